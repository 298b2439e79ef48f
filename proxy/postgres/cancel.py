"""The proxy's own cancel keys, mapped to the target's real ones.

The client gets a BackendKeyData the proxy made up, so that the target's
process id and secret never leave the proxy, and a CancelRequest can only
reach the target through the proxy, which forwards it with the real key.

Several replicas of one proxy behind a load balancer: the CancelRequest opens
a new connection, which the balancer may send to another replica than the
session's. So with `[[proxy]] replica_id` the process id the client gets
carries the replica in bits 24-30 (the rest random, never 0), and a replica
that receives a key of another replica forwards it there (`replicas`, the
replicas' addresses by id) as a *forwarded cancel*: a CancelRequest with the
same process id whose key field is `FORWARDED_MAGIC` followed by the client's
key and address sealed on the replicas' authenticated channel
(`proxy.core.peers.PeerChannel`, bound to the process id). The owner opens it,
checks the client's key as for any cancel, records it in the session (with who
forwarded it and the client's address) and cancels with the real key; a
forwarded cancel is never forwarded again. The format rides in the key field
(protocol 3.2 allows keys of up to 256 bytes), so it crosses the same port
and framing as any cancel.
"""

from __future__ import annotations

import hmac
import secrets
import struct
from dataclasses import dataclass
from typing import Any

from proxy.core.peers import PeerChannel

SECRET_BYTES = 4  # protocol 3.0 keys are exactly 4 bytes
REPLICA_SHIFT = 24
MAX_REPLICAS = 128  # replica ids 0..127 in bits 24-30 of the (positive) 32-bit process id
FORWARDED_MAGIC = b"\xc5CXF"  # a forwarded cancel's key field starts with it (a proxy-issued key is 4 bytes)
MAX_ADDRESS = 100


@dataclass(frozen=True)
class CancelTarget:
    """Where a cancel for one session goes, and with which key."""

    host: str
    port: int
    process_id: int
    secret: bytes
    front_end: Any  # the session's PostgresFrontEnd, which records the cancel (proxy.postgres.frontend)


class CancelKeys:
    """Issued keys of the live sessions of one listener."""

    def __init__(self, replica_id: int | None = None) -> None:
        if replica_id is not None and not 0 <= replica_id < MAX_REPLICAS:
            raise ValueError(f"replica_id must be 0..{MAX_REPLICAS - 1}")
        self.replica_id = replica_id
        self._targets: dict[int, tuple[bytes, CancelTarget]] = {}
        self._by_backend: dict[tuple[str, int, int], int] = {}  # (host, port, real pid) -> proxy pid

    def __len__(self) -> int:
        return len(self._targets)

    def issue(self, target: CancelTarget) -> tuple[int, bytes]:
        """A fresh random (process id, secret) for `target`'s client."""
        while True:
            if self.replica_id is None:
                process_id = secrets.randbelow(2**31 - 1) + 1
            else:
                process_id = self.replica_id << REPLICA_SHIFT | (secrets.randbelow(2**REPLICA_SHIFT - 1) + 1)
            if process_id not in self._targets:
                break
        secret = secrets.token_bytes(SECRET_BYTES)
        self._targets[process_id] = (secret, target)
        self._by_backend[(target.host, target.port, target.process_id)] = process_id
        return process_id, secret

    def lookup(self, process_id: int, secret: bytes) -> CancelTarget | None:
        """The target of a presented key, or None (compared in constant time)."""
        entry = self._targets.get(process_id)
        if entry is None or not hmac.compare_digest(entry[0], secret):
            return None
        return entry[1]

    def proxy_pid(self, host: str, port: int, backend_pid: int) -> int | None:
        """The pid this listener gave the client of the target's backend `backend_pid`, if it is one of ours.

        A NotificationResponse names the notifying backend; a client that
        compares it with its own BackendKeyData must see the pid it was given.
        """
        return self._by_backend.get((host, port, backend_pid))

    def release(self, process_id: int) -> None:
        entry = self._targets.pop(process_id, None)
        if entry is not None:
            target = entry[1]
            self._by_backend.pop((target.host, target.port, target.process_id), None)


def owner(process_id: int) -> int:
    """The replica id a process id was issued by (meaningful only where replicas are configured)."""
    return (process_id >> REPLICA_SHIFT) & (MAX_REPLICAS - 1)


@dataclass(frozen=True)
class ForwardedCancel:
    """A client's cancel as the replica that received it vouched for it."""

    sender: int  # the forwarding replica's id
    secret: bytes  # the key the client presented
    source_address: str  # the client's address, as the forwarding replica saw it


def is_forwarded(key_field: bytes) -> bool:
    return len(key_field) > SECRET_BYTES and key_field.startswith(FORWARDED_MAGIC)


def forwarded_key_field(channel: PeerChannel, sender: int, process_id: int, secret: bytes, source_address: str) -> bytes:
    """The key field of a forwarded cancel (the CancelRequest keeps the client's process id)."""
    address = source_address.encode("utf-8", "replace")[:MAX_ADDRESS]
    payload = struct.pack(">BB", sender, len(secret)) + secret + address
    return FORWARDED_MAGIC + channel.seal(struct.pack(">i", process_id), payload)


def open_forwarded(channel: PeerChannel, process_id: int, key_field: bytes) -> ForwardedCancel | None:
    """What a forwarded cancel says, or None when it is not one a replica sealed (forged, altered, replayed)."""
    payload = channel.open(struct.pack(">i", process_id), key_field[len(FORWARDED_MAGIC):])
    if payload is None or len(payload) < 2 or len(payload) < 2 + payload[1]:
        return None
    sender, length = payload[0], payload[1]
    secret, address = payload[2:2 + length], payload[2 + length:]
    return ForwardedCancel(sender, secret, address.decode("utf-8", "replace"))
