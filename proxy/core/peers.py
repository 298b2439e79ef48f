"""An authenticated channel between replicas of one proxy: HMAC-SHA256 with a shared secret.

Replicas behind one load balancer sometimes must hand each other something a
client sent to the wrong one (a PostgreSQL CancelRequest). What one replica
tells another is sealed: `seal` adds a version, the time, a random nonce and
an HMAC over them, the caller's `context` and the payload; `open` returns the
payload only if the HMAC verifies, the time is within `window` seconds of this
replica's clock and the nonce was not seen within that window (no replay).

Why a shared secret and not the proxy's Ed25519 key: each proxy host signs
events with its own key, but verifying a peer's key would need the keyring
(and its validity rules, made for event times) on every proxy host, and an
Ed25519 verify per forged message costs a flood's worth of CPU; a replica
channel only ever vouches "a replica of this proxy received this", which is
exactly what one secret shared by the replicas says. The protocol-specific
checks (the cancel key itself) still happen at the receiving replica.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import time
from collections.abc import Callable

VERSION = 1
_HEADER = struct.Struct(">BqI8s")  # version, unix ms, nonce (12 bytes as I + 8s)
_NONCE_BYTES = 12
_MAC_BYTES = 32
_LABEL = b"custody-peer-v1\x00"
MIN_SECRET_BYTES = 16


class PeerChannel:
    def __init__(self, secret: bytes, window: float = 30.0, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the replicas' shared secret must be at least {MIN_SECRET_BYTES} bytes")
        self._key = hashlib.sha256(_LABEL + secret).digest()
        self._window, self._clock = window, clock
        self._seen: dict[bytes, float] = {}  # nonce -> when it may be forgotten

    @property
    def overhead(self) -> int:
        return _HEADER.size + _MAC_BYTES

    def _mac(self, context: bytes, body: bytes) -> bytes:
        return hmac.new(self._key, struct.pack(">H", len(context)) + context + body, hashlib.sha256).digest()

    def seal(self, context: bytes, payload: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        body = _HEADER.pack(VERSION, int(self._clock() * 1000), int.from_bytes(nonce[:4], "big"), nonce[4:]) + payload
        return body + self._mac(context, body)

    def open(self, context: bytes, sealed: bytes) -> bytes | None:
        """The payload, or None: forged, altered, stale, from the future or replayed."""
        if len(sealed) < self.overhead:
            return None
        body, mac = sealed[:-_MAC_BYTES], sealed[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(context, body)):
            return None
        version, millis, head, tail = _HEADER.unpack_from(body)
        now = self._clock()
        if version != VERSION or abs(now - millis / 1000) > self._window:
            return None
        nonce = head.to_bytes(4, "big") + tail
        self._seen = {n: until for n, until in self._seen.items() if until > now} if len(self._seen) > 1024 else self._seen
        if self._seen.get(nonce, 0) > now:
            return None
        self._seen[nonce] = now + 2 * self._window
        return body[_HEADER.size:]
