"""PostgreSQL wire protocol, sans I/O: framing (`protocol`), message bodies
(`messages`) and the recording fields of each message (`summary`).

Sockets and asyncio live elsewhere (`proxy.postgres.server`); everything here
takes bytes and returns values, so it is tested without a network.
"""

from .messages import *  # noqa: F403
from .messages import __all__ as _messages_all
from .protocol import (
    FEATURE_NOT_SUPPORTED,
    PROTOCOL_VIOLATION,
    Direction,
    Message,
    MessageReader,
    ProtocolViolation,
)
from .summary import SUMMARIZED_TYPES, summarize

__all__ = [
    "FEATURE_NOT_SUPPORTED",
    "PROTOCOL_VIOLATION",
    "Direction",
    "Message",
    "MessageReader",
    "ProtocolViolation",
    "SUMMARIZED_TYPES",
    "summarize",
    *_messages_all,
]
