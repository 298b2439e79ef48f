"""Recorded PostgreSQL `Message` records (schemas/event.avsc) back into messages.

The proxy folds consecutive DataRow (or CopyData) messages of one read into one
record whose `data` is their wire bytes back to back (`attributes["messages"]`
is their count). Every PG message starts with its type byte and length, so the
boundaries are exact and `split_run` restores the individual messages: for
replay, for bundle readers, for tests.
"""

from __future__ import annotations

from typing import Any

from .protocol import Direction, Message, MessageReader

RUN_TYPES = frozenset({"DataRow", "CopyData"})


def split_run(direction: Direction, record: dict[str, Any]) -> list[Message]:
    """The individual messages of a recorded `Message` record (a run or a single one).

    Raises ProtocolViolation when the bytes do not frame as `direction`'s messages.
    """
    reader = MessageReader(direction, max_message_size=1 << 30)
    reader.start_typed()
    messages = reader.feed(record["data"])
    reader.eof()
    return messages


__all__ = ["RUN_TYPES", "split_run"]
