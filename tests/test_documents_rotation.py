"""A ledger key rotation between a crash and the restart does not cost the crashed seal its documents (issue 18).

The worker is SIGKILLed after seal 2 became durable and before anything of it was sent (the child worker of
tests/test_ocsf_crash.py), the key is rotated (`rotate_partition`: seal 3, signed by the old key, handing the chain
to the new one), and the worker restarts with the new key. Seal 2's documents are rendered again from its segment,
its snapshot (the quarantine violation, which has no row) and seal 1's snapshot (the OCSF renderer's state): the
rotation must have kept those snapshots. Every topic then holds each document of seal 2 exactly once, with the
deterministic ids it was rendered with, and every seal.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import make_key
from events_factory import policy_decision, session_end, session_start
from ingest import kafka
from ingest.events import SessionChain
from ingest.keys import Keyring, TrustedKey, generate_key_file, load_key_file
from ingest.records import frames_body
from ledger.rotation import rotate_partition
from ledger.seals import seal_relpath
from ledger.service import LedgerService
from ledger.settings import LedgerSettings
from ocsf_fixtures import read_topic, validate
from test_ocsf_crash import ORIGIN, ROOT, SOC, WORKER, msg, send, uids


def test_a_rotation_between_a_crash_and_the_restart_keeps_every_topic_of_the_crashed_seal(
        kafka_settings, proxy_key, keyring, tmp_path):
    old_key = generate_key_file(tmp_path / "keys" / "ledger.key", "ledger")
    new_key = generate_key_file(tmp_path / "keys" / "ledger-2.key", "ledger-2")
    for key in (old_key, new_key):
        keyring.add(TrustedKey(key.key_id, "ledger", key.public_key))
    keyring.save(tmp_path / "keys" / "keyring.toml")
    ledger = tmp_path / "ledger"
    chain = SessionChain(proxy_key, "proxy-1")
    start = chain.event("session_start", session_start())
    opened = chain.event("frames", frames_body([msg("Query", "client", operation="statement", text="SELECT 1")]))
    # seal 2: the statement opened in seal 1 answered (rendered from seal 1's OCSF state), a block, a forgery
    answered = chain.event("frames", frames_body([msg("CommandComplete", "server", outcome="ok")]))
    blocked = chain.event("policy_decision", policy_decision("block"))
    end = chain.event("session_end", session_end())
    forged = SessionChain(make_key("proxy"), "evil").event("session_start", session_start("mallory@example.com"))

    kafka.ensure_topics(kafka_settings, ("events", "seals", "violations", *SOC.topics))
    producer = kafka.producer(kafka_settings)
    send(kafka_settings, producer, [start, opened])
    cfg = {"bootstrap": kafka_settings.bootstrap, "prefix": kafka_settings.topic_prefix, "dir": str(ledger),
           "origin": ORIGIN, "key": str(tmp_path / "keys" / "ledger.key"),
           "keyring": str(tmp_path / "keys" / "keyring.toml"), "kill_at": 2}
    child = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(cfg), str(ROOT)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().split() == ["sealed", "1"]
        offsets = send(kafka_settings, producer, [answered, blocked, forged, end])
        assert child.stdout.readline().split() == ["sealed", "2"]
        assert child.wait(60) == -9
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    producer.close()

    rotation = rotate_partition(ledger, 0, ORIGIN, old_key, new_key)
    assert rotation.number == 3

    settings = LedgerSettings(dir=ledger, origin=ORIGIN, segment_max_events=1000, segment_max_bytes=1 << 24,
                              segment_max_seconds=0.3, idle_seal_seconds=3600)
    restarted = LedgerService(kafka_settings, settings, load_key_file(tmp_path / "keys" / "ledger-2.key"),
                              Keyring.load(tmp_path / "keys" / "keyring.toml"), partitions=[0], soc=SOC)
    restarted.step(0.1)
    assert restarted.writers[0].state.last_seal.number == 3
    restarted.close()

    quarantine_id = f"quarantine:{kafka_settings.topic('events')}/0@{offsets[2]}"
    first = {"violations": set(), "violations.ocsf": set(), "activity.ocsf": {start.event_id}}
    second = {"violations": {blocked.event_id, quarantine_id}, "violations.ocsf": {blocked.event_id, quarantine_id},
              "activity.ocsf": {f"{opened.event_id}#0"}}
    for topic in first:  # seal 1's may come twice (acknowledged after seal 2 was written), seal 2's exactly once
        docs = read_topic(kafka_settings, topic)
        assert set(uids(docs)) == first[topic] | second[topic], f"{topic}: every document, nothing foreign"
        assert sorted(u for u in uids(docs) if u in second[topic]) == sorted(second[topic]), topic
        for doc in docs:
            if topic != "violations":
                validate(doc)
    answered_doc = next(d for d in read_topic(kafka_settings, "activity.ocsf")
                        if d["metadata"]["uid"] == f"{opened.event_id}#0")
    assert answered_doc["status_id"] == 1 and answered_doc["query_info"]["query_string"] == "SELECT 1"
    assert answered_doc["unmapped"]["custody"]["ledger"]["seal"] == 2
    assert {s["seal"]["number"] for s in read_topic(kafka_settings, "seals")} == {1, 2, 3}
    assert (ledger / seal_relpath(0, 3)).exists()
