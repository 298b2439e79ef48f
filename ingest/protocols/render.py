"""What recorded messages look like in a replay step, for any protocol.

A replay (query/replay.py) walks a session's events; each run of consecutive
recorded `Message` records (schemas/event.avsc) of one direction and one
channel becomes one step, built by the session's protocol renderer. A step
is a plain dict (JSON as is) with a `step` kind; query adds `seq`, `ts`,
`offset_s`, `direction` and `channel`. The renderer also says how its own step
kinds read as text (`describe`), so the layouts in query (text, HTML) stay
protocol-neutral: a step with `columns`, `rows`, `masked_rows` and `row_count`
is shown as a table whatever the protocol.

A renderer may then `arrange` the session's steps in order, so that a replay
reads like the session rather than like its reads: PostgreSQL folds the login
exchange into one step, and an extended-protocol statement (Parse, Bind,
Execute, Sync) with what came back into another. It is given every step with
the messages a Frames step was built from (None for the session's own steps:
start, policy, end), and returns the steps to show.

`GenericRenderer` serves every protocol that has no renderer of its own: it
shows each message's type and size and the first bytes of the first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

Record = dict[str, Any]
Step = dict[str, Any]
Reveal = Callable[[bytes], bytes]
"""Opens a message's `sealed_original` (the custodian's key); None: show what the client saw."""
Description = tuple[str, str, list[str]]
"""(marker, headline, detail lines); the marker is a short upper-case word (SQL, RESULT, CLIENT, SERVER...)."""

PREVIEW_BYTES = 16


class Entry(NamedTuple):
    """One step of a replay before `arrange`, and the recorded messages a Frames step was built from."""

    step: Step
    messages: list[Record] | None  # None: a step of the session's own (start, policy, protocol error, end)


class Renderer(Protocol):
    protocol: str

    def step(self, direction: str, messages: list[Record], *, max_rows: int, reveal: Reveal | None) -> Step:
        """One step from a run of recorded messages of one direction and channel, in order."""
        ...

    def describe(self, step: Step) -> Description | None:
        """How a step this renderer built reads as text; None for kinds it does not know."""
        ...


def types_of(entry: Entry) -> list[str]:
    """The message types a Frames step was built from (none for the session's own steps)."""
    return [x["type"] for x in entry.messages or ()]


def frames_of(entry: Entry, direction: str) -> bool:
    """Whether an entry is a Frames step of one direction."""
    return entry.messages is not None and entry.step.get("direction") == direction


class Exchange(NamedTuple):
    """The login exchange that begins a session, as `login_exchange` found it."""

    client: list[Record]
    server: list[Record]
    used: int  # entries it took
    rest: list[Record]  # server messages after the one that ended it, in the same read
    outcome: str  # the `ends` value of the message that ended it, or "incomplete"


def login_exchange(entries: list[Entry], login_types: frozenset[str], ends: dict[str, str]) -> Exchange:
    """The Frames entries from the session's first one while each begins with a login message type,
    up to the server message whose type `ends` maps to the outcome (PostgreSQL's ReadyForQuery,
    MySQL's OK after the handshake): one login step for a renderer's `arrange`."""
    client: list[Record] = []
    server: list[Record] = []
    used, rest, outcome = 0, [], "incomplete"
    for entry in entries:
        if entry.messages is None or not all(t in login_types for t in types_of(entry)[:1]):
            break
        used += 1
        if entry.step["direction"] == "client":
            client += entry.messages
            continue
        for i, x in enumerate(entry.messages):
            server.append(x)
            if x["type"] in ends:
                outcome, rest = ends[x["type"]], entry.messages[i + 1:]
                break
        if outcome != "incomplete":
            break
    return Exchange(client, server, used, rest, outcome)


def arrange(renderer: Renderer, entries: list[Entry], *, max_rows: int, reveal: Reveal | None) -> list[Step]:
    """The steps to show: the renderer's `arrange` when it has one (it is optional), else the steps as built."""
    method = getattr(renderer, "arrange", None)
    if method is None:
        return [entry.step for entry in entries]
    return method(entries, max_rows=max_rows, reveal=reveal)


def first_bytes(data: bytes) -> str:
    """`51 00 00 00 0b …`: the first bytes in hex."""
    return data[:PREVIEW_BYTES].hex(" ") + (" …" if len(data) > PREVIEW_BYTES else "")


def byte_summary(data: bytes) -> str:
    """`12 B: 51 00 00 00 0b …`, the size and the first bytes in hex."""
    return f"{len(data):,} B" + (f": {first_bytes(data)}" if data else "")


class GenericRenderer:
    """Type, direction, channel and a byte summary: for protocols without a renderer."""

    protocol = "*"

    def step(self, direction: str, messages: list[Record], *, max_rows: int, reveal: Reveal | None) -> Step:
        sizes = [len(m.get("data") or b"") for m in messages]
        first = next((m.get("data") for m in messages if m.get("data")), b"")
        return {"step": "messages", "messages": [m["type"] for m in messages], "sizes": sizes,
                "bytes": sum(sizes), "preview": first_bytes(first)}

    def describe(self, step: Step) -> Description | None:
        if step["step"] != "messages":
            return None
        marker = {"client": "CLIENT", "server": "SERVER"}.get(step.get("direction") or "", "FRAMES")
        head = ", ".join(f"{kind} ({size:,} B)" for kind, size in zip(step["messages"], step["sizes"]))
        detail = [f"{step['bytes']:,} B in {len(step['sizes'])} messages"] if len(step["sizes"]) > 1 else []
        return marker, head or "(no messages)", detail + ([f"first bytes: {step['preview']}"] if step["preview"] else [])


GENERIC = GenericRenderer()
