"""custody.violations: what a SIEM connector consumes, checked field by field against a real ledger."""

from __future__ import annotations

import json
import time
from importlib import resources

import jsonschema

from conftest import make_key
from events_factory import frames, policy_decision, session_end, session_start
from ingest import kafka
from ingest.events import SessionChain
from ingest.keys import TrustedKey
from ingest.violations import tail
from ledger.service import LedgerService
from ledger.settings import LedgerSettings


def test_the_ledger_publishes_violations_once_sealed(kafka_settings, proxy_key, keyring, tmp_path):
    ledger_key = make_key("ledger")
    keyring.add(TrustedKey(ledger_key.key_id, "ledger", ledger_key.public_key))
    chain = SessionChain(proxy_key, "proxy-1")
    start = chain.event("session_start", session_start("alice@example.com", ("developers",)))
    blocked = chain.event("policy_decision", policy_decision("block"))
    auth_chain = SessionChain(proxy_key, "proxy-1")
    auth = [auth_chain.event("session_start", {**session_start(), "identity": None}),
            auth_chain.event("policy_decision", {**policy_decision("deny"), "rule": "authentication",
                                                 "reason": "expired: token expired at 12:00", "statement": None})]
    gap = chain.event("frames", frames("SELECT 'never sent'"))
    after_gap = chain.event("session_end", session_end())
    forged = SessionChain(make_key("proxy"), "evil").event("session_start", session_start("mallory@example.com"))

    kafka.ensure_topics(kafka_settings, ("events",))
    producer = kafka.producer(kafka_settings)
    for e in [start, blocked, *auth, after_gap, forged]:
        producer.send(kafka_settings.topic("events"), key=e.session_id.encode(), value=e.value)
    producer.flush()
    producer.close()
    assert gap.seq == 2 and after_gap.seq == 3

    settings = LedgerSettings(dir=tmp_path / "ledger", origin="custody.test/ledger", segment_max_events=1000,
                              segment_max_bytes=1 << 24, segment_max_seconds=0.3, idle_seal_seconds=3600)
    service = LedgerService(kafka_settings, settings, ledger_key, keyring, group_id="violations-test",
                            partitions=list(range(kafka_settings.partitions)))  # pinned: no group join to wait for
    deadline = time.monotonic() + 40
    while service.sealed_leaves < 4 or any(w.opened_at is not None for w in service.writers.values()):
        assert time.monotonic() < deadline, "the ledger did not seal in time"
        service.step(0.1)
    service.close()
    consumer = kafka.consumer(kafka_settings, kafka_settings.topic("violations"), group_id=None)
    found = list(tail(consumer, follow=False, idle_seconds=2))
    consumer.close()

    schema = json.loads(resources.files("schemas").joinpath("violation.schema.json").read_text())
    for v in found:
        jsonschema.validate(v, schema)
    by_category = {(v["category"], v["reason"]): v for v in found}
    assert set(by_category) == {("policy_block", "block-drop"), ("auth_failure", "expired"),
                                ("quarantine", "seq_gap"), ("quarantine", "unknown_key")}

    block = by_category[("policy_block", "block-drop")]
    assert block["severity"] == "medium" and block["action"] == "block" and block["rule"] == "block-drop"
    assert block["identity"] == {"subject": "alice@example.com", "email": "alice@example.com",
                                 "groups": ["developers"], "issuer": "https://idp.example.com/"}
    assert block["target"] == "local-postgres" and block["statement"] == "DROP TABLE t"
    assert block["session_id"] == start.session_id and block["event_id"] == blocked.event_id == block["id"]

    failed_login = by_category[("auth_failure", "expired")]
    assert failed_login["identity"] is None and failed_login["detail"] == "expired: token expired at 12:00"

    gap_violation = by_category[("quarantine", "seq_gap")]
    assert gap_violation["severity"] == "high" and gap_violation["session_id"] == start.session_id
    assert gap_violation["identity"]["subject"] == "alice@example.com", "the claimed session's identity"
    assert gap_violation["source"].startswith(kafka_settings.topic("events") + "/")
    assert by_category[("quarantine", "unknown_key")]["severity"] == "critical"
