"""ingest/envelope_writer.py writes exactly the bytes fastavro writes (`ENVELOPE.encode`), and refuses exactly what
fastavro refuses: envelopes of every body kind, every optional field present, null or absent, values at the edges
of their encodings (lengths past the precomputed varints, longs at 64 bits), real envelopes of the code's paths,
and damaged envelopes. A Frames envelope of valid values must take the hand-written path (fastavro not called)."""

from __future__ import annotations

import copy
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_key
from events_factory import ALL_KINDS
from ingest import envelope_writer
from ingest.avro import ENVELOPE
from ingest.batching import fold
from ingest.envelope_writer import encode_envelope
from ingest.events import _BODY_TYPES, SessionChain
from ingest.protocols.postgres import messages as pg
from ingest.protocols.postgres.protocol import Message
from proxy.postgres.recording import PreparedStatements, message_records

LONG = st.one_of(st.integers(-5, 5000), st.integers(-2**63, 2**63 - 1), st.sampled_from([-2**63, 2**63 - 1]))
SMALL_TEXT = st.text(max_size=12)
TEXT = st.one_of(SMALL_TEXT, st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=3), st.integers(1000, 3000)))
BYTES = st.one_of(st.binary(max_size=40), st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=3),
                                                     st.integers(1000, 40_000)))
ATTRIBUTES = st.dictionaries(SMALL_TEXT, TEXT, max_size=5)


def optional(values: st.SearchStrategy) -> st.SearchStrategy:
    return st.none() | values


MESSAGE = st.fixed_dictionaries(
    {"type": SMALL_TEXT, "data": BYTES},
    optional={"sealed_original": optional(BYTES), "statement": optional(TEXT),
              "parameters": optional(st.lists(optional(TEXT), max_size=4)), "command_tag": optional(SMALL_TEXT),
              "rows": optional(LONG), "error_code": optional(SMALL_TEXT), "error_message": optional(TEXT),
              "attributes": ATTRIBUTES, "direction": optional(SMALL_TEXT), "channel": optional(SMALL_TEXT),
              "offset_us": optional(LONG), "operation": optional(SMALL_TEXT), "text": optional(TEXT),
              "objects": optional(st.lists(SMALL_TEXT, max_size=4)), "outcome": optional(SMALL_TEXT)})
FRAMES = st.fixed_dictionaries({"direction": SMALL_TEXT, "messages": st.lists(MESSAGE, max_size=6)})
IDENTITY = st.fixed_dictionaries(
    {"subject": SMALL_TEXT, "issuer": SMALL_TEXT},
    optional={"username": optional(SMALL_TEXT), "email": optional(SMALL_TEXT),
              "groups": st.lists(SMALL_TEXT, max_size=3), "token_id": optional(SMALL_TEXT)})
BODIES = {
    "session_start": st.fixed_dictionaries(
        {"source_address": SMALL_TEXT, "target": SMALL_TEXT, "upstream": SMALL_TEXT, "protocol": SMALL_TEXT},
        optional={"identity": optional(IDENTITY), "client_cert_fingerprint": optional(SMALL_TEXT),
                  "client_application": optional(SMALL_TEXT), "attributes": ATTRIBUTES}),
    "frames": FRAMES,
    "policy_decision": st.fixed_dictionaries(
        {"rule": SMALL_TEXT, "action": SMALL_TEXT},
        optional={"reason": optional(TEXT), "statement": optional(TEXT), "request_id": optional(SMALL_TEXT),
                  "approver": optional(IDENTITY), "attributes": ATTRIBUTES}),
    "protocol_error": st.fixed_dictionaries({"code": SMALL_TEXT, "message": TEXT}, optional={"sample": BYTES}),
    "session_end": st.fixed_dictionaries({name: LONG for name in ("duration_us", "client_bytes", "server_bytes",
                                                                  "client_messages", "server_messages")}
                                         | {"reason": SMALL_TEXT}),
}


@st.composite
def envelopes(draw: st.DrawFn, kinds: tuple[str, ...] = tuple(BODIES), tuple_body: bool | None = None) -> dict:
    """An envelope of one of `kinds`, its body as `SessionChain.event` gives it (`(branch, record)`) or as a
    plain record (fastavro then finds the branch), `tuple_body` deciding or not."""
    kind = draw(st.sampled_from(kinds))
    body = draw(BODIES[kind])
    as_tuple = draw(st.booleans()) if tuple_body is None else tuple_body
    return {"event_id": draw(st.uuids().map(str) | SMALL_TEXT), "session_id": draw(st.uuids().map(str) | TEXT),
            "seq": draw(LONG), "ts": draw(LONG), "producer": draw(TEXT), "key_id": draw(SMALL_TEXT),
            "prev_hash": draw(st.binary(min_size=32, max_size=32)), "kind": draw(st.sampled_from(kinds) | SMALL_TEXT),
            "body": (_BODY_TYPES[kind], body) if as_tuple else body}


def outcome(encode: Any, envelope: dict) -> tuple[str, Any]:
    """What an encoder does with `envelope`: the bytes it returns, or the type of the error it raises."""
    try:
        return "bytes", encode(envelope)
    except Exception as exc:  # the type is the answer
        return "raises", type(exc)


class _NoFastavro:
    def encode(self, envelope: dict) -> bytes:
        raise AssertionError("fell back to fastavro")


@contextmanager
def fast_path_only() -> Iterator[None]:
    """encode_envelope with its fallback to fastavro made an error: what it returns it wrote itself."""
    with mock.patch.object(envelope_writer, "ENVELOPE", _NoFastavro()):
        yield


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(envelopes())
def test_every_body_kind_encodes_as_fastavro_does(envelope: dict) -> None:
    """Or fails as it does: fastavro refuses a few envelopes the schema allows (ProtocolError's default sample)."""
    assert outcome(encode_envelope, envelope) == outcome(ENVELOPE.encode, envelope)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(envelopes(kinds=("frames",), tuple_body=True))
def test_frames_envelopes_are_written_by_hand_byte_for_byte(envelope: dict) -> None:
    expected = ENVELOPE.encode(envelope)
    with fast_path_only():
        assert encode_envelope(envelope) == expected


WRONG = st.sampled_from([None, "x", "\ud800", b"x", bytearray(b"x"), 1, -1, 2**63, -2**63 - 1, 1.5, True,
                         ("x",), ["x"], [None], {"k": 1}, {1: "v"}, {}, uuid.UUID(int=7),
                         datetime(2026, 1, 1, tzinfo=timezone.utc), ("custody.Nope", {})])


def _paths(value: Any, path: tuple = ()) -> Iterator[tuple]:
    """Every place a value sits in an envelope (its body a list while damaged): dict keys, list items."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, path + (index,))


def _damaged(envelope: dict, path: tuple, how: str, wrong: Any) -> dict:
    """`envelope` with the value at `path` replaced by `wrong`, deleted, or with a "-type" key beside it."""
    out = copy.deepcopy(envelope)
    parent = out
    for step in path[:-1]:
        parent = parent[step]
    if how == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif how == "extra" and isinstance(parent, dict):
        parent["-type"] = wrong
    else:
        parent[path[-1]] = wrong
    return out


@st.composite
def damaged_envelopes(draw: st.DrawFn) -> dict:
    envelope = draw(envelopes(kinds=("frames", "session_end", "protocol_error"), tuple_body=True))
    kind, record = envelope["body"]
    envelope["body"] = [kind, record]  # a list while damaged (tuples are immutable), then a tuple again
    path = draw(st.sampled_from([p for p in _paths(envelope) if p]))
    out = _damaged(envelope, path, draw(st.sampled_from(["replace", "delete", "extra"])), draw(WRONG))
    if isinstance(out.get("body"), list) and len(out["body"]) == 2:
        out["body"] = tuple(out["body"])
    return out


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(damaged_envelopes())
def test_a_damaged_envelope_is_encoded_or_refused_as_fastavro_does(envelope: dict) -> None:
    assert outcome(encode_envelope, envelope) == outcome(ENVELOPE.encode, envelope)


def _frames_envelope(**changes: Any) -> dict:
    envelope = {"event_id": str(uuid.UUID(int=1)), "session_id": str(uuid.UUID(int=2)), "seq": 3, "ts": 4,
                "producer": "p", "key_id": "k", "prev_hash": bytes(32), "kind": "frames",
                "body": ("custody.Frames", {"direction": "client", "messages": [{"type": "Query", "data": b"Q"}]})}
    message = envelope["body"][1]["messages"][0]
    for key, value in changes.items():
        (envelope if key in envelope else message)[key] = value
    return envelope


def test_wrong_types_raise_what_fastavro_raises() -> None:
    """The brief's cases by name: bytes given as str, a field missing, a body of no known branch."""
    for envelope, error in [(_frames_envelope(data="Q"), TypeError), (_frames_envelope(type=b"Query"), TypeError),
                            (_frames_envelope(rows="1"), ValueError),
                            (_frames_envelope(prev_hash=bytes(31)), ValueError),
                            (_frames_envelope(body=("custody.Nope", {})), ValueError),
                            (_frames_envelope(body={"unknown": 1}), ValueError),
                            (_frames_envelope(statement="\ud800"), ValueError)]:
        assert outcome(encode_envelope, envelope) == ("raises", outcome(ENVELOPE.encode, envelope)[1])
        assert issubclass(outcome(encode_envelope, envelope)[1], error)
    missing = _frames_envelope()
    del missing["body"][1]["messages"][0]["data"]
    assert outcome(encode_envelope, missing) == ("raises", ValueError) == outcome(ENVELOPE.encode, missing)


def _pgbench_reads(transactions: int) -> list[tuple[str, list[Message]]]:
    """The reads of a pgbench-like session, as the PostgreSQL front end hands them to `message_records`:
    simple and extended queries, a result, an error."""
    reads: list[tuple[str, list[Message]]] = []
    for i in range(transactions):
        sql = f"SELECT abalance FROM pgbench_accounts WHERE aid = {i * 7919};"
        reads.append(("client", [Message("Query", pg.query(sql))]))
        reads.append(("server", [Message("RowDescription", pg.row_description(["abalance"])),
                                 Message("DataRow", pg.data_row([str(i).encode()])),
                                 Message("DataRow", pg.data_row([None])),
                                 Message("CommandComplete", pg.command_complete("SELECT 2")),
                                 Message("ReadyForQuery", pg.ready_for_query("I"))]))
    reads.append(("client", [Message("Parse", pg.parse("s1", "SELECT $1::text ☃", [25])),
                             Message("Bind", pg.bind([b"\xe2\x98\x83", None], statement="s1")),
                             Message("Execute", pg.execute())]))
    return reads


def real_envelopes() -> list[dict]:
    """Envelopes as the recorder signs them: PostgreSQL reads made records, folded into mixed-direction Frames
    events with offsets, and every other kind of body, through `SessionChain.event`."""
    statements = PreparedStatements()
    items = []
    for ts, (direction, messages) in enumerate(_pgbench_reads(12)):
        records = message_records(messages)
        statements.annotate(records)
        items.append(("s", "frames", {"direction": direction, "messages": records}, 1_700_000_000_000_000 + ts))
    chain = SessionChain(make_key(), "proxy-1", "019d44f7-711d-7530-929d-ca1870079a53")
    events = [chain.event("session_start", ALL_KINDS["session_start"])]
    events += [chain.event(kind, body, ts_micros=ts) for _, kind, body, ts in fold(items, max_messages=40)]
    events += [chain.event(kind, body) for kind, body in ALL_KINDS.items() if kind != "session_start"]
    return [event.envelope for event in events]


def test_real_envelopes_of_the_recorder_encode_as_fastavro_does() -> None:
    envelopes_ = real_envelopes()
    assert {e["kind"] for e in envelopes_} == set(_BODY_TYPES)
    assert any(len(e["body"][1]["messages"]) == 40 for e in envelopes_ if e["kind"] == "frames")
    for envelope in envelopes_:
        assert encode_envelope(envelope) == ENVELOPE.encode(envelope)
    with fast_path_only():
        for envelope in envelopes_:
            if envelope["kind"] == "frames":
                assert encode_envelope(envelope) == ENVELOPE.encode(envelope)
