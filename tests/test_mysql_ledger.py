"""End to end for MySQL: a session through the real proxy (a query, a prepared statement with bound
values, a blocked DROP, a masked column) sealed by the real ledger, then `custody activity` (protocol
mysql) and `custody replay` read it back; the blocked DROP and a hold nobody approved in time are the
SOC's violations on the topic."""

from __future__ import annotations

import json
import time
import uuid
from importlib import resources

import jsonschema

import mysql.connector
import pymysql
import pytest
from click.testing import CliRunner

from custody.cli import cli
from ingest import kafka
from ingest.keys import Keyring, load_key_file
from ingest.violations import tail
from ledger.service import LedgerService
from ledger.settings import LedgerSettings
from mysql_fixtures import make_target, proxy_entry
from pg_fixtures import EventLog, make_tls, start_proxy

EVE = "eve@example.com"


@pytest.fixture(scope="module")
def sealed(broker, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("mysql-ledger")
    target = make_target()
    tls = make_tls(tmp_path)
    with target.direct() as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE accounts (id INT PRIMARY KEY, owner VARCHAR(50), password VARCHAR(50))")
        cur.execute("INSERT INTO accounts VALUES (1, 'alice', 'hunter2-secret'), (2, 'bob', 'x')")
    proxy = start_proxy(tmp_path / "custody", broker, extra_proxies=proxy_entry(
        target, extra=f'tls_cert = "{tls["server_cert"]}"\ntls_key = "{tls["server_key"]}"\n'))
    policy = proxy.directory / "policies" / "default.toml"
    policy.write_text(policy.read_text().replace("hold_timeout_seconds = 300", "hold_timeout_seconds = 1"))
    time.sleep(1.2)  # the proxy reloads the policy file
    events = EventLog.open(proxy)
    app = f"ledger-{uuid.uuid4().hex[:10]}"
    host, port = proxy.address(1)
    try:
        conn = mysql.connector.connect(host=host, port=port, user=EVE, password=proxy.token(EVE, groups=("dev",)),
                                       database=target.database, auth_plugin="mysql_clear_password", use_pure=True,
                                       ssl_verify_cert=False, conn_attrs={"program_name": app}, autocommit=True)
        cur = conn.cursor()
        cur.execute("SELECT owner, password FROM accounts ORDER BY id")
        assert cur.fetchall() == [("alice", "[MASKED:column]"), ("bob", "[MASKED:column]")]
        with pytest.raises(mysql.connector.Error) as refused:
            cur.execute("DROP TABLE accounts")
        assert refused.value.errno == 1142
        with pytest.raises(mysql.connector.Error) as expired:  # held for a dba, nobody approves within 1 s
            cur.execute("DELETE FROM accounts")
        assert expired.value.errno == 1142 and "nobody approved it in time" in expired.value.msg
        prepared = conn.cursor(prepared=True)
        prepared.execute("SELECT owner FROM accounts WHERE id = ?", (2,))
        assert prepared.fetchall() == [("bob",)]
        prepared.close()
        cur.close()
        conn.close()
        session = events.session(app)
        keys = proxy.directory / "keys"
        settings = LedgerSettings(dir=tmp_path / "ledger", origin="custody.test/ledger", segment_max_events=1000,
                                  segment_max_bytes=1 << 24, segment_max_seconds=0.3, idle_seal_seconds=3600)
        service = LedgerService(proxy.kafka, settings, load_key_file(keys / "ledger.key"),
                                Keyring.load(keys / "keyring.toml"), group_id=f"my-{app}")
        deadline = time.monotonic() + 40
        while service.sealed_leaves < len(session) or any(w.opened_at is not None for w in service.writers.values()):
            assert time.monotonic() < deadline, "the ledger did not seal in time"
            service.step(0.1)
        service.close()
        yield proxy, session, settings.dir
    finally:
        events.close()
        proxy.background.stop()
        target.drop()


def test_mysql_session_in_activity_and_replay(sealed):
    proxy, session, ledger = sealed
    result = CliRunner().invoke(cli, ["activity", "--ledger", str(ledger), "--protocol", "mysql", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {r["protocol"] for r in rows} == {"mysql"} and {r["subject"] for r in rows} == {EVE}
    texts = [(r["operation"], r["text"], r["outcome"]) for r in rows if "accounts" in (r["text"] or "")]
    assert texts == [("statement", "SELECT owner, password FROM accounts ORDER BY id", "ok"),
                     ("statement", "DROP TABLE accounts", "error"),
                     ("statement", "DELETE FROM accounts", "error"),
                     ("prepare", "SELECT owner FROM accounts WHERE id = ?", "ok"),
                     ("statement", "SELECT owner FROM accounts WHERE id = ?", "ok")]
    drop = next(r for r in rows if r["text"] == "DROP TABLE accounts")
    assert drop["policy_action"] == "block"
    assert [r["objects"] for r in rows if "accounts" in (r["text"] or "")] == [["accounts"]] * 5  # sqlglot's tables

    replay = CliRunner().invoke(cli, ["replay", session[0].session_id, "--ledger", str(ledger),
                                      "--keyring", str(proxy.config.keys.keyring)])
    assert replay.exit_code == 0, replay.output
    text = replay.output
    assert "SQL" in text and "SELECT owner, password FROM accounts ORDER BY id" in text
    assert "[MASKED:column]" in text and "hunter2-secret" not in text
    assert "ERROR 1142 (42000)" in text
    lines = [line.split(None, 1)[1] if line.startswith("   +") else line.strip() for line in text.splitlines()]
    (login,) = [line for line in lines if line.startswith("LOGIN")]  # the whole login exchange, one line
    assert login.startswith(f"LOGIN  ok as {EVE} to {proxy_database(session)} with ledger-") and "(TLS, server " in login
    # PREPARE, its PrepareOK, mysql-connector's COM_STMT_RESET, the EXECUTE and its rows: one step
    at = lines.index("SQL    SELECT owner FROM accounts WHERE id = ?")
    assert lines[at + 1:at + 7] == ["prepared as statement " + lines[at + 1].split()[3] + " (1 parameter), executed",
                                    'parameters: ["2"]', "→ 1 row", "owner", "-----", "bob"]
    assert "PREPARE SELECT" not in text and "COM_STMT_RESET" not in text


def proxy_database(session) -> str:
    return session[0].body["upstream"].rsplit("/", 1)[1]


def test_mysql_block_and_expired_hold_are_violations_on_the_topic(sealed):
    proxy, session, _ = sealed
    block = next(e for e in session if e.kind == "policy_decision" and e.body["action"] == "block")
    consumer = kafka.consumer(proxy.kafka, proxy.kafka.topic("violations"), group_id=None)
    found = [v for v in tail(consumer, follow=False, idle_seconds=2) if v["session_id"] == session[0].session_id]
    consumer.close()
    assert [(v["category"], v["reason"]) for v in found] == [("policy_block", "block-drop"),
                                                            ("approval_expired", "hold-unfiltered-writes")], found
    violation, expired = found
    assert (expired["statement"], expired["action"], expired["severity"]) == ("DELETE FROM accounts", "deny", "low")
    jsonschema.validate(violation, json.loads(resources.files("schemas").joinpath("violation.schema.json").read_text()))
    assert violation == {
        "schema": "custody.violation/v1", "id": block.event_id, "time": violation["time"], "severity": "medium",
        "category": "policy_block", "reason": "block-drop",
        "detail": "DROP DATABASE/SCHEMA/TABLE is not allowed through Custody",
        "identity": {"subject": EVE, "email": EVE, "groups": ["dev"], "issuer": session[0].body["identity"]["issuer"]},
        "source_address": session[0].body["source_address"], "target": "local-mysql",
        "statement": "DROP TABLE accounts", "rule": "block-drop", "action": "block",
        "session_id": session[0].session_id, "event_id": block.event_id, "source": None,
    }
