"""Replay: one session, step by step, rebuilt from its signed events and checked before it is shown.

The events come from the sealed segments (`events` view, pruned by session id);
each is opened from its exact signed bytes, its signature checked against the
keyring and its place in the session's chain checked, so the replay's first
line can say whether what follows is authentic and complete. Steps are plain
dicts (JSON as is); `query.render` and `query.html` only lay them out.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import duckdb
from nacl.public import PrivateKey, SealedBox

from ingest.errors import CustodyError
from ingest.events import SignedEvent, micros_to_datetime, open_event
from ingest.keys import Keyring
from ingest.verify import Rejection, SessionChains, check_signature
from query import pgwire

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

    def to_json(self) -> dict[str, Any]:
        return {"verification": self.verification.to_json(), "started": self.started.isoformat(),
                "steps": self.steps}


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


def _client(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """What the client sent: the statement (Query, or Parse + Bind) with its parameters, or just message types."""
    statement = next((m["statement"] for m in messages if m.get("statement") is not None), None)
    parameters = next((m["parameters"] for m in messages if m.get("parameters") is not None), None)
    step = {"step": "statement" if statement is not None or parameters is not None else "client",
            "messages": [m["type"] for m in messages]}
    if step["step"] == "statement":
        step.update(statement=statement, parameters=parameters)
    return step


def _diagnostic(m: dict[str, Any]) -> dict[str, Any]:
    attributes = m.get("attributes") or {}
    return {"severity": attributes.get("severity_nonlocalized") or attributes.get("severity"),
            "code": m.get("error_code") or attributes.get("code"),
            "message": m.get("error_message") or attributes.get("message"),
            **{k: attributes[k] for k in ("detail", "hint") if k in attributes}}


def _columns(m: dict[str, Any]) -> list[str]:
    recorded = (m.get("attributes") or {}).get("columns")
    return json.loads(recorded) if recorded else pgwire.row_description_names(m["data"])


Reveal = Callable[[bytes], bytes]


def custodian_reveal(key: PrivateKey) -> Reveal:
    """Opens `sealed_original`s: the sealed boxes masking left for whoever holds the custodian key."""
    return SealedBox(key).decrypt


def _revealed(m: dict[str, Any], reveal: Reveal | None) -> dict[str, Any]:
    if reveal is None or m.get("sealed_original") is None:
        return m
    return {**m, "data": reveal(m["sealed_original"])}


def _server(messages: list[dict[str, Any]], max_rows: int, reveal: Reveal | None = None) -> dict[str, Any]:
    """What came back: columns, the first rows (as the client saw them, or the originals when revealing), tags, errors, notices."""
    step: dict[str, Any] = {"step": "result", "columns": None, "rows": [], "masked_rows": [], "row_count": 0,
                            "command_tags": [], "errors": [], "notices": [], "messages": [m["type"] for m in messages],
                            "revealed": reveal is not None}
    for m in (_revealed(x, reveal) for x in messages):
        kind = m["type"]
        if kind == "RowDescription":
            step["columns"] = _columns(m)
        elif kind == "DataRow":
            for row in pgwire.split_messages(m["data"]):  # a record may hold a run of rows of one read
                if step["row_count"] < max_rows:
                    if m.get("sealed_original") is not None:
                        step["masked_rows"].append(len(step["rows"]))
                    step["rows"].append(pgwire.data_row_values(row))
                step["row_count"] += 1
        elif kind == "CommandComplete":
            step["command_tags"].append(m.get("command_tag"))
        elif kind == "ErrorResponse":
            step["errors"].append(_diagnostic(m))
        elif kind == "NoticeResponse":
            step["notices"].append(_diagnostic(m))
        elif kind == "ReadyForQuery":
            step["transaction_status"] = (m.get("attributes") or {}).get("transaction_status")
    if step["errors"] and not step["command_tags"] and not step["row_count"]:
        step["step"] = "error"
    return step


def _policy(body: dict[str, Any]) -> dict[str, Any]:
    return {"step": "policy", "rule": body["rule"], "action": body["action"], "reason": body.get("reason"),
            "statement": body.get("statement"), "request_id": body.get("request_id"),
            "approver": _identity(body.get("approver"))}


def _protocol_error(body: dict[str, Any]) -> dict[str, Any]:
    return {"step": "protocol_error", "code": body["code"], "message": body["message"],
            "sample": body.get("sample", b"")[:64].decode("latin-1")}


def _end(body: dict[str, Any]) -> dict[str, Any]:
    return {"step": "end", **body}


def step_for(event: SignedEvent, max_rows: int, reveal: Reveal | None = None) -> dict[str, Any]:
    kind, body = event.kind, event.body
    if kind == "session_start":
        return _start(body)
    if kind == "frames":
        return _client(body["messages"]) if body["direction"] == "client" else _server(body["messages"], max_rows, reveal)
    if kind == "policy_decision":
        return _policy(body)
    if kind == "protocol_error":
        return _protocol_error(body)
    return _end(body)


def replay_session(con: duckdb.DuckDBPyConnection, session: str, keyring: Keyring,
                   max_rows: int = DEFAULT_ROWS, reveal: Reveal | None = None) -> Replay:
    """The verified, step-by-step story of one session (`session` may be a unique id prefix).

    With `reveal` (see `custodian_reveal`), masked rows show their sealed originals.
    """
    session_id = resolve_session(con, session)
    verification, events = verify_events(session_id, load_events(con, session_id), keyring)
    started = events[0].envelope["ts"]
    steps = [{"seq": e.seq, "ts": micros_to_datetime(e.envelope["ts"]).isoformat(),
              "offset_s": (e.envelope["ts"] - started) / 1e6, **step_for(e, max_rows, reveal)} for e in events]
    return Replay(verification, micros_to_datetime(started), steps)
