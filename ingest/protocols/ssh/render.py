"""How recorded SSH messages read in a replay, and a terminal session as an asciicast v2 file.

A replay step is a run of messages of one direction and one channel: the
SSH renderer shows exec command lines, shell and pty requests with their
size, window changes, terminal input and output as text, stderr, exit
status, and SFTP requests and replies (paths, sizes, a closed file's
SHA-256). `asciicast(steps, …)` turns the steps of a session's terminal
channel (the first with a pty) into asciicast v2
(the shared writer, ingest/protocols/asciicast.py): output as "o", window
changes as "r", policy decisions as "m" markers, and the client's keystrokes
as "i" only when asked (they may hold secrets, such as a sudo password).
"""

from __future__ import annotations

from typing import Any

from ..asciicast import Event, marker, write
from ..render import Description, Record, Reveal, Step

_SHOWN = 2000  # characters of terminal text shown per step in the text replay
_MARKERS = {"exec": "EXEC", "shell": "SHELL", "subsystem": "SUBSYSTEM", "pty-req": "PTY", "window-change": "RESIZE",
            "exit-status": "EXIT", "exit-signal": "EXIT", "direct-tcpip": "FORWARD", "env": "ENV",
            "userauth-request": "LOGIN", "signal": "SIGNAL", "disconnect": "PROXY", "channel-open": "OPEN",
            "eof": "EOF", "close": "CLOSE", "line": "LINE"}


def _attributes(item: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in item["attributes"].items())


def _text_lines(text: str) -> list[str]:
    shown = text if len(text) <= _SHOWN else text[:_SHOWN] + f"… ({len(text):,} characters)"
    return [repr(line)[1:-1] for line in shown.replace("\r\n", "\n").split("\n") if line]


def _detail(item: dict[str, Any]) -> list[str]:
    """One item of a step after its first: terminal text as lines, anything else as `type: attributes`."""
    if item["type"] == "data":
        return _text_lines(item.get("data", ""))
    return [f"{item['type']}: {item.get('text') or _attributes(item)}"]


def _item(message: Record) -> dict[str, Any]:
    kind = message["type"]
    data = message.get("data") or b""
    item: dict[str, Any] = {"type": kind, "attributes": dict(message.get("attributes") or {}), "bytes": len(data)}
    for key in ("text", "objects", "outcome", "error_code", "error_message"):
        if message.get(key) is not None:
            item[key] = message[key]
    if kind in ("data", "disconnect"):
        item["data"] = data.decode("utf-8", "replace")
    return item


class SSHRenderer:
    protocol = "ssh"

    def step(self, direction: str, messages: list[Record], *, max_rows: int, reveal: Reveal | None) -> Step:
        return {"step": "ssh", "items": [_item(m) for m in messages]}

    def describe(self, step: Step) -> Description | None:
        if step.get("step") != "ssh":
            return None
        items = step["items"]
        first = items[0]
        kind, attributes = first["type"], first["attributes"]
        client = step.get("direction") == "client"
        if kind == "data":
            data = [i for i in items if i["type"] == "data"]
            stderr = attributes.get("stream") == "stderr"
            marker = "INPUT" if client else ("STDERR" if stderr else "OUTPUT")
            return marker, f"{sum(i['bytes'] for i in data):,} B", [line for i in items for line in _detail(i)]
        if kind.startswith("sftp:"):
            lines = []
            for i in items:
                a = i["attributes"]
                what = " ".join(str(a[k]) for k in ("path", "new_path", "offset", "length", "code", "message") if k in a)
                extra = f" sha256 {a['sha256']} size {a['size']} ({a['direction']})" if "sha256" in a else ""
                lines.append(f"{i['type'][5:]} {what}{extra} ({i['bytes']:,} B)".strip())
            return "SFTP", f"{len(items)} packets", lines
        marker = _MARKERS.get(kind, kind.upper())
        details = [line for i in items[1:] for line in _detail(i)]
        if kind in ("exec", "direct-tcpip"):
            head = first.get("text") or ""
        elif kind == "line":  # a line typed in a shell, as decided at its Enter (a secret one has no text)
            head = first.get("text") or _attributes(first)
        elif kind in ("exit-status", "exit-signal"):
            head = attributes.get("status") or attributes.get("signal") or ""
        elif kind in ("pty-req", "window-change"):
            head = f"{attributes.get('columns')}x{attributes.get('rows')}" + (
                f" {attributes['term']}" if "term" in attributes else "")
        else:
            head = _attributes(first)
        return marker, head, details


    def html_player(self, steps: list[Step]) -> str:
        """The terminal, played (the HTML replay's section above the timeline; `player`)."""
        from .player import html

        width, height, term, events = terminal(steps)
        if not any(kind == "o" for _, kind, _ in events):
            return ""
        return html(width, height, events, f"Terminal ({width}x{height}{', ' + term if term else ''})")


RENDERER = SSHRenderer()


def terminal(steps: list[Step], *, include_input: bool = False) -> tuple[int, int, str | None, list[Event]]:
    """The terminal channel of a replayed SSH session (the first with a pty; else the first channel's output):
    its initial columns, rows and term, and its events as asciicast has them ("o", "i", "r", "m")."""
    channel = None
    width, height, term = 80, 24, None
    for step in steps:
        for item in step.get("items", ()):
            if item["type"] == "pty-req":
                channel, term = step.get("channel"), item["attributes"].get("term")
                width = int(item["attributes"].get("columns") or 80)
                height = int(item["attributes"].get("rows") or 24)
                break
        if channel is not None:
            break
    if channel is None:  # no pty: the first session channel's output, e.g. an exec
        channel = next((s.get("channel") for s in steps if s.get("step") == "ssh" and s.get("channel")), None)
    events: list[Event] = []
    for step in steps:
        at = round(float(step.get("offset_s") or 0.0), 6)
        if step.get("step") == "policy":
            events.append(marker(step))
            continue
        if step.get("step") != "ssh" or step.get("channel") != channel:
            continue
        client = step.get("direction") == "client"
        for item in step["items"]:
            if item["type"] == "data":
                if client and not include_input:
                    continue
                events.append((at, "i" if client else "o", item.get("data", "")))
            elif item["type"] == "window-change":
                a = item["attributes"]
                events.append((at, "r", f"{a.get('columns')}x{a.get('rows')}"))
    return width, height, term, events


def asciicast(steps: list[Step], *, include_input: bool = False, title: str | None = None) -> str:
    """The terminal channel of a replayed SSH session (its steps, `query.replay`) as asciicast v2 lines."""
    width, height, term, events = terminal(steps, include_input=include_input)
    return write(events, width=width, height=height, term=term, title=title)
