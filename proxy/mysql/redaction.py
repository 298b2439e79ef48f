"""Where a MySQL client's commands carry secrets (the core's input redaction: proxy/core/redaction.py).

* Always: account passwords — `CREATE/ALTER USER … IDENTIFIED BY '…'` (also
  `IDENTIFIED WITH plugin BY/AS '…'`, `IDENTIFIED VIA plugin USING '…'`),
  `SET PASSWORD [FOR u] = '…'`, `GRANT … IDENTIFIED BY '…'`, a literal after
  any `…PASSWORD` word (`MASTER_PASSWORD = '…'`, `CREATE SERVER … OPTIONS
  (PASSWORD '…')`), the argument of `PASSWORD('…')` / `OLD_PASSWORD('…')`
  — and key literals of the encryption functions (`AES_ENCRYPT(data,
  'key')`, `AES_DECRYPT`, `DES_ENCRYPT/DECRYPT`, `ENCODE/DECODE`). A `?` in
  a key or password position marks that parameter of the prepared statement,
  so the COM_STMT_EXECUTE (and any COM_STMT_SEND_LONG_DATA) that fills it is
  redacted too.
* Where the policy has `[[mask]]`s: literals in COM_QUERY / COM_STMT_PREPARE
  text and bound parameters in which the masks' detectors find something.

Statements are read with a small lexer of MySQL's own rules (quotes with
backslash escapes and doubled quotes, backtick names, `#`/`-- `/`/* */`
comments; executable comments `/*!NNNNN … */` and `/*M! … */` are read as
SQL, since MySQL runs them), but only when a cheap test says they might hold
something: ordinary statements cost one lower-case search.

The redacted record's `data` is rebuilt as a packet of the same command
(an EXECUTE's redacted values sent as strings, with its types), so that the
recorded bytes decode to what the record says.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ingest.protocols.mysql import messages as m
from ingest.protocols.mysql.packets import packet
from proxy.core.redaction import NOT_KEPT, MaskDetectors, marker, remember_clean
from proxy.policy.detectors import Scanner

if TYPE_CHECKING:
    from proxy.core.session import Session

    from .frontend import MysqlFrontEnd

Record = dict[str, Any]

# Function name -> (0-based argument positions that are secrets, the kind recorded).
KEY_ARGUMENTS: dict[str, tuple[frozenset[int], str]] = {
    "aes_encrypt": (frozenset({1}), "key"), "aes_decrypt": (frozenset({1}), "key"),
    "des_encrypt": (frozenset({1}), "key"), "des_decrypt": (frozenset({1}), "key"),
    "encode": (frozenset({1}), "key"), "decode": (frozenset({1}), "key"),
    "password": (frozenset({0}), "password"), "old_password": (frozenset({0}), "password"),
}
_HINTS = ("password", "identified", "_encrypt", "_decrypt", "encode", "decode")
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<exec>/\*M?!\d*)                          # an executable comment: its body is SQL
  | (?P<comment>/\*.*?\*/|\#[^\n]*|--(?:[ \t][^\n]*|$|(?=\n)))
  | (?P<close>\*/)                               # the end of an executable comment
  | (?P<string>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*")
  | (?P<quoted>`(?:[^`]|``)*`)
  | (?P<word>[A-Za-z0-9_$@.]+)
  | (?P<param>\?)
  | (?P<punct>.)
""", re.VERBOSE | re.DOTALL)


class Unparsed(ValueError):
    """The statement does not lex (an unterminated literal...)."""


def tokens(sql: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of each significant token: string, quoted, word, param, punct."""
    out: list[tuple[str, int, int]] = []
    position, size = 0, len(sql)
    while position < size:
        match = _TOKEN.match(sql, position)
        if match is None or match.end() == position:
            raise Unparsed(f"cannot read the statement at offset {position}")
        kind = match.lastgroup or "punct"
        if kind == "punct" and sql[position] in "'\"`":
            raise Unparsed(f"unterminated quote at offset {position}")
        if kind == "comment" and sql.startswith("/*", position) and not sql.endswith("*/", 0, match.end()):
            raise Unparsed("unterminated comment")
        if kind not in ("space", "exec", "comment", "close"):
            out.append((kind, match.start(), match.end()))
        position = match.end()
    return out


@remember_clean
def find_secrets(sql: str, detectors: Scanner | None) -> tuple[str, tuple[str, ...], frozenset[int]]:
    """(sql with secret literals replaced by markers, kinds found, 0-based `?` parameters in secret positions)."""
    return _find(sql, detectors)[:3]


def _find(sql: str, detectors: Scanner | None) -> tuple[str, tuple[str, ...], frozenset[int], tuple[tuple[str, str], ...]]:
    """find_secrets, and each redacted literal as written with its kind."""
    lowered = sql.lower()
    hinted = any(hint in lowered for hint in _HINTS)
    if not hinted and detectors is None:
        return sql, (), frozenset(), ()
    try:
        found = tokens(sql)
    except Unparsed:
        return (marker("unparsed"), ("unparsed",), frozenset(), ()) if hinted else (sql, (), frozenset(), ())
    spans: list[tuple[int, int, str]] = []
    secret_params: set[int] = set()
    calls: list[list[Any]] = []  # open calls of key functions: [name, depth, argument index]
    depth = params = 0
    identified = set_password = after_equals = False
    words: list[str] = []  # the statement's significant tokens so far, lower-cased (strings as "'")
    for kind, start, end in found:
        text = sql[start:end]
        word = text.lower() if kind == "word" else ("'" if kind == "string" else text)
        if kind == "punct":
            if text == "(":
                depth += 1
                if words and words[-1] in KEY_ARGUMENTS:
                    calls.append([words[-1], depth, 0])
            elif text == ")":
                if calls and calls[-1][1] == depth:
                    calls.pop()
                depth -= 1
            elif text == "," and calls and calls[-1][1] == depth:
                calls[-1][2] += 1
            elif text == ";":
                identified = set_password = after_equals = False
                words = []
                continue
            elif text == "=" and set_password:
                after_equals = True
        elif kind == "word":
            if word == "identified":
                identified = True
            if len(words) == 1 and words[0] == "set" and word == "password":
                set_password = True
        in_key = bool(calls) and calls[-1][1] == depth and calls[-1][2] in KEY_ARGUMENTS[calls[-1][0]][0]
        secret = None
        if kind in ("string", "param"):
            previous = words[-1] if words else ""
            before = words[-2] if len(words) > 1 else ""
            if in_key:
                secret = KEY_ARGUMENTS[calls[-1][0]][1]
            elif identified and previous in ("by", "as", "using"):
                secret = "password"
            elif previous.endswith("password") or (previous == "=" and before.endswith("password")):
                secret = "password"
            elif set_password and after_equals and not calls:
                secret, after_equals = "password", False
        if kind == "param":
            if secret is not None:
                secret_params.add(params)
            params += 1
        elif kind == "string":
            if secret is not None:
                spans.append((start, end, secret))
            elif detectors is not None:
                _, findings = detectors.mask(text[1:-1])
                if findings:
                    spans.append((start, end, findings[0].kind))
        words.append(word)
    if not spans:
        return sql, (), frozenset(secret_params), ()
    pieces, cursor = [], 0
    for start, end, kind in spans:
        pieces += [sql[cursor:start], f"'{marker(kind)}'"]
        cursor = end
    pieces.append(sql[cursor:])
    return ("".join(pieces), tuple(kind for _, _, kind in spans), frozenset(secret_params),
            tuple((sql[start:end], kind) for start, end, kind in spans))


class MysqlRedactor:
    """One session's redactor: passwords and keys always, detector findings where the policy masks."""

    def __init__(self, session: "Session", front: "MysqlFrontEnd") -> None:
        self.session = session
        self.front = front
        self._shown: dict[str, tuple[str, tuple[str, ...], frozenset[int], tuple[tuple[str, str], ...]]] = {}
        # What the target may echo back (an unaliased expression's column name, an error's "near '…'"): the
        # redacted literals and values of the session's recent commands, and what the evidence shows instead.
        self.echoes: deque[tuple[bytes, bytes]] = deque(maxlen=64)
        self._masks = MaskDetectors(session)
        self._generation = 0

    def _detectors(self) -> Scanner | None:
        scanner = self._masks.scanner()
        if self._masks.generation != self._generation:  # a reloaded policy: what was worked out is stale
            self._generation = self._masks.generation
            self._shown.clear()
        return scanner

    def _secrets(self, sql: str) -> tuple[str, tuple[str, ...], frozenset[int], tuple[tuple[str, str], ...]]:
        detectors = self._detectors()
        known = self._shown.get(sql)
        if known is None:
            known = _find(sql, detectors)
            for literal, kind in known[3]:
                self._echo(literal, f"'{marker(kind)}'")
                self._echo(literal[1:-1], marker(kind))
            if len(self._shown) > 1024:
                self._shown.clear()
            self._shown[sql] = known
        return known

    def _echo(self, value: str, shown: str) -> None:
        if len(value) >= 4 and (value.encode(), shown.encode()) not in self.echoes:
            self.echoes.append((value.encode(), shown.encode()))

    def echoed(self, records: list[Record], seal: Callable[[bytes], bytes] | None) -> None:
        """The target's column definitions and errors that repeat a redacted secret: redacted too, in place."""
        if not self.echoes:
            return
        for index, record in enumerate(records):
            kind = record["type"]
            if kind not in ("ColumnDefinition", "ERR", "ParameterDefinition"):
                continue
            data = bytes(record["data"])
            if not any(needle in data for needle, _ in self.echoes):
                continue
            payload = data[4:]
            if kind == "ERR":
                error = m.decode_err(payload)
                message = self._replace(error.message.encode()).decode("utf-8", "replace")
                rebuilt = m.err(error.code, error.sqlstate, message)
                fields: Record = {"error_message": message}
            else:
                rebuilt = self._column(payload)
                column = m.decode_column(rebuilt)
                fields = {"attributes": {**(record.get("attributes") or {}), "name": column.name}}
                if "org_name" in fields["attributes"]:
                    fields["attributes"]["org_name"] = column.org_name
            out = {**record, **fields, "data": packet(data[3], rebuilt)}
            attributes = dict(out.get("attributes") or {})
            attributes["redacted"] = "echo"
            if record.get("sealed_original") is None:
                out["sealed_original"] = seal(data) if seal is not None else None
                if seal is None:
                    attributes["original"] = NOT_KEPT
            out["attributes"] = attributes
            records[index] = out

    def _replace(self, value: bytes) -> bytes:
        for needle, shown in self.echoes:
            if needle in value:
                value = value.replace(needle, shown)
        return value

    def _column(self, payload: bytes) -> bytes:
        r = m.Reader(payload, "column definition")
        parts = [m.lenenc_bytes(self._replace(r.lenenc_bytes() or b"")) for _ in range(6)]
        return b"".join(parts) + payload[r.pos:]

    def shown(self, sql: str) -> str:
        """The statement as the evidence may hold it (for the server's PrepareOK record, which repeats it)."""
        return self._secrets(sql)[0]

    def redact(self, record: Record) -> tuple[Record, tuple[str, ...]] | None:
        kind = record["type"]
        if kind in ("COM_QUERY", "COM_STMT_PREPARE"):
            return self._statement(record)
        if kind == "COM_STMT_EXECUTE":
            return self._execute(record)
        if kind == "COM_STMT_SEND_LONG_DATA":
            return self._long_data(record)
        return None

    def _statement(self, record: Record) -> tuple[Record, tuple[str, ...]] | None:
        sql = record.get("statement")
        if sql is None:
            return None
        redacted, kinds, _, _ = self._secrets(sql)
        if not kinds:
            return None
        code = bytes(record["data"])[4:5]
        out = {**record, "statement": redacted, "data": packet(0, code + redacted.encode()),
               "attributes": dict(record.get("attributes") or {})}
        if "text" in record:
            out["text"] = redacted
        return out, kinds

    def _statement_of(self, record: Record):
        conversation = self.front.conversation
        if conversation is None:
            return None
        try:
            return conversation.statements.get(int((record.get("attributes") or {}).get("statement_id", "")))
        except ValueError:
            return None

    def _execute(self, record: Record) -> tuple[Record, tuple[str, ...]] | None:
        sql = record.get("statement")
        statement = self._statement_of(record)
        if sql is None or statement is None:
            return None
        redacted_sql, sql_kinds, secret_params, _ = self._secrets(sql)
        parameters = record.get("parameters") or []
        detectors = self._detectors()
        shown, kinds = list(parameters), list(sql_kinds)
        for index, value in enumerate(parameters):
            if value is None:
                continue
            kind = "key" if index in secret_params else None
            if kind is not None:
                kind = _param_kind(sql, index)
            elif detectors is not None:
                _, findings = detectors.mask(value)
                kind = findings[0].kind if findings else None
            if kind is not None:
                shown[index] = marker(kind)
                kinds.append(kind)
                self._echo(value, marker(kind))
        if not kinds:
            return None
        payload = bytes(record["data"])[4:]
        data = record["data"]
        if shown != parameters:
            execute = m.decode_execute(payload, statement.params, statement.types, frozenset(statement.long_data))
            data = packet(0, _execute_payload(execute, shown, parameters))
        out = {**record, "statement": redacted_sql, "parameters": shown, "data": data,
               "attributes": dict(record.get("attributes") or {})}
        if "text" in record:
            out["text"] = redacted_sql
        return out, tuple(kinds)

    def _long_data(self, record: Record) -> tuple[Record, tuple[str, ...]] | None:
        statement = self._statement_of(record)
        if statement is None:
            return None
        payload = bytes(record["data"])[4:]
        statement_id, index, data = m.decode_long_data(payload)
        secret_params = self._secrets(statement.sql)[2]
        kind = _param_kind(statement.sql, index) if index in secret_params else None
        if kind is None:
            detectors = self._detectors()
            if detectors is None:
                return None
            _, findings = detectors.mask(data.decode("utf-8", "replace"))
            if not findings:
                return None
            kind = findings[0].kind
        rebuilt = payload[:7] + marker(kind).encode()
        return {**record, "data": packet(record["data"][3], rebuilt),
                "attributes": dict(record.get("attributes") or {})}, (kind,)


def _param_kind(sql: str, index: int) -> str:
    """password or key: what the `?` number `index` of `sql` stands for."""
    count = 0
    try:
        found = tokens(sql)
    except Unparsed:
        return "key"
    calls: list[str] = []
    for position, (kind, start, end) in enumerate(found):
        text = sql[start:end].lower()
        if kind == "word" and text in KEY_ARGUMENTS and position + 1 < len(found) and sql[found[position + 1][1]] == "(":
            calls.append(KEY_ARGUMENTS[text][1])
        if kind == "param":
            if count == index:
                return calls[-1] if calls else "password"
            count += 1
    return "key"


def _execute_payload(execute: m.Execute, shown: list[str | None], original: list[str | None]) -> bytes:
    """COM_STMT_EXECUTE with the redacted parameters sent as strings (types re-sent)."""
    n = len(execute.types)
    nulls = bytearray((n + 7) // 8)
    types, values = [], []
    for index, ((kind, unsigned), value) in enumerate(zip(execute.types, execute.values)):
        if shown[index] != original[index]:
            types.append(bytes((253, 0)))
            values.append(m.lenenc_bytes((shown[index] or "").encode()))
        elif value is None and shown[index] is None:
            nulls[index >> 3] |= 1 << (index & 7)
            types.append(bytes((kind, 0x80 if unsigned else 0)))
        elif value is None:  # sent as long data: kept as a string here
            types.append(bytes((253, 0)))
            values.append(m.lenenc_bytes((shown[index] or "").encode()))
        else:
            types.append(bytes((kind, 0x80 if unsigned else 0)))
            values.append(value)
    head = b"\x17" + execute.statement_id.to_bytes(4, "little") + bytes((execute.flags,)) + (1).to_bytes(4, "little")
    return head + bytes(nulls) + b"\x01" + b"".join(types) + b"".join(values)
