"""A broker hung (SIGSTOP, then SIGCONT) while the ledger seals does not stop its seals and documents (issue 17):
every seal and document made before, during and after the hang reaches its topic, without a restart.

* Past the producer's delivery timeout (shortened here to 3 s, so that a 6 s hang is past it): before the fix,
  kafka-python's idempotent producer whose batches expired reset its producer id and sent nothing more, so the
  worker never confirmed the seal it made during the hang, the seals after it and their documents were only
  published by a restart's re-render, and its close waited out every flush. Now the worker renews the producer and
  sends again what was not acknowledged. What the broker had appended just before it stopped (its acknowledgement
  never came) then comes twice: the same bytes, de-duplicated by the witness (a seal's number and hash) and the SOC
  (a document's deterministic id).
* Within the ledger's own delivery timeout (its default, 2 minutes): the producer's idempotent retries deliver
  everything exactly once.
* A rejected record's copy to `custody.quarantine` sent into the hang: no seal covers it before Kafka has it.

The broker is a dev broker of this test's own.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from kafka import TopicPartition

from conftest import make_key
from events_factory import policy_decision, session_end, session_start
from ingest import kafka
from ingest.broker import DevBroker
from ingest.events import SessionChain
from ingest.keys import Keyring, TrustedKey
from ingest.records import frames_body
from ingest.settings import KafkaSettings, SocSettings
from ledger.seals import Seal, seal_relpath
from ledger.service import LedgerService
from ledger.settings import LedgerSettings
from ledger.witness import Witness, cosigner_for, custody_log_keys
from ocsf_fixtures import read_topic
from test_ocsf_crash import msg, uids

ORIGIN = "custody.test/hang"
HANG_SECONDS = 6.0
PAST_THE_TIMEOUT = {"request_timeout_ms": 1500, "delivery_timeout_ms": 3000, "max_block_ms": 2000}
DOCUMENT_TOPICS = ("violations", "violations.ocsf", "activity.ocsf")


def session(chain: SessionChain) -> tuple[list, dict[str, set[str]]]:
    """One session's events (a statement answered, a block, the end) and the ids of the documents it makes."""
    start = chain.event("session_start", session_start())
    done = chain.event("frames", frames_body([msg("Query", "client", operation="statement", text="SELECT 1"),
                                              msg("CommandComplete", "server", outcome="ok")]))
    blocked = chain.event("policy_decision", policy_decision("block"))
    end = chain.event("session_end", session_end())
    return [start, done, blocked, end], {"violations": {blocked.event_id}, "violations.ocsf": {blocked.event_id},
                                         "activity.ocsf": {start.event_id, f"{done.event_id}#0"}}


def topic_values(settings: KafkaSettings, name: str) -> list[bytes]:
    """The values on a one-partition topic, up to its end offset (read_topic's are JSON; quarantine's are not)."""
    consumer = kafka.consumer(settings, group_id=None)
    try:
        tp = TopicPartition(settings.topic(name), 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end, values = consumer.end_offsets([tp])[tp], []
        deadline = time.monotonic() + 30
        while consumer.position(tp) < end:
            assert time.monotonic() < deadline, f"{name}: not read to its end"
            values += [r.value for batch in consumer.poll(timeout_ms=300).values() for r in batch]
        return values
    finally:
        consumer.close()


@pytest.mark.parametrize("publisher_options", [PAST_THE_TIMEOUT, None], ids=["past-the-timeout", "within-it"])
def test_a_broker_hang_does_not_stop_seals_and_documents(proxy_key, tmp_path, publisher_options):
    ledger_key = make_key("ledger")
    keyring = Keyring([TrustedKey(proxy_key.key_id, "proxy", proxy_key.public_key),
                       TrustedKey(ledger_key.key_id, "ledger", ledger_key.public_key)])
    chain = SessionChain(proxy_key, "proxy-1")
    with DevBroker(log_path=tmp_path / "tansu.log") as broker:
        settings = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix="hang.", embedded_listen=broker.bootstrap,
                                 partitions=1)
        ledger = LedgerService(settings, LedgerSettings(dir=tmp_path / "ledger", origin=ORIGIN,
                                                        segment_max_events=1000, segment_max_bytes=1 << 24,
                                                        segment_max_seconds=0.3, idle_seal_seconds=3600),
                               ledger_key, keyring, partitions=[0], soc=SocSettings(ocsf=True, activity=True),
                               publisher_options=publisher_options)
        writer = ledger.writers[0]
        producer = kafka.producer(settings)
        expected: dict[str, set[str]] = {topic: set() for topic in DOCUMENT_TOPICS}

        def run_until(done, seconds: float = 30.0) -> None:
            deadline = time.monotonic() + seconds
            while not done():
                assert time.monotonic() < deadline, "the ledger did not get there in time"
                ledger.step(0.1)

        def sealed_session() -> None:
            events, ids = session(chain)
            for e in events:
                producer.send(settings.topic("events"), key=e.session_id.encode(), value=e.value, partition=0)
            producer.flush()
            for topic in DOCUMENT_TOPICS:
                expected[topic] |= ids[topic]

        sealed_session()  # seal 1: out before the hang
        run_until(lambda: writer.state.next_seal_number == 2 and writer.outbox.confirm() == 1)
        sealed_session()  # seal 2: taken in before the hang, sealed and sent while the broker hangs
        run_until(lambda: writer.opened_at is not None)
        os.kill(broker._process.pid, signal.SIGSTOP)
        try:
            hung_at = time.monotonic()
            run_until(lambda: time.monotonic() - hung_at > HANG_SECONDS)
            assert writer.state.next_seal_number == 3, "seal 2 was made during the hang"
        finally:
            os.kill(broker._process.pid, signal.SIGCONT)
        run_until(lambda: writer.outbox.confirm() == 2)  # confirmed by the same worker: no restart
        sealed_session()  # seal 3, after the hang: its producer works
        run_until(lambda: writer.state.next_seal_number == 4 and writer.outbox.confirm() == 3)

        seals = read_topic(settings, "seals")
        on_disk = {n: Seal.load(tmp_path / "ledger" / seal_relpath(0, n)) for n in (1, 2, 3)}
        assert {s["seal"]["number"] for s in seals} == set(on_disk), "every seal published"
        witness = Witness(tmp_path / "witness", cosigner_for(make_key("witness")), custody_log_keys(keyring, [ORIGIN]))
        cosigned = []
        for s in seals:  # a second copy is the same seal file, which the witness skips (same number, same hash)
            assert s == json.loads(on_disk[s["seal"]["number"]].to_bytes())
            if witness.add_seal(Seal.from_bytes(json.dumps(s).encode())) is not None:
                cosigned.append(s["seal"]["number"])
        witness.close()
        assert cosigned == [1, 2, 3]
        copies, published = {}, len(seals)
        for topic in DOCUMENT_TOPICS:
            docs = read_topic(settings, topic)
            assert set(uids(docs)) == expected[topic], f"{topic}: every document, nothing foreign"
            for uid, d in zip(uids(docs), docs):  # a second copy is the same document: de-duplicated on its id
                assert copies.setdefault((topic, uid), d) == d
            published += len(docs)
        print(f"published: {published} messages for {len(on_disk)} seals and {len(copies)} documents")
        if publisher_options is None:
            assert published == len(on_disk) + len(copies), "within the delivery timeout: exactly once"
        producer.close()
        closing = time.monotonic()
        ledger.close()
        assert time.monotonic() - closing < 5, "nothing left waiting in a stuck producer"


def test_no_seal_covers_a_rejected_record_before_kafka_has_its_quarantine_copy(proxy_key, tmp_path):
    """The broker stops just after the worker rejected a forgery, so its copy to `custody.quarantine` is sent into
    the hang and expires: the seal over its offset waits (before: it was made over the lost copy, or, the quarantine
    producer being stuck, the next flush raised and the worker died), and the copy arrives once the broker is back."""
    ledger_key = make_key("ledger")
    keyring = Keyring([TrustedKey(proxy_key.key_id, "proxy", proxy_key.public_key),
                       TrustedKey(ledger_key.key_id, "ledger", ledger_key.public_key)])
    forged = SessionChain(make_key("proxy"), "evil").event("session_start", session_start("mallory@example.com"))
    with DevBroker(log_path=tmp_path / "tansu.log") as broker:
        settings = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix="hang.", embedded_listen=broker.bootstrap,
                                 partitions=1)
        ledger = LedgerService(settings, LedgerSettings(dir=tmp_path / "ledger", origin=ORIGIN,
                                                        segment_max_events=1000, segment_max_bytes=1 << 24,
                                                        segment_max_seconds=0.3, idle_seal_seconds=3600),
                               ledger_key, keyring, partitions=[0], publisher_options=PAST_THE_TIMEOUT)
        writer = ledger.writers[0]
        take = writer.add_batch

        def take_then_hang(records, salts):  # the fault, injected between the reject and the send of its copy
            rejected = take(records, salts)
            if rejected:
                os.kill(broker._process.pid, signal.SIGSTOP)
            return rejected

        writer.add_batch = take_then_hang
        producer = kafka.producer(settings)
        offset = producer.send(settings.topic("events"), key=forged.session_id.encode(), value=forged.value,
                               partition=0).get(10).offset
        producer.close()
        try:
            deadline = time.monotonic() + 30
            while writer.quarantined == 0:
                assert time.monotonic() < deadline, "the forgery was not taken"
                ledger.step(0.1)
            hung_at = time.monotonic()
            while time.monotonic() - hung_at < HANG_SECONDS:
                ledger.step(0.1)
            assert writer.state.next_seal_number == 1, "no seal before its reject's copy is acknowledged"
        finally:
            os.kill(broker._process.pid, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while not (writer.state.next_seal_number == 2 and writer.outbox.confirm() == 1):
            assert time.monotonic() < deadline, "the ledger did not seal after the hang"
            ledger.step(0.1)
        assert set(topic_values(settings, "quarantine")) == {forged.value}
        assert uids(read_topic(settings, "violations")) == [f"quarantine:{settings.topic('events')}/0@{offset}"]
        ledger.close()
