"""Just-in-time approval: the documents on `custody.approvals` and the rules a decision must pass.

Pure (no I/O): the proxy's gateway (`proxy.approvals_gateway`) and the
reviewers' CLI (`custody.commands.approvals`) both build and read these documents.

One JSON document per Kafka message, key = request id:

* request  — `{"type": "request", request_id, session_id, requester, target,
  statement, rule, reason, approvers, created_at, expires_at, proxy_key_id}`,
  published by the proxy that holds the statement.
* decision — `{"type": "decision", request_id, decision, reason, at, approver,
  sealed}`. `approver` is who the reviewer's token says they are (for
  people reading the topic). `sealed` is what the proxy trusts: a libsodium
  sealed box, to the holding proxy's key (its Ed25519 key from the keyring,
  as X25519), of `{request_id, decision, reason, token}`. The proxy opens it,
  verifies the reviewer's own OIDC token itself, and checks that the reviewer
  may approve. Why sealed: a bearer token on a shared topic would let any
  reader log in as the reviewer; sealed, only the proxy that asked sees it,
  and decision, reason and token are bound together, so nobody can move a
  token from a denial onto an approval.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import SealedBox
from nacl.signing import SigningKey, VerifyKey

from ingest.errors import CustodyError

__all__ = [
    "DECISIONS", "ApprovalError", "ApprovalOutcome", "ApprovalRequest", "DecisionDocument", "Ledger",
    "SealedDecision", "check_reviewer", "decision_document", "decode", "encode", "open_decision", "parse_time",
]

DECISIONS = ("approve", "deny")


class ApprovalError(CustodyError):
    """A decision that must not count: malformed, not sealed to us, or by someone who may not decide."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True)
class ApprovalRequest:
    """A held statement waiting for a reviewer; `requester` is the session's identity (Avro Identity shape)."""

    request_id: str
    session_id: str
    requester: dict[str, Any]
    target: str
    statement: str
    rule: str
    reason: str
    approvers: tuple[str, ...]
    created_at: str
    expires_at: str
    proxy_key_id: str
    type: str = field(default="request")

    @classmethod
    def new(cls, *, session_id: str, requester: dict[str, Any], target: str, statement: str, rule: str,
            reason: str, approvers: Iterable[str], timeout: float, proxy_key_id: str) -> ApprovalRequest:
        now = _now()
        return cls(str(uuid.uuid4()), session_id, requester, target, statement, rule, reason, tuple(approvers),
                   _iso(now), _iso(now + timedelta(seconds=timeout)), proxy_key_id)

    @property
    def timeout(self) -> float:
        return max(0.0, (parse_time(self.expires_at) - _now()).total_seconds())

    def document(self) -> dict[str, Any]:
        return {**asdict(self), "approvers": list(self.approvers)}

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> ApprovalRequest:
        try:
            return cls(**{**doc, "approvers": tuple(doc["approvers"])})
        except (TypeError, KeyError) as exc:
            raise ApprovalError(f"malformed approval request: {exc}") from None


@dataclass(frozen=True)
class ApprovalOutcome:
    """What ends a hold: approve, deny, or expired (a denial nobody made), with who and why."""

    request_id: str
    decision: str  # approve | deny | expired
    approver: dict[str, Any] | None
    reason: str

    @property
    def approved(self) -> bool:
        return self.decision == "approve"


@dataclass(frozen=True)
class DecisionDocument:
    request_id: str
    decision: str
    reason: str
    at: str
    approver: dict[str, Any] | None
    sealed: str
    type: str = field(default="decision")

    def document(self) -> dict[str, Any]:
        return asdict(self)


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def decode(value: bytes) -> ApprovalRequest | DecisionDocument:
    """One topic message; ApprovalError for anything else (the topic is shared, so never trust its shape)."""
    try:
        doc = json.loads(value)
        if doc.get("type") == "request":
            return ApprovalRequest.from_document(doc)
        if doc.get("type") == "decision":
            return DecisionDocument(**doc)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ApprovalError(f"malformed approvals message: {exc}") from None
    raise ApprovalError("approvals message of unknown type")


def decision_document(request: ApprovalRequest, decision: str, reason: str, token: str,
                      approver: dict[str, Any] | None, proxy_verify_key: VerifyKey) -> DecisionDocument:
    """The reviewer's decision, sealed with their token to the proxy that holds the statement."""
    if decision not in DECISIONS:
        raise ApprovalError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
    inner = encode({"request_id": request.request_id, "decision": decision, "reason": reason, "token": token})
    sealed = SealedBox(proxy_verify_key.to_curve25519_public_key()).encrypt(inner)
    return DecisionDocument(request.request_id, decision, reason, _iso(_now()), approver, sealed.hex())


@dataclass(frozen=True)
class SealedDecision:
    decision: str
    reason: str
    token: str


def open_decision(document: DecisionDocument, proxy_signing_key: SigningKey) -> SealedDecision:
    """What the reviewer sealed; ApprovalError unless it opens with our key and names this request."""
    try:
        box = SealedBox(proxy_signing_key.to_curve25519_private_key())
        inner = json.loads(box.decrypt(bytes.fromhex(document.sealed)))
        sealed = SealedDecision(inner["decision"], inner["reason"], inner["token"])
        request_id = inner["request_id"]
    except (CryptoError, ValueError, KeyError, TypeError) as exc:
        raise ApprovalError(f"decision for {document.request_id} does not open with this proxy's key: {exc}") from None
    if request_id != document.request_id or sealed.decision not in DECISIONS:
        raise ApprovalError(f"decision for {document.request_id} is not a sealed decision on that request")
    return sealed


def check_reviewer(request: ApprovalRequest, subject: str, groups: Collection[str]) -> None:
    """The rules of approval: never your own statement, and only as a member of an approver group."""
    if subject == request.requester.get("subject"):
        raise ApprovalError(f"{subject} requested {request.request_id} and cannot decide on it")
    if not set(groups) & set(request.approvers):
        raise ApprovalError(f"{subject} is not in an approver group of {request.request_id} "
                            f"({', '.join(request.approvers)})")


@dataclass
class Ledger:
    """What the topic says so far: every request and its decision, for `custody approvals list`."""

    requests: dict[str, ApprovalRequest] = field(default_factory=dict)
    decisions: dict[str, DecisionDocument] = field(default_factory=dict)

    def add(self, item: ApprovalRequest | DecisionDocument) -> None:
        if isinstance(item, ApprovalRequest):
            self.requests.setdefault(item.request_id, item)
        else:
            self.decisions.setdefault(item.request_id, item)

    def pending(self, now: datetime | None = None) -> list[ApprovalRequest]:
        """Requests without a decision that have not expired, oldest first."""
        now = now or _now()
        return [r for r in self.requests.values()
                if r.request_id not in self.decisions and parse_time(r.expires_at) > now]
