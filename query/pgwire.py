"""The few PostgreSQL server messages a replay shows, read from their recorded wire bytes.

Replay must show rows exactly as the client saw them, so it reads the relayed
(masked, when masked) bytes of RowDescription and DataRow; errors and notices
need only the fields the recorder already decoded. This is deliberately not a
protocol implementation (that lives in `proxy/postgres`, which `query` must
not import): it trusts that the bytes framed once already, and reads values
as UTF-8 text with replacement, as a reader would.

The encoders are the inverse, for the demo data of `query.sample`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

_HEADER = 5  # type byte + Int32 length
_INT16 = struct.Struct(">H")
_INT32 = struct.Struct(">i")
_FIELD_TAIL = 18  # table oid, column number, type oid, type size, type modifier, format code


class WireError(ValueError):
    """Recorded bytes that are not the message they claim to be."""


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def row_description_names(data: bytes) -> list[str]:
    """Column names of a RowDescription message (whole wire bytes)."""
    try:
        (count,) = _INT16.unpack_from(data, _HEADER)
        names, at = [], _HEADER + 2
        for _ in range(count):
            end = data.index(b"\0", at)
            names.append(_text(data[at:end]))
            at = end + 1 + _FIELD_TAIL
    except (struct.error, ValueError) as exc:
        raise WireError(f"not a RowDescription: {exc}") from None
    return names


def split_messages(data: bytes) -> list[bytes]:
    """The messages of a recorded run (the proxy folds consecutive DataRows of one read into one record)."""
    messages, at = [], 0
    while at < len(data):
        if at + _HEADER > len(data):
            raise WireError(f"truncated message header at byte {at}")
        (length,) = _INT32.unpack_from(data, at + 1)
        end = at + 1 + length
        if length < 4 or end > len(data):
            raise WireError(f"message at byte {at} claims {length} bytes, {len(data) - at - 1} remain")
        messages.append(data[at:end])
        at = end
    return messages


def data_row_values(data: bytes) -> list[str | None]:
    """Values of a DataRow message (whole wire bytes) as text; NULL is None."""
    try:
        (count,) = _INT16.unpack_from(data, _HEADER)
        values: list[str | None] = []
        at = _HEADER + 2
        for _ in range(count):
            (length,) = _INT32.unpack_from(data, at)
            at += 4
            if length < 0:
                values.append(None)
                continue
            if at + length > len(data):
                raise ValueError("value runs past the message")
            values.append(_text(data[at:at + length]))
            at += length
    except (struct.error, ValueError) as exc:
        raise WireError(f"not a DataRow: {exc}") from None
    return values


# --- encoders, for demo data -------------------------------------------------------------------


def _frame(type_byte: bytes, payload: bytes) -> bytes:
    return type_byte + _INT32.pack(len(payload) + 4) + payload


def _cstring(text: str) -> bytes:
    return text.encode() + b"\0"


def query(sql: str) -> bytes:
    return _frame(b"Q", _cstring(sql))


def parse(sql: str, name: str = "") -> bytes:
    return _frame(b"P", _cstring(name) + _cstring(sql) + _INT16.pack(0))


def _values(values: Sequence[str | None]) -> bytes:
    """Int16 count, then each value as Int32 length (-1 for NULL) and bytes: Bind and DataRow share it."""
    encoded = [None if v is None else v.encode() for v in values]
    return _INT16.pack(len(values)) + b"".join(_INT32.pack(-1) if v is None else _INT32.pack(len(v)) + v
                                               for v in encoded)


def bind(parameters: Sequence[str | None], statement: str = "", portal: str = "") -> bytes:
    return _frame(b"B", _cstring(portal) + _cstring(statement) + _INT16.pack(0) + _values(parameters) + _INT16.pack(0))


def execute(portal: str = "") -> bytes:
    return _frame(b"E", _cstring(portal) + _INT32.pack(0))


def sync() -> bytes:
    return _frame(b"S", b"")


TEXT_OID = 25


def row_description(names: Sequence[str]) -> bytes:
    fields = b"".join(_cstring(n) + struct.pack(">IhIhih", 0, 0, TEXT_OID, -1, -1, 0) for n in names)
    return _frame(b"T", _INT16.pack(len(names)) + fields)


def data_row(values: Sequence[str | None]) -> bytes:
    return _frame(b"D", _values(values))


def command_complete(tag: str) -> bytes:
    return _frame(b"C", _cstring(tag))


def ready_for_query(status: str = "I") -> bytes:
    return _frame(b"Z", status.encode())


def _diagnostic(type_byte: bytes, fields: dict[str, str]) -> bytes:
    return _frame(type_byte, b"".join(code.encode() + _cstring(v) for code, v in fields.items()) + b"\0")


def error_response(code: str, message: str, severity: str = "ERROR") -> bytes:
    return _diagnostic(b"E", {"S": severity, "V": severity, "C": code, "M": message})


def notice_response(code: str, message: str, severity: str = "NOTICE") -> bytes:
    return _diagnostic(b"N", {"S": severity, "V": severity, "C": code, "M": message})
