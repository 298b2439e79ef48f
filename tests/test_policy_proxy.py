"""Policy in the data path, through the real proxy, broker and PostgreSQL, with psycopg:
the default rules block, evasions do not get through, results are masked (originals sealed),
held statements wait for a reviewer, and a reloaded policy applies mid-session.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from nacl.public import PrivateKey as BoxPrivateKey
from psycopg import errors

from custody.cli import cli
from custody.commands.approvals import read_approvals
from ingest import kafka
from ingest.keys import load_key_file
from pg_fixtures import DIRECT, EventLog, messages, new_app, start_proxy
from proxy.approvals import ApprovalRequest, decision_document, encode
from ingest.sealing import open_sealed

TABLE = "custody_policy_t"
HOLD_TIMEOUT = 4
RELOAD_CHECK = 0.1
"""How often this module's proxy looks at its policy file (1 s in production): what reloads is what is tested."""
EVE, BOB, CAROL = "eve@example.com", "bob@example.com", "carol@example.com"  # dev; dba; dev

JWT = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl_-x"
PEM = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----"
SECRETS = {  # detector -> a value it must hide
    "credit_card": "paid with 4111 1111 1111 1111.",
    "iban": "to DE89 3704 0044 0532 0130 00 today",
    "us_ssn": "ssn: 123-45-6789",
    "email": "Alice.Smith+tag@mail.example.co.uk wrote",
    "phone": "call (415) 555-2671 now",
    "jwt": f"Bearer {JWT}",
    "aws_access_key": "key=AKIAIOSFODNN7EXAMPLE;",
    "private_key": f"key:\n{PEM}\nend",
}
NEEDLES = ["4111 1111 1111 1111", "DE89 3704", "123-45-6789", "Alice.Smith", "555-2671", JWT, "AKIAIOSFODNN7EXAMPLE",
           "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", "hunter2-secret"]


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory):
    running = start_proxy(tmp_path_factory.mktemp("custody"), broker)
    policy = running.directory / "policies" / "default.toml"
    policy.write_text(policy.read_text().replace("hold_timeout_seconds = 300", f"hold_timeout_seconds = {HOLD_TIMEOUT}"))
    time.sleep(1.2)  # the holder looks at the file at most once a second
    for served in running.background.service.proxies:  # from now on every RELOAD_CHECK s: the reload test waits less
        served.policy.holder.check_interval = RELOAD_CHECK
    running.events = EventLog.open(running)
    with psycopg.connect(DIRECT, autocommit=True) as direct:
        direct.execute(f"DROP TABLE IF EXISTS {TABLE}")
        direct.execute(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, kind text, note text, password text)")
        direct.cursor().executemany(f"INSERT INTO {TABLE} VALUES (%s, %s, %s, 'hunter2-secret')",
                           [(i, kind, text) for i, (kind, text) in enumerate(SECRETS.items())])
    yield running
    running.events.close()
    running.background.stop()
    with psycopg.connect(DIRECT, autocommit=True) as direct:
        direct.execute(f"DROP TABLE IF EXISTS {TABLE}")


def connect(proxy, user: str = EVE, groups: tuple[str, ...] = ("dev",), app: str | None = None) -> psycopg.Connection:
    return psycopg.connect(proxy.dsn(user=user, password=proxy.token(user, groups=groups), application_name=app),
                           autocommit=True)


def decisions(events) -> list[dict]:
    return [e.body for e in events if e.kind == "policy_decision"]


def table_rows() -> int:
    with psycopg.connect(DIRECT) as direct:
        return direct.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]


class Ran:
    def __init__(self, result):
        self.exit_code = result.exit_code
        self.output = result.output + (str(result.exception) if result.exception else "")


def custody(proxy, *args: str) -> Ran:
    """A `custody` command as a reviewer runs it; a CustodyError (one line for the user) lands in `output`."""
    return Ran(CliRunner().invoke(cli, [*args, "--config", str(proxy.config.path)]))


# --- block ------------------------------------------------------------------------------------------

BLOCKED = [
    ("block-drop", f"DROP TABLE {TABLE}"),
    ("block-drop", "DROP SCHEMA public CASCADE"),
    ("block-drop", "DROP DATABASE postgres"),
    ("block-truncate", f"TRUNCATE {TABLE}"),
    ("block-alter-system", "ALTER SYSTEM SET work_mem = '1GB'"),
    ("block-copy-program", "COPY (SELECT 1) TO PROGRAM 'id'"),
]
EVASIONS = [
    ("block-drop", f"dRoP/**/TaBlE \"{TABLE}\""),
    ("block-drop", f"/* harmless */ SELECT 1; DROP TABLE {TABLE}"),
    ("block-drop", f"DO $$BEGIN EXECUTE 'DROP TABLE {TABLE}'; END$$"),
    ("block-truncate", f"DO $$BEGIN TRUNCATE {TABLE}; END$$"),
    ("block-truncate", f"WITH x AS (SELECT 1) SELECT 1; TRUNCATE ONLY public.{TABLE}"),
    ("on_parse_error", f"DROP TABLE {TABLE}; SELEC"),
]


def test_default_block_rules_and_evasions_over_simple_and_extended_protocol(proxy):
    app = new_app("block")
    with connect(proxy, app=app) as conn:
        for rule, statement in BLOCKED + EVASIONS:
            for prepare in (False, True):
                if prepare and ";" in statement:
                    continue  # the extended protocol carries one statement per Parse
                with pytest.raises(errors.InsufficientPrivilege) as refused:
                    conn.execute(statement, prepare=prepare)
                assert str(refused.value).startswith("custody: "), statement
                assert conn.execute("SELECT 42").fetchone() == (42,), "the session goes on"
        with pytest.raises(errors.InsufficientPrivilege):  # one blocked statement blocks the whole message
            conn.execute(f"INSERT INTO {TABLE} VALUES (100, 'x', 'y', 'z'); DROP TABLE {TABLE}")
    assert table_rows() == len(SECRETS)

    events = proxy.events.session(app)
    blocks = decisions(events)
    expected = [(rule, s) for rule, s in BLOCKED + EVASIONS for p in (False, True) if not (p and ";" in s)]
    assert [(d["rule"], d["statement"]) for d in blocks[:-1]] == expected
    assert all(d["action"] == "block" for d in blocks)
    assert blocks[0]["reason"] == "DROP DATABASE/SCHEMA/TABLE is not allowed through Custody"
    errors_seen = [m for m in messages(events, "server") if m["type"] == "ErrorResponse"]
    assert {m["error_code"] for m in errors_seen} == {"42501"}
    assert not any("custody-refused" in (m["error_message"] or "") for m in errors_seen), "the stand-in never shows"


def test_block_inside_transaction_and_pipeline_keeps_postgres_semantics(proxy):
    with connect(proxy) as conn:
        conn.autocommit = False
        conn.execute(f"INSERT INTO {TABLE} VALUES (200, 'x', 'y', 'z')")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute(f"TRUNCATE {TABLE}")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        conn.autocommit = True
        with pytest.raises(errors.InsufficientPrivilege):  # extended protocol, one implicit transaction
            with conn.pipeline():
                conn.execute(f"INSERT INTO {TABLE} VALUES (%s, 'x', 'y', 'z')", (201,))
                conn.execute(f"DROP TABLE {TABLE}", prepare=True)
                conn.execute("SELECT 1")
        assert conn.execute("SELECT 7").fetchone() == (7,)
    assert table_rows() == len(SECRETS), "both inserts were rolled back, as PostgreSQL does after an error"


# --- mask -------------------------------------------------------------------------------------------

def _all_rows(conn: psycopg.Connection, binary: bool) -> list[tuple]:
    return conn.execute(f"SELECT id, kind, note, password FROM {TABLE} ORDER BY id", binary=binary).fetchall()


def _copy_out(conn: psycopg.Connection) -> bytes:
    with conn.cursor() as cur, cur.copy(f"COPY (SELECT * FROM {TABLE} ORDER BY id) TO STDOUT") as copy:
        return b"".join(bytes(chunk) for chunk in copy)


def _notice_and_error(conn: psycopg.Connection) -> list[str]:
    seen: list[str] = []
    conn.add_notice_handler(lambda d: seen.append(d.message_primary or ""))
    conn.execute("DO $$BEGIN RAISE NOTICE 'card on file: %', (SELECT note FROM custody_policy_t WHERE id = 0); END$$")
    with pytest.raises(errors.InvalidTextRepresentation) as echoed:  # the error text quotes the value
        conn.execute(f"SELECT note::int FROM {TABLE} WHERE id = 3")
    return seen + [echoed.value.diag.message_primary or ""]


def test_masking_each_detector_in_rows_copy_notices_and_errors_unless_exempt(proxy):
    app = new_app("mask")
    with connect(proxy, app=app) as conn:
        text_rows, binary_rows = _all_rows(conn, False), _all_rows(conn, True)
        copied = _copy_out(conn)
        diagnostics = _notice_and_error(conn)
    shown = json.dumps([text_rows, binary_rows, copied.decode(), diagnostics])
    for needle in NEEDLES:
        assert needle not in shown, needle
    assert text_rows == binary_rows
    assert {row[3] for row in text_rows} == {"[MASKED:column]"}
    assert dict((row[1], row[2]) for row in text_rows)["credit_card"] == "paid with **** **** **** 1111."
    assert "**** **** **** 1111" in diagnostics[0] and "A***@mail.example.co.uk" in diagnostics[1]

    with connect(proxy, user=BOB, groups=("dba",)) as dba:  # except_groups = ["dba"]
        clear = _all_rows(dba, True)
        assert [row[2] for row in clear] == list(SECRETS.values()) and clear[0][3] == "hunter2-secret"
        assert "4111 1111 1111 1111" in _copy_out(dba).decode()

    events = proxy.events.session(app)
    raw = b"".join(e.value for e in events)
    for needle in NEEDLES:
        assert needle.encode() not in raw, f"{needle} in clear in the evidence"
    custodian = BoxPrivateKey(base64.b64decode((proxy.directory / "keys" / "custodian.key").read_text()))
    originals = b"".join(open_sealed(m["sealed_original"], custodian)
                         for m in messages(events, "server") if m.get("sealed_original"))
    for needle in NEEDLES:
        assert needle.replace("\n", "\\n").encode() in originals or needle.encode() in originals, needle


# --- hold -------------------------------------------------------------------------------------------

class HeldStatement:
    """A statement run in a thread of its own, since it waits for a reviewer; notices and outcome kept."""

    def __init__(self, proxy, sql: str, user: str = EVE):
        self.app, self.sql, self.notices = new_app("hold"), sql, []
        self.error: Exception | None = None
        self.conn = connect(proxy, user=user, app=self.app)
        self.conn.add_notice_handler(lambda d: self.notices.append((d.message_primary, d.message_detail)))
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.conn.execute(self.sql)
        except psycopg.Error as exc:
            self.error = exc

    def request_id(self, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while not self.notices:
            assert time.monotonic() < deadline, "no hold notice"
            time.sleep(0.05)
        return self.notices[0][0].rsplit(" ", 1)[1]

    def finish(self) -> None:
        self.thread.join(HOLD_TIMEOUT + 10)
        assert not self.thread.is_alive()
        self.conn.execute("SELECT 1")  # still in sync
        self.conn.close()


def test_hold_is_approved_by_a_dba_but_not_by_the_requester_or_a_non_approver(proxy):
    held = HeldStatement(proxy, f"UPDATE {TABLE} SET kind = kind")
    request_id = held.request_id()
    assert "dba" in held.notices[0][1]
    listed = custody(proxy, "approvals", "list")
    assert request_id in listed.output and f"UPDATE {TABLE} SET kind = kind" in listed.output

    mine = custody(proxy, "approvals", "approve", request_id, "--reason", "me", "--token", proxy.token(EVE, ("dba",)))
    assert mine.exit_code != 0 and "cannot decide on it" in mine.output
    carol = custody(proxy, "approvals", "approve", request_id, "--reason", "x", "--token", proxy.token(CAROL, ("dev",)))
    assert carol.exit_code != 0 and "not in an approver group" in carol.output
    ok = custody(proxy, "approvals", "approve", request_id, "--reason", "INC-42 cleanup", "--token", proxy.token(BOB, ("dba",)))
    assert ok.exit_code == 0, ok.output
    held.finish()
    assert held.error is None

    steps = decisions(proxy.events.session(held.app))
    assert [(d["action"], d["rule"], d["request_id"]) for d in steps] == [
        ("hold", "hold-unfiltered-writes", request_id), ("approve", "hold-unfiltered-writes", request_id)]
    assert steps[0]["attributes"]["approvers"] == "dba"
    assert steps[1]["approver"]["subject"] == BOB and steps[1]["approver"]["groups"] == ["dba"]
    assert steps[1]["reason"] == "INC-42 cleanup" and steps[1]["statement"] == f"UPDATE {TABLE} SET kind = kind"
    assert request_id not in custody(proxy, "approvals", "list").output


def test_hold_denied(proxy):
    held = HeldStatement(proxy, f"DELETE FROM {TABLE}")
    request_id = held.request_id()
    denied = custody(proxy, "approvals", "deny", request_id, "--reason", "not today", "--token", proxy.token(BOB, ("dba",)))
    assert denied.exit_code == 0, denied.output
    held.finish()
    assert isinstance(held.error, errors.InsufficientPrivilege)
    assert f"denied by {BOB}: not today" in str(held.error)
    assert table_rows() == len(SECRETS)
    deny = decisions(proxy.events.session(held.app))[-1]
    assert (deny["action"], deny["approver"]["subject"], deny["reason"], deny["attributes"]) == ("deny", BOB, "not today", {})


def test_hold_expires_and_the_proxy_ignores_a_self_approval_sent_around_the_cli(proxy):
    held = HeldStatement(proxy, f"DELETE FROM {TABLE} WHERE true")
    request_id = held.request_id()
    request: ApprovalRequest = read_approvals(proxy.config).requests[request_id]
    proxy_key = load_key_file(proxy.config.keys.proxy_key).signing_key.verify_key
    forged = decision_document(request, "approve", "trust me", proxy.token(EVE, ("dba",)), None, proxy_key)
    sender = kafka.producer(proxy.kafka)
    sender.send(proxy.kafka.topic("approvals"), key=request_id.encode(), value=encode(forged.document())).get(10)
    sender.close()
    held.finish()
    assert isinstance(held.error, errors.InsufficientPrivilege) and "nobody approved it in time" in str(held.error)
    assert table_rows() == len(SECRETS)
    expired = decisions(proxy.events.session(held.app))[-1]
    assert (expired["action"], expired["approver"], expired["attributes"]) == ("deny", None, {"expired": "true"})


# --- reload -----------------------------------------------------------------------------------------

def test_policy_reload_applies_mid_session_and_a_broken_file_keeps_the_old_one(proxy):
    path: Path = proxy.directory / "policies" / "default.toml"
    original = path.read_text()
    holder = proxy.background.service.proxies[0].policy.holder
    with connect(proxy) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        path.write_text(original + f'\n[[rule]]\nname = "block-t"\naction = "block"\ntables = ["{TABLE}"]\n')
        time.sleep(3 * RELOAD_CHECK)
        with pytest.raises(errors.InsufficientPrivilege, match="block-t"):
            conn.execute(f"SELECT id FROM {TABLE}")
        path.write_text(original + "\n[[rule]]\nname = 'broken'\naction = 'explode'\n")
        time.sleep(3 * RELOAD_CHECK)
        with pytest.raises(errors.InsufficientPrivilege, match="block-t"):
            conn.execute(f"SELECT id FROM {TABLE}")
        assert "explode" in holder.last_error
        path.write_text(original)
        time.sleep(3 * RELOAD_CHECK)
        assert conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone() == (len(SECRETS),)
    assert holder.last_error is None
