"""The ledger worker against the real broker: verify, seal into Parquet, quarantine, resume, idle seals."""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from conftest import make_key, send_raw
from events_factory import frames, policy_decision, protocol_error, result_frames, session_end, session_start
from ingest import kafka
from ingest.events import SessionChain
from ingest.keys import TrustedKey
from ledger import checkpoint
from ledger.seals import Seal, checkpoint_verifiers
from ledger.segments import SCHEMA
from ledger.service import LedgerService
from ledger.settings import LedgerSettings
from ledger.state import recover
from ledger.verify import verify_ledger


@pytest.fixture
def ledger_key(keyring):
    key = make_key("ledger")
    keyring.add(TrustedKey(key.key_id, "ledger", key.public_key))
    return key


def ledger_settings(tmp_path: Path, **overrides) -> LedgerSettings:
    values = dict(dir=tmp_path / "ledger", origin="custody.test/ledger", segment_max_events=1000,
                  segment_max_bytes=1 << 24, segment_max_seconds=0.3, idle_seal_seconds=3600.0)
    return LedgerSettings(**{**values, **overrides})


def send_events(settings, events) -> None:
    send_raw(settings, [(e.session_id.encode(), e.value) for e in events])


def seal_until(service: LedgerService, predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate(service):
        assert time.monotonic() < deadline, "ledger did not get there in time"
        service.step(0.1)


def sealed(n: int):
    return lambda service: service.sealed_leaves >= n and service.writers and \
        all(w.opened_at is None for w in service.writers.values())


def session_events(key, subject: str, statements: int = 3) -> list:
    chain = SessionChain(key, "proxy-1")
    events = [chain.event("session_start", session_start(subject, groups=("dba", "oncall")))]
    for i in range(statements):
        events.append(chain.event("frames", frames(f"SELECT {i}")))
        events.append(chain.event("frames", result_frames(rows=i + 1)))
    events += [chain.event("policy_decision", policy_decision("block")),
               chain.event("protocol_error", protocol_error()),
               chain.event("session_end", session_end())]
    return events


def read_rows(ledger_dir: Path) -> list[dict]:
    return [row for path in sorted(ledger_dir.glob("segments/p*/*.parquet")) for row in pq.read_table(path).to_pylist()]


def test_events_become_rows_leaves_and_seals(kafka_settings, proxy_key, keyring, ledger_key, tmp_path):
    sessions = {subject: session_events(proxy_key, subject) for subject in ("alice", "bob", "carol")}
    interleaved = [e for group in zip(*sessions.values()) for e in group]
    send_events(kafka_settings, interleaved)
    settings = ledger_settings(tmp_path)
    service = LedgerService(kafka_settings, settings, ledger_key, keyring, group_id="ledger-test")
    seal_until(service, sealed(len(interleaved)))
    service.close()

    for path in settings.dir.glob("segments/p*/*.parquet"):
        assert pq.read_schema(path).remove_metadata() == SCHEMA
        table = pq.read_table(path)
        keys = list(zip(table.column("session_id").to_pylist(), table.column("seq").to_pylist()))
        assert keys == sorted(keys), "one session's rows are contiguous, in seq order"
    rows = read_rows(settings.dir)
    assert len(rows) == len(interleaved)
    assert {r["event"] for r in rows} == {e.value for e in interleaved}
    for subject, events in sessions.items():
        mine = [r for r in rows if r["session_id"] == events[0].session_id]
        assert [r["seq"] for r in mine] == list(range(len(events)))
        assert {(r["subject"], tuple(r["groups"]), r["target"], r["protocol"]) for r in mine} == \
            {(subject, ("dba", "oncall"), "local-postgres", "postgres")}, "identity is on every row of a session"
        by_kind = {r["kind"]: r for r in reversed(mine)}  # the first row of each kind
        assert by_kind["frames"]["statement"] == "SELECT 0" and by_kind["frames"]["direction"] == "client"
        assert by_kind["frames"]["messages"][0]["type"] == "Query"
        assert by_kind["policy_decision"]["policy_action"] == "block"
        assert by_kind["protocol_error"]["error_code"] == "08P01"
        assert by_kind["session_end"]["end_reason"] == "client_terminate"
        assert [r["rows"] for r in mine if r["command_tag"]] == [1, 2, 3]
    by_partition: dict[int, list[int]] = {}
    for r in rows:
        by_partition.setdefault(r["partition"], []).append(r["leaf_index"])
    assert all(sorted(v) == list(range(len(v))) for v in by_partition.values()), "leaf indexes 0..n-1 per partition"

    report = verify_ledger(settings.dir, keyring, settings.origin)
    assert report.ok, [p.line for p in report.problems]
    assert report.events_valid == len(interleaved)

    seal = Seal.load(sorted(settings.dir.glob("seals/p*/000001.json"))[0])
    assert seal.record["previous"] == {"first_seal": True}
    tree, _ = checkpoint.open_checkpoint(seal.checkpoint_note, checkpoint_verifiers(keyring, seal.record["origin"]),
                                         origin=seal.record["origin"])
    assert (tree.size, tree.root_hash) == (seal.tree_size, seal.root)
    assert seal.record["origin"] == f"custody.test/ledger/p{seal.partition}"


def test_session_replay_by_duckdb_reads_the_contract(kafka_settings, proxy_key, keyring, ledger_key, tmp_path):
    events = session_events(proxy_key, "dave")
    send_events(kafka_settings, events)
    settings = ledger_settings(tmp_path)
    service = LedgerService(kafka_settings, settings, ledger_key, keyring, group_id="ledger-duckdb")
    seal_until(service, sealed(len(events)))
    service.close()
    glob = str(settings.dir / "segments" / "*" / "*.parquet")
    replay = duckdb.sql(f"SELECT seq, kind, subject FROM read_parquet('{glob}') "
                        f"WHERE session_id = '{events[0].session_id}' ORDER BY seq").fetchall()
    assert [(s, k) for s, k, _ in replay] == [(e.seq, e.kind) for e in events]
    assert {subject for _, _, subject in replay} == {"dave"}


def test_rejected_events_are_quarantined_and_never_become_leaves(kafka_settings, proxy_key, keyring, ledger_key,
                                                                  tmp_path):
    good = session_events(proxy_key, "erin")
    forged = bytearray(good[1].value)
    forged[forged.index(b"SELECT 0")] ^= 1
    stranger = session_events(make_key("proxy"), "mallory")[:1]
    send_raw(kafka_settings, [(e.session_id.encode(), e.value) for e in good[:2]]
             + [(good[1].session_id.encode(), bytes(forged)),          # bad_signature
                (good[1].session_id.encode(), good[1].value),          # re-delivered: duplicate
                (stranger[0].session_id.encode(), stranger[0].value)]  # unknown_key
             + [(e.session_id.encode(), e.value) for e in good[2:]])
    settings = ledger_settings(tmp_path)
    service = LedgerService(kafka_settings, settings, ledger_key, keyring, group_id="ledger-quarantine")
    seal_until(service, sealed(len(good)))
    service.close()

    assert sorted(r["event"] for r in read_rows(settings.dir)) == sorted(e.value for e in good)
    quarantined = sum(Seal.load(p).record["events"]["quarantined"] for p in settings.dir.glob("seals/p*/*.json"))
    assert quarantined == 3
    consumer = kafka.consumer(kafka_settings, kafka_settings.topic("quarantine"), group_id=None)
    reasons, deadline = [], time.monotonic() + 20
    while len(reasons) < 3 and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            reasons += [dict(m.headers)["custody-reason"].decode() for m in batch]
    consumer.close()
    assert sorted(reasons) == ["bad_signature", "duplicate", "unknown_key"]
    assert verify_ledger(settings.dir, keyring, settings.origin).ok


def test_idle_interval_seals_silence_and_seals_are_published(kafka_settings, proxy_key, keyring, ledger_key,
                                                              tmp_path):
    kafka_settings = type(kafka_settings)(**{**kafka_settings.__dict__, "partitions": 1})
    events = session_events(proxy_key, "frank", statements=1)
    send_events(kafka_settings, events)
    settings = ledger_settings(tmp_path, idle_seal_seconds=0.5)
    service = LedgerService(kafka_settings, settings, ledger_key, keyring, group_id="ledger-idle")
    seal_until(service, lambda s: s.writers and s.writers[0].state.next_seal_number > 3)
    service.close()

    seals = [Seal.load(p) for p in sorted(settings.dir.glob("seals/p0/*.json"))]
    assert seals[0].segment is not None and seals[0].tree_size == len(events)
    for idle in seals[1:]:
        assert idle.segment is None and idle.record["leaves"]["count"] == 0
        assert (idle.tree_size, idle.root) == (seals[0].tree_size, seals[0].root)
        assert idle.consistency_proof == ()
    assert verify_ledger(settings.dir, keyring, settings.origin).ok

    consumer = kafka.consumer(kafka_settings, kafka_settings.topic("seals"), group_id=None)
    published, deadline = set(), time.monotonic() + 20
    while len(published) < len(seals) and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            published |= {Seal.from_bytes(m.value).number for m in batch}
    consumer.close()
    assert published == {s.number for s in seals}


def test_a_restart_resumes_after_the_last_seal_and_clears_orphans(kafka_settings, proxy_key, keyring, ledger_key,
                                                                 tmp_path):
    kafka_settings = type(kafka_settings)(**{**kafka_settings.__dict__, "partitions": 1})
    first, second = session_events(proxy_key, "gina"), session_events(proxy_key, "hank")
    send_events(kafka_settings, first)
    settings = ledger_settings(tmp_path)
    service = LedgerService(kafka_settings, settings, ledger_key, keyring, group_id="ledger-restart")
    seal_until(service, sealed(len(first)))
    service.close()
    orphan = settings.dir / "segments" / "p0" / "000099.parquet"  # a crash after a segment, before its seal
    orphan.write_bytes(b"torn")
    (settings.dir / "seals" / "p0" / "000002.json.tmp").write_bytes(b"{")
    assert recover(settings.dir, 0).tree.size == len(first)
    assert not orphan.exists() and not (settings.dir / "seals" / "p0" / "000002.json.tmp").exists()

    send_events(kafka_settings, second)
    service = LedgerService(kafka_settings, settings, ledger_key, keyring, group_id="ledger-restart")
    seal_until(service, sealed(len(first) + len(second)))
    service.close()
    assert sorted(r["event"] for r in read_rows(settings.dir)) == sorted(e.value for e in first + second)
    assert verify_ledger(settings.dir, keyring, settings.origin).ok
