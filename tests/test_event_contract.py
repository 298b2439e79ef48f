"""The wire contract: every event kind round-trips through a real broker, and an
independent Avro implementation (the `avro` package) decodes it from the .avsc alone."""

from __future__ import annotations

import copy
import io
import json
import os
import time
from importlib import resources

import avro.io
import avro.schema
import fastavro
import pytest

from ingest import kafka
from fastavro.schema import to_parsing_canonical_form

from conftest import make_key
from custody.config import LedgerSettings
from events_factory import ALL_KINDS, frames, result_frames
from ingest.avro import ENVELOPE, ENVELOPE_V1, ENVELOPES, HEADER_LEN, MAGIC, SIGNED_EVENT, Schema
from ingest.consumer import Record
from ingest.events import _BODY_TYPES, ZERO_HASH, SessionChain, SignedEvent, now_micros, open_event, uuid7
from ingest.keys import Keyring, TrustedKey
from ingest.records import frames_body, message_direction
from ingest.verify import EventVerifier, Rejection
from ledger.service import PartitionWriter
from ledger.state import recover
from ledger.verify import verify_ledger
from query.views import open_ledger


def avsc(name: str) -> str:
    return resources.files("schemas").joinpath(name).read_text()


def consume_all(settings, topic: str, expected: int, timeout: float = 20.0) -> list:
    consumer = kafka.consumer(settings, topic, group_id=None)
    messages, deadline = [], time.monotonic() + timeout
    while len(messages) < expected and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            messages.extend(batch)
    consumer.close()
    return messages


def avro_decode(schema_text: str, data: bytes) -> dict:
    """Decode single-object encoding with the reference `avro` package."""
    assert data[:2] == MAGIC
    decoder = avro.io.BinaryDecoder(io.BytesIO(data[HEADER_LEN:]))
    return avro.io.DatumReader(avro.schema.parse(schema_text)).read(decoder)


def crc64_avro(data: bytes) -> int:
    """The Avro spec's fingerprint algorithm, written out from the spec for an independent check."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def test_fingerprints_are_crc64_avro_little_endian():
    """The spec puts the 64-bit fingerprint little-endian on the wire."""
    reference = avro.schema.parse(avsc("signed_event.avsc")).fingerprint("CRC-64-AVRO")
    assert SIGNED_EVENT.fingerprint == bytes(reference)
    # The avro package keeps {"type": "string"} for logical types in its canonical form, against the
    # spec's [PRIMITIVES] rule, so for the envelope the spec's algorithm is checked directly.
    canonical = to_parsing_canonical_form(json.loads(avsc("event.avsc"))).encode()
    assert ENVELOPE.fingerprint == crc64_avro(canonical).to_bytes(8, "little")


def test_every_kind_round_trips_through_the_broker_and_decodes_with_the_avro_package(kafka_settings, proxy_key):
    kafka.ensure_topics(kafka_settings, ("events",))
    chain = SessionChain(proxy_key, producer="test-proxy")
    events = [chain.event(kind, body) for kind, body in ALL_KINDS.items()]
    producer = kafka.producer(kafka_settings)
    for event in events:
        producer.send(kafka_settings.topic("events"), key=event.session_id.encode(), value=event.value)
    producer.flush()
    producer.close()

    received = consume_all(kafka_settings, kafka_settings.topic("events"), len(events))
    assert [m.value for m in received] == [e.value for e in events]
    assert {m.key for m in received} == {chain.session_id.encode()}

    for message, (kind, body) in zip(received, ALL_KINDS.items()):
        outer = avro_decode(avsc("signed_event.avsc"), message.value)
        envelope = avro_decode(avsc("event.avsc"), outer["envelope"])
        assert envelope["kind"] == kind
        assert envelope["session_id"] == chain.session_id
        for field, value in body.items():
            if field == "messages":
                assert [m["statement"] for m in envelope["body"]["messages"]] == [m.get("statement") for m in value]
                assert [m["data"] for m in envelope["body"]["messages"]] == [m["data"] for m in value]
            else:
                assert envelope["body"][field] == value, field
        opened = open_event(message.value)
        assert opened.kind == kind and opened.signature == outer["signature"]
    assert events[0].prev_hash == ZERO_HASH
    assert [e.seq for e in events] == [0, 1, 2, 3, 4]
    assert all(later.prev_hash == earlier.hash for earlier, later in zip(events, events[1:]))


def _with_new_optional_field(schema_json: dict) -> dict:
    evolved = copy.deepcopy(schema_json)
    evolved["fields"].append({"name": "tenant", "type": ["null", "string"], "default": None})
    return evolved


def _encode(schema: Schema, record: dict) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema.parsed, record)
    return buf.getvalue()


def test_schema_evolution_both_ways(proxy_key):
    """schemas/README.md: new fields are optional with a default; old and new readers resolve each other."""
    v1_json = json.loads(avsc("event.avsc"))
    v1, v2 = ENVELOPE, Schema.from_json(_with_new_optional_field(v1_json))
    assert v1.fingerprint != v2.fingerprint

    envelope = dict(SessionChain(proxy_key, "p").event("frames", ALL_KINDS["frames"]).envelope)
    new_bytes = v2.encode({**envelope, "tenant": "acme"})
    old_reader_view = v2.decode(new_bytes, reader=v1)
    assert "tenant" not in old_reader_view and old_reader_view["seq"] == envelope["seq"]

    old_bytes = v1.encode(envelope)
    new_reader_view = v1.decode(old_bytes, reader=v2)
    assert new_reader_view["tenant"] is None
    assert new_reader_view["body"]["messages"][0]["statement"] == "SELECT 1"


def test_schemas_are_valid_for_the_avro_package():
    for name in ("event.avsc", "event.v1.avsc", "signed_event.avsc"):
        avro.schema.parse(avsc(name))


# --- contract v2 against v1 (schemas/event.v1.avsc) --------------------------------------------------

V2_MESSAGE_FIELDS = ("direction", "channel", "offset_us", "operation", "text", "objects", "outcome")


def mixed_frames() -> dict:
    """One v2 Frames event: a command on channel 0 and its answer, both directions."""
    return frames_body([
        {"type": "exec", "data": b"ls", "direction": "client", "channel": "0", "offset_us": 0,
         "operation": "command", "text": "ls /tmp", "objects": ["/tmp"]},
        {"type": "data", "data": b"a\nb\n", "direction": "server", "channel": "0", "offset_us": 850},
        {"type": "exit-status", "data": b"\0", "direction": "server", "channel": "0", "offset_us": 900,
         "outcome": "ok", "error_code": "0"}])


def sign_v1(key, session_id: str, seq: int, prev_hash: bytes, kind: str, body: dict) -> SignedEvent:
    """An event exactly as a v1 producer wrote it: the envelope encoded with the v1 schema, signed over those bytes."""
    envelope = {"event_id": uuid7(), "session_id": session_id, "seq": seq, "ts": now_micros(), "producer": "pg-proxy-v1",
                "key_id": key.key_id, "prev_hash": prev_hash, "kind": kind, "body": (_BODY_TYPES[kind], body)}
    envelope_bytes = ENVELOPE_V1.encode(envelope)
    signature = key.sign(envelope_bytes)
    value = SIGNED_EVENT.encode({"envelope": envelope_bytes, "signature": signature})
    return SignedEvent(value, envelope_bytes, signature, envelope)


def test_v1_and_v2_fingerprints_are_published():
    table = resources.files("schemas").joinpath("README.md").read_text()
    assert ENVELOPE_V1.fingerprint.hex() == "2a731cde7a10977b"  # v1's, as published before v2
    for schema in (ENVELOPE, ENVELOPE_V1, SIGNED_EVENT):
        assert f"`{schema.fingerprint.hex()}`" in table
    assert set(ENVELOPES.by_fingerprint) == {ENVELOPE.fingerprint, ENVELOPE_V1.fingerprint}
    canonical = to_parsing_canonical_form(json.loads(avsc("event.v1.avsc"))).encode()
    assert ENVELOPE_V1.fingerprint == crc64_avro(canonical).to_bytes(8, "little")


def test_v2_adds_only_optional_message_fields_at_the_end():
    def message_fields(name):
        body = next(f for f in json.loads(avsc(name))["fields"] if f["name"] == "body")["type"]
        frames = next(b for b in body if b["name"] == "Frames")
        return frames["fields"][1]["type"]["items"]["fields"]
    v1, v2 = message_fields("event.v1.avsc"), message_fields("event.avsc")
    assert v2[:len(v1)] == v1
    assert tuple(f["name"] for f in v2[len(v1):]) == V2_MESSAGE_FIELDS
    assert all(f["type"][0] == "null" and f["default"] is None for f in v2[len(v1):])


def test_a_reader_on_the_v1_schema_reads_v2_events_and_never_files_a_server_message_under_client(proxy_key):
    event = SessionChain(proxy_key, "p").event("frames", mixed_frames())
    assert event.envelope_bytes[2:HEADER_LEN] == ENVELOPE.fingerprint
    for old in (ENVELOPE.decode(event.envelope_bytes, reader=ENVELOPE_V1),
                avro.io.DatumReader(avro.schema.parse(avsc("event.avsc")), avro.schema.parse(avsc("event.v1.avsc")))
                .read(avro.io.BinaryDecoder(io.BytesIO(event.envelope_bytes[HEADER_LEN:])))):
        body = old["body"]
        assert body["direction"] == "mixed"
        assert [m["type"] for m in body["messages"]] == ["exec", "data", "exit-status"]
        assert not any(field in m for m in body["messages"] for field in V2_MESSAGE_FIELDS)
    # one direction: the Frames' direction is that direction, as a v1 reader expects
    assert frames_body([{"type": "Query", "data": b""}], "client")["direction"] == "client"
    assert frames_body([{"type": "a", "data": b"", "direction": "server"}])["direction"] == "server"
    both = frames_body([{"type": "a", "data": b""}, {"type": "b", "data": b"", "direction": "server"}], "client")
    assert both["direction"] == "mixed" and [m["direction"] for m in both["messages"]] == ["client", "server"]
    assert [message_direction(both, m) for m in both["messages"]] == ["client", "server"]


def test_a_v2_reader_reads_v1_events_with_the_defaults(proxy_key):
    event = sign_v1(proxy_key, uuid7(), 0, ZERO_HASH, "frames", ALL_KINDS["frames"])
    assert event.envelope_bytes[2:HEADER_LEN] == ENVELOPE_V1.fingerprint
    opened = open_event(event.value)
    assert opened.envelope_bytes == event.envelope_bytes  # the writer's bytes, as signed
    message = opened.body["messages"][0]
    assert message["statement"] == "SELECT 1"
    assert {field: message[field] for field in V2_MESSAGE_FIELDS} == dict.fromkeys(V2_MESSAGE_FIELDS)
    assert opened.body["direction"] == "client"


def test_an_unknown_schema_fingerprint_is_malformed(proxy_key):
    event = SessionChain(proxy_key, "p").event("frames", ALL_KINDS["frames"])
    forged = event.envelope_bytes[:2] + bytes(8) + event.envelope_bytes[HEADER_LEN:]
    value = SIGNED_EVENT.encode({"envelope": forged, "signature": proxy_key.sign(forged)})
    with pytest.raises(Rejection, match="malformed: schema fingerprint 0000000000000000 is none of"):
        EventVerifier(Keyring([TrustedKey(proxy_key.key_id, "proxy", proxy_key.public_key)])).check(value)


def test_v1_events_verify_and_go_through_the_ledger_beside_v2_events(tmp_path, proxy_key):
    """A session begun by a v1 proxy and continued by a v2 one: signatures over each writer's bytes, one chain."""
    ledger_key = make_key("ledger")
    keyring = Keyring([TrustedKey(proxy_key.key_id, "proxy", proxy_key.public_key),
                       TrustedKey(ledger_key.key_id, "ledger", ledger_key.public_key)])
    session_id, v1_events, prev = uuid7(), [], ZERO_HASH
    for seq, (kind, body) in enumerate([("session_start", ALL_KINDS["session_start"]),
                                        ("frames", frames("SELECT count(*) FROM orders")),
                                        ("frames", result_frames(1))]):
        v1_events.append(sign_v1(proxy_key, session_id, seq, prev, kind, body))
        prev = v1_events[-1].hash
    chain = SessionChain(proxy_key, "pg-proxy-v2", session_id)
    chain._seq, chain._prev_hash = len(v1_events), prev  # the upgraded proxy continues the session's chain
    v2_events = [chain.event("frames", mixed_frames()), chain.event("session_end", ALL_KINDS["session_end"])]

    verifier = EventVerifier(keyring)
    for event in v1_events + v2_events:
        assert verifier.check(event.value, session_id.encode()).seq == event.seq

    root = tmp_path / "ledger"
    settings = LedgerSettings(dir=root, origin="custody.test/v1", segment_max_events=100, segment_max_bytes=1 << 24,
                              segment_max_seconds=60.0, idle_seal_seconds=60.0)
    writer = PartitionWriter(root, settings, "t.events", recover(root, 0), keyring, ledger_key)
    for offset, event in enumerate(v1_events + v2_events):
        assert writer.add(Record("t.events", 0, offset, session_id.encode(), event.value), os.urandom(32)) is None
    writer.seal()
    report = verify_ledger(root, keyring, "custody.test/v1")
    assert report.ok, [p.line for p in report.problems]

    con = open_ledger(root)
    frames_rows = con.sql("SELECT seq, direction, operation, outcome FROM frames ORDER BY seq, message_no").fetchall()
    assert frames_rows == [(1, "client", None, None), (2, "server", None, None), (3, "client", "command", None),
                           (3, "server", None, None), (3, "server", None, "ok")]
    activity = con.sql("SELECT operation_no, operation, text, outcome FROM activity ORDER BY operation_no").fetchall()
    # the v1 statement's operation is derived from its SQL-named fields; the v2 command names its own
    assert activity == [(1, "statement", "SELECT count(*) FROM orders", "ok"), (2, "command", "ls /tmp", "ok")]


def test_hand_written_frames_reader_agrees_with_fastavro(proxy_key):
    """ingest.avro's reader of the v2 Frames envelope returns fastavro's record, field for field, and takes no
    bytes fastavro refuses or reads otherwise (damaged, truncated, extended); anything else falls back."""
    import random

    from ingest.avro import FRAMES_READER_FINGERPRINT, DecodeError, _frames_envelope

    assert ENVELOPE.fingerprint == FRAMES_READER_FINGERPRINT  # a new schema: update the reader (or drop it)
    rnd, reference = random.Random(11), ENVELOPE.plain_decoder()

    def message() -> dict:
        m = {"type": rnd.choice(["DataRow", "Query", "ü"]), "data": os.urandom(rnd.choice([0, 5, 70, 300]))}
        if rnd.random() < .5:
            m["statement"] = "select ☃ " * rnd.randint(0, 30)
        if rnd.random() < .3:
            m["parameters"] = [None, "a", "b" * 100][:rnd.randint(0, 3)]
        if rnd.random() < .3:
            m["rows"] = rnd.choice([0, 1, -5, 2**40, 2**63 - 1, -2**63])
        if rnd.random() < .3:
            m["command_tag"], m["error_code"], m["error_message"] = "SELECT 1", "42P01", "nope"
        if rnd.random() < .3:
            m["attributes"] = {f"k{i}": "v" * i for i in range(rnd.randint(0, 70))}
        if rnd.random() < .5:
            m["direction"], m["channel"], m["offset_us"] = "client", "x", rnd.randint(0, 2**50)
        if rnd.random() < .3:
            m["operation"], m["text"], m["objects"], m["outcome"] = "read", "t", ["a", "b"][:rnd.randint(0, 2)], "ok"
        if rnd.random() < .1:
            m["sealed_original"] = os.urandom(20)
        return m

    def decoded(data: bytes):
        try:
            return reference(data)
        except DecodeError:
            return "refused"

    chain = SessionChain(proxy_key, "test")
    events = [chain.event("frames", {"direction": "server", "messages": [message() for _ in range(rnd.choice([0, 1, 3, 40]))]})
              for _ in range(150)]
    for event in events:
        data = event.envelope_bytes
        assert _frames_envelope(data) == reference(data)
        for _ in range(40):
            damaged = bytearray(data)
            if (op := rnd.random()) < .5:
                for _ in range(rnd.randint(1, 3)):
                    damaged[rnd.randrange(HEADER_LEN, len(damaged))] = rnd.randrange(256)
            elif op < .75:
                damaged = damaged[:rnd.randrange(HEADER_LEN, len(damaged))]
            else:
                damaged += bytes([rnd.randrange(256)])
            if (fast := _frames_envelope(bytes(damaged))) is not None:
                assert fast == decoded(bytes(damaged))
    end = chain.event("session_end", {"reason": "x", "duration_us": 1, "client_bytes": 1, "server_bytes": 1,
                                      "client_messages": 1, "server_messages": 1})
    assert _frames_envelope(end.envelope_bytes) is None and open_event(end.value).body["reason"] == "x"


def test_an_envelope_without_its_marker_is_refused_by_the_fast_readers_too(proxy_key):
    """The hand-written readers compared only the fingerprint, so a current-schema envelope whose C3 01 marker was
    damaged opened anyway; the whole single-object header must match, as fastavro's path requires."""
    from ingest.avro import DecodeError

    for kind in ("frames", "session_start"):
        envelope = SessionChain(proxy_key, "p").event(kind, ALL_KINDS[kind]).envelope_bytes
        damaged = b"\x00\x00" + envelope[2:]
        assert ENVELOPES.head(damaged) is None
        with pytest.raises(DecodeError, match="no C3 01 marker"):
            ENVELOPES.decode_plain(damaged)
        assert ENVELOPES.decode_plain(envelope)[1] is True
