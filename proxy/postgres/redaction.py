"""Where a PostgreSQL client's messages carry secrets (the core's input redaction: proxy/core/redaction.py).

* Always: the password literal of a role statement (`CREATE ROLE/USER …
  PASSWORD '…'`, `ALTER ROLE/USER … [ENCRYPTED] PASSWORD '…'`, psql's
  `\\password` sends one), and key literals passed to key-taking functions
  (pgcrypto's `pgp_sym_encrypt(data, 'key')`, `encrypt(data, 'key', …)`,
  `hmac(…, 'key', …)`…). A `$n` in a key position marks that parameter of
  the statement, so the Bind that fills it is redacted too.
* Where the policy has `[[mask]]`s: literals in Query/Parse text and Bind
  parameters in which the masks' detectors find something (card numbers,
  private keys, tokens…). Any mask's detectors count, whoever it applies to:
  the evidence is read by analysts, not by the caller.

Statements are read with PostgreSQL's own lexer (pglast.parser.scan), but
only when a cheap test says they might hold something: ordinary statements
cost one lower-case search.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pglast.parser import scan

from ingest.protocols.postgres import messages as m
from proxy.core.redaction import MaskDetectors, marker, remember_clean
from proxy.policy.detectors import Scanner

if TYPE_CHECKING:
    from proxy.core.session import Session

Record = dict[str, Any]

# Function name -> the 0-based argument positions that are keys or passwords.
KEY_ARGUMENTS: dict[str, frozenset[int]] = {
    "pgp_sym_encrypt": frozenset({1}), "pgp_sym_encrypt_bytea": frozenset({1}),
    "pgp_sym_decrypt": frozenset({1}), "pgp_sym_decrypt_bytea": frozenset({1}),
    "pgp_pub_decrypt": frozenset({1, 2}), "pgp_pub_decrypt_bytea": frozenset({1, 2}),
    "encrypt": frozenset({1}), "decrypt": frozenset({1}), "encrypt_iv": frozenset({1}), "decrypt_iv": frozenset({1}),
    "hmac": frozenset({1}),
}
_HINTS = ("password", *KEY_ARGUMENTS)
_LITERALS = frozenset({"SCONST", "FCONST", "ICONST", "XCONST", "BCONST", "USCONST"})
# A number of up to 12 digits is a plain value the detectors never report (proxy.policy.detectors._PLAIN_VALUE);
# a longer one (a card number written as a number) may be a finding wherever it stands.
_LONG_NUMBER = re.compile(r"(?:\d[.eE+-]?){13}")


def literal_scope(sql: str) -> str:
    """The part of `sql` that holds every literal a detector could report: from its first quote (' or $) to its
    last, or all of it where a number too long to be a plain value stands. Empty: no such literal.

    Only literals are redacted, each with its own neighbours, which inside this span are what they are in the
    whole text; so the detectors' gate on the span is as sound as on the whole text. What it saves: pgbench's
    `UPDATE … SET abalance = abalance + -4123 WHERE aid = 734521` has no quote and no long number, where the
    whole text's dash and digits woke the SSN, phone and IBAN patterns (~10 µs a statement)."""
    if _LONG_NUMBER.search(sql):
        return sql
    quotes = [i for i in (sql.find("'"), sql.find("$")) if i >= 0]
    if not quotes:
        return ""
    return sql[min(quotes):max(sql.rfind("'"), sql.rfind("$")) + 1]


class _Found:
    __slots__ = ("spans", "kinds", "key_params")

    def __init__(self) -> None:
        self.spans: list[tuple[int, int, str]] = []  # start, end (exclusive), kind
        self.kinds: list[str] = []
        self.key_params: set[int] = set()  # 1-based $n in key positions

    def add(self, start: int, end: int, kind: str) -> None:
        self.spans.append((start, end, kind))
        self.kinds.append(kind)


@remember_clean
def find_secrets(sql: str, detectors: Scanner | None) -> tuple[str, tuple[str, ...], frozenset[int]]:
    """(sql with secret literals replaced by markers, kinds found, 1-based key parameter numbers)."""
    lowered = sql.lower()
    hinted = any(hint in lowered for hint in _HINTS)
    if not hinted and (detectors is None or detectors.masked_or_none(literal_scope(sql).encode()) is None):
        # A literal's finding is a finding in any text around it (the detectors' gates only grow with the text
        # and a literal's neighbours are quotes), so a scope without one needs no lexing: most statements.
        return sql, (), frozenset()
    raw = sql  # the lexer's offsets count characters
    try:
        tokens = scan(sql)
    except Exception:  # noqa: BLE001 - the lexer refused it (e.g. an unterminated literal): hide it all if hinted
        return (marker("unparsed"), ("unparsed",), frozenset()) if hinted else (sql, (), frozenset())
    found = _Found()
    calls: list[list[Any]] = []  # open calls of key functions: [name, depth, argument index]
    depth = 0
    previous: list[str] = []
    for token in tokens:
        name, start, end = token.name, token.start, token.end + 1
        if name == "ASCII_40":  # (
            depth += 1
            if len(previous) >= 1 and previous[-1] in KEY_ARGUMENTS:
                calls.append([previous[-1], depth, 0])
        elif name == "ASCII_41":  # )
            if calls and calls[-1][1] == depth:
                calls.pop()
            depth -= 1
        elif name == "ASCII_44" and calls and calls[-1][1] == depth:  # , of a key function's arguments
            calls[-1][2] += 1
        in_key = bool(calls) and calls[-1][1] == depth and calls[-1][2] in KEY_ARGUMENTS[calls[-1][0]]
        if name in _LITERALS:
            if previous[-1:] in (["PASSWORD"], ["password"]) and name in ("SCONST", "USCONST"):
                found.add(start, end, "password")
            elif in_key:
                found.add(start, end, "key")
            elif detectors is not None:
                _, findings = detectors.mask(raw[start:end])
                if findings:
                    found.add(start, end, findings[0].kind)
        elif name == "PARAM" and in_key:
            found.key_params.add(int(raw[start + 1:end]))
        previous.append(name if name != "IDENT" else raw[start:end].lower())
    if not found.spans:
        return sql, (), frozenset(found.key_params)
    pieces, cursor = [], 0
    for start, end, kind in found.spans:
        pieces += [raw[cursor:start], f"'{marker(kind)}'"]
        cursor = end
    pieces.append(raw[cursor:])
    return "".join(pieces), tuple(found.kinds), frozenset(found.key_params)


class PostgresRedactor:
    """One session's redactor: role passwords and keys always, detector findings where the policy masks."""

    def __init__(self, session: "Session") -> None:
        self.session = session
        self._key_params: dict[str, frozenset[int]] = {}  # statement name -> key parameter numbers
        self._detectors = MaskDetectors(session).scanner


    def redact(self, record: Record) -> tuple[Record, tuple[str, ...]] | None:
        kind = record["type"]
        if kind == "Query" or kind == "Parse":
            return self._statement(record)
        if kind == "Bind":
            return self._bind(record)
        return None

    def _statement(self, record: Record) -> tuple[Record, tuple[str, ...]] | None:
        sql = record.get("statement")
        if sql is None:
            return None
        redacted, kinds, key_params = find_secrets(sql, self._detectors())
        if record["type"] == "Parse":
            name = (record.get("attributes") or {}).get("statement_name") or ""
            if key_params:
                self._key_params[name] = key_params
            else:
                self._key_params.pop(name, None)
        if not kinds:
            return None
        if record["type"] == "Query":
            data = m.query(redacted)
        else:
            parse = m.decode_parse(bytes(record["data"])[5:])
            data = m.parse(parse.name, redacted, parse.parameter_type_oids)
        out = {**record, "statement": redacted, "data": data, "attributes": dict(record.get("attributes") or {})}
        if "text" in record:
            out["text"] = redacted
        return out, kinds

    def _bind(self, record: Record) -> tuple[Record, tuple[str, ...]] | None:
        parameters = record.get("parameters")
        if not parameters:
            return None
        bind = m.decode_bind(bytes(record["data"])[5:])
        keys = self._key_params.get(bind.statement, frozenset())
        detectors = self._detectors()
        if not keys and detectors is None:
            return None
        shown, values, kinds = list(parameters), _values(bytes(record["data"])[5:]), []
        for index, value in enumerate(parameters):
            if value is None:
                continue
            kind = "key" if index + 1 in keys else None
            if kind is None and detectors is not None:
                _, findings = detectors.mask(value)
                kind = findings[0].kind if findings else None
            if kind is not None:
                shown[index] = marker(kind)
                values[index] = marker(kind).encode()
                kinds.append(kind)
        if not kinds:
            return None
        formats: list[int] = []  # the markers are text; other binary parameters stay binary
        if any(bind.parameter_formats):
            formats = [_format(bind.parameter_formats, i) if shown[i] == parameters[i] else 0
                       for i in range(len(parameters))]
        data = m.bind(values, bind.statement, bind.portal, formats, bind.result_formats)
        return {**record, "parameters": shown, "data": data,
                "attributes": dict(record.get("attributes") or {})}, tuple(kinds)


def _format(formats: tuple[int, ...], index: int) -> int:
    if not formats:
        return 0
    return formats[0] if len(formats) == 1 else formats[index]


def _values(payload: bytes) -> list[bytes | None]:
    """A Bind's parameter values as bytes, as sent."""
    view = memoryview(payload)
    offset = payload.index(b"\0") + 1
    offset = payload.index(b"\0", offset) + 1
    count = int.from_bytes(view[offset:offset + 2], "big")
    offset += 2 + 2 * count
    n = int.from_bytes(view[offset:offset + 2], "big")
    offset += 2
    out: list[bytes | None] = []
    for _ in range(n):
        length = int.from_bytes(view[offset:offset + 4], "big", signed=True)
        offset += 4
        if length < 0:
            out.append(None)
        else:
            out.append(bytes(view[offset:offset + length]))
            offset += length
    return out

