"""The `Message` records (schemas/event.avsc) of a PostgreSQL session, built from its messages.

Pure functions: the front end decides *when* to record, this module decides
*what* a message record holds; the other event bodies are the core's
(`proxy.core.records`).

Two rules shape the `Frames` records:

* Secrets never reach the evidence. A PasswordMessage carries the client's
  token; BackendKeyData and CancelRequest carry a cancel key. Their bytes are
  replaced by nothing and `attributes["redacted"]` says what was removed.
* Bulk messages come in runs. Consecutive DataRow (or CopyData) messages of
  one read become one `Message` record whose `data` is their exact wire bytes
  back to back and whose `attributes["messages"]` is their count. Every PG
  message starts with its type byte and length, so the boundaries are exact
  and `split_run` (ingest/protocols/postgres/records.py) restores them. Why: the Avro encoder
  costs ~4 µs per Message record, on the recorder thread that shares the GIL
  with the relay; one record per row would cap a recorded result at a quarter
  of a million rows per second.
"""

from __future__ import annotations

from typing import Any

from ingest.protocols.postgres.protocol import Message
from ingest.protocols.postgres.records import RUN_TYPES
from ingest.protocols.postgres.summary import SUMMARIZED_TYPES, summarize
from proxy.core.records import PROXY_ORIGIN

Record = dict[str, Any]

REDACTED: dict[str, str] = {
    "PasswordMessage": "token",
    "BackendKeyData": "cancel key",
    "CancelRequest": "cancel key",
}
# The protocol-neutral operation fields (contract v2): where a statement starts, and how it ended.
STATEMENT_TYPES = frozenset({"Query", "Parse"})
_OUTCOMES = {"CommandComplete": "ok", "ErrorResponse": "error"}


# Server messages whose record is a function of their bytes alone and that sessions repeat with every
# statement (the same query's RowDescription, `SELECT 1`, ReadyForQuery 'I'): their records are built once
# and copied. A hit costs a dictionary lookup and two copies instead of a decode and two JSON encodings.
_REPEATING = frozenset({"RowDescription", "CommandComplete", "ReadyForQuery", "ParameterDescription"})
_REPEATED_LIMIT = 1024  # distinct messages remembered; cleared (one atomic step) when full
_REPEATED_MAX_BYTES = 1024
_repeated: dict[bytes, Record] = {}


def message_record(message: Message, origin: dict[str, str] | None = None) -> Record:
    """One message as the contract's `Message` record; `origin` marks the proxy's own messages."""
    kind = message.type
    if kind in _REPEATING and len(message.data) <= _REPEATED_MAX_BYTES:
        known = _repeated.get(message.data)
        if known is None:
            known = _build_record(message)
            if len(_repeated) >= _REPEATED_LIMIT:
                _repeated.clear()
            _repeated[message.data] = known
        record = {**known, "attributes": dict(known["attributes"])}
    else:
        record = _build_record(message)
    if origin:
        record["attributes"].update(origin)
    return record


def _build_record(message: Message) -> Record:
    kind = message.type
    if kind in SUMMARIZED_TYPES:
        record = summarize(message)
        record["data"] = message.data
    else:
        record = {"type": kind, "data": message.data, "attributes": {}}
    if kind in STATEMENT_TYPES:
        record["operation"], record["text"] = "statement", record.get("statement")
    elif kind in _OUTCOMES:
        record["outcome"] = _OUTCOMES[kind]
    if kind in REDACTED:
        record["data"] = b""
        record["attributes"]["redacted"] = REDACTED[kind]
    return record


def message_records(messages: list[Message]) -> list[Record]:
    """The records of one read: runs of bulk messages folded (those the reader coalesced, and consecutive
    ones it did not), everything else one each.

    Raises ProtocolViolation when a message's body does not decode.
    """
    records: list[Record] = []
    run: list[bytes] = []
    run_type, run_count = "", 0
    for message in messages:
        kind = message.type
        if kind in RUN_TYPES:
            if kind != run_type:
                _flush_run(records, run_type, run, run_count)
                run, run_type, run_count = [], kind, 0
            run.append(message.data)
            run_count += message.count
            continue
        if run:
            _flush_run(records, run_type, run, run_count)
            run, run_type, run_count = [], "", 0
        records.append(message_record(message))
    _flush_run(records, run_type, run, run_count)
    return records


def _flush_run(records: list[Record], kind: str, run: list[bytes], count: int) -> None:
    if count == 1:
        records.append({"type": kind, "data": run[0], "attributes": {}})
    elif run:
        records.append({"type": kind, "data": b"".join(run), "attributes": {"messages": str(count)}})


class PreparedStatements:
    """The statements a session prepared by name, so that each later execution of one is an operation with its SQL.

    psycopg prepares a query it ran five times, then sends only Bind/Execute
    by name: the Bind carries no SQL, so without this the activity and
    statements views would show one operation where the client ran hundreds.
    The first Bind after its own Parse is that Parse's execution (the Parse
    already starts the operation); every other Bind of a named statement
    starts one, with the statement's SQL.
    """

    MAX_STATEMENTS = 10_000  # a client that never closes its statements cannot grow this without bound

    def __init__(self) -> None:
        self._sql: dict[str, str] = {}
        self._unbound: str | None = None  # a Parse's name until its first Bind

    def annotate(self, records: list[Record]) -> None:
        for record in records:
            kind = record["type"]
            if kind == "Parse":
                name = record["attributes"].get("statement_name", "")
                if record.get("statement") is not None:
                    self._sql.pop(name, None)
                    self._sql[name] = record["statement"]
                    if len(self._sql) > self.MAX_STATEMENTS:
                        del self._sql[next(iter(self._sql))]
                self._unbound = name
            elif kind == "Bind":
                name = record["attributes"].get("statement_name", "")
                sql = self._sql.get(name) if name and name != self._unbound else None
                if sql is not None:
                    record["statement"] = record["text"] = sql
                    record["operation"] = "statement"
                self._unbound = None
            elif kind == "Close" and record["attributes"].get("kind") == "statement":
                self._sql.pop(record["attributes"].get("name", ""), None)
