"""End to end: a block and a masked result through the real proxy, sealed by the real ledger; the SOC's
violation checked field by field; masked originals in clear nowhere in the broker or the segments, and
`custody replay --reveal` shows them to the custodian only.
"""

from __future__ import annotations

import json
import time
from importlib import resources

import jsonschema
import psycopg
import pytest
from click.testing import CliRunner

from custody.cli import cli
from ingest import kafka
from ingest.keys import Keyring, load_key_file
from ingest.violations import tail
from ledger.service import LedgerService
from ledger.settings import LedgerSettings
from pg_fixtures import DIRECT, EventLog, new_app, start_proxy
from query.views import open_ledger

TABLE = "custody_policy_ledger_t"
CARD, EMAIL = "4111 1111 1111 1111", "Alice.Smith@mail.example"


@pytest.fixture
def sealed(broker, tmp_path):
    """One session by eve (dev): a blocked DROP and a masked SELECT, sealed into a ledger."""
    proxy = start_proxy(tmp_path / "custody", broker)
    events = EventLog.open(proxy)
    with psycopg.connect(DIRECT, autocommit=True) as direct:
        direct.execute(f"DROP TABLE IF EXISTS {TABLE}")
        direct.execute(f"CREATE TABLE {TABLE} (id int, note text)")
        direct.execute(f"INSERT INTO {TABLE} VALUES (1, %s), (2, %s)", (f"paid with {CARD}", EMAIL))
    app = new_app("e2e")
    eve = "eve@example.com"
    try:
        with psycopg.connect(proxy.dsn(user=eve, password=proxy.token(eve, groups=("dev",)), application_name=app),
                             autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"DROP TABLE {TABLE}")
            assert conn.execute(f"SELECT note FROM {TABLE} ORDER BY id").fetchall() == [
                ("paid with **** **** **** 1111",), ("A***@mail.example",)]
        session = events.session(app)
        keys = proxy.directory / "keys"
        keyring = Keyring.load(keys / "keyring.toml")
        settings = LedgerSettings(dir=tmp_path / "ledger", origin="custody.test/ledger", segment_max_events=1000,
                                  segment_max_bytes=1 << 24, segment_max_seconds=0.3, idle_seal_seconds=3600)
        service = LedgerService(proxy.kafka, settings, load_key_file(keys / "ledger.key"), keyring,
                                group_id=f"e2e-{app}", partitions=list(range(proxy.kafka.partitions)))  # no group join
        deadline = time.monotonic() + 40
        while service.sealed_leaves < len(session) or any(w.opened_at is not None for w in service.writers.values()):
            assert time.monotonic() < deadline, "the ledger did not seal in time"
            service.step(0.1)
        service.close()
        yield proxy, session, settings.dir
    finally:
        events.close()
        proxy.background.stop()
        with psycopg.connect(DIRECT, autocommit=True) as direct:
            direct.execute(f"DROP TABLE IF EXISTS {TABLE}")


def test_block_becomes_a_violation_and_originals_stay_sealed(sealed):
    proxy, session, ledger_dir = sealed
    session_id = session[0].session_id
    block = next(e for e in session if e.kind == "policy_decision")

    consumer = kafka.consumer(proxy.kafka, proxy.kafka.topic("violations"), group_id=None)
    found = [v for v in tail(consumer, follow=False, idle_seconds=2) if v["session_id"] == session_id]
    consumer.close()
    assert len(found) == 1
    violation = found[0]
    jsonschema.validate(violation, json.loads(resources.files("schemas").joinpath("violation.schema.json").read_text()))
    assert violation == {
        "schema": "custody.violation/v1", "id": block.event_id, "time": violation["time"], "severity": "medium",
        "category": "policy_block", "reason": "block-drop",
        "detail": "DROP DATABASE/SCHEMA/TABLE is not allowed through Custody",
        "identity": {"subject": "eve@example.com", "email": "eve@example.com", "groups": ["dev"],
                     "issuer": session[0].body["identity"]["issuer"]},
        "source_address": session[0].body["source_address"], "target": "local-postgres",
        "statement": f"DROP TABLE {TABLE}", "rule": "block-drop", "action": "block",
        "session_id": session_id, "event_id": block.event_id, "source": None,
    }

    con = open_ledger(ledger_dir)
    stored = [bytes(row[0]) for row in con.execute("SELECT event FROM events WHERE session_id = ?", [session_id]).fetchall()]
    assert len(stored) == len(session)
    records = kafka.consumer(proxy.kafka, proxy.kafka.topic("events"), group_id=None)
    on_broker: list[bytes] = []
    deadline = time.monotonic() + 20
    while sum(session_id.encode() in value for value in on_broker) < len(session):
        assert time.monotonic() < deadline, "the session's events were not read back from the broker"
        on_broker += [m.value for batch in records.poll(timeout_ms=500).values() for m in batch]
    records.close()
    for needle in (CARD.encode(), EMAIL.encode()):
        assert not any(needle in value for value in stored + on_broker), needle

    args = ["replay", session_id, "--ledger", str(ledger_dir), "--keyring", str(proxy.config.keys.keyring)]
    masked = CliRunner().invoke(cli, args)
    assert masked.exit_code == 0, masked.output
    assert "[masked]" in masked.output and CARD not in masked.output
    revealed = CliRunner().invoke(cli, [*args, "--reveal", "--custodian-key",
                                        str(proxy.directory / "keys" / "custodian.key")])
    assert revealed.exit_code == 0, revealed.output
    assert f"paid with {CARD}" in revealed.output and EMAIL in revealed.output and "[revealed]" in revealed.output
