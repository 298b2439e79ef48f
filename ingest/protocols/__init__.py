"""Sans-I/O protocol codecs, one package per protocol (`ingest.protocols.postgres`).

They live under `ingest/` because both the proxy (which speaks the protocols)
and query (which replays what was recorded) import them, and both already
import `ingest`: no new arrow, and query never re-implements a protocol.

Here: the `ProtocolViolation` every codec raises, and the registry of replay
renderers (`renderer(protocol)`): each protocol's `render` module beside its
codec, and `render.GENERIC` for protocols without one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .render import Renderer


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


# protocol (SessionStart.protocol) -> the module whose RENDERER shows its messages in a replay.
# Imported on first use, so a proxy that never replays never loads them.
RENDERERS: dict[str, str] = {"postgres": "ingest.protocols.postgres.render", "mysql": "ingest.protocols.mysql.render",
                             "http": "ingest.protocols.http.render", "kubernetes": "ingest.protocols.http.render",
                             "ssh": "ingest.protocols.ssh.render"}


def renderer(protocol: str | None) -> Renderer:
    """The replay renderer of `protocol`; the generic one (type, direction,
    channel, bytes) for a protocol without its own, or an unknown one."""
    module = RENDERERS.get(protocol or "")
    if module is None:
        from .render import GENERIC

        return GENERIC
    return importlib.import_module(module).RENDERER


__all__ = ["RENDERERS", "ProtocolViolation", "renderer"]
