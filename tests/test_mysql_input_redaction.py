"""A MySQL client's secrets are not kept in clear: through the real proxy, sealed by the real ledger.

`CREATE USER … IDENTIFIED BY '…'`, `SET PASSWORD FOR … = PASSWORD('…')`, an AES_ENCRYPT key literal (PyMySQL
interpolates its parameters: literals too), a key and a card number bound as binary-protocol parameters
(mysql-connector, prepared) reach MariaDB as sent — the new account logs in with its new password — but the
broker's messages and the sealed segments hold none of them in clear: the recorded statements, parameters and
wire bytes carry markers, the originals are sealed to the custodian key, and `custody replay --reveal
--custodian-key` shows them.
"""

from __future__ import annotations

import time
import uuid

import mysql.connector
import pymysql
import pytest
from click.testing import CliRunner

from custody.cli import cli
from ingest import kafka
from mysql_fixtures import make_target, proxy_entry, root
from pg_fixtures import EventLog, make_tls, messages, start_proxy
from proxy.mysql.redaction import find_secrets
from proxy.policy.detectors import scanner_for
from query.views import open_ledger
from test_pg_replay import seal

PW1, PW2 = "hunter2-first-7c1e", "hunter2-second-0b9d"
KEY, KEY2 = "aes-key-s3cret-4d1f", "aes-key-bound-77aa"
CARD = "4111 1111 1111 1111"
PLAIN, TLS = 1, 2


@pytest.fixture
def recorded(broker, tmp_path):
    target = make_target()
    account = f"redact_{uuid.uuid4().hex[:8]}"
    with root() as conn, conn.cursor() as cur:  # the proxy's account may manage accounts
        cur.execute(f"GRANT CREATE USER ON *.* TO '{target.user}'@'127.0.0.1'")
        cur.execute(f"GRANT UPDATE ON mysql.* TO '{target.user}'@'127.0.0.1'")
    (tmp_path / "tls").mkdir()
    tls = make_tls(tmp_path / "tls")
    entries = proxy_entry(target) + proxy_entry(
        target, "tls-mysql", f'tls_cert = "{tls["server_cert"]}"\ntls_key = "{tls["server_key"]}"\n')
    proxy = start_proxy(tmp_path / "custody", broker, extra_proxies=entries)
    time.sleep(1.2)
    events = EventLog.open(proxy)
    apps = [f"redact-{uuid.uuid4().hex[:10]}", f"redact-bin-{uuid.uuid4().hex[:10]}"]
    try:
        host, port = proxy.address(PLAIN)
        with pymysql.connect(host=host, port=port, user="alice@example.com", password=proxy.token(groups=("dba",)),
                             database=target.database, autocommit=True, program_name=apps[0]) as conn:
            with conn.cursor() as cur:
                cur.execute(f"CREATE USER '{account}'@'127.0.0.1' IDENTIFIED BY '{PW1}'")
                cur.execute(f"SET PASSWORD FOR '{account}'@'127.0.0.1' = PASSWORD('{PW2}')")
                cur.execute("SELECT AES_DECRYPT(AES_ENCRYPT('data', %s), %s)", (KEY, KEY))
                assert cur.fetchone() == (b"data",)
        host, port = proxy.address(TLS)
        conn = mysql.connector.connect(host=host, port=port, user="alice@example.com",
                                       password=proxy.token(groups=("dba",)), database=target.database,
                                       auth_plugin="mysql_clear_password", use_pure=True, ssl_disabled=False,
                                       ssl_verify_cert=False, conn_attrs={"program_name": apps[1]}, autocommit=True)
        try:
            cur = conn.cursor(prepared=True)
            cur.execute("SELECT LENGTH(AES_ENCRYPT(?, ?)), ?", ("data", KEY2, 7))
            assert cur.fetchall() == [(16, 7)]
            cur.execute("SELECT LENGTH(?)", (f"card {CARD}",))
            assert cur.fetchall() == [(24,)]
            cur.close()
        finally:
            conn.close()
        with pymysql.connect(host="127.0.0.1", port=3306, user=account, password=PW2) as direct:  # as sent
            assert direct.open
        sessions = [events.session(app) for app in apps]
        seal(proxy, sessions, tmp_path / "ledger", f"redact-{apps[0]}")
        yield proxy, sessions, tmp_path / "ledger"
    finally:
        events.close()
        proxy.background.stop()
        with root() as conn, conn.cursor() as cur:
            cur.execute(f"DROP USER IF EXISTS '{account}'@'127.0.0.1'")
        target.drop()


def test_secrets_are_redacted_on_the_broker_and_in_the_segments_and_revealed_to_the_custodian(recorded):
    proxy, (text, binary), ledger_dir = recorded
    queries = [m for m in messages(text, "client") if m["type"] == "COM_QUERY" and "SET NAMES" not in m["statement"]]
    assert queries[2]["statement"] == "SELECT AES_DECRYPT(AES_ENCRYPT('data', '[REDACTED:key]'), '[REDACTED:key]')"
    assert queries[0]["statement"].endswith("IDENTIFIED BY '[REDACTED:password]'")
    assert queries[1]["statement"].endswith("= PASSWORD('[REDACTED:password]')")
    assert [m["attributes"]["redacted"] for m in queries] == ["password", "password", "key"]
    assert all(m["sealed_original"] and b"[REDACTED:" in m["data"] and m["text"] == m["statement"] for m in queries)
    executes = [m for m in messages(binary, "client") if m["type"] == "COM_STMT_EXECUTE"]
    assert [m["parameters"] for m in executes] == [["data", "[REDACTED:key]", "7"], ["[REDACTED:credit_card]"]]
    assert [m["attributes"]["redacted"] for m in executes] == ["key", "credit_card"]
    assert all(b"[REDACTED:" in m["data"] for m in executes)

    session_ids = [s[0].session_id for s in (text, binary)]
    stored = [bytes(r[0]) for r in open_ledger(ledger_dir).execute(
        "SELECT event FROM events WHERE session_id IN (?, ?)", session_ids).fetchall()]
    assert len(stored) == len(text) + len(binary)
    segments = b"".join(p.read_bytes() for p in ledger_dir.rglob("*.parquet"))
    consumer = kafka.consumer(proxy.kafka, proxy.kafka.topic("events"), group_id=None)
    on_broker: list[bytes] = []
    deadline = time.monotonic() + 20
    while sum(any(s.encode() in value for s in session_ids) for value in on_broker) < len(stored):
        assert time.monotonic() < deadline, "the sessions' events were not read back from the broker"
        on_broker += [m.value for batch in consumer.poll(timeout_ms=500).values() for m in batch]
    consumer.close()
    for needle in (PW1, PW2, KEY, KEY2, CARD, CARD.replace(" ", "")):
        assert not any(needle.encode() in value for value in stored + on_broker), needle
        assert needle.encode() not in segments, needle

    keyring = str(proxy.config.keys.keyring)
    args = ["replay", session_ids[0], "--ledger", str(ledger_dir), "--keyring", keyring]
    shown = CliRunner().invoke(cli, args)
    assert shown.exit_code == 0, shown.output
    assert "IDENTIFIED BY '[REDACTED:password]'" in shown.output and PW1 not in shown.output
    assert "[redacted] password: the original is sealed to the custodian key" in shown.output
    custodian = str(proxy.directory / "keys" / "custodian.key")
    revealed = CliRunner().invoke(cli, [*args, "--reveal", "--custodian-key", custodian])
    assert revealed.exit_code == 0, revealed.output
    assert f"IDENTIFIED BY '{PW1}'" in revealed.output and f"PASSWORD('{PW2}')" in revealed.output
    assert f"AES_ENCRYPT('data', '{KEY}')" in revealed.output and "[revealed] password" in revealed.output
    revealed = CliRunner().invoke(cli, ["replay", session_ids[1], "--ledger", str(ledger_dir), "--keyring", keyring,
                                        "--reveal", "--custodian-key", custodian])
    assert revealed.exit_code == 0, revealed.output
    assert f'["data", "{KEY2}", "7"]' in revealed.output and f'["card {CARD}"]' in revealed.output


def test_the_redactor_reads_statements_with_mysql_lexing():
    detectors = scanner_for(frozenset({"credit_card"}))
    cases = {
        "CREATE USER 'u'@'%' IDENTIFIED BY 'a\\'b''c' COMMENT 'kept'":
            ("CREATE USER 'u'@'%' IDENTIFIED BY '[REDACTED:password]' COMMENT 'kept'", ("password",)),
        "ALTER USER u IDENTIFIED WITH mysql_native_password AS '*94BDCEBE19083CE2A1F959FD02F964C7AF4CFC29'":
            ("ALTER USER u IDENTIFIED WITH mysql_native_password AS '[REDACTED:password]'", ("password",)),
        "CREATE USER u IDENTIFIED VIA ed25519 USING PASSWORD(\"pw\")":
            ("CREATE USER u IDENTIFIED VIA ed25519 USING PASSWORD('[REDACTED:password]')", ("password",)),
        "SET PASSWORD FOR 'u'@'h' = 'x'": ("SET PASSWORD FOR 'u'@'h' = '[REDACTED:password]'", ("password",)),
        "/*!50000 GRANT ALL ON *.* TO u IDENTIFIED BY 'g' */; SELECT 'g'":
            ("/*!50000 GRANT ALL ON *.* TO u IDENTIFIED BY '[REDACTED:password]' */; SELECT 'g'", ("password",)),
        "CHANGE MASTER TO MASTER_PASSWORD='m', MASTER_USER='r'":
            ("CHANGE MASTER TO MASTER_PASSWORD='[REDACTED:password]', MASTER_USER='r'", ("password",)),
        "SELECT des_decrypt(c, 'k'), `aes_encrypt`, 'aes_encrypt(x, y)' -- password 'p'":
            ("SELECT des_decrypt(c, '[REDACTED:key]'), `aes_encrypt`, 'aes_encrypt(x, y)' -- password 'p'", ("key",)),
        "INSERT INTO t VALUES (\"4111 1111 1111 1111\", ?)": ("INSERT INTO t VALUES ('[REDACTED:credit_card]', ?)",
                                                            ("credit_card",)),
        "SELECT 1": ("SELECT 1", ()),
    }
    for sql, (expected, kinds) in cases.items():
        redacted, found, _ = find_secrets(sql, detectors)
        assert (redacted, found) == (expected, kinds), sql
    assert find_secrets("SELECT ?, AES_ENCRYPT(?, ?), ENCODE(?, ?)", None)[2] == {2, 4}
    assert find_secrets("CREATE USER u IDENTIFIED BY 'unterminated", None)[:2] == ("[REDACTED:unparsed]", ("unparsed",))
