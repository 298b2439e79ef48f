"""How a recorded HTTP or Kubernetes session looks in a replay (see ingest/protocols/render.py).

A client run becomes a `request` step (method and target, headers as recorded — credentials already
redacted —, the body, JSON pretty-printed), a server run a `response` step (status, headers, body as
the client saw it: masked when masked; `reveal` opens sealed originals). Runs of tunnelled frames
(WebSocket, SPDY) become a `stream` step: the channel's name (stdin, stdout, stderr, error, resize)
and its bytes as text, so an exec reads like a terminal.
"""

from __future__ import annotations

import json

from ..render import Description, Record, Reveal, Step
from .records import CHANNEL_NAMES

BODY_CHARS = 4000


def _body(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    try:
        shown = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        lines = [line for line in text.split("\n") if line.strip()]
        try:  # a watch: one JSON event per line
            shown = "\n".join(json.dumps(json.loads(line), ensure_ascii=False) for line in lines)
        except ValueError:
            shown = text
    return shown if len(shown) <= BODY_CHARS else shown[:BODY_CHARS] + f"… ({len(data):,} B)"


def _head(record: Record) -> tuple[str, list[str]]:
    lines = (record.get("data") or b"").decode("latin-1").split("\r\n")
    return lines[0], [line for line in lines[1:] if line]


class HttpRenderer:
    protocol = "http"

    def step(self, direction: str, messages: list[Record], *, max_rows: int, reveal: Reveal | None) -> Step:
        heads = [m for m in messages if m["type"] in ("Request", "Response")]
        data = b"".join((reveal(m["sealed_original"]) if reveal and m.get("sealed_original") else m.get("data") or b"")
                        for m in messages if m["type"] == "Data")
        frames = [m for m in messages if m["type"].startswith(("ws.", "spdy.", "tunnel"))]
        if frames and not heads:
            channel = next((m.get("channel") for m in frames if m.get("channel") is not None), None)
            payload = b"".join(m.get("data") or b"" for m in frames)
            return {"step": "stream", "channel": channel, "name": CHANNEL_NAMES.get(channel or "", channel),
                    "frames": len(frames), "text": payload.decode("utf-8", "replace")}
        if heads and heads[0]["type"] == "Request":
            line, headers = _head(heads[0])
            return {"step": "request", "line": line, "text": heads[0].get("text"), "headers": headers,
                    "operation": heads[0].get("operation"), "body": _body(data) if data else None,
                    "requests": len(heads)}
        if heads:
            line, headers = _head(heads[0])
            masked = sorted({m["attributes"]["masked"] for m in messages if (m.get("attributes") or {}).get("masked")})
            return {"step": "response", "line": line, "status": (heads[0].get("attributes") or {}).get("status"),
                    "headers": headers, "body": _body(data) if data else None, "masked": masked}
        return {"step": "body", "bytes": len(data), "body": _body(data)}

    def describe(self, step: Step) -> Description | None:
        kind = step["step"]
        if kind == "request":
            detail = step["headers"] + ([step["body"]] if step["body"] else [])
            return "REQUEST", step["text"] or step["line"], detail
        if kind == "response":
            detail = step["headers"] + ([step["body"]] if step["body"] else [])
            if step["masked"]:
                detail.append(f"masked: {', '.join(step['masked'])}")
            return "RESPONSE", step["line"], detail
        if kind == "stream":
            return "STREAM", f"{step['name'] or 'tunnel'} ({step['frames']} frames)", step["text"].splitlines()
        if kind == "body":
            return "BODY", f"{step['bytes']:,} B", [step["body"]]
        return None


RENDERER = HttpRenderer()
