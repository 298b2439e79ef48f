"""Replay: one session, step by step, rebuilt from its signed events and checked before it is shown.

The events come from the sealed segments (`events` view, pruned by session id);
each is opened from its exact signed bytes, its signature checked against the
keyring and its place in the session's chain checked, so the replay's first
line can say whether what follows is authentic and complete. Steps are plain
dicts (JSON as is); `query.render` and `query.html` only lay them out.

Frames are the protocol's business: each run of messages of one direction and
channel becomes one step, built by the renderer of the session's protocol
(`ingest.protocols.renderer`, beside its codec; a generic one for protocols
without), which may then fold steps that are one thing to a reader
(`arrange`: PostgreSQL's login, an extended-protocol statement with its
result). Query decodes no protocol itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import duckdb
from nacl.public import PrivateKey

from ingest import protocols
from ingest.errors import CustodyError
from ingest.events import SignedEvent, micros_to_datetime, open_event
from ingest.keys import Keyring
from ingest.protocols.render import Entry, Renderer, Reveal, arrange
from ingest.protocols.ssh.extract import Extracted, extract_files, select
from ingest.sealing import opener
from ingest.verify import Rejection, SessionChains, check_signature

DEFAULT_ROWS = 10
_UUID_LENGTH = 36


class SessionNotFound(CustodyError):
    pass


@dataclass
class Verification:
    """What the replay's first line says: are these events authentic, in order, with nothing missing inside?"""

    session_id: str
    events: int = 0
    problems: list[str] = field(default_factory=list)
    ended: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def line(self) -> str:
        end = "ended" if self.ended else "no SessionEnd (still open, or its end is not sealed yet)"
        if self.ok:
            return f"VERIFIED session {self.session_id}: {self.events} events, signatures and chain intact, {end}"
        return (f"NOT VERIFIED session {self.session_id}: {len(self.problems)} of {self.events} events failed "
                f"({self.problems[0]}{'; …' if len(self.problems) > 1 else ''})")

    def to_json(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "verified": self.ok, "events": self.events, "ended": self.ended,
                "problems": self.problems, "line": self.line}


@dataclass
class Replay:
    verification: Verification
    started: datetime
    steps: list[dict[str, Any]]
    protocol: str | None = None  # SessionStart's; picks the renderer that describes the Frames steps

    @property
    def renderer(self) -> Renderer:
        return protocols.renderer(self.protocol)

    def to_json(self) -> dict[str, Any]:
        return {"verification": self.verification.to_json(), "started": self.started.isoformat(),
                "protocol": self.protocol, "steps": self.steps}


# --- loading -----------------------------------------------------------------------------------------


def resolve_session(con: duckdb.DuckDBPyConnection, session: str) -> str:
    """A full session id, from itself or a unique prefix; a range filter, so row groups are pruned."""
    session = session.strip().lower()
    if len(session) == _UUID_LENGTH:
        return session
    found = con.execute("SELECT DISTINCT session_id FROM events WHERE session_id >= ? AND session_id < ? LIMIT 2",
                        [session, session + "g"]).fetchall()
    if not found:
        raise SessionNotFound(f"no session starts with {session!r}")
    if len(found) > 1:
        raise SessionNotFound(f"session prefix {session!r} is ambiguous; give more of the id")
    return found[0][0]


def load_events(con: duckdb.DuckDBPyConnection, session_id: str) -> list[bytes]:
    rows = con.execute("SELECT event FROM events WHERE session_id = ? ORDER BY seq", [session_id]).fetchall()
    if not rows:
        raise SessionNotFound(f"no sealed events for session {session_id}")
    return [r[0] for r in rows]


def verify_events(session_id: str, values: list[bytes], keyring: Keyring) -> tuple[Verification, list[SignedEvent]]:
    """Open and check every event; a failure is named with its seq and reason and the walk carries on."""
    verification, chains, events = Verification(session_id), SessionChains(), []
    for value in values:
        event = open_event(value)
        events.append(event)
        verification.events += 1
        try:
            check_signature(event, keyring)
            chains.check(event)
        except Rejection as rejection:
            verification.problems.append(f"seq {event.seq}: {rejection.reason}: {rejection.detail}")
        chains.accept(event)
        verification.ended |= event.kind == "session_end"
    return verification, events


# --- steps -------------------------------------------------------------------------------------------


def _identity(who: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if who is None else {k: who.get(k) for k in ("subject", "email", "groups", "issuer")}


def _start(body: dict[str, Any]) -> dict[str, Any]:
    return {"step": "start", "identity": _identity(body["identity"]), "source_address": body["source_address"],
            "target": body["target"], "upstream": body["upstream"], "protocol": body["protocol"],
            "client_application": body.get("client_application"), "attributes": body.get("attributes", {})}


def custodian_reveal(key: PrivateKey) -> Reveal:
    """Opens `sealed_original`s: what masking and redaction sealed for whoever holds the custodian key."""
    return opener(key)


def runs(body: dict[str, Any]) -> list[tuple[int, str, str | None, list[dict[str, Any]]]]:
    """A Frames body as (offset_us, direction, channel, messages) runs, in the order they were read.

    Each message's own `direction` (null: the Frames' direction), `channel` and
    `offset_us` (contract v2) place it; consecutive messages of one direction
    and channel make one run. A v1 Frames is one run.
    """
    default = body["direction"]
    placed = sorted(enumerate(body["messages"]), key=lambda im: (im[1].get("offset_us") or 0, im[0]))
    out: list[tuple[int, str, str | None, list[dict[str, Any]]]] = []
    for _, message in placed:
        direction, channel = message.get("direction") or default, message.get("channel")
        if out and out[-1][1] == direction and out[-1][2] == channel:
            out[-1][3].append(message)
        else:
            out.append((message.get("offset_us") or 0, direction, channel, [message]))
    return out


def _policy(body: dict[str, Any]) -> dict[str, Any]:
    return {"step": "policy", "rule": body["rule"], "action": body["action"], "reason": body.get("reason"),
            "statement": body.get("statement"), "request_id": body.get("request_id"),
            "approver": _identity(body.get("approver"))}


def _protocol_error(body: dict[str, Any]) -> dict[str, Any]:
    return {"step": "protocol_error", "code": body["code"], "message": body["message"],
            "sample": body.get("sample", b"")[:64].decode("latin-1")}


def _end(body: dict[str, Any]) -> dict[str, Any]:
    return {"step": "end", **body}


def step_for(event: SignedEvent) -> dict[str, Any]:
    """The step of a non-Frames event (Frames go through the protocol's renderer, see `frame_steps`)."""
    kind, body = event.kind, event.body
    if kind == "session_start":
        return _start(body)
    if kind == "policy_decision":
        return _policy(body)
    if kind == "protocol_error":
        return _protocol_error(body)
    return _end(body)


def frame_steps(body: dict[str, Any], renderer: Renderer, max_rows: int,
                reveal: Reveal | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(offset_us, step) for each run of a Frames body, each step saying its direction and channel."""
    return [(offset_us, step) for offset_us, step, _ in _frame_entries(body, renderer, max_rows, reveal)]


def _frame_entries(body: dict[str, Any], renderer: Renderer, max_rows: int,
                   reveal: Reveal | None) -> list[tuple[int, dict[str, Any], list[dict[str, Any]]]]:
    return [(offset_us, {"direction": direction, "channel": channel,
                         **renderer.step(direction, messages, max_rows=max_rows, reveal=reveal)}, messages)
            for offset_us, direction, channel, messages in runs(body)]


def session_protocol(events: list[SignedEvent]) -> str | None:
    return next((e.body.get("protocol") for e in events if e.kind == "session_start"), None)


def replay_session(con: duckdb.DuckDBPyConnection, session: str, keyring: Keyring,
                   max_rows: int = DEFAULT_ROWS, reveal: Reveal | None = None) -> Replay:
    """The verified, step-by-step story of one session (`session` may be a unique id prefix).

    Frames are shown by the renderer of the session's protocol (its SessionStart
    says which; `ingest.protocols.renderer`). With `reveal` (see
    `custodian_reveal`), masked rows show their sealed originals.
    """
    session_id = resolve_session(con, session)
    verification, events = verify_events(session_id, load_events(con, session_id), keyring)
    protocol = session_protocol(events)
    renderer = protocols.renderer(protocol)
    started = events[0].envelope["ts"]
    timed = []
    for e in events:
        ts = e.envelope["ts"]
        placed = (_frame_entries(e.body, renderer, max_rows, reveal) if e.kind == "frames"
                  else [(0, step_for(e), None)])
        timed += [(ts + offset_us, Entry({"seq": e.seq, "ts": micros_to_datetime(ts + offset_us).isoformat(),
                                          "offset_s": (ts + offset_us - started) / 1e6, **step}, messages))
                  for offset_us, step, messages in placed]
    # A v2 Frames may gather several reads and be written after an event that followed its first
    # read (a hold, say): steps go by when they happened, ties (and all of v1) in seq order.
    timed.sort(key=lambda at_entry: at_entry[0])
    # Then the protocol's renderer may fold steps that are one thing to a reader (PostgreSQL's login).
    steps = arrange(renderer, [entry for _, entry in timed], max_rows=max_rows, reveal=reveal)
    return Replay(verification, micros_to_datetime(started), steps, protocol)


# --- files -------------------------------------------------------------------------------------------


def session_messages(events: list[SignedEvent]) -> list[dict[str, Any]]:
    """Every Frames message of a session, its `direction` filled in, in the order it was read (as the steps)."""
    placed = [(e.envelope["ts"] + (m.get("offset_us") or 0),
               {**m, "direction": m.get("direction") or e.body["direction"]})
              for e in events if e.kind == "frames" for m in e.body["messages"]]
    placed.sort(key=lambda at_message: at_message[0])  # stable: ties stay in seq order
    return [m for _, m in placed]


def extract_file(con: duckdb.DuckDBPyConnection, session: str, keyring: Keyring, path: str,
                 nth: int | None = None) -> tuple[Verification, Extracted]:
    """The file `path` as an SFTP transfer of the session moved it (the last, or its `nth`), rebuilt from the
    recorded packets, with the session's verification: the bytes are evidence only if the events verify."""
    session_id = resolve_session(con, session)
    verification, events = verify_events(session_id, load_events(con, session_id), keyring)
    protocol = session_protocol(events)
    if protocol != "ssh":
        raise CustodyError(f"session {session_id} is a {protocol or 'generic'} session; "
                           "files are extracted from SSH (SFTP) sessions only")
    return verification, select(extract_files(session_messages(events)), path, nth)
