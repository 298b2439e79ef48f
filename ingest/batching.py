"""Adaptive batching: a session's consecutive Frames events that wait together become one event.

Pure and order-preserving per session (contract v2, schemas/event.avsc): the
folded event's `ts` is its first part's, each message keeps its own
direction (`Frames.direction = "mixed"` when they differ, so a reader on the
old schema never files a server message under the client's direction) and
its `offset_us` after that `ts`. Nothing waits for a batch to fill: only
what already waits is folded, so at low load an event is written as soon as
it arrives.
"""

from __future__ import annotations

from typing import Any

Item = tuple[str, str, dict[str, Any], int]  # session id, kind, body, ts (µs)

MAX_MESSAGES = 4096
MAX_BYTES = 1 << 20


class _Run:
    """Frames events of one session being folded into the first one's place."""

    __slots__ = ("session_id", "ts", "parts", "messages", "size")

    def __init__(self, session_id: str, body: dict[str, Any], ts: int) -> None:
        self.session_id, self.ts = session_id, ts
        self.parts: list[tuple[dict[str, Any], int]] = [(body, ts)]
        self.messages = len(body["messages"])
        self.size = _size(body)

    def take(self, body: dict[str, Any], ts: int, max_messages: int, max_bytes: int) -> bool:
        count, size = len(body["messages"]), _size(body)
        if self.messages + count > max_messages or self.size + size > max_bytes:
            return False
        self.parts.append((body, ts))
        self.messages += count
        self.size += size
        return True

    def item(self) -> Item:
        if len(self.parts) == 1:
            body, ts = self.parts[0]
            return self.session_id, "frames", body, ts
        directions = {body["direction"] for body, _ in self.parts}
        mixed = len(directions) > 1
        messages: list[dict[str, Any]] = []
        for body, ts in self.parts:
            offset = ts - self.ts or None
            for message in body["messages"]:
                if mixed:
                    message["direction"] = body["direction"]
                if offset is not None:
                    message["offset_us"] = offset
                messages.append(message)
        direction = "mixed" if mixed else next(iter(directions))
        return self.session_id, "frames", {"direction": direction, "messages": messages}, self.ts


def _size(body: dict[str, Any]) -> int:
    return sum(len(message["data"]) for message in body["messages"])


def fold(items: list[Item], max_messages: int = MAX_MESSAGES, max_bytes: int = MAX_BYTES) -> list[Item]:
    """The same events, each session's consecutive Frames folded (up to the bounds), in per-session order."""
    out: list[Item | _Run] = []
    open_runs: dict[str, _Run] = {}
    for session_id, kind, body, ts in items:
        if kind == "frames" and not any("direction" in m for m in body["messages"]):
            run = open_runs.get(session_id)
            if run is not None and run.take(body, ts, max_messages, max_bytes):
                continue
            open_runs[session_id] = run = _Run(session_id, body, ts)
            out.append(run)
            continue
        open_runs.pop(session_id, None)
        out.append((session_id, kind, body, ts))
    return [entry.item() if isinstance(entry, _Run) else entry for entry in out]
