"""Sans-I/O protocol codecs, one package per protocol (`ingest.protocols.postgres`).

They live under `ingest/` because both the proxy (which speaks the protocols)
and query (which replays what was recorded) import them, and both already
import `ingest`: no new arrow, and query never re-implements a protocol.
"""

from __future__ import annotations


class ProtocolViolation(Exception):
    """A peer broke its wire protocol. Every codec raises this (or a subclass)
    for bytes it cannot frame or decode, so the proxy core catches one type.

    `code` is the protocol's own error code to report (a SQLSTATE for
    PostgreSQL), `message` the human text.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


__all__ = ["ProtocolViolation"]
