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
    session: Any  # the Session to note the cancel in (proxy.postgres.session.Session)


class CancelKeys:
    """Issued keys of the live sessions of one listener."""

    def __init__(self) -> None:
        self._targets: dict[int, tuple[bytes, CancelTarget]] = {}

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
        return process_id, secret

    def lookup(self, process_id: int, secret: bytes) -> CancelTarget | None:
        """The target of a presented key, or None (compared in constant time)."""
        entry = self._targets.get(process_id)
        if entry is None or not hmac.compare_digest(entry[0], secret):
            return None
        return entry[1]

    def release(self, process_id: int) -> None:
        self._targets.pop(process_id, None)
