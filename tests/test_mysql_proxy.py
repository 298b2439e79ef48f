"""The MySQL proxy with real clients (PyMySQL, mysql-connector-python, the `mariadb` CLI) and the
machine's MariaDB: the same results as direct, and events that say what the client did, prepared
statements' bound values included. One proxy (a plain and a TLS MySQL listener) serves the module,
with the default policy (block DROP, hold unfiltered writes, mask sensitive data).
"""

from __future__ import annotations

import datetime as dt
import decimal
import os
import subprocess
import threading
import time
import uuid

import mysql.connector
import pymysql
import pytest
from pymysql.constants import CLIENT

from custody.commands.approvals import read_approvals
from ingest.protocols.mysql.packets import PacketReader
from mysql_fixtures import make_target, proxy_entry
from pg_fixtures import EventLog, make_tls, messages, start_proxy

from test_policy_proxy import custody

PLAIN, TLS = 1, 2  # listener indexes: 0 is custody init's PostgreSQL entry
EVE, BOB = "eve@example.com", "bob@example.com"


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def target():
    target = make_target()
    with target.direct() as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE people (id INT PRIMARY KEY, name VARCHAR(100), note TEXT, password VARCHAR(64), "
                    "born DATE, score DECIMAL(8,2), data BLOB)")
        cur.execute("INSERT INTO people VALUES (1, 'alice', 'paid with 4111 1111 1111 1111.', 'hunter2-secret', "
                    "'1990-05-17', 12.50, x'00ff'), (2, 'bob', 'mail Alice.Smith@mail.example', 'pw2', NULL, NULL, NULL)")
    yield target
    target.drop()


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory, target, tls):
    entries = proxy_entry(target) + proxy_entry(
        target, "tls-mysql", f'tls_cert = "{tls["server_cert"]}"\ntls_key = "{tls["server_key"]}"\n')
    running = start_proxy(tmp_path_factory.mktemp("custody"), broker, extra_proxies=entries)
    policy = running.directory / "policies" / "default.toml"
    policy.write_text(policy.read_text().replace("hold_timeout_seconds = 300", "hold_timeout_seconds = 6") + """
[[rule]]
name = "block-vault-objects"
action = "block"
message = "the vault tables are not reachable through Custody"
protocols = ["mysql"]
objects = ["vault*", "*.vault*"]

[[rule]]
name = "block-secret-files"
action = "block"
message = "LOAD DATA LOCAL of a .secret file is not allowed through Custody"
protocols = ["mysql"]
operations = ["transfer"]
objects = ["*.secret"]
""")
    time.sleep(1.2)
    running.events = EventLog.open(running)
    yield running
    running.events.close()
    running.background.stop()


def new_app(prefix: str = "my") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def connect(proxy, target, user: str = "alice@example.com", groups=("dba",), app: str | None = None,
            token: str | None = None, **kwargs) -> pymysql.connections.Connection:
    host, port = proxy.address(PLAIN)
    return pymysql.connect(host=host, port=port, user=user, password=token or proxy.token(user, groups=groups),
                           database=target.database, autocommit=True, program_name=app or new_app(), **kwargs)


def connector(proxy, target, app: str, user: str = "alice@example.com", groups=("dba",),
              auth_plugin: str = "mysql_clear_password", **kwargs):
    host, port = proxy.address(TLS)
    return mysql.connector.connect(host=host, port=port, user=user, password=proxy.token(user, groups=groups),
                                   database=target.database, auth_plugin=auth_plugin, use_pure=True,
                                   ssl_disabled=False, ssl_verify_cert=False, conn_attrs={"program_name": app},
                                   autocommit=True, **kwargs)


def client_records(events, kind: str) -> list[dict]:
    return [m for m in messages(events, "client") if m["type"] == kind]


def server_records(events, kind: str) -> list[dict]:
    return [m for m in messages(events, "server") if m["type"] == kind]


def test_pymysql_text_queries_same_as_direct_and_recorded(proxy, target):
    app = new_app("pymysql")
    query = "SELECT id, name, score, born FROM people ORDER BY id"
    with target.direct() as direct, direct.cursor() as cur:
        cur.execute(query)
        expected = cur.fetchall()
    with connect(proxy, target, app=app, client_flag=CLIENT.MULTI_STATEMENTS) as conn, conn.cursor() as cur:
        cur.execute(query)
        assert cur.fetchall() == expected
        cur.execute("INSERT INTO people (id, name) VALUES (10, 'carol')")
        assert cur.rowcount == 1
        cur.execute("DELETE FROM people WHERE id = 10")
        with pytest.raises(pymysql.err.ProgrammingError) as failed:
            cur.execute("SELECT * FROM no_such_table")
        assert failed.value.args[0] == 1146
        cur.execute("SELECT 1; SELECT 2, 3")  # multi-statements, multi-results
        assert cur.fetchall() == ((1,),)
        assert cur.nextset() and cur.fetchall() == ((2, 3),)
    events = proxy.events.session(app)
    start = events[0].body
    assert start["protocol"] == "mysql" and start["identity"]["subject"] == "alice@example.com"
    assert start["target"] == "local-mysql" and start["upstream"] == f"127.0.0.1:3306/{target.database}"
    assert start["attributes"]["user"] == "alice@example.com"
    assert start["attributes"]["upstream_server_version"].startswith("5.5.5-10.11")
    queries = [m["statement"] for m in client_records(events, "COM_QUERY") if not m["statement"].startswith("SET NAMES")]
    assert queries == [query, "INSERT INTO people (id, name) VALUES (10, 'carol')", "DELETE FROM people WHERE id = 10",
                       "SELECT * FROM no_such_table", "SELECT 1; SELECT 2, 3"]
    assert all(m["operation"] == "statement" for m in client_records(events, "COM_QUERY"))
    oks = server_records(events, "OK")
    assert [(m["rows"], m["outcome"]) for m in oks if m["attributes"].get("origin") != "proxy"][-2:] == [(1, "ok"), (1, "ok")]
    (error,) = server_records(events, "ERR")
    assert (error["error_code"], error["attributes"]["errno"], error["outcome"]) == ("42S02", "1146", "error")
    assert "no_such_table" in error["error_message"]
    ends = [m for m in server_records(events, "EOF") if m.get("rows") is not None]
    assert [m["rows"] for m in ends] == [2, 1, 1]
    assert events[-1].body["reason"] == "client_terminate"
    token_records = [m for m in messages(events, "client") if m["type"] in ("HandshakeResponse", "AuthSwitchResponse")]
    assert token_records and all(m["data"] == b"" and m["attributes"]["redacted"] == "token" for m in token_records)
    assert not any(proxy.token().encode()[:40] in e.value for e in events)
    assert not any(target.password.encode() in e.value for e in events)


def test_connector_prepared_statements_over_tls_record_bound_values(proxy, target):
    app = new_app("connector")
    conn = connector(proxy, target, app)
    try:
        cur = conn.cursor(prepared=True)
        cur.execute("SELECT id, name, born, score FROM people WHERE id = %s AND name <> %s", (1, "zed"))
        assert cur.fetchall() == [(1, "alice", dt.date(1990, 5, 17), decimal.Decimal("12.50"))]
        cur.execute("INSERT INTO people (id, name, born, score) VALUES (%s, %s, %s, %s)",
                    (20, "dave", dt.date(2001, 2, 3), decimal.Decimal("1.25")))
        cur.execute("DELETE FROM people WHERE id = %s", (20,))
        assert cur.rowcount == 1
        cur.close()
    finally:
        conn.close()
    events = proxy.events.session(app)
    assert events[0].body["attributes"]["tls"].startswith("TLS")
    executes = client_records(events, "COM_STMT_EXECUTE")
    assert [(m["statement"], m["parameters"]) for m in executes] == [
        ("SELECT id, name, born, score FROM people WHERE id = ? AND name <> ?", ["1", "zed"]),
        ("INSERT INTO people (id, name, born, score) VALUES (?, ?, ?, ?)", ["20", "dave", "2001-02-03", "1.25"]),
        ("DELETE FROM people WHERE id = ?", ["20"]),
    ]
    assert executes[0]["attributes"]["parameter_types"] == '["TINY UNSIGNED", "STRING"]'  # types as bound
    prepares = client_records(events, "COM_STMT_PREPARE")
    assert [m["operation"] for m in prepares] == ["prepare"] * 3
    assert [m["attributes"]["params"] for m in server_records(events, "PrepareOK")] == ["2", "4", "1"]
    assert server_records(events, "BinaryRow")


def test_caching_sha2_full_authentication_over_tls_takes_the_token(proxy, target):
    app = new_app("sha2")
    conn = connector(proxy, target, app, auth_plugin="caching_sha2_password")
    try:
        cur = conn.cursor()
        cur.execute("SELECT name FROM people WHERE id = 2")
        assert cur.fetchall() == [("bob",)]
    finally:
        conn.close()
    events = proxy.events.session(app)
    logins = [m["type"] for m in messages(events, "client") + messages(events, "server")
              if m["type"] in ("AuthMoreData", "AuthFullResponse", "AuthSwitchRequest", "AuthSwitchResponse")]
    assert logins == ["AuthFullResponse", "AuthMoreData"]  # the full-authentication path, no switch
    (full,) = client_records(events, "AuthFullResponse")
    assert full["data"] == b"" and full["attributes"]["redacted"] == "token"
    assert events[0].body["identity"]["subject"] == "alice@example.com"
    assert not any(proxy.token().encode()[:40] in e.value for e in events)
    with pytest.raises(mysql.connector.Error) as refused:  # a bad token on that path: the native access denied
        mysql.connector.connect(host=proxy.address(TLS)[0], port=proxy.address(TLS)[1], user="alice@example.com",
                                password="not-a-token", auth_plugin="caching_sha2_password", use_pure=True,
                                ssl_verify_cert=False, database=target.database)
    assert refused.value.errno == 1045


def test_change_user_is_refused_and_its_token_never_recorded(proxy, target):
    app = new_app("change-user")
    conn = connector(proxy, target, app)
    secret = proxy.token(BOB, groups=("dba",))  # mysql_clear_password: COM_CHANGE_USER carries it in clear
    try:
        with pytest.raises(mysql.connector.Error) as refused:
            conn.cmd_change_user(username=BOB, password=secret, database=target.database)
        assert refused.value.errno == 1235 and "one identity" in refused.value.msg
        cur = conn.cursor()
        cur.execute("SELECT current_user() IS NOT NULL")  # still alice's session, as the target knows it
        assert cur.fetchall() == [(1,)]
    finally:
        conn.close()
    events = proxy.events.session(app)
    assert events[0].body["identity"]["subject"] == "alice@example.com"
    (change,) = client_records(events, "COM_CHANGE_USER")
    assert change["data"] == b"" and change["attributes"] == {"redacted": "token", "user": BOB}
    assert not any(secret.encode()[-40:] in e.value for e in events)


def test_mariadb_cli_with_the_cleartext_plugin(proxy, target, tmp_path):
    host, port = proxy.address(PLAIN)
    user = f"cli-{uuid.uuid4().hex[:8]}@example.com"
    (tmp_path / "n.txt").write_text("5\n6\n")
    result = subprocess.run(
        ["mariadb", "-h", host, "-P", str(port), "-u", user, "--skip-ssl",  # MariaDB's client allows cleartext
         "--local-infile=1", "-D", target.database, "-N", "-B", "-e",
         "SELECT name FROM people ORDER BY id; SELECT 6 * 7; CREATE TEMPORARY TABLE n (a INT); "
         f"LOAD DATA LOCAL INFILE '{tmp_path / 'n.txt'}' INTO TABLE n; SELECT sum(a) FROM n"],
        env={**os.environ, "MYSQL_PWD": proxy.token(user)}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["alice", "bob", "42", "11"]
    (events,) = proxy.events.find(lambda start: (start["identity"] or {}).get("subject") == user)
    assert "SELECT 6 * 7" in [m["statement"] for m in client_records(events, "COM_QUERY")]


def test_blocked_drop_gets_1142_and_the_session_goes_on(proxy, target):
    app = new_app("block")
    with connect(proxy, target, user=EVE, groups=("dev",), app=app) as conn, conn.cursor() as cur:
        for statement in ("DROP TABLE people", "/*!50000 DROP TABLE people */", "TRUNCATE people",
                          "SELECT p.id FROM people p JOIN secrets.vault_keys k ON k.id = p.id"):
            with pytest.raises(pymysql.err.OperationalError) as refused:
                cur.execute(statement)
            assert refused.value.args[0] == 1142 and "custody: " in refused.value.args[1]
            cur.execute("SELECT 42")
            assert cur.fetchone() == (42,)
    with target.direct() as direct, direct.cursor() as cur:
        cur.execute("SELECT count(*) FROM people")
        assert cur.fetchone() == (2,)
    events = proxy.events.session(app)
    blocks = [e.body for e in events if e.kind == "policy_decision"]
    assert [(d["rule"], d["action"]) for d in blocks] == [("block-drop", "block"), ("block-drop", "block"),
                                                         ("block-truncate", "block"), ("block-vault-objects", "block")]
    refusals = [m for m in server_records(events, "ERR") if m["attributes"].get("origin") == "proxy"]
    assert [(m["error_code"], m["attributes"]["errno"]) for m in refusals] == [("42000", "1142")] * 4
    objects = [m.get("objects") for m in client_records(events, "COM_QUERY") if "people" in m["statement"]]
    assert objects == [["people"]] * 3 + [["people", "secrets.vault_keys"]]  # the policy's `objects` saw them


def test_load_data_local_infile_relayed_recorded_and_under_policy(proxy, target, tmp_path):
    import hashlib

    with target.direct() as direct, direct.cursor() as cur:
        cur.execute("CREATE TABLE loads (id INT, name VARCHAR(20))")
    rows = "".join(f"{i}\tname-{i}\n" for i in range(3000))  # ~40 KiB: several packets, maybe several reads
    path = tmp_path / "loads.tsv"
    path.write_text(rows)
    app = new_app("infile")
    with connect(proxy, target, user=EVE, groups=("dev",), app=app, local_infile=True) as conn, conn.cursor() as cur:
        assert cur.execute(f"LOAD DATA LOCAL INFILE '{path}' INTO TABLE loads") == 3000
        with pytest.raises(pymysql.err.OperationalError) as refused:  # the policy's objects rule, before the target
            cur.execute(f"LOAD DATA LOCAL INFILE '{path}' INTO TABLE vault_keys")
        assert refused.value.args[0] == 1142
        secret = tmp_path / "keys.secret"
        secret.write_text("1\tleaked\n")
        with pytest.raises(pymysql.err.OperationalError) as refused:  # the transfer: the client is never asked
            cur.execute(f"LOAD DATA LOCAL INFILE '{secret}' INTO TABLE loads")
        assert refused.value.args[0] == 1142 and "secret file" in refused.value.args[1]
        cur.execute("SELECT count(*), max(name) FROM loads")
        assert cur.fetchone() == (3000, "name-999")
    with connect(proxy, target, user=EVE, groups=("dev",)) as conn, conn.cursor() as cur:  # no local_infile
        with pytest.raises(pymysql.MySQLError):
            cur.execute(f"LOAD DATA LOCAL INFILE '{path}' INTO TABLE loads")  # the target refuses: never agreed
        cur.execute("SELECT count(*) FROM loads")
        assert cur.fetchone() == (3000,)
    events = proxy.events.session(app)
    request, refused_request = server_records(events, "LocalInfileRequest")
    assert (request["operation"], request["text"], request["objects"]) == ("transfer", str(path), [str(path)])
    assert refused_request["objects"] == [str(secret)]
    end, empty = client_records(events, "LocalInfileEnd")
    assert empty["attributes"] == {"bytes": "0", "refused": "true", "origin": "proxy"}
    assert [m["attributes"].get("unrelayed") is not None for m in server_records(events, "OK") if m.get("rows") == 0
            and m["attributes"].get("origin") != "proxy"][-1:] == [True]  # the target's answer to the empty file
    assert end["attributes"] == {"bytes": str(len(rows)), "sha256": hashlib.sha256(rows.encode()).hexdigest()}
    recorded = b"".join(p.payload for m in client_records(events, "LocalInfileData")
                        for p in PacketReader("client", 1 << 30).feed(m["data"]))
    assert recorded == rows.encode()  # the file itself is in the evidence, packet boundaries kept
    ok = [m for m in server_records(events, "OK") if m.get("rows") == 3000]
    assert len(ok) == 1 and ok[0]["outcome"] == "ok"
    assert [e.body["rule"] for e in events if e.kind == "policy_decision"] == ["block-vault-objects",
                                                                              "block-secret-files"]


def test_masked_columns_and_detectors_in_text_and_binary_rows(proxy, target):
    app = new_app("mask")
    with connect(proxy, target, user=EVE, groups=("dev",), app=app) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, note, password, password AS p FROM people ORDER BY id")
        text_rows = cur.fetchall()
    conn = connector(proxy, target, new_app("mask-bin"), user=EVE, groups=("dev",))
    try:
        cur = conn.cursor(prepared=True)
        cur.execute("SELECT id, note, password FROM people WHERE id > ? ORDER BY id", (0,))
        binary_rows = cur.fetchall()
    finally:
        conn.close()
    assert text_rows == ((1, "paid with **** **** **** 1111.", "[MASKED:column]", "[MASKED:column]"),
                         (2, "mail A***@mail.example", "[MASKED:column]", "[MASKED:column]"))
    assert [tuple(r) for r in binary_rows] == [row[:3] for row in text_rows]
    events = proxy.events.session(app)
    assert not any(b"hunter2-secret" in e.value or b"4111 1111 1111 1111" in e.value for e in events)
    assert any(m.get("sealed_original") for m in server_records(events, "TextRow"))


class Held:
    """A statement run in a thread of its own, since it waits for a reviewer."""

    def __init__(self, proxy, target, sql: str):
        self.app, self.error = new_app("hold"), None
        self.conn = connect(proxy, target, user=EVE, groups=("dev",), app=self.app)
        self.thread = threading.Thread(target=self._run, args=(sql,))
        self.thread.start()

    def _run(self, sql: str) -> None:
        try:
            with self.conn.cursor() as cur:
                cur.execute(sql)
        except pymysql.err.MySQLError as exc:
            self.error = exc

    def finish(self) -> None:
        self.thread.join(20)
        assert not self.thread.is_alive()
        with self.conn.cursor() as cur:
            cur.execute("SELECT 1")
        self.conn.close()


def _request_for(proxy, sql: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for request_id, request in read_approvals(proxy.config).requests.items():
            if request.statement == sql:
                return request_id
        time.sleep(0.1)
    raise AssertionError(f"no approval request for {sql}")


def test_held_statement_approved_then_one_denied(proxy, target):
    sql = "UPDATE people SET name = name"
    held = Held(proxy, target, sql)
    request_id = _request_for(proxy, sql)
    ok = custody(proxy, "approvals", "approve", request_id, "--reason", "INC-7", "--token", proxy.token(BOB, ("dba",)))
    assert ok.exit_code == 0, ok.output
    held.finish()
    assert held.error is None
    steps = [e.body for e in proxy.events.session(held.app) if e.kind == "policy_decision"]
    assert [(d["action"], d["rule"]) for d in steps] == [("hold", "hold-unfiltered-writes"),
                                                        ("approve", "hold-unfiltered-writes")]

    sql = "DELETE FROM people"
    held = Held(proxy, target, sql)
    request_id = _request_for(proxy, sql)
    denied = custody(proxy, "approvals", "deny", request_id, "--reason", "no", "--token", proxy.token(BOB, ("dba",)))
    assert denied.exit_code == 0, denied.output
    held.finish()
    assert held.error is not None and held.error.args[0] == 1142 and f"denied by {BOB}" in held.error.args[1]
    with target.direct() as direct, direct.cursor() as cur:
        cur.execute("SELECT count(*) FROM people")
        assert cur.fetchone() == (2,)


def test_proxy_logs_in_upstream_with_client_ed25519(broker, tmp_path):
    target = make_target("ed25519")
    running = start_proxy(tmp_path / "custody", broker, extra_proxies=proxy_entry(target))
    try:
        host, port = running.address(PLAIN)
        with pymysql.connect(host=host, port=port, user="alice@example.com", password=running.token(),
                             database=target.database, program_name=new_app("ed25519")) as conn, conn.cursor() as cur:
            cur.execute("SELECT current_user()")
            assert cur.fetchone() == (f"{target.user}@127.0.0.1",)
    finally:
        running.background.stop()
        target.drop()
