"""Protocol-neutral helpers for `Frames` bodies of event contract v2 (schemas/event.avsc).

One Frames event may carry the messages of several reads of a session, both
directions, several channels, in order. Each `Message` then says its own
`direction` (null = the Frames' direction), `channel` and `offset_us`, and
every front end fills the operation fields: `operation` (kind) and `text` and
`objects` on the message that starts an operation, `outcome` on the one that
ends it. The Frames' own `direction` is `mixed` when its messages go both ways,
so that a reader on the v1 schema never files a server message under `client`.
"""

from __future__ import annotations

from typing import Any

CLIENT, SERVER, MIXED = "client", "server", "mixed"
OUTCOMES = ("ok", "error")


def message_direction(frames: dict[str, Any], message: dict[str, Any]) -> str:
    """A message's effective direction: its own, else its Frames'."""
    return message.get("direction") or frames["direction"]


def frames_body(messages: list[dict[str, Any]], direction: str | None = None) -> dict[str, Any]:
    """A Frames body for `messages`, in order.

    `direction` is the default for messages that name none. The Frames' direction is the one
    direction all messages share, or `mixed`; a message whose direction differs from the
    Frames' then names its own.
    """
    directions = {m.get("direction") or direction for m in messages} or {direction}
    if None in directions:
        raise ValueError("a message has no direction and no default was given")
    if len(directions) == 1:
        return {"direction": directions.pop(), "messages": messages}
    return {"direction": MIXED,
            "messages": [m if m.get("direction") else {**m, "direction": direction} for m in messages]}
