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

import collections
import os
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from ingest.avro import DecodeError
from ingest.events import ZERO_HASH, SignedEvent, datetime_to_micros, open_event
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


def signing_key(event: SignedEvent, keyring: Keyring) -> bytes:
    """The public key that may have signed `event` (trusted, proxy role, valid at its time), or the Rejection."""
    try:
        return bytes(keyring.key_for(event.key_id, event.ts, role="proxy"))
    except KeyLookupError as exc:
        raise Rejection(exc.reason, str(exc), event) from None


def signature_valid(event: SignedEvent, public_key: bytes) -> bool:
    """Ed25519 over the envelope's exact bytes (libsodium; the GIL is released while it runs)."""
    if len(event.signature) != 64:
        return False
    try:
        crypto_sign_open(event.signature + event.envelope_bytes, public_key)
    except (BadSignatureError, ValueError):
        return False
    return True


def bad_signature(event: SignedEvent) -> Rejection:
    return Rejection("bad_signature", f"signature by {event.key_id} does not verify", event)


def check_signature(event: SignedEvent, keyring: Keyring) -> None:
    if not signature_valid(event, signing_key(event, keyring)):
        raise bad_signature(event)


def _signatures_valid(pairs: list[tuple[SignedEvent, bytes]]) -> list[bool]:
    return [signature_valid(event, public_key) for event, public_key in pairs]


CHUNK = 128
"""Signatures per task handed to the verify threads: large enough that the hand-off is noise, small enough
that the first results come back while later ones are still being decoded."""
LOOKAHEAD = 2 * max(1, os.cpu_count() or 1)
"""Chunks handed to the verify threads ahead of the one whose outcomes `check_many` yields: enough to keep every
thread busy while the caller works on that one."""

_pool: Executor | None = None
_pool_lock = threading.Lock()


def verify_pool() -> Executor:
    """Threads that check signatures while the caller's thread decodes and builds rows (libsodium runs
    without the GIL), one per core."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="custody-verify")
        return _pool


RECENT_WINDOW = 1024
"""How many of an open session's latest events a verifier can still tell a duplicate of."""
CLOSED_WINDOW = 16
"""The same after the session ended: late re-deliveries of its last events stay `duplicate`s."""
DIGEST_SIZE = 8
"""Recent events are remembered by 8 bytes of their hash: enough to tell a re-delivery from a fork
(both are rejected either way; only the reason could differ), at 1/4 of the memory."""


@dataclass(slots=True)
class ChainPosition:
    """What a verifier remembers of a session: enough to check the next event, and duplicates of recent ones.

    `recent` holds the digests of the seqs just before `next_seq`, oldest first.
    """

    next_seq: int = 0
    last_hash: bytes = ZERO_HASH
    recent: bytearray = field(default_factory=bytearray)

    def digest_of(self, seq: int) -> bytes | None:
        count = len(self.recent) // DIGEST_SIZE
        index = seq - (self.next_seq - count)
        if 0 <= index < count:
            return bytes(self.recent[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE])
        return None

    def advance(self, digest: bytes, window: int) -> None:
        self.next_seq += 1
        self.last_hash = digest
        self.recent += digest[:DIGEST_SIZE]
        if len(self.recent) > window * DIGEST_SIZE:
            del self.recent[:len(self.recent) - window * DIGEST_SIZE]

    def to_json(self, window: int = RECENT_WINDOW) -> dict:
        """A JSON-able snapshot keeping the last `window` digests, so a restarted verifier still names duplicates."""
        return {"next_seq": self.next_seq, "last_hash": self.last_hash.hex(),
                "recent": self.recent[-window * DIGEST_SIZE:].hex() if window else ""}

    @classmethod
    def from_json(cls, data: dict) -> "ChainPosition":
        return cls(data["next_seq"], bytes.fromhex(data["last_hash"]), bytearray.fromhex(data["recent"]))


class SessionChains:
    """Per-session chain positions; `check` then `accept` keeps them in step with what was accepted.

    Memory is bounded per session (RECENT_WINDOW digests while open, CLOSED_WINDOW after
    its SessionEnd), not per event.
    """

    def __init__(self) -> None:
        self.sessions: dict[str, ChainPosition] = {}

    def check(self, event: SignedEvent) -> None:
        envelope = event.envelope  # its fields, not SignedEvent's properties: this runs for every event
        position = self.sessions.get(envelope["session_id"]) or ChainPosition()
        seq = envelope["seq"]
        if seq < position.next_seq:
            if position.digest_of(seq) == event.hash[:DIGEST_SIZE]:
                raise Rejection("duplicate", f"session {event.session_id} seq {seq} was already accepted", event)
            raise Rejection("seq_conflict", f"session {event.session_id} seq {seq} was already accepted with other contents", event)
        if seq > position.next_seq:
            raise Rejection("seq_gap", f"session {event.session_id} expected seq {position.next_seq}, got {seq}", event)
        if envelope["prev_hash"] != position.last_hash:
            raise Rejection("chain_mismatch", f"session {event.session_id} seq {seq} prev_hash {event.prev_hash.hex()[:16]}… does not match {position.last_hash.hex()[:16]}…", event)

    def accept(self, event: SignedEvent) -> None:
        envelope = event.envelope
        position = self.sessions.get(envelope["session_id"])
        if position is None:  # not setdefault, which would build a ChainPosition for every event to drop it
            position = self.sessions[envelope["session_id"]] = ChainPosition()
        position.advance(event.hash, CLOSED_WINDOW if envelope["kind"] == "session_end" else RECENT_WINDOW)


class EventVerifier:
    """Every check an event must pass before it is accepted."""

    def __init__(self, keyring: Keyring, chains: SessionChains | None = None):
        self.keyring = keyring
        self.chains = chains or SessionChains()
        self._keys: dict[str, tuple] = {}

    def _public_key(self, event: SignedEvent) -> bytes:
        """`signing_key`, with each trusted key's validity kept in µs beside its bytes: no datetime and no
        VerifyKey per event. Kept per TrustedKey object, so a revocation (which replaces it) is seen at once."""
        key_id = event.envelope["key_id"]
        try:
            trusted = self.keyring.get(key_id)
        except KeyLookupError as exc:
            raise Rejection(exc.reason, str(exc), event) from None
        entry = self._keys.get(key_id)
        if entry is None or entry[0] is not trusted:
            try:
                bounds = tuple(None if t is None else datetime_to_micros(t)
                               for t in (trusted.not_before, trusted.not_after))
            except TypeError:  # naive datetimes: leave every check to the keyring
                bounds = None
            entry = self._keys[key_id] = (trusted, trusted.role == "proxy" and bounds, trusted.public_key)
        _, bounds, public_key = entry
        ts = event.envelope["ts"]
        if bounds and (bounds[0] is None or ts >= bounds[0]) and (bounds[1] is None or ts <= bounds[1]):
            return public_key
        return signing_key(event, self.keyring)  # the keyring says why not (or, for naive bounds, whether)

    def check(self, value: bytes, kafka_key: bytes | None = None) -> SignedEvent:
        """The accepted event; raises Rejection. Accepting advances the session's chain."""
        event = decode(value)
        check_key(event, kafka_key)
        check_signature(event, self.keyring)
        self.chains.check(event)
        self.chains.accept(event)
        return event

    def check_many(self, records: Iterable[tuple[bytes, bytes | None]],
                   pool: Executor | None = None) -> Iterator[SignedEvent | Rejection]:
        """`check` of each (value, Kafka key) in order, each outcome the accepted event or its Rejection.

        The same checks in the same order per event, so the same outcomes; but the signatures are checked by
        `pool` (default `verify_pool()`), a chunk at a time, while this thread decodes the chunks after it, and a
        chunk's outcomes are yielded once LOOKAHEAD chunks wait behind it: the caller's work on them (rows,
        leaves) overlaps the verifying of the next ones instead of following all of it.
        """
        pool = pool or verify_pool()
        pending: collections.deque[tuple[list, Future | None]] = collections.deque()
        chunk: list = []
        pairs: list[tuple[SignedEvent, bytes]] = []
        for value, kafka_key in records:
            try:
                event = decode(value)
                check_key(event, kafka_key)
                pair = (event, self._public_key(event))
            except Rejection as rejection:
                chunk.append(rejection)
            else:
                chunk.append(pair)
                pairs.append(pair)
                if len(pairs) >= CHUNK:
                    pending.append((chunk, pool.submit(_signatures_valid, pairs)))
                    chunk, pairs = [], []
                    if len(pending) > LOOKAHEAD:
                        yield from self._outcomes(*pending.popleft())
        if chunk:
            pending.append((chunk, pool.submit(_signatures_valid, pairs) if pairs else None))
        while pending:
            yield from self._outcomes(*pending.popleft())

    def _outcomes(self, items: list, future: Future | None) -> Iterator[SignedEvent | Rejection]:
        """One chunk's outcomes in order, once its signatures are checked: the chain checks run here, in order."""
        valid = iter(future.result() if future is not None else ())
        for item in items:
            if isinstance(item, Rejection):
                yield item
                continue
            event = item[0]
            if not next(valid):
                yield bad_signature(event)
                continue
            try:
                self.chains.check(event)
            except Rejection as rejection:
                yield rejection
                continue
            self.chains.accept(event)
            yield event
