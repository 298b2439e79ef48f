"""The proxy's own cancel keys, mapped to the target's real ones.

The client gets a BackendKeyData the proxy made up, so that the target's
process id and secret never leave the proxy, and a CancelRequest can only
reach the target through the proxy, which forwards it with the real key.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Any

SECRET_BYTES = 4  # protocol 3.0 keys are exactly 4 bytes


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

    def __init__(self) -> None:
        self._targets: dict[int, tuple[bytes, CancelTarget]] = {}
        self._by_backend: dict[tuple[str, int, int], int] = {}  # (host, port, real pid) -> proxy pid

    def __len__(self) -> int:
        return len(self._targets)

    def issue(self, target: CancelTarget) -> tuple[int, bytes]:
        """A fresh random (process id, secret) for `target`'s client."""
        while True:
            process_id = secrets.randbelow(2**31 - 1) + 1
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
