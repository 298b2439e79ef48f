"""A replay as plain text (for a terminal or a ticket) or JSON (for tools).

Text reads top to bottom like the session happened: the verification line
first, who connected where, then one block per step with its time offset.
What a protocol's messages say comes from its renderer (beside its codec,
`ingest.protocols.<name>.render`); this module lays out the rest.
"""

from __future__ import annotations

import json
from typing import Any

from ingest.protocols.render import GENERIC, Renderer
from query.replay import Replay

_INDENT = " " * 18
MAX_CELL = 40


def offset(seconds: float) -> str:
    """+0.004s, +12.5s, +4m05s, +1h02m: precise when close together, short when far apart."""
    if seconds < 10:
        return f"+{seconds:.3f}s"
    if seconds < 60:
        return f"+{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"+{minutes}m{secs:02d}s"
    return f"+{minutes // 60}h{minutes % 60:02d}m"


def who(identity: dict[str, Any] | None) -> str:
    if identity is None:
        return "(no identity: authentication failed)"
    groups = ", ".join(identity.get("groups") or [])
    return f"{identity['subject']} ({groups})" if groups else identity["subject"]


def _cell(value: str | None) -> str:
    text = "NULL" if value is None else value.replace("\n", "\\n")
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 1] + "…"


def table(columns: list[str], rows: list[list[str | None]], masked: set[int], label: str = "[masked]") -> list[str]:
    """A small aligned table; masked rows are marked (originals sealed, or shown as `[revealed]` with the custodian key)."""
    cells = [[_cell(c) for c in columns]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(columns))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return [line + "   " + label if i - 2 in masked else line.rstrip() for i, line in enumerate(lines)]


def result_rows(step: dict[str, Any]) -> list[str]:
    """The rows a result step shows, as text lines (none for other steps)."""
    if step.get("columns") is None:
        return []
    lines = table(step["columns"], step["rows"], set(step["masked_rows"]),
                  "[revealed]" if step.get("revealed") else "[masked]")
    if step["row_count"] > len(step["rows"]):
        lines.append(f"… {step['row_count'] - len(step['rows'])} more rows")
    return lines


def _policy(step: dict[str, Any]) -> tuple[str, list[str]]:
    head = f"{step['action'].upper()} by rule {step['rule']}"
    if step["request_id"]:
        head += f" (request {step['request_id']})"
    body = [f"reason: {step['reason']}"] if step["reason"] else []
    if step["approver"]:
        body.append(f"approver: {who(step['approver'])}")
    return head, body


def _channel(step: dict[str, Any]) -> list[str]:
    """Where a Frames step was, when the protocol has channels: the marker already says the direction."""
    return [f"{step.get('direction')}, channel {step['channel']}"] if step.get("channel") is not None else []


def describe(step: dict[str, Any], renderer: Renderer = GENERIC) -> tuple[str, str, list[str]]:
    """(marker, headline, detail lines) of one step: the session's steps here, its Frames steps by
    the protocol's renderer (`Replay.renderer`), the generic one when that does not know them."""
    kind = step["step"]
    if kind == "start":
        return "START", f"{who(step['identity'])} from {step['source_address']} to {step['target']}", [
            f"{step['protocol']} via {step['client_application'] or 'unknown client'}, upstream {step['upstream']}"]
    if kind == "policy":
        head, body = _policy(step)
        return "POLICY", head, body
    if kind == "protocol_error":
        return "PROTOCOL", f"{step['code']} {step['message']}", [f"sample: {step['sample']!r}"]
    if kind == "end":
        return "END", f"{step['reason']} after {offset(step['duration_us'] / 1e6)[1:]}", [
            f"client {step['client_bytes']:,} B in {step['client_messages']} messages, "
            f"server {step['server_bytes']:,} B in {step['server_messages']} messages"]
    described = renderer.describe(step) or GENERIC.describe(step)
    if described is None:  # a step of another renderer's kind: say what is known
        described = step.get("direction", "").upper() or "FRAMES", " ".join(step.get("messages", [])), []
    marker, head, body = described
    return marker, head, _channel(step) + body


def render_text(replay: Replay) -> str:
    lines = [replay.verification.line, ""]
    renderer = replay.renderer
    for step in replay.steps:
        marker, head, body = describe(step, renderer)
        lines.append(f"{offset(step['offset_s']):>10} {marker:<7}{head}")
        lines += [_INDENT + line for line in body + result_rows(step)]
    return "\n".join(lines) + "\n"


def render_json(replay: Replay) -> str:
    return json.dumps(replay.to_json(), indent=1, ensure_ascii=False) + "\n"
