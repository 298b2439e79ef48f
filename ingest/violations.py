"""Violations: what the SOC subscribes to on `custody.violations`.

One JSON document per violation, with stable field names (schemas/violation.schema.json):
policy blocks, approval denials and expiries, authentication failures,
protocol errors, and every quarantined event (forgery, tampering, chain gaps,
re-deliveries). The ledger publishes them once the evidence behind them is
sealed, so a violation always points at something an investigator can replay.
Delivery is at least once; `id` is deterministic, so a consumer can de-duplicate.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, Iterator

from ingest.consumer import Record
from ingest.events import SignedEvent, micros_to_datetime
from ingest.sessions import SessionIdentity
from ingest.verify import Rejection

SCHEMA_ID = "custody.violation/v1"

QUARANTINE_SEVERITY = {
    "bad_signature": "critical", "unknown_key": "critical", "wrong_role": "critical", "key_revoked": "critical",
    "key_not_yet_valid": "critical", "seq_conflict": "critical", "chain_mismatch": "critical",
    "key_mismatch": "high", "seq_gap": "high", "malformed": "high", "duplicate": "info",
}
POLICY_CATEGORY = {"block": ("policy_block", "medium"), "deny": ("approval_denied", "medium")}
EXPIRED = ("approval_expired", "low")
"""A hold nobody decided in time is recorded as a denial with attributes {"expired": "true"}."""


def _iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _who(identity: SessionIdentity | None) -> dict[str, Any] | None:
    if identity is None or identity.subject is None:
        return None
    return {"subject": identity.subject, "email": identity.email, "groups": list(identity.groups or []),
            "issuer": identity.issuer}


def _document(*, id: str, time: datetime, severity: str, category: str, reason: str, detail: str | None,
              identity: SessionIdentity | None, session_id: str | None, event_id: str | None, statement: str | None = None,
              rule: str | None = None, action: str | None = None, source: str | None = None) -> dict[str, Any]:
    return {
        "schema": SCHEMA_ID, "id": id, "time": _iso(time), "severity": severity, "category": category,
        "reason": reason, "detail": detail, "identity": _who(identity),
        "source_address": identity.source_address if identity else None, "target": identity.target if identity else None,
        "statement": statement, "rule": rule, "action": action,
        "session_id": session_id, "event_id": event_id, "source": source,
    }


def from_event(event: SignedEvent, identity: SessionIdentity | None) -> dict[str, Any] | None:
    """The violation an accepted event records, if it records one."""
    if event.kind not in ("protocol_error", "policy_decision"):  # most events: decide before building anything
        return None
    body, when = event.body, micros_to_datetime(event.envelope["ts"])
    common = dict(id=event.event_id, time=when, identity=identity, session_id=event.session_id, event_id=event.event_id)
    if event.kind == "protocol_error":
        return _document(severity="low", category="protocol_error", reason=body["code"], detail=body["message"], **common)
    if event.kind != "policy_decision":
        return None
    if body["rule"] == "authentication" and body["action"] == "deny":
        return _document(severity="medium", category="auth_failure", reason=(body.get("reason") or "").split(":")[0],
                         detail=body.get("reason"), rule=body["rule"], action=body["action"],
                         identity=identity, **{k: v for k, v in common.items() if k != "identity"})
    if body["action"] not in POLICY_CATEGORY:
        return None
    expired = (body.get("attributes") or {}).get("expired") == "true"
    category, severity = EXPIRED if expired else POLICY_CATEGORY[body["action"]]
    return _document(severity=severity, category=category, reason=body["rule"], detail=body.get("reason"),
                     statement=body.get("statement"), rule=body["rule"], action=body["action"], **common)


def from_quarantine(record: Record, rejection: Rejection, identity: SessionIdentity | None) -> dict[str, Any]:
    """Every quarantined message is a violation; its identity is the claimed session's, when known."""
    event = rejection.event
    source = f"{record.topic}/{record.partition}@{record.offset}"
    return _document(id=f"quarantine:{source}", time=datetime.now(timezone.utc),
                     severity=QUARANTINE_SEVERITY[rejection.reason], category="quarantine", reason=rejection.reason,
                     detail=rejection.detail, identity=identity, session_id=event.session_id if event else None,
                     event_id=event.event_id if event else None, source=source)


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def tail(consumer, follow: bool, idle_seconds: float = 2.0) -> Iterator[dict[str, Any]]:
    """Violations from the start of the topic; stops after `idle_seconds` of silence unless following."""
    quiet_since = None
    while True:
        batches = consumer.poll(timeout_ms=500)
        records = [m for batch in batches.values() for m in batch]
        for message in sorted(records, key=lambda m: (m.timestamp, m.partition, m.offset)):
            yield json.loads(message.value)
        if records:
            quiet_since = None
        elif not follow:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= idle_seconds:
                return
