"""The wire contract: every event kind round-trips through a real broker, and an
independent Avro implementation (the `avro` package) decodes it from the .avsc alone."""

from __future__ import annotations

import copy
import io
import json
import time
from importlib import resources

import avro.io
import avro.schema
import fastavro

from ingest import kafka
from fastavro.schema import to_parsing_canonical_form

from ingest.avro import ENVELOPE, HEADER_LEN, MAGIC, SIGNED_EVENT, Schema
from ingest.events import ZERO_HASH, SessionChain, open_event
from events_factory import ALL_KINDS


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
    for name in ("event.avsc", "signed_event.avsc"):
        avro.schema.parse(avsc(name))
