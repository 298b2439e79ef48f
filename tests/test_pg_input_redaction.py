"""Secrets a client sends are not kept in clear: through the real proxy, sealed by the real ledger.

`ALTER ROLE … PASSWORD '…'` and a card number bound as a parameter reach the target as sent, but the
broker's messages and the sealed segments hold neither in clear: the recorded statement and parameters (and
the recorded wire bytes) carry markers, the originals are sealed to the custodian key, and `custody replay
--reveal --custodian-key` shows them.
"""

from __future__ import annotations

import time

import psycopg
import pytest
from click.testing import CliRunner

from custody.cli import cli
from ingest import kafka
from pg_fixtures import DIRECT, EventLog, messages, new_app, start_proxy
from proxy.core.redaction import NOT_KEPT
from proxy.policy.detectors import scanner_for
from proxy.postgres.redaction import find_secrets, literal_scope
from query.views import open_ledger
from test_pg_replay import seal

ROLE = "custody_redaction_r"
PASSWORD = "hunter2-correct-horse-battery"
KEY = "pgp-key-s3cret-9f2c"
CARD = "4111 1111 1111 1111"


@pytest.fixture
def recorded(broker, tmp_path):
    proxy = start_proxy(tmp_path / "custody", broker)
    events = EventLog.open(proxy)
    with psycopg.connect(DIRECT, autocommit=True) as direct:
        direct.execute(f"DROP ROLE IF EXISTS {ROLE}")
        direct.execute(f"CREATE ROLE {ROLE}")
    app = new_app("redact")
    try:
        with proxy.connect(app, autocommit=True) as conn:  # alice, dba
            conn.execute(f"ALTER ROLE {ROLE} PASSWORD '{PASSWORD}'", prepare=False)
            # alice (dba) would see a card in a result in clear: the query returns its length only
            assert conn.execute("SELECT length(%s::text) AS paid", (f"card {CARD}",)).fetchone() == (24,)
            assert conn.execute(f"SELECT md5('{KEY}') = md5(%s) AS same", (KEY,)).fetchone() == (True,)
        with psycopg.connect(DIRECT) as direct:  # the target got the password as sent
            verifier = direct.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (ROLE,)).fetchone()[0]
            assert verifier and verifier.startswith("SCRAM-SHA-256$")
        session = events.session(app)
        seal(proxy, [session], tmp_path / "ledger", f"redact-{app}")
        yield proxy, session, tmp_path / "ledger"
    finally:
        events.close()
        proxy.background.stop()
        with psycopg.connect(DIRECT, autocommit=True) as direct:
            direct.execute(f"DROP ROLE IF EXISTS {ROLE}")


def test_secrets_are_redacted_on_the_broker_and_in_the_segments_and_revealed_to_the_custodian(recorded):
    proxy, session, ledger_dir = recorded
    session_id = session[0].session_id
    client = messages(session, "client")
    alter = next(m for m in client if m["type"] == "Query" and "ALTER ROLE" in m["statement"])
    assert alter["statement"] == f"ALTER ROLE {ROLE} PASSWORD '[REDACTED:password]'"
    assert alter["text"] == alter["statement"] and b"[REDACTED:password]" in alter["data"]
    assert alter["attributes"]["redacted"] == "password" and alter["sealed_original"]
    bind = next(m for m in client if m["type"] == "Bind" and m["parameters"] and "REDACTED" in m["parameters"][0])
    assert bind["parameters"] == ["[REDACTED:credit_card]"] and bind["attributes"]["redacted"] == "credit_card"

    stored = [bytes(r[0]) for r in open_ledger(ledger_dir).execute(
        "SELECT event FROM events WHERE session_id = ?", [session_id]).fetchall()]
    assert len(stored) == len(session)
    segments = b"".join(p.read_bytes() for p in ledger_dir.rglob("*.parquet"))
    consumer = kafka.consumer(proxy.kafka, proxy.kafka.topic("events"), group_id=None)
    on_broker: list[bytes] = []
    deadline = time.monotonic() + 20
    while sum(session_id.encode() in value for value in on_broker) < len(session):
        assert time.monotonic() < deadline, "the session's events were not read back from the broker"
        on_broker += [m.value for batch in consumer.poll(timeout_ms=500).values() for m in batch]
    consumer.close()
    for needle in (PASSWORD.encode(), CARD.encode(), CARD.replace(" ", "").encode()):
        assert not any(needle in value for value in stored + on_broker), needle
        assert needle not in segments, needle

    args = ["replay", session_id, "--ledger", str(ledger_dir), "--keyring", str(proxy.config.keys.keyring)]
    shown = CliRunner().invoke(cli, args)
    assert shown.exit_code == 0, shown.output
    assert f"ALTER ROLE {ROLE} PASSWORD '[REDACTED:password]'" in shown.output
    assert '["[REDACTED:credit_card]"]' in shown.output and PASSWORD not in shown.output and CARD not in shown.output
    assert "[redacted] password: the original is sealed to the custodian key" in shown.output
    revealed = CliRunner().invoke(cli, [*args, "--reveal", "--custodian-key",
                                        str(proxy.directory / "keys" / "custodian.key")])
    assert revealed.exit_code == 0, revealed.output
    assert f"ALTER ROLE {ROLE} PASSWORD '{PASSWORD}'" in revealed.output
    assert f'["card {CARD}"]' in revealed.output and "[revealed] credit_card" in revealed.output


def test_without_a_policy_passwords_are_still_redacted_and_detectors_do_not_run(broker, tmp_path):
    proxy = start_proxy(tmp_path / "custody", broker, replace={'policy = "policies/default.toml"': "# no policy"})
    (proxy.directory / "keys" / "custodian.pub").unlink()  # read at start: the running proxy still has it
    events = EventLog.open(proxy)
    app = new_app("redact-nopolicy")
    try:
        with proxy.connect(app, autocommit=True) as conn:
            conn.execute("SELECT 'CREATE USER x PASSWORD ''not-this'''", prepare=False)
            conn.execute("SELECT %s::text", (f"card {CARD}",))
            with pytest.raises(psycopg.errors.UndefinedFunction):
                conn.execute(f"SELECT pgp_sym_encrypt('data', '{KEY}')", prepare=False)
        client = messages(events.session(app), "client")
    finally:
        events.close()
        proxy.background.stop()
    statements = [m["statement"] for m in client if m["type"] == "Query"]
    assert statements[0] == "SELECT 'CREATE USER x PASSWORD ''not-this'''"  # a literal, not a role statement
    assert statements[1] == "SELECT pgp_sym_encrypt('data', '[REDACTED:key]')"
    query = next(m for m in client if m["type"] == "Query" and "pgp_sym_encrypt" in m["statement"])
    assert query["sealed_original"] and "original" not in query["attributes"]  # sealed: the key was loaded
    assert any(m["parameters"] == [f"card {CARD}"] for m in client if m["type"] == "Bind")  # no masks, no detectors


def test_the_redactor_reads_statements_with_the_postgres_lexer():
    detectors = scanner_for(frozenset({"credit_card", "private_key"}))
    cases = {
        "CREATE USER u WITH ENCRYPTED PASSWORD 'a''b' VALID UNTIL 'infinity'":
            ("CREATE USER u WITH ENCRYPTED PASSWORD '[REDACTED:password]' VALID UNTIL 'infinity'", ("password",)),
        "alter role \"Zoë\" password E'x\\'y'": ("alter role \"Zoë\" password '[REDACTED:password]'", ("password",)),
        "CREATE USER MAPPING FOR u SERVER s OPTIONS (user 'u', password 'pw')":
            ("CREATE USER MAPPING FOR u SERVER s OPTIONS (user 'u', password '[REDACTED:password]')", ("password",)),
        "SELECT 'Zoë', public.pgp_sym_decrypt(c, $2), encrypt(d, 'k', 'aes')":
            ("SELECT 'Zoë', public.pgp_sym_decrypt(c, $2), encrypt(d, '[REDACTED:key]', 'aes')", ("key",)),
        "INSERT INTO t VALUES ('paid 4111 1111 1111 1111')": (
            "INSERT INTO t VALUES ('[REDACTED:credit_card]')", ("credit_card",)),
        "SELECT 1": ("SELECT 1", ()),
    }
    for sql, (expected, kinds) in cases.items():
        redacted, found, _ = find_secrets(sql, detectors)
        assert (redacted, found) == (expected, kinds), sql
    assert find_secrets("SELECT pgp_sym_encrypt($1, $2)", None)[2] == {2}
    assert find_secrets("ALTER ROLE x PASSWORD 'unterminated", None)[:2] == ("[REDACTED:unparsed]", ("unparsed",))
    assert NOT_KEPT.startswith("not kept")


def test_only_the_span_of_the_literals_is_searched_and_nothing_a_literal_holds_escapes_it():
    detectors = scanner_for(frozenset({"credit_card", "us_ssn", "phone", "iban"}))
    assert literal_scope("UPDATE a SET b = b + -4123 WHERE aid = 734521;") == ""
    assert literal_scope("SELECT x FROM t WHERE a = 'p' AND b = $1") == "'p' AND b = $"
    cases = {
        "SELECT 4111111111111111": "SELECT '[REDACTED:credit_card]'",  # a long number is a literal too
        "SELECT 1 FROM t WHERE note = E'card 4111 1111 1111 1111' AND id = -7": (
            "SELECT 1 FROM t WHERE note = '[REDACTED:credit_card]' AND id = -7"),
        "SELECT $$ssn 123-45-6789$$, -4123": "SELECT '[REDACTED:us_ssn]', -4123",
        "UPDATE a SET b = b + -4123 WHERE aid = 734521;": "UPDATE a SET b = b + -4123 WHERE aid = 734521;",
    }
    for sql, expected in cases.items():
        assert find_secrets(sql, detectors)[0] == expected, sql


def test_repeated_statements_skip_the_search_but_secrets_are_found_every_time():
    """find_secrets remembers clean texts only: a statement with a secret is searched (and redacted) each time."""
    detectors = scanner_for(frozenset({"credit_card"}))
    card = "INSERT INTO t VALUES ('4111 1111 1111 1111')"
    for _ in range(3):
        assert find_secrets(card, detectors)[1] == ("credit_card",)
        assert find_secrets("ALTER ROLE x PASSWORD 'p'", detectors)[1] == ("password",)
        assert find_secrets("SELECT pgp_sym_encrypt($1, $2)", None)[2] == {2}
        assert find_secrets("SELECT abalance FROM a WHERE aid = 1", detectors) == (
            "SELECT abalance FROM a WHERE aid = 1", (), frozenset())
    # a clean text for one scanner is searched again by another (a reloaded policy's detectors)
    assert find_secrets(card, None)[1] == ()
    assert find_secrets(card, detectors)[1] == ("credit_card",)
