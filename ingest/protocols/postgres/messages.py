"""Message bodies: pure decoders into small dataclasses, and the encoders the
proxy needs to speak for itself (its own errors, its own authentication, its
own upstream session) or to rewrite what it relays (masked DataRows).

Decoders take a message's payload (`Message.payload`) and raise only
`ProtocolViolation`, since the bytes come from a peer we do not trust.
Encoders return complete wire messages and raise ValueError on arguments the
protocol cannot carry (a NUL inside a string, a count that overflows), since
that is our own bug, not the peer's.

Text is decoded as UTF-8 with replacement: the recorded fields are for
reading; the exact bytes always travel in the Message's `data`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .protocol import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_CANCEL_KEY,
    MIN_CANCEL_KEY,
    PROTOCOL_MAJOR,
    SSL_REQUEST_CODE,
    violation,
)

__all__ = [
    "SSL_ALLOWED",
    "GSSENC_ALLOWED",
    "ENCRYPTION_DENIED",
    "SSL_REQUEST",
    "GSSENC_REQUEST",
    "TERMINATE",
    "StartupMessage",
    "CancelRequest",
    "decode_startup_message",
    "startup_message",
    "decode_cancel_request",
    "cancel_request",
    "Query",
    "Parse",
    "Bind",
    "Execute",
    "StatementOrPortal",
    "Describe",
    "Close",
    "FunctionCall",
    "PasswordMessage",
    "SASLInitialResponse",
    "SASLResponse",
    "CopyFail",
    "decode_query",
    "query",
    "decode_parse",
    "parse",
    "decode_bind",
    "bind",
    "decode_execute",
    "execute",
    "SYNC",
    "decode_describe",
    "decode_close",
    "decode_function_call",
    "decode_password_message",
    "password_message",
    "decode_sasl_initial_response",
    "sasl_initial_response",
    "decode_sasl_response",
    "sasl_response",
    "decode_copy_fail",
    "AuthenticationRequest",
    "decode_authentication",
    "authentication_ok",
    "authentication_cleartext_password",
    "BackendKeyData",
    "decode_backend_key_data",
    "backend_key_data",
    "ParameterStatus",
    "decode_parameter_status",
    "ReadyForQuery",
    "decode_ready_for_query",
    "ready_for_query",
    "CommandComplete",
    "row_count",
    "decode_command_complete",
    "command_complete",
    "FieldDescription",
    "RowDescription",
    "decode_row_description",
    "row_description",
    "TEXT_OID",
    "DataRow",
    "decode_data_row",
    "data_row",
    "Diagnostic",
    "ErrorResponse",
    "NoticeResponse",
    "decode_error_response",
    "decode_notice_response",
    "error_response",
    "notice_response",
    "notification_response",
    "NotificationResponse",
    "decode_notification_response",
    "CopyResponse",
    "decode_copy_response",
    "ParameterDescription",
    "decode_parameter_description",
    "NegotiateProtocolVersion",
    "decode_negotiate_protocol_version",
    "negotiate_protocol_version",
]

_INT16 = struct.Struct(">h")
_UINT16 = struct.Struct(">H")
_INT32 = struct.Struct(">i")
_UINT32 = struct.Struct(">I")
_NULL_LENGTH = _INT32.pack(-1)

# Single-byte answers to SSLRequest / GSSENCRequest; not framed messages.
SSL_ALLOWED = b"S"
GSSENC_ALLOWED = b"G"
ENCRYPTION_DENIED = b"N"

SSL_REQUEST = struct.pack(">iI", 8, SSL_REQUEST_CODE)
GSSENC_REQUEST = struct.pack(">iI", 8, GSSENC_REQUEST_CODE)
TERMINATE = b"X\x00\x00\x00\x04"
SYNC = b"S\x00\x00\x00\x04"


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


class _Cursor:
    """Reads one payload front to back; running short is the peer's fault."""

    __slots__ = ("data", "position", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.position = 0
        self.what = what

    def _advance(self, size: int) -> int:
        start = self.position
        if size < 0 or start + size > len(self.data):
            raise violation(f"{self.what} message is truncated")
        self.position = start + size
        return start

    def int16(self) -> int:
        return _INT16.unpack_from(self.data, self._advance(2))[0]

    def uint16(self) -> int:
        return _UINT16.unpack_from(self.data, self._advance(2))[0]

    def int32(self) -> int:
        return _INT32.unpack_from(self.data, self._advance(4))[0]

    def uint32(self) -> int:
        return _UINT32.unpack_from(self.data, self._advance(4))[0]

    def take(self, size: int) -> bytes:
        start = self._advance(size)
        return self.data[start : start + size]

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.position)

    def cstring(self) -> str:
        """A NUL-terminated string, the protocol's String type."""
        end = self.data.find(b"\x00", self.position)
        if end < 0:
            raise violation(f"{self.what} message has an unterminated string")
        start, self.position = self.position, end + 1
        return _text(self.data[start:end])

    def int16s(self, count: int) -> tuple[int, ...]:
        return tuple(self.int16() for _ in range(count))

    def uint32s(self, count: int) -> tuple[int, ...]:
        return tuple(self.uint32() for _ in range(count))

    def values(self, count: int) -> tuple[bytes | None, ...]:
        """`count` length-prefixed values, length -1 meaning NULL.

        One tight loop rather than a call per value: every DataRow the
        masking layer rewrites comes through here.
        """
        data, position, unpack = self.data, self.position, _INT32.unpack_from
        size = len(data)
        values: list[bytes | None] = []
        for _ in range(count):
            if position + 4 > size:
                raise violation(f"{self.what} message is truncated")
            length = unpack(data, position)[0]
            position += 4
            if length == -1:
                values.append(None)
                continue
            if length < 0 or position + length > size:
                raise violation(f"{self.what} message has invalid value length {length}")
            values.append(data[position : position + length])
            position += length
        self.position = position
        return tuple(values)

    def finish(self) -> None:
        if self.position != len(self.data):
            raise violation(f"{self.what} message has {len(self.data) - self.position} trailing bytes")


def _cstring(text: str) -> bytes:
    raw = text.encode("utf-8")
    if b"\x00" in raw:
        raise ValueError(f"a protocol string cannot contain NUL: {text!r}")
    return raw + b"\x00"


def _frame(type_byte: bytes, payload: bytes) -> bytes:
    return type_byte + _UINT32.pack(len(payload) + 4) + payload


def _values(values: Sequence[bytes | None]) -> bytes:
    """Count, then each value as Int32 length (-1 for NULL) and bytes: Bind and DataRow share it."""
    parts = [_UINT16.pack(len(values))]
    for value in values:
        parts.append(_NULL_LENGTH if value is None else _INT32.pack(len(value)) + value)
    return b"".join(parts)


def _int16s(codes: Sequence[int]) -> bytes:
    return struct.pack(f">H{len(codes)}h", len(codes), *codes)


def _render_value(value: bytes | None, format_code: int) -> str | None:
    """A parameter as the recording shows it: text as is, binary as \\x hex."""
    if value is None:
        return None
    return _text(value) if format_code == 0 else "\\x" + value.hex()


def _render_values(
    values: Sequence[bytes | None], formats: Sequence[int], what: str
) -> tuple[str | None, ...]:
    """Apply Bind-style format codes: none = all text, one = all alike, else one each."""
    if len(formats) not in (0, 1, len(values)):
        raise violation(f"{what} message has {len(formats)} formats but {len(values)} values")
    if len(formats) == len(values):
        return tuple(map(_render_value, values, formats))
    shared = formats[0] if formats else 0
    return tuple(_render_value(value, shared) for value in values)


# --- startup phase ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartupMessage:
    protocol_version: tuple[int, int]
    parameters: dict[str, str]


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret: bytes  # 4 bytes in protocol 3.0, up to 256 from 3.2


def decode_startup_message(payload: bytes) -> StartupMessage:
    cursor = _Cursor(payload, "StartupMessage")
    version = cursor.uint32()
    if not payload.endswith(b"\x00"):
        raise violation("invalid startup packet layout: expected terminator as last byte")
    parameters: dict[str, str] = {}
    while (name := cursor.cstring()) != "":
        parameters[name] = cursor.cstring()
    cursor.finish()
    return StartupMessage((version >> 16, version & 0xFFFF), parameters)


def startup_message(
    parameters: Mapping[str, str], protocol_version: tuple[int, int] = (PROTOCOL_MAJOR, 0)
) -> bytes:
    """The packet the proxy opens its own upstream session with."""
    if "" in parameters:
        raise ValueError("an empty parameter name would end the parameter list")
    major, minor = protocol_version
    body = b"".join(_cstring(name) + _cstring(value) for name, value in parameters.items())
    payload = _UINT32.pack(major << 16 | minor) + body + b"\x00"
    return _INT32.pack(len(payload) + 4) + payload


def decode_cancel_request(payload: bytes) -> CancelRequest:
    cursor = _Cursor(payload, "CancelRequest")
    if cursor.uint32() != CANCEL_REQUEST_CODE:
        raise violation("CancelRequest message has the wrong request code")
    process_id = cursor.int32()
    return CancelRequest(process_id, cursor.rest())


def _check_cancel_key(secret: bytes) -> None:
    if not MIN_CANCEL_KEY <= len(secret) <= MAX_CANCEL_KEY:
        raise ValueError(f"a cancel key is {MIN_CANCEL_KEY} to {MAX_CANCEL_KEY} bytes")


def cancel_request(process_id: int, secret: bytes) -> bytes:
    """Cancels upstream with the real key after mapping the client's proxy key."""
    _check_cancel_key(secret)
    return struct.pack(">iIi", 12 + len(secret), CANCEL_REQUEST_CODE, process_id) + secret


# --- client messages -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    sql: str


@dataclass(frozen=True, slots=True)
class Parse:
    name: str
    sql: str
    parameter_type_oids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Bind:
    portal: str
    statement: str
    parameter_formats: tuple[int, ...]
    parameters: tuple[str | None, ...]
    result_formats: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Execute:
    portal: str
    max_rows: int  # 0 = no limit


@dataclass(frozen=True, slots=True)
class StatementOrPortal:
    """What Describe and Close name: a prepared statement or a portal."""

    kind: str  # "statement" | "portal"
    name: str


class Describe(StatementOrPortal):
    __slots__ = ()


class Close(StatementOrPortal):
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class FunctionCall:
    function_oid: int
    argument_formats: tuple[int, ...]
    arguments: tuple[str | None, ...]
    result_format: int


@dataclass(frozen=True, slots=True)
class PasswordMessage:
    password: str


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:
    mechanism: str
    data: bytes | None


@dataclass(frozen=True, slots=True)
class SASLResponse:
    data: bytes


@dataclass(frozen=True, slots=True)
class CopyFail:
    message: str


def _single_string(payload: bytes, what: str) -> str:
    cursor = _Cursor(payload, what)
    text = cursor.cstring()
    cursor.finish()
    return text


def decode_query(payload: bytes) -> Query:
    return Query(_single_string(payload, "Query"))


def query(sql: str) -> bytes:
    return _frame(b"Q", _cstring(sql))


def decode_parse(payload: bytes) -> Parse:
    cursor = _Cursor(payload, "Parse")
    name, sql = cursor.cstring(), cursor.cstring()
    oids = cursor.uint32s(cursor.uint16())
    cursor.finish()
    return Parse(name, sql, oids)


def parse(name: str, sql: str, param_types: Sequence[int] = ()) -> bytes:
    """A Parse message: prepare `sql` as statement `name` ("" is the unnamed one),
    with the parameter type OIDs given (0 or absent: let the server infer)."""
    if len(param_types) > 0xFFFF:
        raise ValueError("a Parse message has at most 65535 parameter types")
    if any(not 0 <= oid <= 0xFFFFFFFF for oid in param_types):
        raise ValueError(f"a type OID is an unsigned 32-bit integer: {list(param_types)!r}")
    types = struct.pack(f">H{len(param_types)}I", len(param_types), *param_types)
    return _frame(b"P", _cstring(name) + _cstring(sql) + types)


def decode_bind(payload: bytes) -> Bind:
    cursor = _Cursor(payload, "Bind")
    portal, statement = cursor.cstring(), cursor.cstring()
    formats = cursor.int16s(cursor.uint16())
    parameters = _render_values(cursor.values(cursor.uint16()), formats, "Bind")
    result_formats = cursor.int16s(cursor.uint16())
    cursor.finish()
    return Bind(portal, statement, formats, parameters, result_formats)


def bind(parameters: Sequence[bytes | None], statement: str = "", portal: str = "",
         parameter_formats: Sequence[int] = (), result_formats: Sequence[int] = ()) -> bytes:
    """A Bind message: `parameters` (None = NULL) into `statement`, as `portal`."""
    if max(len(parameters), len(parameter_formats), len(result_formats)) > 0xFFFF:
        raise ValueError("a Bind message has at most 65535 parameters and formats")
    return _frame(b"B", _cstring(portal) + _cstring(statement) + _int16s(parameter_formats)
                  + _values(parameters) + _int16s(result_formats))


def decode_execute(payload: bytes) -> Execute:
    cursor = _Cursor(payload, "Execute")
    portal, max_rows = cursor.cstring(), cursor.int32()
    cursor.finish()
    return Execute(portal, max_rows)


_TARGET_KINDS = {ord("S"): "statement", ord("P"): "portal"}


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return _frame(b"E", _cstring(portal) + _INT32.pack(max_rows))


def _statement_or_portal(payload: bytes, what: str) -> tuple[str, str]:
    cursor = _Cursor(payload, what)
    kind = _TARGET_KINDS.get(cursor.take(1)[0])
    if kind is None:
        raise violation(f"invalid {what} message subtype {payload[:1]!r}")
    name = cursor.cstring()
    cursor.finish()
    return kind, name


def decode_describe(payload: bytes) -> Describe:
    return Describe(*_statement_or_portal(payload, "Describe"))


def decode_close(payload: bytes) -> Close:
    return Close(*_statement_or_portal(payload, "Close"))


def decode_function_call(payload: bytes) -> FunctionCall:
    """The fastpath interface: it runs functions (lo_export...) without SQL."""
    cursor = _Cursor(payload, "FunctionCall")
    oid = cursor.uint32()
    formats = cursor.int16s(cursor.uint16())
    arguments = _render_values(cursor.values(cursor.uint16()), formats, "FunctionCall")
    result_format = cursor.int16()
    cursor.finish()
    return FunctionCall(oid, formats, arguments, result_format)


def decode_password_message(payload: bytes) -> PasswordMessage:
    """The client's token arrives here, as a cleartext password."""
    return PasswordMessage(_single_string(payload, "PasswordMessage"))


def password_message(password: str) -> bytes:
    return _frame(b"p", _cstring(password))


def decode_sasl_initial_response(payload: bytes) -> SASLInitialResponse:
    cursor = _Cursor(payload, "SASLInitialResponse")
    mechanism = cursor.cstring()
    (data,) = cursor.values(1)
    cursor.finish()
    return SASLInitialResponse(mechanism, data)


def sasl_initial_response(mechanism: str, data: bytes | None) -> bytes:
    length = _NULL_LENGTH if data is None else _INT32.pack(len(data)) + data
    return _frame(b"p", _cstring(mechanism) + length)


def decode_sasl_response(payload: bytes) -> SASLResponse:
    return SASLResponse(payload)


def sasl_response(data: bytes) -> bytes:
    return _frame(b"p", data)


def decode_copy_fail(payload: bytes) -> CopyFail:
    return CopyFail(_single_string(payload, "CopyFail"))


# --- server messages -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthenticationRequest:
    method: str  # Ok, CleartextPassword, MD5Password, SASL, SASLContinue, SASLFinal, GSS...
    salt: bytes = b""  # MD5Password
    mechanisms: tuple[str, ...] = ()  # SASL
    data: bytes = b""  # SASLContinue, SASLFinal, GSSContinue


_AUTH_METHODS = {
    0: "Ok",
    2: "KerberosV5",
    3: "CleartextPassword",
    5: "MD5Password",
    7: "GSS",
    8: "GSSContinue",
    9: "SSPI",
    10: "SASL",
    11: "SASLContinue",
    12: "SASLFinal",
}
_AUTH_CODES = {method: code for code, method in _AUTH_METHODS.items()}
_AUTH_WITH_DATA = frozenset({"GSSContinue", "SASLContinue", "SASLFinal"})


def decode_authentication(payload: bytes) -> AuthenticationRequest:
    cursor = _Cursor(payload, "AuthenticationRequest")
    code = cursor.int32()
    method = _AUTH_METHODS.get(code)
    if method is None:
        raise violation(f"unknown authentication request code {code}")
    if method in _AUTH_WITH_DATA:
        return AuthenticationRequest(method, data=cursor.rest())
    if method == "MD5Password":
        request = AuthenticationRequest(method, salt=cursor.take(4))
    elif method == "SASL":
        mechanisms = []
        while (mechanism := cursor.cstring()) != "":
            mechanisms.append(mechanism)
        request = AuthenticationRequest(method, mechanisms=tuple(mechanisms))
    else:
        request = AuthenticationRequest(method)
    cursor.finish()
    return request


def _authentication(method: str) -> bytes:
    return _frame(b"R", _INT32.pack(_AUTH_CODES[method]))


def authentication_ok() -> bytes:
    return _authentication("Ok")


def authentication_cleartext_password() -> bytes:
    """How the proxy asks the client for its OIDC token."""
    return _authentication("CleartextPassword")


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    process_id: int
    secret: bytes


def decode_backend_key_data(payload: bytes) -> BackendKeyData:
    cursor = _Cursor(payload, "BackendKeyData")
    process_id = cursor.int32()
    return BackendKeyData(process_id, cursor.rest())


def backend_key_data(process_id: int, secret: bytes) -> bytes:
    """The proxy hands out its own key so that cancels come to it first."""
    _check_cancel_key(secret)
    return _frame(b"K", _INT32.pack(process_id) + secret)


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    name: str
    value: str


def decode_parameter_status(payload: bytes) -> ParameterStatus:
    cursor = _Cursor(payload, "ParameterStatus")
    name, value = cursor.cstring(), cursor.cstring()
    cursor.finish()
    return ParameterStatus(name, value)


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    status: str  # I idle, T in transaction, E failed transaction


_TRANSACTION_STATUSES = frozenset("ITE")


def decode_ready_for_query(payload: bytes) -> ReadyForQuery:
    status = payload.decode("latin-1")
    if status not in _TRANSACTION_STATUSES:
        raise violation(f"invalid transaction status {payload!r} in ReadyForQuery")
    return ReadyForQuery(status)


def ready_for_query(status: str) -> bytes:
    """Ends the proxy's answer to a blocked statement, so the client goes on."""
    if status not in _TRANSACTION_STATUSES:
        raise ValueError(f"transaction status must be I, T or E, not {status!r}")
    return _frame(b"Z", status.encode("ascii"))


@dataclass(frozen=True, slots=True)
class CommandComplete:
    tag: str
    rows: int | None  # from the tag, for the commands whose tag counts rows


_COUNTING_COMMANDS = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "MOVE", "FETCH", "COPY"})
_MAX_ROWS = 2**63 - 1  # the recording's Avro long


def row_count(tag: str) -> int | None:
    """'SELECT 5' -> 5, 'INSERT 0 3' -> 3, 'CREATE TABLE' -> None."""
    words = tag.split(" ")
    count = words[-1]
    if len(words) < 2 or words[0] not in _COUNTING_COMMANDS:
        return None
    if not (count.isascii() and count.isdigit() and len(count) <= 20):
        return None
    rows = int(count)
    return rows if rows <= _MAX_ROWS else None


def decode_command_complete(payload: bytes) -> CommandComplete:
    tag = _single_string(payload, "CommandComplete")
    return CommandComplete(tag, row_count(tag))


def command_complete(tag: str) -> bytes:
    return _frame(b"C", _cstring(tag))


@dataclass(frozen=True, slots=True)
class FieldDescription:
    name: str
    table_oid: int
    column_number: int
    type_oid: int
    type_size: int
    type_modifier: int
    format: int


@dataclass(frozen=True, slots=True)
class RowDescription:
    fields: tuple[FieldDescription, ...]


def decode_row_description(payload: bytes) -> RowDescription:
    cursor = _Cursor(payload, "RowDescription")
    fields = tuple(
        FieldDescription(
            cursor.cstring(),
            cursor.uint32(),
            cursor.int16(),
            cursor.uint32(),
            cursor.int16(),
            cursor.int32(),
            cursor.int16(),
        )
        for _ in range(cursor.uint16())
    )
    cursor.finish()
    return RowDescription(fields)


TEXT_OID = 25
_FIELD_TAIL = struct.Struct(">IhIhih")


def row_description(fields: Sequence[FieldDescription | str]) -> bytes:
    """A RowDescription; a bare name stands for a text column of no table."""
    if len(fields) > 0xFFFF:
        raise ValueError("a RowDescription has at most 65535 fields")
    parts = [_UINT16.pack(len(fields))]
    for f in fields:
        if isinstance(f, str):
            f = FieldDescription(f, 0, 0, TEXT_OID, -1, -1, 0)
        parts.append(_cstring(f.name) + _FIELD_TAIL.pack(f.table_oid, f.column_number, f.type_oid, f.type_size,
                                                         f.type_modifier, f.format))
    return _frame(b"T", b"".join(parts))


@dataclass(frozen=True, slots=True)
class DataRow:
    values: tuple[bytes | None, ...]


def decode_data_row(payload: bytes) -> DataRow:
    cursor = _Cursor(payload, "DataRow")
    values = cursor.values(cursor.uint16())
    cursor.finish()
    return DataRow(values)


def data_row(values: Sequence[bytes | None]) -> bytes:
    """Rebuilds a row after masking changed values (and so lengths)."""
    if len(values) > 0xFFFF:
        raise ValueError("a DataRow has at most 65535 columns")
    return _frame(b"D", _values(values))


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """ErrorResponse and NoticeResponse: fields keyed by readable names."""

    fields: dict[str, str]

    @property
    def severity(self) -> str:
        return self.fields.get("severity_nonlocalized") or self.fields.get("severity", "")

    @property
    def code(self) -> str:
        return self.fields.get("code", "")

    @property
    def message(self) -> str:
        return self.fields.get("message", "")


class ErrorResponse(Diagnostic):
    __slots__ = ()


class NoticeResponse(Diagnostic):
    __slots__ = ()


_FIELD_NAMES = {
    "S": "severity",
    "V": "severity_nonlocalized",
    "C": "code",
    "M": "message",
    "D": "detail",
    "H": "hint",
    "P": "position",
    "p": "internal_position",
    "q": "internal_query",
    "W": "where",
    "s": "schema_name",
    "t": "table_name",
    "c": "column_name",
    "d": "data_type_name",
    "n": "constraint_name",
    "F": "file",
    "L": "line",
    "R": "routine",
}
_FIELD_CODES = {name: code.encode("ascii") for code, name in _FIELD_NAMES.items()}


def _diagnostic_fields(payload: bytes, what: str) -> dict[str, str]:
    """Field type byte + String, until a zero byte; unknown types keep their letter."""
    cursor = _Cursor(payload, what)
    fields: dict[str, str] = {}
    while (code := cursor.take(1)) != b"\x00":
        letter = code.decode("latin-1")
        fields[_FIELD_NAMES.get(letter, letter)] = cursor.cstring()
    cursor.finish()
    return fields


def decode_error_response(payload: bytes) -> ErrorResponse:
    return ErrorResponse(_diagnostic_fields(payload, "ErrorResponse"))


def decode_notice_response(payload: bytes) -> NoticeResponse:
    return NoticeResponse(_diagnostic_fields(payload, "NoticeResponse"))


def _diagnostic(type_byte: bytes, severity: str, code: str, message: str, extra: dict[str, str]) -> bytes:
    fields = {"severity": severity, "severity_nonlocalized": severity, "code": code, "message": message}
    fields.update(extra)
    unknown = fields.keys() - _FIELD_CODES.keys()
    if unknown:
        raise ValueError(f"unknown error fields: {sorted(unknown)}")
    body = b"".join(_FIELD_CODES[name] + _cstring(value) for name, value in fields.items())
    return _frame(type_byte, body + b"\x00")


def error_response(*, severity: str, code: str, message: str, **fields: str) -> bytes:
    """The proxy's own errors, e.g. severity="FATAL", code="28P01"."""
    return _diagnostic(b"E", severity, code, message, fields)


def notice_response(*, severity: str, code: str, message: str, **fields: str) -> bytes:
    return _diagnostic(b"N", severity, code, message, fields)


@dataclass(frozen=True, slots=True)
class NotificationResponse:
    process_id: int
    channel: str
    payload: str


def decode_notification_response(payload: bytes) -> NotificationResponse:
    cursor = _Cursor(payload, "NotificationResponse")
    process_id, channel, text = cursor.int32(), cursor.cstring(), cursor.cstring()
    cursor.finish()
    return NotificationResponse(process_id, channel, text)


def notification_response(process_id: int, channel: str, payload: str) -> bytes:
    return _frame(b"A", struct.pack(">i", process_id) + _cstring(channel) + _cstring(payload))


@dataclass(frozen=True, slots=True)
class CopyResponse:
    """CopyInResponse, CopyOutResponse and CopyBothResponse share one layout."""

    format: int  # 0 text, 1 binary
    column_formats: tuple[int, ...]


def decode_copy_response(payload: bytes) -> CopyResponse:
    cursor = _Cursor(payload, "CopyResponse")
    overall = cursor.take(1)[0]
    formats = cursor.int16s(cursor.uint16())
    cursor.finish()
    return CopyResponse(overall, formats)


@dataclass(frozen=True, slots=True)
class ParameterDescription:
    type_oids: tuple[int, ...]


def decode_parameter_description(payload: bytes) -> ParameterDescription:
    cursor = _Cursor(payload, "ParameterDescription")
    oids = cursor.uint32s(cursor.uint16())
    cursor.finish()
    return ParameterDescription(oids)


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    newest_minor: int
    unrecognized_options: tuple[str, ...]


def decode_negotiate_protocol_version(payload: bytes) -> NegotiateProtocolVersion:
    cursor = _Cursor(payload, "NegotiateProtocolVersion")
    newest_minor = cursor.int32()
    options = tuple(cursor.cstring() for _ in range(cursor.int32()))
    cursor.finish()
    return NegotiateProtocolVersion(newest_minor, options)


def negotiate_protocol_version(newest_minor: int, unrecognized_options: Sequence[str] = ()) -> bytes:
    """Answers a client that asked for 3.x (x > 0) or for `_pq_.` options."""
    body = b"".join(map(_cstring, unrecognized_options))
    return _frame(b"v", _INT32.pack(newest_minor) + _INT32.pack(len(unrecognized_options)) + body)
