"""The protocol-neutral event bodies (schemas/event.avsc) a session records.

Pure functions: the session decides *when* to record, this module decides
*what* a record holds. A front end builds only its own `Message` records.
"""

from __future__ import annotations

from typing import Any

Record = dict[str, Any]

PROXY_ORIGIN = {"origin": "proxy"}
SAMPLE_BYTES = 64


def session_start(*, identity: Record | None, source_address: str, client_cert_fingerprint: str | None,
                  target: str, upstream: str, protocol: str, client_application: str | None,
                  attributes: dict[str, str]) -> Record:
    return {
        "identity": identity,
        "source_address": source_address,
        "client_cert_fingerprint": client_cert_fingerprint,
        "target": target,
        "upstream": upstream,
        "protocol": protocol,
        "client_application": client_application,
        "attributes": attributes,
    }


def decision(rule: str, action: str, reason: str | None, statement: str | None, *,
             request_id: str | None = None, approver: Record | None = None,
             attributes: dict[str, str] | None = None) -> Record:
    """A PolicyDecision body; `statement` is the operation's text (SQL, command line, request line)."""
    return {"rule": rule, "action": action, "reason": reason, "statement": statement,
            "request_id": request_id, "approver": approver, "attributes": attributes or {}}


def authentication_denied(reason: str, attributes: dict[str, str]) -> Record:
    return decision("authentication", "deny", reason, None, attributes=attributes)


def protocol_error(code: str, message: str, sample: bytes) -> Record:
    return {"code": code, "message": message, "sample": bytes(sample[:SAMPLE_BYTES])}


def frames(direction: str, messages: list[Record]) -> Record:
    return {"direction": direction, "messages": messages}


def raw_message(kind: str, data: bytes, attributes: dict[str, str] | None = None) -> Record:
    """A Message record with nothing decoded (bytes the front end never parsed, the proxy's own bytes)."""
    return {"type": kind, "data": data, "attributes": attributes or {}}


class Counters:
    """Bytes and messages each way, for SessionEnd: from the client, and to it."""

    __slots__ = ("client_bytes", "server_bytes", "client_messages", "server_messages")

    def __init__(self) -> None:
        self.client_bytes = self.server_bytes = self.client_messages = self.server_messages = 0


def session_end(reason: str, duration_us: int, counters: Counters) -> Record:
    return {
        "reason": reason,
        "duration_us": duration_us,
        "client_bytes": counters.client_bytes,
        "server_bytes": counters.server_bytes,
        "client_messages": counters.client_messages,
        "server_messages": counters.server_messages,
    }
