"""The witness fed over custody.seals by a real ledger on the real broker: cosignatures published to
custody.cosignatures and stored by the ledger beside its seals; a witness restarted mid-stream carries on."""

from __future__ import annotations

import time
import uuid

import pytest

from conftest import make_key
from events_factory import frames, session_end, session_start
from ingest import kafka
from ingest.events import SessionChain
from ingest.keys import Keyring, TrustedKey
from ingest.settings import KafkaSettings
from ledger import checkpoint, cosignatures
from ledger.seals import Seal
from ledger.service import LedgerService
from ledger.settings import LedgerSettings
from ledger.witness import SealFeed, Witness, cosignature_verifiers, cosigner_for, custody_log_keys

ORIGIN = "custody.test/ledger/feed"


@pytest.fixture
def settings(broker) -> KafkaSettings:
    return KafkaSettings(bootstrap=broker.bootstrap, topic_prefix=f"w{uuid.uuid4().hex[:8]}.",
                         embedded_listen=broker.bootstrap, partitions=1)


def send_session(settings: KafkaSettings, proxy, statements: int, end: bool = True) -> int:
    chain = SessionChain(proxy, "proxy-1")
    events = [chain.event("session_start", session_start())]
    events += [chain.event("frames", frames(f"SELECT {i}")) for i in range(statements)]
    if end:
        events.append(chain.event("session_end", session_end()))
    kafka.ensure_topics(settings, ("events",))
    producer = kafka.producer(settings)
    for e in events:
        producer.send(settings.topic("events"), key=e.session_id.encode(), value=e.value)
    producer.flush()
    producer.close()
    return len(events)


def seal_all(service: LedgerService, leaves: int) -> None:
    deadline = time.monotonic() + 30
    while service.sealed_leaves < leaves or any(w.opened_at is not None for w in service.writers.values()):
        assert time.monotonic() < deadline, "ledger did not seal everything"
        service.step(0.1)


def test_witness_cosigns_seals_from_kafka_and_the_ledger_keeps_them(settings, tmp_path):
    proxy, ledger_key, witness_key = make_key("proxy"), make_key("ledger"), make_key("witness")
    keyring = Keyring([TrustedKey(k.key_id, role, k.public_key) for k, role in
                       ((proxy, "proxy"), (ledger_key, "ledger"), (witness_key, "witness"))])
    ledger_dir = tmp_path / "ledger"
    ledger = LedgerSettings(dir=ledger_dir, origin=ORIGIN, segment_max_events=5, segment_max_bytes=1 << 24,
                            segment_max_seconds=0.2, idle_seal_seconds=3600)
    service = LedgerService(settings, ledger, ledger_key, keyring, group_id=f"g{uuid.uuid4().hex[:6]}")

    def witness() -> tuple[Witness, SealFeed]:
        core = Witness(tmp_path / "witness", cosigner_for(witness_key), custody_log_keys(keyring, [ORIGIN]))
        return core, SealFeed(core, settings, group_id="witness-test")

    core, feed = witness()
    total = send_session(settings, proxy, 7)
    seal_all(service, total)
    deadline = time.monotonic() + 30
    while feed.cosigned < 1:
        assert time.monotonic() < deadline, f"witness cosigned {feed.cosigned} seals"
        feed.step(0.2)
    first_round = feed.cosigned
    feed.close()  # the witness goes away mid-stream...
    core.close()

    total += send_session(settings, proxy, 6)
    seal_all(service, total)
    core, feed = witness()  # ...and comes back: it resumes from its state and committed offset
    chain = sorted((Seal.load(p) for p in (ledger_dir / "seals" / "p0").glob("*.json")), key=lambda s: s.number)
    deadline = time.monotonic() + 30
    while core.latest(f"{ORIGIN}/p0") is None or core.latest(f"{ORIGIN}/p0").size < chain[-1].tree_size:
        assert time.monotonic() < deadline, "restarted witness did not catch up"
        feed.step(0.2)
    assert feed.refused == 0 and core.violations == []
    assert core.latest(f"{ORIGIN}/p0").seal_number == chain[-1].number

    deadline = time.monotonic() + 30
    while len(cosignatures.load(ledger_dir, 0, chain[-1].number)) < 1:
        assert time.monotonic() < deadline, "the ledger did not store the cosignatures"
        service.step(0.1)
    service.close()
    feed.close()
    core.close()

    verifiers = cosignature_verifiers(keyring)
    assert [v.name for v in verifiers] == ["witness"]
    stored = 0
    for seal in chain:
        lines = cosignatures.load(ledger_dir, 0, seal.number)
        stored += bool(lines)
        for line in lines:
            witnessed = checkpoint.open_cosignatures(checkpoint.add_signature_lines(seal.checkpoint_note, [line]),
                                                     verifiers)
            assert len(witnessed.cosignatures) == 1
    assert stored >= first_round + 1
