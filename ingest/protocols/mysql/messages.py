"""MySQL/MariaDB packet bodies: decode what a peer sent, encode what the proxy says itself.

Pure functions over payloads (the bytes after a packet's 4-byte header, see
`packets`). Every decoder raises `ProtocolViolation` for a payload that does
not decode, never an IndexError. References: the MySQL client/server protocol
(dev.mysql.com/doc/dev/mysql-server/latest/PAGE_PROTOCOL.html) and MariaDB's
(mariadb.com/kb/en/clientserver-protocol/).
"""

from __future__ import annotations

import datetime as _dt
import struct
from dataclasses import dataclass, field
from decimal import Decimal

from .packets import violation

# --- capability flags ------------------------------------------------------------------------

CLIENT_LONG_PASSWORD = 1
CLIENT_FOUND_ROWS = 1 << 1
CLIENT_LONG_FLAG = 1 << 2
CLIENT_CONNECT_WITH_DB = 1 << 3
CLIENT_NO_SCHEMA = 1 << 4
CLIENT_COMPRESS = 1 << 5
CLIENT_ODBC = 1 << 6
CLIENT_LOCAL_FILES = 1 << 7
CLIENT_IGNORE_SPACE = 1 << 8
CLIENT_PROTOCOL_41 = 1 << 9
CLIENT_INTERACTIVE = 1 << 10
CLIENT_SSL = 1 << 11
CLIENT_IGNORE_SIGPIPE = 1 << 12
CLIENT_TRANSACTIONS = 1 << 13
CLIENT_RESERVED = 1 << 14
CLIENT_SECURE_CONNECTION = 1 << 15
CLIENT_MULTI_STATEMENTS = 1 << 16
CLIENT_MULTI_RESULTS = 1 << 17
CLIENT_PS_MULTI_RESULTS = 1 << 18
CLIENT_PLUGIN_AUTH = 1 << 19
CLIENT_CONNECT_ATTRS = 1 << 20
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21
CLIENT_CAN_HANDLE_EXPIRED_PASSWORDS = 1 << 22
CLIENT_SESSION_TRACK = 1 << 23
CLIENT_DEPRECATE_EOF = 1 << 24
CLIENT_OPTIONAL_RESULTSET_METADATA = 1 << 25
CLIENT_ZSTD_COMPRESSION = 1 << 26
CLIENT_QUERY_ATTRIBUTES = 1 << 27
CLIENT_SSL_VERIFY_SERVER_CERT = 1 << 30
CLIENT_REMEMBER_OPTIONS = 1 << 31

# What the proxy can relay faithfully. Not: compression (the proxy would have to inflate, re-frame and
# deflate every packet: refused at negotiation, never corrupted), query attributes and optional metadata
# (other COM_QUERY / result layouts), session tracking (other OK layouts), MariaDB's extended capabilities
# (bulk execution, cached metadata: never offered, the extended bytes are sent as zero).
RELAYED_CAPABILITIES = (
    CLIENT_LONG_PASSWORD | CLIENT_FOUND_ROWS | CLIENT_LONG_FLAG | CLIENT_CONNECT_WITH_DB | CLIENT_NO_SCHEMA
    | CLIENT_ODBC | CLIENT_IGNORE_SPACE | CLIENT_PROTOCOL_41 | CLIENT_INTERACTIVE | CLIENT_IGNORE_SIGPIPE
    | CLIENT_TRANSACTIONS | CLIENT_RESERVED | CLIENT_SECURE_CONNECTION | CLIENT_MULTI_STATEMENTS
    | CLIENT_MULTI_RESULTS | CLIENT_PS_MULTI_RESULTS | CLIENT_PLUGIN_AUTH | CLIENT_CONNECT_ATTRS
    | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | CLIENT_DEPRECATE_EOF
    | CLIENT_LOCAL_FILES  # LOAD DATA LOCAL: passed on only when the client offers it; its file recorded
)

SERVER_STATUS_IN_TRANS = 0x0001
SERVER_STATUS_AUTOCOMMIT = 0x0002
SERVER_MORE_RESULTS_EXISTS = 0x0008
SERVER_STATUS_CURSOR_EXISTS = 0x0040
SERVER_STATUS_LAST_ROW_SENT = 0x0080

# --- commands -----------------------------------------------------------------------------------

COMMANDS = {
    0x00: "COM_SLEEP", 0x01: "COM_QUIT", 0x02: "COM_INIT_DB", 0x03: "COM_QUERY", 0x04: "COM_FIELD_LIST",
    0x05: "COM_CREATE_DB", 0x06: "COM_DROP_DB", 0x07: "COM_REFRESH", 0x08: "COM_SHUTDOWN",
    0x09: "COM_STATISTICS", 0x0A: "COM_PROCESS_INFO", 0x0B: "COM_CONNECT", 0x0C: "COM_PROCESS_KILL",
    0x0D: "COM_DEBUG", 0x0E: "COM_PING", 0x0F: "COM_TIME", 0x10: "COM_DELAYED_INSERT",
    0x11: "COM_CHANGE_USER", 0x12: "COM_BINLOG_DUMP", 0x13: "COM_TABLE_DUMP", 0x14: "COM_CONNECT_OUT",
    0x15: "COM_REGISTER_SLAVE", 0x16: "COM_STMT_PREPARE", 0x17: "COM_STMT_EXECUTE",
    0x18: "COM_STMT_SEND_LONG_DATA", 0x19: "COM_STMT_CLOSE", 0x1A: "COM_STMT_RESET", 0x1B: "COM_SET_OPTION",
    0x1C: "COM_STMT_FETCH", 0x1D: "COM_DAEMON", 0x1E: "COM_BINLOG_DUMP_GTID", 0x1F: "COM_RESET_CONNECTION",
    0xFA: "COM_STMT_BULK_EXECUTE",
}
COMMAND_CODES = {name: code for code, name in COMMANDS.items()}

# --- field types ----------------------------------------------------------------------------------

TYPE_NAMES = {
    0: "DECIMAL", 1: "TINY", 2: "SHORT", 3: "LONG", 4: "FLOAT", 5: "DOUBLE", 6: "NULL", 7: "TIMESTAMP",
    8: "LONGLONG", 9: "INT24", 10: "DATE", 11: "TIME", 12: "DATETIME", 13: "YEAR", 14: "NEWDATE",
    15: "VARCHAR", 16: "BIT", 17: "TIMESTAMP2", 18: "DATETIME2", 19: "TIME2", 245: "JSON", 246: "NEWDECIMAL",
    247: "ENUM", 248: "SET", 249: "TINY_BLOB", 250: "MEDIUM_BLOB", 251: "LONG_BLOB", 252: "BLOB",
    253: "VAR_STRING", 254: "STRING", 255: "GEOMETRY",
}
_FIXED = {1: ("<b", "<B"), 2: ("<h", "<H"), 13: ("<h", "<H"), 3: ("<i", "<I"), 9: ("<i", "<I"),
          8: ("<q", "<Q"), 4: ("<f", "<f"), 5: ("<d", "<d")}
_DATES = frozenset({7, 10, 12, 14, 17, 18})
_TIMES = frozenset({11, 19})
STRING_TYPES = frozenset({0, 15, 16, 245, 246, 247, 248, 249, 250, 251, 252, 253, 254, 255})
"""Types whose binary-protocol value is a length-encoded string (text, blobs, decimals, JSON...)."""
BINARY_CHARSET = 63


# --- reading ----------------------------------------------------------------------------------

class Reader:
    """A cursor over one payload; every read past the end is a protocol violation."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str = "packet", pos: int = 0) -> None:
        self.data, self.pos, self.what = data, pos, what

    def _need(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.data):
            raise violation(f"truncated {self.what}")
        self.pos = start + n
        return start

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def int(self, n: int) -> int:
        start = self._need(n)
        return int.from_bytes(self.data[start:start + n], "little")

    def bytes(self, n: int) -> bytes:
        start = self._need(n)
        return self.data[start:start + n]

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out

    def nul(self) -> bytes:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise violation(f"unterminated string in {self.what}")
        out = self.data[self.pos:end]
        self.pos = end + 1
        return out

    def lenenc_int(self) -> int | None:
        """A length-encoded integer; None for 0xFB (NULL in a text row)."""
        first = self.int(1)
        if first < 0xFB:
            return first
        if first == 0xFB:
            return None
        if first == 0xFC:
            return self.int(2)
        if first == 0xFD:
            return self.int(3)
        if first == 0xFE:
            return self.int(8)
        raise violation(f"invalid length-encoded integer 0xff in {self.what}")

    def lenenc_bytes(self) -> bytes | None:
        length = self.lenenc_int()
        return None if length is None else self.bytes(length)

    def lenenc_str(self) -> str:
        value = self.lenenc_bytes()
        return "" if value is None else value.decode("utf-8", "replace")


def lenenc_int(value: int) -> bytes:
    if value < 0xFB:
        return bytes((value,))
    if value < 1 << 16:
        return b"\xfc" + value.to_bytes(2, "little")
    if value < 1 << 24:
        return b"\xfd" + value.to_bytes(3, "little")
    return b"\xfe" + value.to_bytes(8, "little")


def lenenc_bytes(value: bytes) -> bytes:
    return lenenc_int(len(value)) + value


# --- handshake ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Handshake:
    """Protocol::HandshakeV10, the server's greeting."""

    server_version: str
    connection_id: int
    scramble: bytes  # 20 bytes (auth-plugin-data parts 1 and 2)
    capabilities: int
    charset: int
    status: int
    auth_plugin: str
    mariadb_capabilities: int = 0


def decode_handshake(payload: bytes) -> Handshake:
    r = Reader(payload, "server handshake")
    protocol = r.int(1)
    if protocol == 0xFF:
        error = decode_err(payload, 0)
        raise violation(f"the server refused the connection: {error.code} {error.message}")
    if protocol != 10:
        raise violation(f"unsupported handshake protocol version {protocol}")
    version = r.nul().decode("utf-8", "replace")
    connection_id = r.int(4)
    part1 = r.bytes(8)
    r.int(1)
    caps = r.int(2)
    charset, status, caps_high, data_len = 0, 0, 0, 0
    part2, plugin, mariadb = b"", "", 0
    if r.left:
        charset = r.int(1)
        status = r.int(2)
        caps_high = r.int(2)
        data_len = r.int(1)
        r.bytes(6)
        mariadb = r.int(4)
    caps |= caps_high << 16
    if caps & CLIENT_SECURE_CONNECTION and r.left:
        part2 = r.bytes(max(13, data_len - 8))
        part2 = part2[:-1] if part2.endswith(b"\x00") else part2
    if caps & CLIENT_PLUGIN_AUTH and r.left:
        rest = r.rest()
        plugin = rest.split(b"\x00", 1)[0].decode("ascii", "replace")
    return Handshake(version, connection_id, part1 + part2, caps, charset, status, plugin,
                     mariadb if not caps & CLIENT_LONG_PASSWORD else 0)


def handshake(h: Handshake) -> bytes:
    """Encode a HandshakeV10 (what the proxy greets its clients with)."""
    scramble = h.scramble
    caps = h.capabilities
    return (b"\x0a" + h.server_version.encode() + b"\x00" + h.connection_id.to_bytes(4, "little")
            + scramble[:8] + b"\x00" + (caps & 0xFFFF).to_bytes(2, "little") + bytes((h.charset,))
            + h.status.to_bytes(2, "little") + (caps >> 16 & 0xFFFF).to_bytes(2, "little")
            + bytes((len(scramble) + 1,)) + b"\x00" * 6 + h.mariadb_capabilities.to_bytes(4, "little")
            + scramble[8:] + b"\x00" + h.auth_plugin.encode() + b"\x00")


@dataclass(frozen=True)
class HandshakeResponse:
    """Protocol::HandshakeResponse41 (or the 32-byte SSLRequest that precedes it over TLS)."""

    capabilities: int
    max_packet: int
    charset: int
    user: str = ""
    auth_response: bytes = b""
    database: str | None = None
    auth_plugin: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    ssl_request: bool = False


def decode_handshake_response(payload: bytes) -> HandshakeResponse:
    r = Reader(payload, "handshake response")
    caps = r.int(4) if len(payload) >= 4 else 0
    if not caps & CLIENT_PROTOCOL_41:
        raise violation("the client speaks the pre-4.1 protocol (HandshakeResponse320), which is not relayed")
    max_packet, charset = r.int(4), r.int(1)
    r.bytes(23)
    if not r.left:
        if caps & CLIENT_SSL:
            return HandshakeResponse(caps, max_packet, charset, ssl_request=True)
        raise violation("truncated handshake response")
    user = r.nul().decode("utf-8", "replace")
    if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        auth = r.lenenc_bytes() or b""
    elif caps & CLIENT_SECURE_CONNECTION:
        auth = r.bytes(r.int(1))
    else:
        auth = r.nul()
    database = None
    if caps & CLIENT_CONNECT_WITH_DB and r.left:
        database = r.nul().decode("utf-8", "replace")
    plugin = None
    if caps & CLIENT_PLUGIN_AUTH and r.left:
        plugin = r.nul().decode("ascii", "replace") if b"\x00" in payload[r.pos:] else r.rest().decode("ascii", "replace")
    attributes: dict[str, str] = {}
    if caps & CLIENT_CONNECT_ATTRS and r.left:
        total = r.lenenc_int() or 0
        end = r.pos + total
        if end > len(payload):
            raise violation("truncated connection attributes")
        while r.pos < end:
            key = r.lenenc_str()
            attributes[key] = r.lenenc_str()
    return HandshakeResponse(caps, max_packet, charset, user, auth, database or None, plugin, attributes)


def ssl_request(capabilities: int, max_packet: int, charset: int) -> bytes:
    return (capabilities | CLIENT_SSL).to_bytes(4, "little") + max_packet.to_bytes(4, "little") + bytes((charset,)) + b"\x00" * 23


def handshake_response(capabilities: int, max_packet: int, charset: int, user: str, auth_response: bytes,
                       database: str | None, auth_plugin: str, attributes: dict[str, str] | None = None) -> bytes:
    """Encode a HandshakeResponse41 (the proxy's own login to the target)."""
    if database:
        capabilities |= CLIENT_CONNECT_WITH_DB
    else:
        capabilities &= ~CLIENT_CONNECT_WITH_DB
    if not attributes:
        capabilities &= ~CLIENT_CONNECT_ATTRS
    out = [capabilities.to_bytes(4, "little"), max_packet.to_bytes(4, "little"), bytes((charset,)), b"\x00" * 23,
           user.encode() + b"\x00"]
    if capabilities & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        out.append(lenenc_bytes(auth_response))
    else:
        out.append(bytes((len(auth_response),)) + auth_response)
    if database:
        out.append(database.encode() + b"\x00")
    out.append(auth_plugin.encode() + b"\x00")
    if attributes:
        body = b"".join(lenenc_bytes(k.encode()) + lenenc_bytes(v.encode()) for k, v in attributes.items())
        out.append(lenenc_bytes(body))
    return b"".join(out)


def auth_switch_request(plugin: str, data: bytes) -> bytes:
    return b"\xfe" + plugin.encode() + b"\x00" + data


@dataclass(frozen=True)
class AuthSwitch:
    plugin: str
    data: bytes


def decode_auth_switch(payload: bytes) -> AuthSwitch:
    r = Reader(payload, "auth switch request", 1)
    if not r.left:  # the old 0xFE "use the 3.23 scramble" request
        return AuthSwitch("mysql_old_password", b"")
    plugin = r.nul().decode("ascii", "replace")
    data = r.rest()
    return AuthSwitch(plugin, data[:-1] if data.endswith(b"\x00") else data)


# --- OK / ERR / EOF -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Ok:
    affected_rows: int
    last_insert_id: int
    status: int
    warnings: int
    info: str


def decode_ok(payload: bytes) -> Ok:
    r = Reader(payload, "OK packet", 1)
    affected = r.lenenc_int() or 0
    last_id = r.lenenc_int() or 0
    status = r.int(2) if r.left >= 2 else 0
    warnings = r.int(2) if r.left >= 2 else 0
    info = r.rest().decode("utf-8", "replace")
    return Ok(affected, last_id, status, warnings, info)


def ok(affected_rows: int = 0, last_insert_id: int = 0, status: int = SERVER_STATUS_AUTOCOMMIT,
       warnings: int = 0, info: str = "", header: int = 0x00) -> bytes:
    return (bytes((header,)) + lenenc_int(affected_rows) + lenenc_int(last_insert_id) + status.to_bytes(2, "little")
            + warnings.to_bytes(2, "little") + info.encode())


@dataclass(frozen=True)
class Err:
    code: int
    sqlstate: str
    message: str


def decode_err(payload: bytes, capabilities: int = CLIENT_PROTOCOL_41) -> Err:
    r = Reader(payload, "ERR packet", 1)
    code = r.int(2)
    if code == 0xFFFF:  # progress report (MariaDB): not an error
        return Err(code, "", "progress report")
    state = ""
    if r.left and payload[r.pos] == 0x23:  # '#'
        r.int(1)
        state = r.bytes(5).decode("ascii", "replace")
    return Err(code, state, r.rest().decode("utf-8", "replace"))


def err(code: int, sqlstate: str, message: str) -> bytes:
    return b"\xff" + code.to_bytes(2, "little") + b"#" + sqlstate.encode()[:5] + message.encode()


@dataclass(frozen=True)
class Eof:
    warnings: int
    status: int


def decode_eof(payload: bytes) -> Eof:
    r = Reader(payload, "EOF packet", 1)
    if r.left >= 4:
        return Eof(r.int(2), r.int(2))
    return Eof(0, 0)


def is_eof(payload: bytes, deprecate_eof: bool = False) -> bool:
    """The packet that ends a result set: an EOF packet, or with CLIENT_DEPRECATE_EOF an OK packet with the
    0xFE header (a row whose first value is 16 MiB or more also starts with 0xFE, but is longer)."""
    return bool(payload) and payload[0] == 0xFE and len(payload) < (0xFFFFFF if deprecate_eof else 9)


def terminator_status(payload: bytes, deprecate_eof: bool) -> tuple[int, int, int | None]:
    """(status, warnings, affected rows or None) of the packet that ends a result set."""
    if deprecate_eof and len(payload) > 5:
        decoded = decode_ok(payload)
        return decoded.status, decoded.warnings, decoded.affected_rows
    decoded_eof = decode_eof(payload)
    return decoded_eof.status, decoded_eof.warnings, None


# --- result sets --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    """Protocol::ColumnDefinition41."""

    schema: str
    table: str
    org_table: str
    name: str
    org_name: str
    charset: int
    length: int
    type: int
    flags: int
    decimals: int

    @property
    def unsigned(self) -> bool:
        return bool(self.flags & 0x20)

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, str(self.type))


def decode_column(payload: bytes) -> Column:
    r = Reader(payload, "column definition")
    r.lenenc_bytes()  # catalog, always "def"
    schema, table, org_table, name, org_name = (r.lenenc_str() for _ in range(5))
    r.lenenc_int()
    charset, length, kind, flags, decimals = r.int(2), r.int(4), r.int(1), r.int(2), r.int(1)
    return Column(schema, table, org_table, name, org_name, charset, length, kind, flags, decimals)


def decode_text_row(payload: bytes, columns: int) -> list[bytes | None]:
    r = Reader(payload, "text row")
    values = [r.lenenc_bytes() for _ in range(columns)]
    if r.left:
        raise violation("text row longer than its columns")
    return values


def text_row(values: list[bytes | None]) -> bytes:
    return b"".join(b"\xfb" if v is None else lenenc_bytes(v) for v in values)


def _binary_value_end(data: bytes, pos: int, kind: int) -> int:
    """Where a binary-protocol value of `kind` starting at `pos` ends."""
    fixed = _FIXED.get(kind)
    if fixed is not None:
        return pos + struct.calcsize(fixed[0])
    if kind in _DATES or kind in _TIMES:
        if pos >= len(data):
            raise violation("truncated binary value")
        return pos + 1 + data[pos]
    if kind == 6:
        return pos
    r = Reader(data, "binary value", pos)
    length = r.lenenc_int() or 0
    return r.pos + length


def split_binary_values(data: bytes, pos: int, types: list[int], nulls: bytes, offset: int) -> list[bytes | None]:
    """The raw values of a binary row or of COM_STMT_EXECUTE's parameters; `offset` is the bitmap's bit offset."""
    values: list[bytes | None] = []
    for index, kind in enumerate(types):
        bit = index + offset
        if nulls[bit >> 3] & (1 << (bit & 7)):
            values.append(None)
            continue
        end = _binary_value_end(data, pos, kind)
        if end > len(data):
            raise violation("truncated binary value")
        values.append(data[pos:end])
        pos = end
    if pos != len(data):
        raise violation("binary values longer than their types")
    return values


def decode_binary_row(payload: bytes, columns: list[Column]) -> list[bytes | None]:
    """The raw (binary-protocol encoded) values of one binary result row."""
    if not payload or payload[0] != 0:
        raise violation("binary row without its 0x00 header")
    bitmap = (len(columns) + 7 + 2) // 8
    if len(payload) < 1 + bitmap:
        raise violation("truncated binary row")
    return split_binary_values(payload, 1 + bitmap, [c.type for c in columns], payload[1:1 + bitmap], 2)


def binary_row(values: list[bytes | None]) -> bytes:
    """A binary row from raw values (None = NULL)."""
    bitmap = bytearray((len(values) + 7 + 2) // 8)
    for index, value in enumerate(values):
        if value is None:
            bit = index + 2
            bitmap[bit >> 3] |= 1 << (bit & 7)
    return b"\x00" + bytes(bitmap) + b"".join(v for v in values if v is not None)


def binary_string(value: bytes) -> bytes:
    """A string value in the binary protocol."""
    return lenenc_bytes(value)


def binary_text(kind: int, value: bytes, unsigned: bool = False) -> str:
    """A binary-protocol value as text (how a parameter is recorded); strings and blobs as UTF-8 or \\x hex."""
    fixed = _FIXED.get(kind)
    if fixed is not None:
        number = struct.unpack(fixed[1] if unsigned else fixed[0], value)[0]
        return repr(number) if isinstance(number, float) else str(number)
    if kind in _DATES:
        return _date_text(value[1:])
    if kind in _TIMES:
        return _time_text(value[1:])
    if kind == 6:
        return ""
    r = Reader(value, "binary value")
    raw = r.lenenc_bytes() or b""
    if kind in (0, 246):
        return str(Decimal(raw.decode("ascii", "replace")))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "\\x" + raw.hex()


def _date_text(b: bytes) -> str:
    if not b:
        return "0000-00-00 00:00:00"
    year, month, day = int.from_bytes(b[0:2], "little"), b[2], b[3]
    text = f"{year:04d}-{month:02d}-{day:02d}"
    if len(b) >= 7:
        text += f" {b[4]:02d}:{b[5]:02d}:{b[6]:02d}"
    if len(b) >= 11:
        text += f".{int.from_bytes(b[7:11], 'little'):06d}"
    return text


def _time_text(b: bytes) -> str:
    if not b:
        return "00:00:00"
    negative, days = b[0], int.from_bytes(b[1:5], "little")
    hours = days * 24 + b[5]
    text = f"{'-' if negative else ''}{hours:02d}:{b[6]:02d}:{b[7]:02d}"
    if len(b) >= 12:
        text += f".{int.from_bytes(b[8:12], 'little'):06d}"
    return text


def date_value(value: _dt.date) -> bytes:  # for tests and the proxy's own use
    return bytes((4,)) + value.year.to_bytes(2, "little") + bytes((value.month, value.day))


# --- prepared statements ---------------------------------------------------------------------

@dataclass(frozen=True)
class PrepareOk:
    statement_id: int
    columns: int
    params: int
    warnings: int


def decode_prepare_ok(payload: bytes) -> PrepareOk:
    r = Reader(payload, "COM_STMT_PREPARE OK", 1)
    statement_id, columns, params = r.int(4), r.int(2), r.int(2)
    r.int(1) if r.left else None
    warnings = r.int(2) if r.left >= 2 else 0
    return PrepareOk(statement_id, columns, params, warnings)


@dataclass(frozen=True)
class Execute:
    """COM_STMT_EXECUTE: the statement, cursor flags, and each parameter's type and raw value."""

    statement_id: int
    flags: int
    types: tuple[tuple[int, bool], ...]  # (field type, unsigned)
    values: tuple[bytes | None, ...]
    new_types: bool

    @property
    def cursor(self) -> bool:
        return bool(self.flags & 0x07)

    def texts(self, long_data: dict[int, bytes] | None = None) -> list[str | None]:
        """Each parameter as text: numbers as numbers, strings as UTF-8 (or \\x hex), NULL as None."""
        out: list[str | None] = []
        for index, ((kind, unsigned), value) in enumerate(zip(self.types, self.values)):
            if value is None:
                sent = (long_data or {}).get(index)
                out.append(None if sent is None else _long_text(sent))
            else:
                out.append(binary_text(kind, value, unsigned))
        return out


def _long_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\\x" + data.hex()


def execute_statement_id(payload: bytes) -> int:
    return Reader(payload, "COM_STMT_EXECUTE", 1).int(4)


def decode_execute(payload: bytes, params: int, previous_types: tuple[tuple[int, bool], ...] | None,
                   long_data: frozenset[int] = frozenset()) -> Execute:
    """`params` comes from the statement's PREPARE answer; `previous_types` from its last EXECUTE.

    Parameters sent with COM_STMT_SEND_LONG_DATA (`long_data`) have no value here.
    """
    r = Reader(payload, "COM_STMT_EXECUTE", 1)
    statement_id, flags = r.int(4), r.int(1)
    r.int(4)  # iteration count, always 1
    if params == 0:
        return Execute(statement_id, flags, (), (), False)
    nulls = r.bytes((params + 7) // 8)
    new_types = r.int(1) == 1
    if new_types:
        types = tuple((r.int(1), bool(r.int(1) & 0x80)) for _ in range(params))
    elif previous_types is not None and len(previous_types) == params:
        types = previous_types
    else:
        raise violation("COM_STMT_EXECUTE without parameter types, and none bound before")
    kinds: list[int] = []
    masked = bytearray(nulls)
    for index in long_data:  # a long-data parameter has no value here: read it as NULL
        if index < params:
            masked[index >> 3] |= 1 << (index & 7)
    kinds = [kind for kind, _ in types]
    values = split_binary_values(payload, r.pos, kinds, bytes(masked), 0)
    return Execute(statement_id, flags, types, tuple(values), new_types)


def decode_long_data(payload: bytes) -> tuple[int, int, bytes]:
    """COM_STMT_SEND_LONG_DATA: (statement id, parameter index, data)."""
    r = Reader(payload, "COM_STMT_SEND_LONG_DATA", 1)
    return r.int(4), r.int(2), r.rest()


def statement_id(payload: bytes) -> int:
    """The statement id of COM_STMT_CLOSE / RESET / FETCH / SEND_LONG_DATA / EXECUTE."""
    return Reader(payload, "statement command", 1).int(4)


def decode_fetch(payload: bytes) -> tuple[int, int]:
    r = Reader(payload, "COM_STMT_FETCH", 1)
    return r.int(4), r.int(4)
