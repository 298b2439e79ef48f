"""Parquet segments: the ledger's rows, one per accepted event. THE contract of the query layer.

`SCHEMA` is the one definition of a segment's columns; `ledger/README.md`
documents each. A row carries the event's exact signed bytes (`event`) and its
salt, which is all an auditor needs to recompute its Merkle leaf; every other
column is a decoded convenience for analysts and can be re-derived from `event`.

Rows are sorted by (session_id, seq), so one session is contiguous and small
row groups let DuckDB skip row groups by session_id statistics; `leaf_index`
gives the order of the leaves in the partition's Merkle tree (arrival order).
"""

from __future__ import annotations

import array
import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ingest.events import SignedEvent
from ingest.sessions import SessionIdentity
from ledger.durable import write_atomic

ROW_GROUP_ROWS = 16_384
COMPRESSION = "zstd"
SORT_KEYS = [("session_id", "ascending"), ("seq", "ascending")]

MESSAGE = pa.struct([
    ("type", pa.string()),
    ("statement", pa.string()),
    ("parameters", pa.list_(pa.string())),
    ("command_tag", pa.string()),
    ("rows", pa.int64()),
    ("error_code", pa.string()),
    ("error_message", pa.string()),
    # contract v2 (null in events written before it, and in segments written before it)
    ("direction", pa.string()),
    ("channel", pa.string()),
    ("offset_us", pa.int64()),
    ("operation", pa.string()),
    ("text", pa.string()),
    ("objects", pa.list_(pa.string())),
    ("outcome", pa.string()),
])

HASH = pa.binary(32)

SCHEMA = pa.schema([
    ("leaf_index", pa.int64()),
    ("partition", pa.int32()),
    ("kafka_offset", pa.int64()),
    ("event_id", pa.string()),
    ("session_id", pa.string()),
    ("seq", pa.int64()),
    ("ts", pa.timestamp("us", tz="UTC")),
    ("kind", pa.string()),
    ("producer", pa.string()),
    ("key_id", pa.string()),
    ("prev_hash", HASH),
    ("event_hash", HASH),
    # Identity of the session (ingest.sessions.SessionIdentity, in its field order), carried from its SessionStart
    # onto every row.
    ("subject", pa.string()),
    ("email", pa.string()),
    ("groups", pa.list_(pa.string())),
    ("issuer", pa.string()),
    ("source_address", pa.string()),
    ("target", pa.string()),
    ("protocol", pa.string()),
    ("client_application", pa.string()),
    # Frames
    ("direction", pa.string()),
    ("messages", pa.list_(MESSAGE)),
    ("statement", pa.string()),
    ("command_tag", pa.string()),
    ("rows", pa.int64()),
    ("error_code", pa.string()),
    ("error_message", pa.string()),
    # PolicyDecision
    ("policy_rule", pa.string()),
    ("policy_action", pa.string()),
    ("policy_reason", pa.string()),
    ("approver_subject", pa.string()),
    # SessionEnd
    ("end_reason", pa.string()),
    # Evidence
    ("salt", HASH),
    ("event", pa.binary()),
])


_BODY_COLUMNS = ("direction", "messages", "statement", "command_tag", "rows", "error_code", "error_message",
                 "policy_rule", "policy_action", "policy_reason", "approver_subject", "end_reason")
_NO_BODY = (None,) * len(_BODY_COLUMNS)


def _frames_columns(body: dict[str, Any]) -> tuple:
    """One pass over the messages (a folded event may carry thousands) for the first statement, command tag,
    error code and message, and the sum of row counts."""
    messages = body["messages"]
    statement = command_tag = error_code = error_message = rows = None
    for m in messages:
        if m.get("rows") is not None:
            rows = (rows or 0) + m["rows"]
        if statement is None:
            statement = m.get("statement")
        if command_tag is None:
            command_tag = m.get("command_tag")
        if error_code is None:
            error_code = m.get("error_code")
        if error_message is None:
            error_message = m.get("error_message")
    return (body["direction"], messages, statement, command_tag, rows, error_code, error_message,
            None, None, None, None, None)


def _body_columns(kind: str, body: dict[str, Any]) -> tuple:
    """Values of _BODY_COLUMNS: the decoded body fields analysts filter on."""
    if kind == "frames":
        return _frames_columns(body)
    if kind == "policy_decision":
        approver = body.get("approver") or {}
        return (None, None, body.get("statement"), None, None, None, None,
                body["rule"], body["action"], body.get("reason"), approver.get("subject"), None)
    if kind == "protocol_error":
        return (None, None, None, None, None, body["code"], body["message"], None, None, None, None, None)
    if kind == "session_end":
        return _NO_BODY[:-1] + (body["reason"],)
    return _NO_BODY


def _binary_array(values: tuple[bytes, ...]) -> pa.Array:
    """`pa.array(values, pa.binary())` from one join and one offsets array (half the CPU for the events column)."""
    data = b"".join(values)
    if len(data) >= 1 << 31:  # beyond 32-bit offsets: let Arrow split it
        return pa.array(values, type=pa.binary())
    offsets = array.array("i", itertools.accumulate(map(len, values), initial=0))
    return pa.Array.from_buffers(pa.binary(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(data)])


_warm = False


def _warm_up() -> None:
    """pyarrow imports pandas (~0.4 s of CPU) on its first conversion of a Python list: pay it when a ledger
    opens a partition, not in the middle of its first seal."""
    global _warm
    if not _warm:
        pa.array([0])
        _warm = True


CHUNK_ROWS = 1024
"""Rows kept as Python tuples before they become Arrow columns. A segment holds thousands of rows for seconds;
as Python objects (a tuple and a messages list each, at least) they are what every full collection of the cyclic
garbage collector scans again (bench/ledger.py: ~10 µs of CPU per sealed event went to the collector); as Arrow
buffers they are not objects."""


class SegmentBuilder:
    """Collects one segment's rows, one tuple each, and turns every `CHUNK_ROWS` of them into columns (one
    transposition and one `pa.array` per column); `table` joins the chunks into the table a single conversion
    of all the rows would have made (the same values, one chunk per column), so a segment is the same Parquet."""

    def __init__(self, partition: int):
        _warm_up()
        self.partition = partition
        self._rows: list[tuple] = []
        self._chunks: list[pa.Table] = []
        self._chunked = 0
        self.nbytes = 0

    def __len__(self) -> int:
        return self._chunked + len(self._rows)

    def add(self, leaf_index: int, offset: int, event: SignedEvent, event_hash: bytes, salt: bytes,
            identity: SessionIdentity) -> None:
        e = event.envelope
        kind = e["kind"]
        self._rows.append((leaf_index, self.partition, offset, e["event_id"], e["session_id"], e["seq"], e["ts"],
                           kind, e["producer"], e["key_id"], e["prev_hash"], event_hash, *identity,
                           *_body_columns(kind, e["body"]), salt, event.value))
        self.nbytes += len(event.value) + 200  # the decoded columns cost about as much again as small events
        if len(self._rows) >= CHUNK_ROWS:
            self._chunk()

    def _chunk(self) -> None:
        """The pending rows as one table of columns, in arrival order."""
        columns = list(zip(*self._rows))
        arrays = [_binary_array(column) if f.name == "event" else pa.array(column, type=f.type)
                  for column, f in zip(columns, SCHEMA)]
        self._chunks.append(pa.Table.from_arrays(arrays, schema=SCHEMA))
        self._chunked += len(self._rows)
        self._rows = []

    def table(self) -> pa.Table:
        """The rows as a table in the contract's order: by session, then seq."""
        if self._rows:
            self._chunk()
        if not self._chunks:
            return pa.Table.from_arrays([pa.array((), type=f.type) for f in SCHEMA], schema=SCHEMA)
        return pa.concat_tables(self._chunks).combine_chunks().sort_by(SORT_KEYS)


@dataclass(frozen=True)
class SegmentFile:
    sha256: bytes
    size: int


def encode_segment(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=COMPRESSION, row_group_size=ROW_GROUP_ROWS, write_statistics=True)
    return sink.getvalue()


def write_segment(table: pa.Table, path: Path) -> SegmentFile:
    """Write the segment durably and atomically; its SHA-256 is taken over the very bytes written."""
    data = encode_segment(table)
    write_atomic(path, data)
    return SegmentFile(hashlib.sha256(data).digest(), data.size)


def read_segment(path: Path) -> pa.Table:
    return pq.read_table(path, schema=SCHEMA)


def file_sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.digest()
