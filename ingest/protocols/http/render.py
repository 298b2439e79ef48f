"""How a recorded HTTP or Kubernetes session looks in a replay (see ingest/protocols/render.py).

A client run becomes a `request` step (method and target, headers as recorded — credentials already
redacted —, the body, JSON pretty-printed), a server run a `response` step (status, headers, body as
the client saw it: masked when masked; `reveal` opens sealed originals). Runs of tunnelled frames
(WebSocket, SPDY) become a `stream` step: the channel's name (stdin, stdout, stderr, error, resize)
and its bytes as text, so an exec reads like a terminal: INPUT (stdin), OUTPUT (stdout), STDERR,
STATUS (the error channel's Status: Success, or the failure and its exit code), RESIZE; runs of
frames without payload (SPDY SYN_STREAM/WINDOW_UPDATE, pings) are one FRAMES line. `asciicast(steps,
…)` turns an exec or attach into asciicast v2 with the shared writer (`ingest/protocols/asciicast.py`):
stdout and stderr as "o", resizes as "r", policy decisions as "m", stdin as "i" only when asked;
the command and the pod in the header.
"""

from __future__ import annotations

import json

from ..asciicast import Event, marker, write
from ..render import Description, Record, Reveal, Step
from .records import CHANNEL_NAMES

_MARKERS = {"stdin": "INPUT", "stdout": "OUTPUT", "stderr": "STDERR", "error": "STATUS", "resize": "RESIZE"}

BODY_CHARS = 4000


PROTOBUF_MAGIC = b"k8s\x00"  # the Kubernetes protobuf envelope's first bytes


def _body(data: bytes) -> str:
    if data.startswith(PROTOBUF_MAGIC):  # no decoder: recorded whole, shown as what it is
        return f"(Kubernetes protobuf, {len(data):,} B, not decoded)"
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
            if not payload:
                return {"step": "frames", "channel": channel, "frames": len(frames),
                        "types": list(dict.fromkeys(m["type"] for m in frames))}
            return {"step": "stream", "channel": channel, "name": CHANNEL_NAMES.get(channel or "", channel),
                    "frames": len(frames), "text": payload.decode("utf-8", "replace")}
        if heads and heads[0]["type"] == "Request":
            line, headers = _head(heads[0])
            step = {"step": "request", "line": line, "text": heads[0].get("text"), "headers": headers,
                    "operation": heads[0].get("operation"), "body": _body(data) if data else None,
                    "requests": len(heads)}
            attributes = heads[0].get("attributes") or {}
            if attributes.get("verb") in ("exec", "attach", "portforward"):
                step["kubernetes"] = {k: attributes[k] for k in ("verb", "namespace", "name", "container")
                                      if attributes.get(k)}
            return step
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
            name = step["name"] or "tunnel"
            marker_ = _MARKERS.get(name, "STREAM")
            if marker_ == "STATUS":
                return marker_, _status(step["text"]), []
            head = f"{len(step['text'].encode()):,} B" if marker_ != "STREAM" else f"{name} ({step['frames']} frames)"
            if marker_ == "RESIZE":
                size = _size(step["text"])
                head = f"{size[0]}x{size[1]}" if size else head
                return marker_, head, []
            return marker_, head, [repr(line)[1:-1] if marker_ == "INPUT" else line
                                   for line in step["text"].splitlines()]
        if kind == "frames":
            what = f" ({step['channel']})" if step.get("channel") else ""
            return "FRAMES", f"{', '.join(step['types'])}{what} ({step['frames']})", []
        if kind == "body":
            return "BODY", f"{step['bytes']:,} B", [step["body"]]
        return None


def _status(text: str) -> str:
    """The error channel: a v4/v5 Status (Success, or Failure with its message and exit code), or text."""
    try:
        status = json.loads(text)
    except ValueError:
        return text.strip() or "(empty)"
    if not isinstance(status, dict):
        return text.strip()
    if status.get("status") == "Success":
        return "Success"
    causes = (status.get("details") or {}).get("causes") or []
    code = next((c.get("message") for c in causes if c.get("reason") == "ExitCode"), None)
    return f"{status.get('status')}: {status.get('message', '')}" + (f" (exit code {code})" if code else "")


def _size(text: str) -> tuple[int, int] | None:
    """A resize message ({"Width": W, "Height": H}, one per line) as (width, height): the last one."""
    size = None
    for line in text.splitlines():
        try:
            document = json.loads(line)
            size = int(document["Width"]), int(document["Height"])
        except (ValueError, KeyError, TypeError):
            continue
    return size


def asciicast(steps: list[Step], *, include_input: bool = False, title: str | None = None) -> str:
    """The exec/attach streams of a replayed Kubernetes session (its steps, `query.replay`) as asciicast v2."""
    opened = next((s for s in steps if s.get("step") == "request" and (s.get("kubernetes") or {}).get("verb")
                   in ("exec", "attach")), None)
    pod = (opened or {}).get("kubernetes") or {}
    command = (opened or {}).get("text") if pod.get("verb") == "exec" else None
    width, height = 80, 24
    events: list[Event] = []
    for step in steps:
        at = float(step.get("offset_s") or 0.0)
        if step.get("step") == "policy":
            events.append(marker(step))
        elif step.get("step") == "stream":
            name = step.get("name")
            if name in ("stdout", "stderr"):
                events.append((at, "o", step["text"]))
            elif name == "stdin" and include_input:
                events.append((at, "i", step["text"]))
            elif name == "resize" and (size := _size(step["text"])) is not None:
                if not any(code != "m" for _, code, _ in events):
                    width, height = size
                events.append((at, "r", f"{size[0]}x{size[1]}"))
    where = f"{pod.get('namespace')}/{pod.get('name')}" if pod.get("name") else None
    what = " ".join(x for x in (pod.get("verb"), where, f"-- {command}" if command else None) if x)
    return write(events, width=width, height=height, command=command,
                 title=f"{title}: {what}" if title and what else title or what or None)


RENDERER = HttpRenderer()
