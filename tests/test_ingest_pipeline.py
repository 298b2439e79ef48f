"""Producer → broker → consumer with verification and quarantine, against the real broker."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from conftest import make_key, send_raw
from events_factory import frames, session_start
from ingest import kafka
from ingest.consumer import Accepted, EventConsumer, Quarantined
from ingest.events import SessionChain
from ingest.keys import TrustedKey
from ingest.producer import EventProducer
from ingest.spool import Spool, SpoolFull
from ingest.verify import EventVerifier


def drain(consumer: EventConsumer, expected: int, timeout: float = 30.0, commit: bool = True) -> list:
    """Poll until `expected` outcomes; then commit, or (a consumer without a group) make the quarantine copies safe."""
    outcomes, deadline = [], time.monotonic() + timeout
    while len(outcomes) < expected and time.monotonic() < deadline:
        outcomes.extend(consumer.poll(0.5))
    if commit:
        consumer.commit()
    else:
        consumer.quarantine.flush()
    return outcomes


def quarantine_reasons(settings, expected: int, timeout: float = 20.0) -> list[tuple[str, str, bytes]]:
    c = kafka.consumer(settings, settings.topic("quarantine"), group_id=None)
    found, deadline = [], time.monotonic() + timeout
    while len(found) < expected and time.monotonic() < deadline:
        for batch in c.poll(timeout_ms=500).values():
            for m in batch:
                headers = dict(m.headers)
                found.append((headers["custody-reason"].decode(), headers["custody-source"].decode(), m.value))
    c.close()
    return found


def test_each_bad_event_is_quarantined_with_its_own_reason(kafka_settings, proxy_key, keyring):
    """Bit flip, wrong key, revoked key, seq gap, replay, truncation: each one reason, nothing silent."""
    revoked_key, stranger = make_key("proxy"), make_key("proxy")
    keyring.add(TrustedKey(revoked_key.key_id, "proxy", revoked_key.public_key,
                           not_after=datetime.now(timezone.utc) - timedelta(hours=1)))

    def session(key):
        chain = SessionChain(key, "p")
        return chain, [chain.event("session_start", session_start()), chain.event("frames", frames("SELECT 42"))]

    good_chain, good = session(proxy_key)
    flipped = bytearray(good[1].value)
    flipped[flipped.index(b"SELECT 42")] ^= 0x01  # 'S' -> 'R' inside the signed envelope
    _, by_stranger = session(stranger)
    _, by_revoked = session(revoked_key)
    gap_chain, gap = session(proxy_key)
    gap_chain.event("frames", frames("SELECT 'skipped'"))  # seq 2 is never sent
    after_gap = gap_chain.event("frames", frames("SELECT 'after gap'"))
    trunc_chain, trunc = session(proxy_key)

    key = lambda e: e.session_id.encode()
    send_raw(kafka_settings, [
        (key(good[0]), good[0].value),
        (key(good[1]), bytes(flipped)),           # bad_signature
        (key(good[1]), good[1].value),            # the genuine one is still accepted
        (key(good[1]), good[1].value),            # replayed: duplicate
        (key(by_stranger[0]), by_stranger[0].value),  # unknown_key
        (key(by_revoked[0]), by_revoked[0].value),    # key_revoked
        (key(gap[0]), gap[0].value), (key(gap[1]), gap[1].value),
        (key(after_gap), after_gap.value),        # seq_gap
        (key(trunc[0]), trunc[0].value[:-20]),    # malformed
        (key(good[0]), trunc[0].value),           # key_mismatch: Kafka key of another session
    ])
    consumer = EventConsumer(kafka_settings, EventVerifier(keyring), group_id=None)  # no group join: ~3 s less
    outcomes = drain(consumer, 11, commit=False)  # commits: the broker-restart test
    consumer.close()

    accepted = [o.event.seq for o in outcomes if isinstance(o, Accepted)]
    assert sorted(accepted) == [0, 0, 1, 1]
    quarantined = sorted(q.rejection.reason for q in outcomes if isinstance(q, Quarantined))
    assert quarantined == sorted(["bad_signature", "duplicate", "unknown_key", "key_revoked", "seq_gap",
                                  "malformed", "key_mismatch"])
    on_topic = quarantine_reasons(kafka_settings, 7)
    assert sorted(r for r, _, _ in on_topic) == quarantined
    assert all(src.startswith(kafka_settings.topic("events") + "/") for _, src, _ in on_topic)
    assert bytes(flipped) in [v for r, _, v in on_topic if r == "bad_signature"]  # kept unchanged


def test_chain_mismatch_is_its_own_reason(kafka_settings, proxy_key, keyring):
    chain = SessionChain(proxy_key, "p")
    first = chain.event("session_start", session_start())
    chain._prev_hash = b"\x01" * 32  # a producer that lost its place
    second = chain.event("frames", frames())
    send_raw(kafka_settings, [(first.session_id.encode(), first.value), (second.session_id.encode(), second.value)])
    consumer = EventConsumer(kafka_settings, EventVerifier(keyring), group_id=None)
    outcomes = drain(consumer, 2, commit=False)
    consumer.close()
    assert [type(o).__name__ for o in outcomes] == ["Accepted", "Quarantined"]
    assert outcomes[1].rejection.reason == "chain_mismatch"


def test_broker_stopped_mid_stream_then_restarted_delivers_every_event_once_in_order(
        broker, kafka_settings, proxy_key, keyring, tmp_path):
    """The spool holds events while the broker is down and drains them in order when it returns."""
    producer = EventProducer(kafka_settings, Spool(tmp_path / "spool", fsync_interval=0.005))
    chains = [SessionChain(proxy_key, "p") for _ in range(4)]
    produced: dict[str, list[int]] = {c.session_id: [] for c in chains}

    def produce(n: int) -> None:
        for i in range(n):
            chain = chains[i % len(chains)]
            event = chain.event("frames", frames(f"SELECT {chain.next_seq}")) if chain.next_seq else \
                chain.event("session_start", session_start())
            producer.send(event)
            produced[chain.session_id].append(event.seq)

    verifier = EventVerifier(keyring)
    consumer = EventConsumer(kafka_settings, verifier, group_id="restart-test")
    produce(200)
    assert producer.wait_delivered(timeout=30)
    seen = drain(consumer, 200)
    consumer.close()

    broker.stop()
    produce(300)                      # broker down: all of these go to the spool only
    time.sleep(1.0)
    assert producer.spool.pending_bytes > 0
    broker.start()                    # memory storage: the broker comes back empty
    assert producer.wait_delivered(timeout=60), "spool did not drain after the broker returned"
    consumer = EventConsumer(kafka_settings, verifier, group_id="restart-test")
    seen += drain(consumer, 300)
    consumer.close()
    producer.close()

    accepted = [o.event for o in seen if isinstance(o, Accepted)]
    duplicates = [o for o in seen if isinstance(o, Quarantined) and o.rejection.reason == "duplicate"]
    assert not [o for o in seen if isinstance(o, Quarantined) and o.rejection.reason != "duplicate"]
    delivered: dict[str, list[int]] = {}
    for event in accepted:
        delivered.setdefault(event.session_id, []).append(event.seq)
    assert delivered == produced, f"{len(duplicates)} duplicates"


def test_full_spool_fails_loudly(tmp_path, proxy_key, kafka_settings):
    """Broker unreachable and spool full: send raises, so a proxy can refuse the frame."""
    unreachable = type(kafka_settings)(bootstrap="127.0.0.1:1", topic_prefix="x.", embedded_listen="127.0.0.1:1", partitions=1)
    producer = EventProducer(unreachable, Spool(tmp_path / "spool", max_bytes=1 << 16))
    chain = SessionChain(proxy_key, "p")
    with pytest.raises(SpoolFull):
        for _ in range(10_000):
            producer.send(chain.event("frames", frames(payload=b"x" * 1024)))
    producer.close(timeout=0.1)


def test_spool_survives_restart_and_cuts_a_torn_tail(tmp_path):
    spool = Spool(tmp_path / "s")
    for i in range(5):
        spool.append(b"k", b"value %d" % i)
    spool.close()
    path = next((tmp_path / "s").glob("*.log"))
    with open(path, "ab") as f:
        f.write(b"\x00\x00\x01\x00garbage")  # a crash mid-append
    spool = Spool(tmp_path / "s")
    records = list(spool.read(0))
    assert [v for _, _, v in records] == [b"value %d" % i for i in range(5)]
    spool.ack(records[2][0])
    spool.close()
    spool = Spool(tmp_path / "s")
    assert [v for _, _, v in spool.read(spool.acked)] == [b"value 3", b"value 4"]
    spool.close()
