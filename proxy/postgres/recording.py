"""Event bodies of a PostgreSQL session (schemas/event.avsc), built from messages.

Pure functions: the session state machine decides *when* to record, this
module decides *what* a record holds.

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

from ingest.protocols.postgres.protocol import Direction, Message
from ingest.protocols.postgres.records import RUN_TYPES
from ingest.protocols.postgres.summary import SUMMARIZED_TYPES, summarize

Record = dict[str, Any]

REDACTED: dict[str, str] = {
    "PasswordMessage": "token",
    "BackendKeyData": "cancel key",
    "CancelRequest": "cancel key",
}
PROXY_ORIGIN = {"origin": "proxy"}


def message_record(message: Message, origin: dict[str, str] | None = None) -> Record:
    """One message as the contract's `Message` record; `origin` marks the proxy's own messages."""
    kind = message.type
    if kind in SUMMARIZED_TYPES:
        record = summarize(message)
        record["data"] = message.data
    else:
        record = {"type": kind, "data": message.data, "attributes": {}}
    if kind in REDACTED:
        record["data"] = b""
        record["attributes"]["redacted"] = REDACTED[kind]
    if origin:
        record["attributes"].update(origin)
    return record


def message_records(messages: list[Message]) -> list[Record]:
    """The records of one read: runs of bulk messages folded, everything else one each.

    Raises ProtocolViolation when a message's body does not decode.
    """
    records: list[Record] = []
    run: list[bytes] = []
    run_type = ""
    for message in messages:
        kind = message.type
        if kind in RUN_TYPES:
            if kind != run_type:
                _flush_run(records, run_type, run)
                run, run_type = [], kind
            run.append(message.data)
            continue
        if run:
            _flush_run(records, run_type, run)
            run, run_type = [], ""
        records.append(message_record(message))
    _flush_run(records, run_type, run)
    return records


def _flush_run(records: list[Record], kind: str, run: list[bytes]) -> None:
    if len(run) == 1:
        records.append({"type": kind, "data": run[0], "attributes": {}})
    elif run:
        records.append({"type": kind, "data": b"".join(run), "attributes": {"messages": str(len(run))}})


def frames(direction: Direction, messages: list[Message]) -> Record:
    return {"direction": direction, "messages": message_records(messages)}


def proxy_frames(messages: list[Message]) -> Record:
    """What the proxy itself said to the client (its auth requests, its errors)."""
    return {"direction": "server", "messages": [message_record(m, PROXY_ORIGIN) for m in messages]}


def session_start(
    *,
    identity: dict[str, Any] | None,
    source_address: str,
    client_cert_fingerprint: str | None,
    target: str,
    upstream: str,
    client_application: str | None,
    attributes: dict[str, str],
) -> Record:
    return {
        "identity": identity,
        "source_address": source_address,
        "client_cert_fingerprint": client_cert_fingerprint,
        "target": target,
        "upstream": upstream,
        "protocol": "postgres",
        "client_application": client_application,
        "attributes": attributes,
    }


def authentication_denied(reason: str, attributes: dict[str, str]) -> Record:
    return {
        "rule": "authentication",
        "action": "deny",
        "reason": reason,
        "statement": None,
        "request_id": None,
        "approver": None,
        "attributes": attributes,
    }


SAMPLE_BYTES = 64


def protocol_error(code: str, message: str, sample: bytes) -> Record:
    return {"code": code, "message": message, "sample": bytes(sample[:SAMPLE_BYTES])}


def session_end(reason: str, duration_us: int, counters: "Counters") -> Record:
    return {
        "reason": reason,
        "duration_us": duration_us,
        "client_bytes": counters.client_bytes,
        "server_bytes": counters.server_bytes,
        "client_messages": counters.client_messages,
        "server_messages": counters.server_messages,
    }


class Counters:
    """Bytes and messages each way, for SessionEnd: from the client, and to it."""

    __slots__ = ("client_bytes", "server_bytes", "client_messages", "server_messages")

    def __init__(self) -> None:
        self.client_bytes = self.server_bytes = self.client_messages = self.server_messages = 0
