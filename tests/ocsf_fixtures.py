"""Helpers for the OCSF tests: the carried schema, a ledger run with [soc] on, the OCSF topics read back."""

from __future__ import annotations

import json
import time
from functools import cache
from pathlib import Path

import jsonschema
from kafka import TopicPartition

from ingest import kafka, ocsf
from ingest.keys import Keyring, load_key_file
from ingest.settings import KafkaSettings, SocSettings
from ledger.service import LedgerService
from ledger.settings import LedgerSettings

SCHEMA_DIR = Path(__file__).parent / "ocsf" / ocsf.VERSION
CLASS_FILES = {3002: "authentication", 2004: "detection_finding", 6005: "datastore_activity", 4007: "ssh_activity",
               4002: "http_activity", 6003: "api_activity"}


@cache
def validator(class_uid: int) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / f"{CLASS_FILES[class_uid]}.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def validate(doc: dict) -> None:
    """Raise unless `doc` is valid for its class in the carried OCSF schema."""
    errors = sorted(validator(doc["class_uid"]).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


def seal(kafka_settings: KafkaSettings, keys: Path, ledger_dir: Path, leaves: int, group: str,
         soc: SocSettings = SocSettings(ocsf=True, activity=True)) -> None:
    """Seal every record on the events topic with [soc] on, then stop (flushed: the documents are on their topics).
    Pinned to every partition: the same sealing and rendering without the dev broker's ~6 s group join."""
    settings = LedgerSettings(dir=ledger_dir, origin="custody.test/ledger", segment_max_events=1000,
                              segment_max_bytes=1 << 24, segment_max_seconds=0.3, idle_seal_seconds=3600)
    service = LedgerService(kafka_settings, settings, load_key_file(keys / "ledger.key"),
                            Keyring.load(keys / "keyring.toml"), group_id=group, soc=soc,
                            partitions=list(range(kafka_settings.partitions)))
    topic = kafka_settings.topic("events")
    partitions = service.consumer.partitions_for_topic(topic) or set()
    ends = service.consumer.end_offsets([TopicPartition(topic, p) for p in partitions])

    def behind() -> bool:  # every record already on the topic sealed, not just `leaves` of them
        return any(end and (tp.partition not in service.writers
                            or service.writers[tp.partition].state.next_offset < end) for tp, end in ends.items())

    deadline = time.monotonic() + 40
    while (service.sealed_leaves < leaves or behind()
           or any(w.opened_at is not None for w in service.writers.values())):
        assert time.monotonic() < deadline, "the ledger did not seal in time"
        service.step(0.1)
    service.close()


def read_topic(kafka_settings: KafkaSettings, name: str, timeout: float = 30.0) -> list[dict]:
    """Every document on the topic when called, up to its end offsets (no waiting for silence: the ledger flushed
    its producer before `seal` returned, so nothing of it is still on the way)."""
    topic = kafka_settings.topic(name)
    consumer = kafka.consumer(kafka_settings, group_id=None)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        assert partitions, f"{topic}: no partitions"
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        out: list[dict] = []
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            assert time.monotonic() < deadline, f"{topic}: not read to its end in {timeout} s"
            batches = consumer.poll(timeout_ms=300)
            out += [json.loads(r.value) for b in batches.values() for r in b]
        return out
    finally:
        consumer.close()
