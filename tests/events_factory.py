"""Realistic bodies of every event kind, for tests and the demo data generators."""

from __future__ import annotations

from typing import Any


def session_start(subject: str = "alice@example.com", groups: tuple[str, ...] = ("dba",)) -> dict[str, Any]:
    return {
        "identity": {"subject": subject, "username": subject, "email": subject, "groups": list(groups),
                     "issuer": "https://idp.example.com/", "token_id": None},
        "source_address": "127.0.0.1:50432",
        "client_cert_fingerprint": None,
        "target": "local-postgres",
        "upstream": "127.0.0.1:5432/postgres",
        "protocol": "postgres",
        "client_application": "psql",
        "attributes": {"database": "postgres"},
    }


def frames(statement: str = "SELECT 1", payload: bytes = b"") -> dict[str, Any]:
    data = b"Q" + (len(statement) + 5).to_bytes(4, "big") + statement.encode() + b"\0"
    return {"direction": "client", "messages": [{"type": "Query", "data": data + payload, "statement": statement}]}


def result_frames(rows: int = 1) -> dict[str, Any]:
    return {"direction": "server", "messages": [
        {"type": "CommandComplete", "data": b"C\0\0\0\rSELECT 1\0", "command_tag": f"SELECT {rows}", "rows": rows}]}


def policy_decision(action: str = "block") -> dict[str, Any]:
    return {"rule": "block-drop", "action": action, "reason": "DROP TABLE is not allowed", "statement": "DROP TABLE t",
            "request_id": None, "approver": None, "attributes": {}}


def protocol_error() -> dict[str, Any]:
    return {"code": "08P01", "message": "invalid message length", "sample": b"\xff\xff"}


def session_end() -> dict[str, Any]:
    return {"reason": "client_terminate", "duration_us": 1234, "client_bytes": 100, "server_bytes": 200,
            "client_messages": 3, "server_messages": 5}


ALL_KINDS = {
    "session_start": session_start(),
    "frames": frames(),
    "policy_decision": policy_decision(),
    "protocol_error": protocol_error(),
    "session_end": session_end(),
}
