"""PostgreSQL wire protocol, sans I/O: framing (`protocol`), message bodies
(`messages`), the recording fields of each message (`summary`), recorded
runs back into messages (`records`), and how recorded messages read in a
replay (`render`, loaded by `ingest.protocols.renderer`).

The proxy (`proxy.postgres`) speaks through it and query replays through it;
everything here takes bytes and returns values, so it is tested without a
network.
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
    single_messages,
)
from .records import RUN_TYPES, split_run
from .summary import SUMMARIZED_TYPES, summarize

__all__ = [
    "FEATURE_NOT_SUPPORTED",
    "PROTOCOL_VIOLATION",
    "Direction",
    "Message",
    "MessageReader",
    "ProtocolViolation",
    "RUN_TYPES",
    "SUMMARIZED_TYPES",
    "single_messages",
    "split_run",
    "summarize",
    *_messages_all,
]
