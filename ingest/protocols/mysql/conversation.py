"""The command phase of a MySQL connection, sans I/O: what each packet is, and what answers it.

MySQL packets do not say what they are: a result row, an OK packet and a
column count can start with the same byte. What a server packet means
depends on the command it answers and on how far the answer has got, so
`Conversation` follows both directions: each relayed command queues the
answer it expects (`sent`), and each server packet is classified against the
head of that queue (`server`), which also checks sequence ids. Prepared
statements are tracked (id → SQL, parameter count, columns, last bound
types), so that COM_STMT_EXECUTE's bound values decode with their types and
binary rows decode against their columns.

LOAD DATA LOCAL INFILE: the target answers the statement with a request
for a file of the client's (0xFB + its name), the client sends the file's
bytes in packets that continue the answer's sequence ids, then an empty
packet, and the target answers with OK or ERR. While the file comes, the
client's packets are the file's (`receiving_file`), not commands; the
request starts a `transfer` operation (its file name the object), the end
packet records the file's size and SHA-256. A request for a file the
statement does not name (how a rogue server reads a client's files) is a
protocol violation: that connection ends, the file is never asked for.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from . import messages as m
from .packets import Packet, violation
from .packets import packet as framed

Fields = dict[str, Any]


@dataclass
class Statement:
    """A prepared statement the target accepted."""

    sql: str
    params: int
    columns: list[m.Column] = field(default_factory=list)
    types: tuple[tuple[int, bool], ...] | None = None
    long_data: dict[int, bytearray] = field(default_factory=dict)


@dataclass
class Expect:
    """The answer one command waits for; `kind`: simple | query | prepare | field_list | statistics | proxy."""

    kind: str
    command: str
    seq: int  # the sequence id the next packet of the answer must carry
    binary: bool = False
    statement_id: int | None = None
    sql: str | None = None
    state: str = "first"  # first | columns | columns_eof | rows | params | params_eof | prepare_columns | ...
    count: int = 0
    columns: list[m.Column] = field(default_factory=list)
    rows: int = 0
    prepare: m.PrepareOk | None = None
    params_left: int = 0
    answer: bytes = b""  # kind proxy: the proxy's own answer, sent in the answer's turn
    file: Any = None  # LOAD DATA LOCAL: the SHA-256 of the client's file so far
    file_bytes: int = 0
    swallow: bool = False  # the proxy refused the file and answered the client itself: the target's answer is not relayed


_SIMPLE = frozenset({"COM_INIT_DB", "COM_PING", "COM_RESET_CONNECTION", "COM_STMT_RESET", "COM_SET_OPTION",
                     "COM_REFRESH", "COM_PROCESS_KILL", "COM_SHUTDOWN", "COM_DEBUG", "COM_CREATE_DB",
                     "COM_DROP_DB", "COM_SLEEP"})
LONG_DATA_MAX = 64 << 20  # long data a prepared statement may hold until its EXECUTE (MariaDB caps each at
# max_allowed_packet, 16 MiB by default); past it the connection ends with a protocol error, not the proxy's memory
_NO_ANSWER = frozenset({"COM_STMT_CLOSE", "COM_STMT_SEND_LONG_DATA", "COM_QUIT"})


def command_name(packet: Packet) -> str:
    if not packet.payload:
        raise violation("empty command packet")
    return m.COMMANDS.get(packet.payload[0], f"COM_0x{packet.payload[0]:02x}")


def _text(payload: bytes) -> str:
    return payload[1:].decode("utf-8", "replace")


class Conversation:
    def __init__(self, capabilities: int) -> None:
        self.capabilities = capabilities
        self.deprecate_eof = bool(capabilities & m.CLIENT_DEPRECATE_EOF)
        self.statements: dict[int, Statement] = {}
        self.expected: deque[Expect] = deque()

    @property
    def idle(self) -> bool:
        return not self.expected

    @property
    def receiving_file(self) -> bool:
        """The target asked for a LOCAL INFILE: the client's packets are the file's until an empty one."""
        return bool(self.expected) and self.expected[0].state == "infile"

    @property
    def swallowing(self) -> bool:
        """The answer being received is one the proxy already gave the client its own answer for."""
        return bool(self.expected) and self.expected[0].swallow

    def refuse_file(self) -> tuple[bytes, int]:
        """The policy refused the file the target asked for: (the empty file to send the target instead, the
        sequence id of the client's answer). The target's answer (OK, 0 rows) is then recorded, not relayed."""
        e = self.expected[0]
        client_seq = (e.seq - 1) & 0xFF  # the client never saw the request: it waits for this answer
        empty = framed(e.seq, b"")
        e.seq, e.state, e.swallow = (e.seq + 1) & 0xFF, "first", True
        return empty, client_seq

    def file_data(self, packet: Packet) -> tuple[str, Fields]:
        """One packet of the client's file for LOAD DATA LOCAL (an empty one ends it)."""
        e = self.expected[0]
        if packet.seq != e.seq:
            raise violation(f"file packet with sequence id {packet.seq}, expected {e.seq}")
        e.seq = (packet.last_seq + 1) & 0xFF
        if packet.payload:
            e.file.update(packet.payload)
            e.file_bytes += len(packet.payload)
            return "LocalInfileData", {}
        e.state = "first"  # the target's OK or ERR follows
        return "LocalInfileEnd", {"attributes": {"bytes": str(e.file_bytes), "sha256": e.file.hexdigest()}}

    # --- client ----------------------------------------------------------------------------

    def client(self, packet: Packet) -> tuple[str, Fields]:
        """What a client command is: its type and the decoded fields of its record."""
        if packet.seq != 0:
            raise violation(f"command packet with sequence id {packet.seq}, expected 0")
        name = command_name(packet)
        payload = packet.payload
        fields: Fields = {}
        if name == "COM_QUERY":
            sql = _text(payload)
            fields = {"statement": sql, "operation": "statement", "text": sql}
        elif name == "COM_STMT_PREPARE":
            sql = _text(payload)
            fields = {"statement": sql, "operation": "prepare", "text": sql}
        elif name == "COM_STMT_EXECUTE":
            statement_id = m.execute_statement_id(payload)
            statement = self.statements.get(statement_id)
            attributes = {"statement_id": str(statement_id)}
            if statement is None:
                fields = {"attributes": attributes}
            else:
                execute = m.decode_execute(payload, statement.params, statement.types,
                                           frozenset(statement.long_data))
                texts = execute.texts(statement.long_data)
                attributes["parameter_types"] = json.dumps(
                    [m.TYPE_NAMES.get(k, str(k)) + (" UNSIGNED" if u else "") for k, u in execute.types])
                if execute.cursor:
                    attributes["cursor"] = "read_only"
                fields = {"statement": statement.sql, "parameters": texts, "operation": "statement",
                          "text": statement.sql, "attributes": attributes}
        elif name in ("COM_STMT_CLOSE", "COM_STMT_RESET", "COM_STMT_FETCH"):
            fields = {"attributes": {"statement_id": str(m.statement_id(payload))}}
        elif name == "COM_STMT_SEND_LONG_DATA":
            statement_id, index, data = m.decode_long_data(payload)
            statement = self.statements.get(statement_id)
            held = sum(map(len, statement.long_data.values())) if statement is not None else 0
            if held + len(data) > LONG_DATA_MAX:  # kept until its EXECUTE, to record the value: bounded
                raise violation(f"COM_STMT_SEND_LONG_DATA: statement {statement_id} would hold more than "
                                f"{LONG_DATA_MAX} bytes of long data before its EXECUTE")
            fields = {"attributes": {"statement_id": str(statement_id), "parameter": str(index),
                                     "bytes": str(len(data))}}
        elif name == "COM_INIT_DB":
            fields = {"attributes": {"database": _text(payload)}, "operation": "statement",
                      "text": f"USE `{_text(payload)}`"}
        elif name == "COM_FIELD_LIST":
            fields = {"attributes": {"table": payload[1:].split(b"\x00", 1)[0].decode("utf-8", "replace")}}
        elif name == "COM_CHANGE_USER":  # its auth data is the new password, in clear for mysql_clear_password
            fields = {"attributes": {"user": payload[1:].split(b"\x00", 1)[0].decode("utf-8", "replace"),
                                     "redacted": "token"}}
        return name, fields

    def sent(self, packet: Packet) -> None:
        """A command was relayed to the target: expect its answer."""
        name = command_name(packet)
        payload = packet.payload
        seq = (packet.last_seq + 1) & 0xFF
        if name in _NO_ANSWER:
            if name == "COM_STMT_CLOSE":
                self.statements.pop(m.statement_id(payload), None)
            elif name == "COM_STMT_SEND_LONG_DATA":
                statement_id, index, data = m.decode_long_data(payload)
                statement = self.statements.get(statement_id)
                if statement is not None:  # appended in place: a value sent in many pieces is not copied each time
                    statement.long_data.setdefault(index, bytearray()).extend(data)
            return
        if name == "COM_QUERY":
            self.expected.append(Expect("query", name, seq, sql=_text(payload) if self.capabilities
                                        & m.CLIENT_LOCAL_FILES else None))  # what a LOCAL INFILE must name
        elif name == "COM_STMT_PREPARE":
            self.expected.append(Expect("prepare", name, seq, sql=_text(payload)))
        elif name == "COM_STMT_EXECUTE":
            statement_id = m.execute_statement_id(payload)
            statement = self.statements.get(statement_id)
            if statement is not None:
                execute = m.decode_execute(payload, statement.params, statement.types, frozenset(statement.long_data))
                if execute.types:
                    statement.types = execute.types
                statement.long_data.clear()
            self.expected.append(Expect("query", name, seq, binary=True, statement_id=statement_id))
        elif name == "COM_STMT_FETCH":
            statement_id = m.statement_id(payload)
            statement = self.statements.get(statement_id)
            expect = Expect("query", name, seq, binary=True, statement_id=statement_id, state="rows")
            expect.columns = list(statement.columns) if statement is not None else []
            self.expected.append(expect)
        elif name == "COM_STMT_RESET":
            statement = self.statements.get(m.statement_id(payload))
            if statement is not None:
                statement.long_data.clear()
            self.expected.append(Expect("simple", name, seq))
        elif name == "COM_FIELD_LIST":
            self.expected.append(Expect("field_list", name, seq))
        elif name == "COM_STATISTICS":
            self.expected.append(Expect("statistics", name, seq))
        elif name in _SIMPLE:
            self.expected.append(Expect("simple", name, seq))
        else:
            raise violation(f"{name} is not relayed")

    def answer_by_proxy(self, answer: bytes) -> bool:
        """The proxy answers a command itself (a refusal); True: send it now, else after the answers before it."""
        if not self.expected:
            return True
        self.expected.append(Expect("proxy", "", 0, answer=answer))
        return False

    def due_answers(self) -> list[bytes]:
        """The proxy's own answers whose turn has come (the target answered everything before them)."""
        out = []
        while self.expected and self.expected[0].kind == "proxy":
            out.append(self.expected.popleft().answer)
        return out

    # --- server ----------------------------------------------------------------------------

    @property
    def columns(self) -> list[m.Column]:
        """The columns of the result set being received."""
        return self.expected[0].columns if self.expected else []

    @property
    def binary(self) -> bool:
        return bool(self.expected) and self.expected[0].binary

    def server(self, packet: Packet) -> tuple[str, Fields]:
        """What a server packet is, against the command it answers: its type and decoded fields."""
        if not self.expected or self.expected[0].kind == "proxy":
            raise violation("the target sent a packet no command asked for")
        e = self.expected[0]
        if e.state == "infile":
            raise violation("the target sent a packet while the client sends its LOCAL INFILE")
        if packet.seq != e.seq:
            raise violation(f"the target's packet has sequence id {packet.seq}, expected {e.seq}")
        e.seq = (packet.last_seq + 1) & 0xFF
        payload = packet.payload
        if not payload:
            raise violation("empty packet from the target")
        head = payload[0]
        if head == 0xFF and e.state not in ("columns", "params", "prepare_columns"):
            self._done()
            return "ERR", _err_fields(payload)
        kind = e.kind
        if kind == "simple":
            self._done()
            if head == 0xFE:  # COM_SET_OPTION answers with EOF
                return "EOF", {"outcome": "ok"}
            if e.command == "COM_RESET_CONNECTION":
                self.statements.clear()  # the target deallocated them: an EXECUTE of an old id runs no SQL of theirs
            return "OK", _ok_fields(m.decode_ok(payload), final=True)
        if kind == "statistics":
            self._done()
            return "Statistics", {"attributes": {"text": payload.decode("utf-8", "replace")}, "outcome": "ok"}
        if kind == "field_list":
            if m.is_eof(payload, self.deprecate_eof):
                self._done()
                return "EOF", {"outcome": "ok"}
            column = m.decode_column(payload)
            return "ColumnDefinition", {"attributes": _column_attributes(column)}
        if kind == "prepare":
            return self._prepare(e, payload)
        return self._query(e, payload)

    def _done(self) -> None:
        self.expected.popleft()

    def _query(self, e: Expect, payload: bytes) -> tuple[str, Fields]:
        head = payload[0]
        if e.state == "first":
            if head == 0x00:
                decoded = m.decode_ok(payload)
                more = bool(decoded.status & m.SERVER_MORE_RESULTS_EXISTS)
                if not more:
                    self._done()
                return "OK", _ok_fields(decoded, final=not more)
            if head == 0xFB:
                if not self.capabilities & m.CLIENT_LOCAL_FILES or e.command != "COM_QUERY":
                    raise violation("the target asked for a LOCAL INFILE, which the client never agreed to")
                name = payload[1:].decode("utf-8", "replace")
                if not name or name not in (e.sql or ""):  # a rogue target's way to read any file of the client's
                    raise violation("the target asked for a LOCAL INFILE the statement did not name")
                e.state, e.file, e.file_bytes = "infile", hashlib.sha256(), 0
                return "LocalInfileRequest", {"operation": "transfer", "text": name, "objects": [name],
                                              "attributes": {"file": name}}
            count = m.Reader(payload, "column count").lenenc_int() or 0
            if count == 0:
                raise violation("result set with no columns")
            e.state, e.count, e.columns, e.rows = "columns", count, [], 0
            return "ColumnCount", {"attributes": {"columns": str(count)}}
        if e.state == "columns":
            column = m.decode_column(payload)
            e.columns.append(column)
            if len(e.columns) == e.count:
                e.state = "rows" if self.deprecate_eof else "columns_eof"
                if e.command == "COM_STMT_EXECUTE" and e.statement_id in self.statements:
                    self.statements[e.statement_id].columns = list(e.columns)
            return "ColumnDefinition", {"attributes": _column_attributes(column)}
        if e.state == "columns_eof":
            if not m.is_eof(payload):
                raise violation("expected EOF after the column definitions")
            status = m.decode_eof(payload).status
            e.state = "rows"
            if e.command == "COM_STMT_EXECUTE" and status & m.SERVER_STATUS_CURSOR_EXISTS:
                self._done()  # the rows come with COM_STMT_FETCH
                return "EOF", {"attributes": {"cursor": "open"}, "outcome": "ok"}
            return "EOF", {}
        # rows
        if m.is_eof(payload, self.deprecate_eof):
            status, warnings, _ = m.terminator_status(payload, self.deprecate_eof)
            more = bool(status & m.SERVER_MORE_RESULTS_EXISTS)
            rows = e.rows
            if more and e.command != "COM_STMT_FETCH":
                e.state = "first"
            elif e.command == "COM_STMT_EXECUTE" and status & m.SERVER_STATUS_CURSOR_EXISTS and rows == 0:
                self._done()
                return "EOF", {"attributes": {"cursor": "open"}, "outcome": "ok"}
            else:
                self._done()
            attributes = {"status": str(status)}
            if warnings:
                attributes["warnings"] = str(warnings)
            return "EOF", {"command_tag": f"{rows} rows" if rows != 1 else "1 row", "rows": rows,
                           "attributes": attributes, "outcome": None if more else "ok"}
        e.rows += 1
        return ("BinaryRow" if e.binary else "TextRow"), {}

    def _prepare(self, e: Expect, payload: bytes) -> tuple[str, Fields]:
        if e.state == "first":
            if payload[0] != 0x00:
                raise violation("unexpected answer to COM_STMT_PREPARE")
            ok = m.decode_prepare_ok(payload)
            e.prepare = ok
            self.statements[ok.statement_id] = Statement(e.sql or "", ok.params)
            e.params_left, e.count = ok.params, ok.columns
            self._prepare_next(e)
            attributes = {"statement_id": str(ok.statement_id), "params": str(ok.params), "columns": str(ok.columns)}
            if ok.warnings:
                attributes["warnings"] = str(ok.warnings)
            return "PrepareOK", {"attributes": attributes, "outcome": "ok", "statement": e.sql}
        if e.state == "params":
            column = m.decode_column(payload)
            e.params_left -= 1
            if e.params_left == 0:
                e.state = "params_eof" if not self.deprecate_eof else "prepare_columns"
                if e.state == "prepare_columns":
                    self._prepare_columns(e)
            return "ParameterDefinition", {"attributes": _column_attributes(column)}
        if e.state == "params_eof":
            if not m.is_eof(payload):
                raise violation("expected EOF after the parameter definitions")
            e.state = "prepare_columns"
            self._prepare_columns(e)
            return "EOF", {}
        if e.state == "prepare_columns":
            column = m.decode_column(payload)
            assert e.prepare is not None
            statement = self.statements[e.prepare.statement_id]
            statement.columns.append(column)
            if len(statement.columns) == e.count:
                if self.deprecate_eof:
                    self._done()
                else:
                    e.state = "columns_eof"
            return "ColumnDefinition", {"attributes": _column_attributes(column)}
        if e.state == "columns_eof":
            if not m.is_eof(payload):
                raise violation("expected EOF after the column definitions")
            self._done()
            return "EOF", {}
        raise violation("unexpected packet in a COM_STMT_PREPARE answer")

    def _prepare_next(self, e: Expect) -> None:
        if e.params_left:
            e.state = "params"
        else:
            e.state = "prepare_columns"
            self._prepare_columns(e)

    def _prepare_columns(self, e: Expect) -> None:
        if e.count == 0:
            self._done()


def _ok_fields(ok: m.Ok, final: bool) -> Fields:
    attributes = {"last_insert_id": str(ok.last_insert_id), "status": str(ok.status)}
    if ok.warnings:
        attributes["warnings"] = str(ok.warnings)
    if ok.info:
        attributes["info"] = ok.info
    return {"command_tag": "OK", "rows": ok.affected_rows, "attributes": attributes,
            "outcome": "ok" if final else None}


def _err_fields(payload: bytes) -> Fields:
    error = m.decode_err(payload)
    return {"error_code": error.sqlstate or "HY000", "error_message": error.message,
            "attributes": {"errno": str(error.code)}, "outcome": "error"}


def _column_attributes(column: m.Column) -> dict[str, str]:
    attributes = {"name": column.name, "type": column.type_name}
    if column.table:
        attributes["table"] = column.table
    if column.org_name and column.org_name != column.name:
        attributes["org_name"] = column.org_name
    return attributes


def classify_err(payload: bytes) -> Fields:
    return _err_fields(payload)
