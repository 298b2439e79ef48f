"""asciicast v2 (https://docs.asciinema.org/manual/asciicast/v2/): the one writer every terminal replay uses.

A header line (version 2, width, height, and the optional env, title, command), then one JSON array
per event: `[seconds, code, data]` with code "o" output, "i" input, "r" resize (`COLSxROWS`) or "m"
marker. Times are made non-decreasing (a player needs them in order). The protocols say what is a
terminal (`ingest.protocols.ssh.render.asciicast`, `ingest.protocols.http.render.asciicast`);
`custody replay --format asciicast` asks the session's renderer module for its `asciicast`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

Event = tuple[float, str, str]  # seconds since the start, "o" | "i" | "r" | "m", data


def marker(step: dict[str, Any]) -> Event:
    """A policy step as a marker: `action: rule: reason`."""
    return (float(step.get("offset_s") or 0.0), "m",
            f"{step.get('action')}: {step.get('rule')}: {step.get('reason') or ''}")


def write(events: Iterable[Event], *, width: int = 80, height: int = 24, term: str | None = None,
          title: str | None = None, command: str | None = None) -> str:
    """The asciicast v2 text of `events` (in the order given), newline-terminated."""
    header: dict[str, Any] = {"version": 2, "width": int(width), "height": int(height)}
    if term:
        header["env"] = {"TERM": term}
    if title:
        header["title"] = title
    if command:
        header["command"] = command
    lines, last = [json.dumps(header)], 0.0
    for at, code, data in events:
        last = max(last, round(float(at), 6))
        lines.append(json.dumps([last, code, data]))
    return "\n".join(lines) + "\n"


__all__ = ["Event", "marker", "write"]
