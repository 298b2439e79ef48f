"""Checks that an event is authentic and in its place: each check named, each failure typed.

A consumer (and the ledger) runs `EventVerifier.check` on every message; what fails
is quarantined with `Rejection.reason`, a stable machine-readable code:

    malformed          the bytes are not a SignedEvent of a schema we know
    key_mismatch       the Kafka key is not the event's session id
    unknown_key        key_id is not in the keyring
    wrong_role         key_id is trusted, but not for signing events
    key_not_yet_valid  signed before the key's not_before
    key_revoked        signed after the key's not_after
    bad_signature      the Ed25519 signature does not verify
    duplicate          this exact event was already accepted (a replay or a re-delivery)
    seq_conflict       another event with this seq was already accepted (a fork)
    seq_gap            seq is ahead of the next expected seq for the session
    chain_mismatch     prev_hash does not name the previous event of the session
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nacl.exceptions import BadSignatureError

from ingest.avro import DecodeError
from ingest.events import ZERO_HASH, SignedEvent, open_event
from ingest.keys import Keyring, KeyLookupError

REASONS = ("malformed", "key_mismatch", "unknown_key", "wrong_role", "key_not_yet_valid", "key_revoked",
           "bad_signature", "duplicate", "seq_conflict", "seq_gap", "chain_mismatch")


class Rejection(Exception):
    """An event that must not enter the ledger, and why."""

    def __init__(self, reason: str, detail: str, event: SignedEvent | None = None):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.event = reason, detail, event


def decode(value: bytes) -> SignedEvent:
    try:
        return open_event(value)
    except DecodeError as exc:
        raise Rejection("malformed", str(exc)) from None


def check_key(event: SignedEvent, kafka_key: bytes | None) -> None:
    if kafka_key is not None and kafka_key != event.session_id.encode():
        raise Rejection("key_mismatch", f"Kafka key {kafka_key[:64]!r} is not session {event.session_id}", event)


def check_signature(event: SignedEvent, keyring: Keyring) -> None:
    try:
        verify_key = keyring.key_for(event.key_id, event.ts, role="proxy")
    except KeyLookupError as exc:
        raise Rejection(exc.reason, str(exc), event) from None
    try:
        verify_key.verify(event.envelope_bytes, event.signature)
    except (BadSignatureError, ValueError):
        raise Rejection("bad_signature", f"signature by {event.key_id} does not verify", event) from None


RECENT_WINDOW = 1024


@dataclass
class ChainPosition:
    """What a verifier remembers of a session: enough to check the next event, and duplicates of recent ones."""

    next_seq: int = 0
    last_hash: bytes = ZERO_HASH
    recent: dict[int, bytes] = field(default_factory=dict)

    def to_json(self, window: int = RECENT_WINDOW) -> dict:
        """A JSON-able snapshot keeping the last `window` recent hashes, so a restarted verifier still names duplicates."""
        first = self.next_seq
        while first > max(0, self.next_seq - window) and first - 1 in self.recent:
            first -= 1  # accepted seqs are contiguous, so the recent ones are a run ending at next_seq - 1
        return {"next_seq": self.next_seq, "last_hash": self.last_hash.hex(),
                "recent": "".join(self.recent[s].hex() for s in range(first, self.next_seq))}

    @classmethod
    def from_json(cls, data: dict) -> "ChainPosition":
        """Inverse of `to_json`: the recent hashes are those of the seqs just before `next_seq`."""
        hashes = bytes.fromhex(data["recent"])
        count = len(hashes) // 32
        first = data["next_seq"] - count
        recent = {first + i: hashes[32 * i:32 * (i + 1)] for i in range(count)}
        return cls(data["next_seq"], bytes.fromhex(data["last_hash"]), recent)


class SessionChains:
    """Per-session chain positions; `check` then `accept` keeps them in step with what was accepted."""

    def __init__(self) -> None:
        self.sessions: dict[str, ChainPosition] = {}

    def check(self, event: SignedEvent) -> None:
        position = self.sessions.get(event.session_id, ChainPosition())
        seq = event.seq
        if seq < position.next_seq:
            seen = position.recent.get(seq)
            if seen == event.hash:
                raise Rejection("duplicate", f"session {event.session_id} seq {seq} was already accepted", event)
            raise Rejection("seq_conflict", f"session {event.session_id} seq {seq} was already accepted with other contents", event)
        if seq > position.next_seq:
            raise Rejection("seq_gap", f"session {event.session_id} expected seq {position.next_seq}, got {seq}", event)
        if event.prev_hash != position.last_hash:
            raise Rejection("chain_mismatch", f"session {event.session_id} seq {seq} prev_hash {event.prev_hash.hex()[:16]}… does not match {position.last_hash.hex()[:16]}…", event)

    def accept(self, event: SignedEvent) -> None:
        position = self.sessions.setdefault(event.session_id, ChainPosition())
        digest = event.hash
        position.next_seq, position.last_hash = event.seq + 1, digest
        position.recent[event.seq] = digest
        position.recent.pop(event.seq - RECENT_WINDOW, None)


class EventVerifier:
    """Every check an event must pass before it is accepted."""

    def __init__(self, keyring: Keyring, chains: SessionChains | None = None):
        self.keyring = keyring
        self.chains = chains or SessionChains()

    def check(self, value: bytes, kafka_key: bytes | None = None) -> SignedEvent:
        """The accepted event; raises Rejection. Accepting advances the session's chain."""
        event = decode(value)
        check_key(event, kafka_key)
        check_signature(event, self.keyring)
        self.chains.check(event)
        self.chains.accept(event)
        return event
