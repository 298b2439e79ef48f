"""The partial reader bundle verify's fast way opens events with (ingest.events.open_head): the fields of
`open_event` but the body, for exactly the bytes `open_event` opens, whatever the damage."""

from __future__ import annotations

import os
import random

import pytest

from conftest import make_key
from events_factory import ALL_KINDS, policy_decision, session_start
from ingest.avro import _BODIES, ENVELOPE, HEADER_LEN, DecodeError, EnvelopeHead, _envelope_head_only, _frames_envelope
from ingest.events import SessionChain, open_event, open_head, sign_envelope, uuid7


def message(rnd: random.Random) -> dict:
    """A Message with each field present or not, values of every shape the schema allows."""
    m = {"type": rnd.choice(["DataRow", "Query", "ü"]), "data": os.urandom(rnd.choice([0, 5, 70, 300]))}
    if rnd.random() < .3:
        m["statement"] = "select ☃ " * rnd.randint(0, 30)
    if rnd.random() < .3:
        m["parameters"] = [None, "a", "b" * 100][:rnd.randint(0, 3)]
    if rnd.random() < .3:
        m["rows"] = rnd.choice([0, 1, -5, 2**40, 2**63 - 1, -2**63])
    if rnd.random() < .3:
        m["command_tag"], m["error_code"], m["error_message"] = "SELECT 1", "42P01", "nope ü"
    if rnd.random() < .3:
        m["attributes"] = {f"k{i}": "v" * i for i in range(rnd.randint(0, 70))}
    if rnd.random() < .3:
        m["direction"], m["channel"], m["offset_us"] = "client", "x", rnd.randint(0, 2**50)
    if rnd.random() < .3:
        m["operation"], m["text"], m["objects"], m["outcome"] = "read", "t", ["a", "b"][:rnd.randint(0, 2)], "ok"
    if rnd.random() < .1:
        m["sealed_original"] = os.urandom(20)
    return m


def damaged(rnd: random.Random, data: bytes, start: int) -> bytes:
    """`data` with a few bytes after `start` changed, or cut short, or a byte longer."""
    out = bytearray(data)
    if (op := rnd.random()) < .5:
        for _ in range(rnd.randint(1, 3)):
            out[rnd.randrange(start, len(out))] = rnd.randrange(256)
    elif op < .75:
        out = out[:rnd.randrange(start, len(out))]
    else:
        out += bytes([rnd.randrange(256)])
    return bytes(out)


@pytest.fixture(scope="module")
def events():
    rnd, chain = random.Random(5), SessionChain(make_key("proxy"), "test")
    frames = [chain.event("frames", {"direction": "server", "messages": [message(rnd) for _ in range(rnd.choice([0, 1, 3, 20]))]})
              for _ in range(120)]
    approved = {**policy_decision("approve"), "approver": session_start()["identity"], "request_id": "r-1"}
    return frames + [chain.event(kind, body) for kind, body in [*ALL_KINDS.items(), ("policy_decision", approved)]]


def test_the_head_reader_takes_only_bytes_the_whole_readers_take(events):
    """Read (not None) only where fastavro reads the same head fields, and wherever the hand-written reader of
    Frames envelopes (`_frames_envelope`) reads: damaged bytes of every kind, all kinds whole."""
    rnd, plain = random.Random(11), ENVELOPE.plain_decoder()

    def decoded(data: bytes) -> EnvelopeHead | None:
        try:
            record = plain(data)
        except DecodeError:
            return None
        return EnvelopeHead(*(record[name] for name in EnvelopeHead._fields))

    for event in events:
        cases = [event.envelope_bytes] + [damaged(rnd, event.envelope_bytes, HEADER_LEN) for _ in range(60)]
        for data in cases:
            head = _envelope_head_only(data, _BODIES)
            if data is event.envelope_bytes:
                assert head is not None
            if head is not None:
                assert head == decoded(data)
            if _frames_envelope(data) is not None:
                assert head is not None


def opened(value: bytes, open_) -> EnvelopeHead | str:
    try:
        envelope = open_(value).envelope
    except DecodeError as exc:
        return f"DecodeError: {exc}"
    if isinstance(envelope, EnvelopeHead):
        return envelope
    return EnvelopeHead(*(envelope[name] for name in EnvelopeHead._fields))


def test_open_head_opens_and_refuses_what_open_event_does_with_the_same_fields(events):
    rnd = random.Random(12)
    for event in events:
        for value in [event.value] + [damaged(rnd, event.value, 0) for _ in range(40)]:
            head = opened(value, open_head)
            assert head == opened(value, open_event)
            if not isinstance(head, str):
                event = open_event(value)
                assert open_head(value)[:3] == (event.value, event.envelope_bytes, event.signature)


@pytest.mark.parametrize("change", [{"session_id": "0190A8B2-1C3D-7E4F-8A9B-0C1D2E3F4A5B"}, {"kind": "nope"},
                                    {"ts": 2**62}, {"ts": -2**62}, {}])
def test_open_head_converts_and_refuses_envelope_fields_as_open_event_does(change):
    """An uppercase uuid comes back in open_event's form; an unknown kind or a time out of range is refused."""
    key = make_key("proxy")
    envelope = {"event_id": uuid7(), "session_id": uuid7(), "seq": 3, "ts": 1_700_000_000_000_000, "producer": "p",
                "key_id": key.key_id, "prev_hash": bytes(32), "kind": "frames",
                "body": ("custody.Frames", {"direction": "client", "messages": []}), **change}
    value = sign_envelope(envelope, key).value
    assert opened(value, open_head) == opened(value, open_event)


def test_the_verifier_starts_without_the_exporter_duckdb_or_kafka():
    """`custody bundle verify` and each worker it spawns import this much: the start-up a worker pays per run
    (DuckDB, kafka-python and every command cost ~0.4 s of CPU each, bench/bundle.py)."""
    import subprocess
    import sys

    probe = ("import sys, custody.cli, query.bundle_verify; "
             "print(sorted(m for m in ('duckdb', 'kafka', 'query.bundle', 'query.views', 'custody.commands.proxy') "
             "if m in sys.modules))")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == "[]"
