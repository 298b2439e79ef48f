"""A ledger SIGKILLed after a seal became durable and before its documents were sent loses none of them (issue 18):
the next worker renders that seal's violations and OCSF documents again from its segment and snapshots and
publishes them, with the same deterministic ids.

The window (seal file renamed, nothing sent yet) is microseconds wide, so the worker is a child process whose
driver wraps `PartitionWriter.seal`: the real seal runs, then the child SIGKILLs itself before `_seal` sends
anything. That wrapper is a test hook in the child only; the ledger code itself has none.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import make_key
from events_factory import policy_decision, session_end, session_start
from ingest import kafka
from ingest.events import SessionChain
from ingest.keys import Keyring, TrustedKey, generate_key_file, load_key_file
from ingest.records import frames_body
from ingest.settings import KafkaSettings, SocSettings
from ledger import documents
from ledger.seals import seal_relpath
from ledger.service import LedgerService
from ledger.settings import LedgerSettings
from ocsf_fixtures import read_topic, validate

ROOT = Path(__file__).resolve().parent.parent
ORIGIN = "custody.test/ocsf-crash"
SOC = SocSettings(ocsf=True, activity=True)

# The child: a pinned ledger worker on partition 0 whose second seal is its last act.
WORKER = """
import os, signal, sys, json
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from ingest.keys import Keyring, load_key_file
from ingest.settings import KafkaSettings, SocSettings
from ledger import service
from ledger.settings import LedgerSettings

cfg = json.loads(sys.argv[1])
real_seal = service.PartitionWriter.seal

def seal(self):
    sealed = real_seal(self)  # durable: segment, snapshot, seal file
    print("sealed", sealed.number, flush=True)
    if sealed.number == cfg["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)  # before _seal publishes the seal or any of its documents
    return sealed

service.PartitionWriter.seal = seal
worker = service.LedgerService(
    KafkaSettings(bootstrap=cfg["bootstrap"], topic_prefix=cfg["prefix"], embedded_listen=cfg["bootstrap"],
                  partitions=3),
    LedgerSettings(dir=Path(cfg["dir"]), origin=cfg["origin"], segment_max_events=1000, segment_max_bytes=1 << 24,
                   segment_max_seconds=0.3, idle_seal_seconds=3600),
    load_key_file(cfg["key"]), Keyring.load(cfg["keyring"]), partitions=[0],
    soc=SocSettings(ocsf=True, activity=True))
while True:
    worker.step(0.1)
"""


def msg(type_: str, direction: str, **fields) -> dict:
    return {"type": type_, "data": b"", "direction": direction, "channel": None, **fields}


def send(settings: KafkaSettings, producer, events) -> list[int]:
    """Onto partition 0 of the events topic; their offsets."""
    futures = [producer.send(settings.topic("events"), key=e.session_id.encode(), value=e.value, partition=0)
               for e in events]
    producer.flush()
    return [f.get(10).offset for f in futures]


def uids(docs: list[dict]) -> list[str]:
    return [d["metadata"]["uid"] if "metadata" in d else d["id"] for d in docs]


def test_documents_of_a_seal_made_durable_just_before_a_crash_are_published_after_the_restart(
        kafka_settings, proxy_key, keyring, tmp_path):
    ledger_key = generate_key_file(tmp_path / "keys" / "ledger.key", "ledger")
    keyring.add(TrustedKey(ledger_key.key_id, "ledger", ledger_key.public_key))
    keyring.save(tmp_path / "keys" / "keyring.toml")
    ledger = tmp_path / "ledger"
    chain = SessionChain(proxy_key, "proxy-1")
    start = chain.event("session_start", session_start())
    done = chain.event("frames", frames_body([msg("Query", "client", operation="statement", text="SELECT 2"),
                                              msg("CommandComplete", "server", outcome="ok")]))
    opened = chain.event("frames", frames_body([msg("Query", "client", operation="statement", text="SELECT 1")]))
    # seal 2: the outcome of the statement opened in seal 1 (rendered from seal 1's OCSF state), a block, a
    # quarantined record (its violation has no segment row: kept in seal 2's snapshot), another statement
    answered = chain.event("frames", frames_body([msg("CommandComplete", "server", outcome="ok")]))
    blocked = chain.event("policy_decision", policy_decision("block"))
    delete = chain.event("frames", frames_body([msg("Query", "client", operation="statement", text="DELETE FROM t"),
                                                msg("CommandComplete", "server", outcome="ok")]))
    end = chain.event("session_end", session_end())
    forged = SessionChain(make_key("proxy"), "evil").event("session_start", session_start("mallory@example.com"))

    kafka.ensure_topics(kafka_settings, ("events", "seals", "violations", *SOC.topics))
    producer = kafka.producer(kafka_settings)
    send(kafka_settings, producer, [start, done, opened])
    cfg = {"bootstrap": kafka_settings.bootstrap, "prefix": kafka_settings.topic_prefix, "dir": str(ledger),
           "origin": ORIGIN, "key": str(tmp_path / "keys" / "ledger.key"),
           "keyring": str(tmp_path / "keys" / "keyring.toml"), "kill_at": 2}
    child = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(cfg), str(ROOT)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().split() == ["sealed", "1"]
        offsets = send(kafka_settings, producer, [answered, blocked, forged, delete, end])
        assert child.stdout.readline().split() == ["sealed", "2"]
        assert child.wait(60) == -9
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    producer.close()
    assert (ledger / seal_relpath(0, 2)).exists(), "seal 2 is durable"

    quarantine_id = f"quarantine:{kafka_settings.topic('events')}/0@{offsets[2]}"
    first = {"violations": set(), "violations.ocsf": set(),
             "activity.ocsf": {start.event_id, f"{done.event_id}#0"}}
    second = {"violations": {blocked.event_id, quarantine_id}, "violations.ocsf": {blocked.event_id, quarantine_id},
              "activity.ocsf": {f"{opened.event_id}#0", f"{delete.event_id}#0"}}
    for topic in first:  # the crash hit the window: seal 1's documents are out, none of seal 2's
        published = uids(read_topic(kafka_settings, topic))
        assert set(published) == first[topic], topic

    settings = LedgerSettings(dir=ledger, origin=ORIGIN, segment_max_events=1000, segment_max_bytes=1 << 24,
                              segment_max_seconds=0.3, idle_seal_seconds=3600)
    restarted = LedgerService(kafka_settings, settings, load_key_file(tmp_path / "keys" / "ledger.key"),
                              Keyring.load(tmp_path / "keys" / "keyring.toml"), partitions=[0], soc=SOC)
    restarted.step(0.1)
    assert restarted.writers[0].state.last_seal.number == 2, "nothing left to seal: the documents come from disk"
    restarted.close()

    found = {topic: read_topic(kafka_settings, topic) for topic in first}
    for topic, docs in found.items():  # seal 1's may come twice (acknowledged after seal 2 was written), seal 2's once
        assert set(uids(docs)) == first[topic] | second[topic], f"{topic}: every document, nothing foreign"
        assert sorted(u for u in uids(docs) if u in second[topic]) == sorted(second[topic]), topic
    for doc in found["violations.ocsf"] + found["activity.ocsf"]:
        validate(doc)
        if doc["metadata"]["uid"] in second["violations.ocsf"] | second["activity.ocsf"]:
            assert doc["unmapped"]["custody"]["ledger"]["seal"] == 2
    by_uid = {d["metadata"]["uid"]: d for d in found["activity.ocsf"]}
    select = by_uid[f"{opened.event_id}#0"]  # opened in seal 1, answered in seal 2: seal 1's renderer state
    assert select["status_id"] == 1 and select["database"]["name"] == "postgres"
    assert select["query_info"]["query_string"] == "SELECT 1"
    assert select["actor"]["user"]["uid"] == "alice@example.com"
    assert by_uid[f"{delete.event_id}#0"]["activity_id"] == 7
    violations = {v["id"]: v for v in found["violations"]}
    assert violations[blocked.event_id]["category"] == "policy_block"
    assert violations[blocked.event_id]["identity"]["subject"] == "alice@example.com"
    assert violations[quarantine_id]["reason"] == "unknown_key"

    # [soc] off, a restart reads only the rows that can be violations: the same custody.violations documents
    again = [d for _, docs in documents.rerender(ledger, kafka_settings, ORIGIN, 0, 0, 2, None) for d in docs]
    assert {d.topic for d in again} == {kafka_settings.topic("violations")}
    assert sorted(json.loads(d.value)["id"] for d in again) == sorted(second["violations"])
