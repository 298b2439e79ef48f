"""Applying a mask plan to what PostgreSQL sends back, and sealing what was hidden.

Pure functions over values: the proxy decodes RowDescription / DataRow /
CopyData / NoticeResponse / ErrorResponse, hands the values here, and encodes
what comes back (so DataRow lengths are recomputed from the masked values).
Values are taken as UTF-8 text (the proxy pins client_encoding); bytes that
are not UTF-8 survive unchanged through `surrogateescape`.

The client only ever sees masked values. The originals travel in the evidence
only sealed to the evidence custodian's public key (the session's
`ingest.sealing.Sealer`), so analysts see what the client saw and only the
custodian can reveal more.

Nothing here keeps state between calls, and what it shares (Scanners, compiled
patterns, tables) is immutable: a RowMasker or MaskPlan may be used from any
thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Generic, TypeVar

from .detectors import Scanner, scanner_for

__all__ = [
    "COLUMN_PLACEHOLDER",
    "HIDE_BINARY",
    "HIDE_TEXT",
    "PASS",
    "SCAN",
    "MaskPlan",
    "Masked",
    "RowMasker",
    "mask_fields",
]

COLUMN_PLACEHOLDER = b"[MASKED:column]"
TEXT_FORMAT, BINARY_FORMAT = 0, 1
# What RowMasker does with a column's values (`RowMasker.actions`): scan them with the detectors, pass
# them (binary), hide them whole as COLUMN_PLACEHOLDER (text) or as NULL (binary).
SCAN, PASS, HIDE_TEXT, HIDE_BINARY = range(4)
_STRUCTURAL_FIELDS = frozenset("SVCPpFLR")  # severity, code, position, source file/line/routine: never data

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class MaskPlan:
    """What to hide from one identity on one target: detectors, column-name patterns, and the [[mask]] rules behind them."""

    detectors: frozenset[str]
    columns: tuple[str, ...]
    rules: tuple[str, ...]

    @property
    def scanner(self) -> Scanner:
        return scanner_for(self.detectors)

    def masks_column(self, name: str) -> bool:
        """Column patterns are matched case-insensitively (`*ssn*` hides `SSN` and `customer_ssn`)."""
        lowered = name.lower()
        return any(fnmatchcase(lowered, pattern) for pattern in self.columns)


@dataclass(frozen=True, slots=True)
class Masked(Generic[T]):
    """A masked value and what was found in it: (column index or field code, detector kind or "column")."""

    value: T
    findings: tuple[tuple[int | str, str], ...]

    @property
    def changed(self) -> bool:
        return bool(self.findings)


def _format_of(formats: Sequence[int], index: int) -> int:
    """Protocol rule: no format codes = all text, one = all columns, otherwise one per column."""
    if not formats:
        return TEXT_FORMAT
    return formats[0] if len(formats) == 1 else formats[index]


class RowMasker:
    """A plan bound to one result's columns (one RowDescription, or one COPY's column list).

    Column-name rules are resolved once here, not per row. A column whose
    name matches hides its whole value: `[MASKED:column]` in text format; in
    binary format a NULL, because any other bytes would not decode as the
    column's type on the client. Binary values of other columns are left
    untouched: detectors read text, and guessing at binary encodings would
    corrupt values without hiding anything reliably.
    """

    def __init__(self, plan: MaskPlan, column_names: Sequence[str] = (), formats: Sequence[int] = ()):
        self.scanner = plan.scanner
        self.columns = tuple(
            (plan.masks_column(name), _format_of(formats, index) == BINARY_FORMAT)
            for index, name in enumerate(column_names)
        )
        # What to do with each column's values, decided once: scan, hide whole, or pass (binary).
        self._actions = tuple(
            (HIDE_BINARY if binary else HIDE_TEXT) if whole else (PASS if binary else SCAN)
            for whole, binary in self.columns
        )
        self.actions = self._actions  # public, for a protocol's own walk over its row format (PostgreSQL DataRow)
        self._known = len(self._actions)
        self._scanned = tuple(index for index, action in enumerate(self._actions) if action == SCAN)
        self._hidden = tuple(index for index, action in enumerate(self._actions) if action in (HIDE_TEXT, HIDE_BINARY))
        self._hidden_as = {index: None if self._actions[index] == HIDE_BINARY else COLUMN_PLACEHOLDER
                           for index in self._hidden}
        self._shortest = self.shortest = self.scanner.shortest  # a shorter value holds no finding
        self._masked_or_none = self.masked_or_none = self.scanner.masked_or_none  # one scanned value, None: unchanged

    def _mask_value(self, index: int, value: bytes) -> tuple[bytes | None, tuple[str, ...]]:
        action = self._actions[index] if index < len(self._actions) else SCAN
        if action == SCAN:
            return self.scanner.mask_bytes(value)
        if action == PASS:
            return value, ()
        return (None if action == HIDE_BINARY else COLUMN_PLACEHOLDER), ("column",)

    def mask_row(self, values: Sequence[bytes | None]) -> Masked[list[bytes | None]]:
        """One DataRow's values (None = SQL NULL) with findings hidden; encode the result as a new DataRow."""
        out: list[bytes | None] = []
        findings: list[tuple[int | str, str]] = []
        for index, value in enumerate(values):
            if value is None:
                out.append(None)
                continue
            masked, kinds = self._mask_value(index, value)
            out.append(masked)
            findings.extend((index, kind) for kind in kinds)
        return Masked(out, tuple(findings))

    def mask_values(self, values: Sequence[bytes | None]) -> list[bytes | None] | None:
        """`mask_row(values).value` without the findings, or None when nothing changed (the hot path).

        The caller keeps an unchanged row's bytes as they are; values that
        masking leaves alone are the caller's own objects.
        """
        out = list(values)
        return out if self.mask_in_place(out) else None

    def mask_in_place(self, values: list[bytes | None]) -> bool:
        """`mask_values` on a list the caller owns, replaced value by value; whether anything changed."""
        if len(values) != self._known:
            return self._mask_in_place_any(values)
        changed = False
        for index in self._hidden:
            if values[index] is not None:
                values[index] = self._hidden_as[index]
                changed = True
        shortest, masked_or_none = self._shortest, self._masked_or_none
        for index in self._scanned:
            value = values[index]
            if value is not None and len(value) >= shortest:
                masked = masked_or_none(value)
                if masked is not None:
                    values[index] = masked
                    changed = True
        return changed

    def _mask_each(self, values: list[bytes | None], scanned: list[int]) -> bool:
        changed = False
        for index in scanned:
            masked = self._masked_or_none(values[index])
            if masked is not None:
                values[index] = masked
                changed = True
        return changed

    def _mask_in_place_any(self, values: list[bytes | None]) -> bool:
        """`mask_in_place` for a row of another length than the columns (values past them are scanned)."""
        actions, known, shortest = self._actions, self._known, self._shortest
        changed = False
        scanned = []
        for index, value in enumerate(values):
            if value is None:
                continue
            action = actions[index] if index < known else SCAN
            if action == SCAN:
                if len(value) >= shortest:
                    scanned.append(index)
            elif action != PASS:
                values[index] = None if action == HIDE_BINARY else COLUMN_PLACEHOLDER
                changed = True
        return self._mask_each(values, scanned) or changed

    def mask_copy_row(self, line: bytes) -> Masked[bytes]:
        """One COPY text-format row (tab-separated, `\\N` for NULL, backslash escapes, trailing newline).

        Each field is unescaped, masked and re-escaped, so an escaped tab or
        newline inside a value neither hides a finding nor breaks the row.
        CSV and binary COPY are not rows of this shape; the caller masks CSV
        lines as free text (`scanner.mask`) and leaves binary COPY alone.
        """
        body, newline = (line[:-1], line[-1:]) if line.endswith(b"\n") else (line, b"")
        fields = [None if raw == b"\\N" else _copy_unescape(raw) for raw in body.split(b"\t")]
        masked = self.mask_row(fields)
        if not masked.changed:
            return Masked(line, ())
        encoded = b"\t".join(b"\\N" if value is None else _copy_escape(value) for value in masked.value)
        return Masked(encoded + newline, masked.findings)


_COPY_UNESCAPES = {ord("b"): b"\b", ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("v"): b"\v"}
_COPY_ESCAPES = {b"\\"[0]: b"\\\\", b"\n"[0]: b"\\n", b"\r"[0]: b"\\r", b"\t"[0]: b"\\t"}


def _copy_unescape(raw: bytes) -> bytes:
    r"""COPY text format: \b \f \n \r \t \v, \digits (octal, up to 3), \xHH (hex, up to 2), else the next byte itself."""
    if b"\\" not in raw:
        return raw
    out, i = bytearray(), 0
    while i < len(raw):
        byte = raw[i]
        if byte != 0x5C or i + 1 == len(raw):
            out.append(byte)
            i += 1
            continue
        nxt = raw[i + 1]
        if nxt in _COPY_UNESCAPES:
            out += _COPY_UNESCAPES[nxt]
            i += 2
        elif 0x30 <= nxt <= 0x37:
            digits = _run(raw, i + 1, b"01234567", 3)
            out.append(int(digits, 8) & 0xFF)
            i += 1 + len(digits)
        elif nxt == 0x78 and (digits := _run(raw, i + 2, b"0123456789abcdefABCDEF", 2)):
            out.append(int(digits, 16))
            i += 2 + len(digits)
        else:
            out.append(nxt)
            i += 2
    return bytes(out)


def _run(raw: bytes, start: int, allowed: bytes, limit: int) -> bytes:
    end = start
    while end < len(raw) and end - start < limit and raw[end] in allowed:
        end += 1
    return raw[start:end]


def _copy_escape(value: bytes) -> bytes:
    """The escapes PostgreSQL itself writes for backslash, newline, carriage return and tab."""
    if not any(byte in _COPY_ESCAPES for byte in value):
        return value
    return b"".join(_COPY_ESCAPES.get(byte, bytes((byte,))) for byte in value)


def mask_fields(plan: MaskPlan, fields: Mapping[str, str]) -> Masked[dict[str, str]]:
    """NoticeResponse / ErrorResponse fields, keyed by their one-letter code.

    Message, detail, hint, context and internal query echo data (`Key
    (email)=(a@b.example) already exists`); severity, code, position and the
    server's source location do not, and are passed through.
    """
    scanner = plan.scanner
    out: dict[str, str] = {}
    findings: list[tuple[int | str, str]] = []
    for code, text in fields.items():
        if code in _STRUCTURAL_FIELDS:
            out[code] = text
            continue
        out[code], found = scanner.mask(text)
        findings.extend((code, f.kind) for f in found)
    return Masked(out, tuple(findings))
