"""The PostgreSQL proxy with real clients (psycopg, psql, pgbench) and the
machine's PostgreSQL: same results as direct, and events that say exactly what
the client did. One proxy (a plain and a TLS listener) serves the whole module.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from psycopg import sql

from pg_fixtures import (
    DIRECT,
    EventLog,
    command_tags,
    make_tls,
    message_count,
    messages,
    new_app,
    start_proxy,
    statements,
)
from ingest.protocols.postgres.messages import decode_data_row
from ingest.protocols.postgres.records import split_run

TABLE = "custody_proxy_t"


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory, tls):
    tls_proxy = f"""
[[proxy]]
name = "tls-postgres"
protocol = "postgres"
listen = "127.0.0.1:0"
upstream = "postgresql://postgres@127.0.0.1:5432/postgres"
tls_cert = "{tls['server_cert']}"
tls_key = "{tls['server_key']}"
client_ca = "{tls['ca']}"
"""
    # Protocol fidelity: the same workload direct and through the proxy, so no policy (pgbench -i drops tables,
    # which the default policy blocks; policy in the data path is tests/test_policy_proxy*.py's subject).
    running = start_proxy(tmp_path_factory.mktemp("custody"), broker, extra_proxies=tls_proxy,
                          replace={'policy = "policies/default.toml"': "# no policy"})
    running.events = EventLog.open(running)
    with psycopg.connect(DIRECT, autocommit=True) as direct:
        direct.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(TABLE)))
        direct.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, name text, data bytea)").format(sql.Identifier(TABLE)))
    yield running
    running.events.close()
    running.background.stop()
    with psycopg.connect(DIRECT, autocommit=True) as direct:
        direct.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(TABLE)))


def run_psql(proxy, app: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    host, port = proxy.address()
    env = {**os.environ, "PGPASSWORD": proxy.token(), "PGAPPNAME": app, "PGSSLMODE": "disable"}
    return subprocess.run(["psql", "-X", "-h", host, "-p", str(port), "-U", "alice@example.com", "-d", "postgres",
                           "-v", "ON_ERROR_STOP=0", *args], input=stdin, env=env, capture_output=True, text=True,
                          timeout=60)


def test_psql_command_is_relayed_and_recorded_with_identity(proxy):
    app = new_app("psql")
    result = run_psql(proxy, app, "-At", "-c", "SELECT 40 + 2, current_user")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "42|postgres"

    events = proxy.events.session(app)
    start = events[0].body
    assert start["identity"]["subject"] == "alice@example.com"
    assert start["identity"]["groups"] == ["dba"]
    assert start["identity"]["email"] == "alice@example.com"
    assert start["source_address"].startswith("127.0.0.1:")
    assert start["target"] == "local-postgres" and start["upstream"] == "127.0.0.1:5432/postgres"
    assert start["attributes"]["user"] == "alice@example.com"
    assert statements(events) == ["SELECT 40 + 2, current_user"]
    assert command_tags(events) == [("SELECT 1", 1)]
    assert events[-1].body["reason"] == "client_terminate"
    client = messages(events, "client")
    password = next(m for m in client if m["type"] == "PasswordMessage")
    assert password["data"] == b"" and password["attributes"]["redacted"] == "token"
    assert not any(proxy.token().encode()[:40] in e.value for e in events)
    key = next(m for m in messages(events, "server") if m["type"] == "BackendKeyData")
    assert key["data"] == b"" and key["attributes"]["origin"] == "proxy"


def test_psql_script_with_errors_and_transactions(proxy):
    app = new_app("psql-script")
    script = f"""
BEGIN;
INSERT INTO {TABLE} VALUES (1001, 'a'), (1002, 'b');
SELECT 1/0;
ROLLBACK;
INSERT INTO {TABLE} VALUES (1003, 'c');
SELECT count(*) FROM {TABLE} WHERE id > 1000;
DELETE FROM {TABLE} WHERE id > 1000;
"""
    result = run_psql(proxy, app, "-At", "-f", "-", stdin=script)
    assert "division by zero" in result.stderr
    assert result.stdout.splitlines() == ["BEGIN", "INSERT 0 2", "ROLLBACK", "INSERT 0 1", "1", "DELETE 1"]
    events = proxy.events.session(app)
    assert statements(events) == [line.strip() for line in script.strip().splitlines()]
    errors = [(m["error_code"], m["error_message"]) for m in messages(events, "server") if m["type"] == "ErrorResponse"]
    assert errors == [("22012", "division by zero")]
    assert command_tags(events) == [("BEGIN", None), ("INSERT 0 2", 2), ("ROLLBACK", None), ("INSERT 0 1", 1),
                                    ("SELECT 1", 1), ("DELETE 1", 1)]


def test_text_binary_and_parameters_are_recorded(proxy):
    app = new_app("psycopg")
    with proxy.connect(app, autocommit=True) as conn:
        assert conn.execute("SELECT %s::int + 1, %s::text", (41, "x")).fetchone() == (42, "x")
        with conn.cursor(binary=True) as cur:
            cur.execute("SELECT %b::bytea, %s::int8[]", (b"\x00\xff", [1, 2]))
            assert cur.fetchone() == (b"\x00\xff", [1, 2])
        conn.execute("SELECT 'a; b', 1; SELECT 2")  # multi-statement simple query (no parameters)
    events = proxy.events.session(app)
    binds = [m["parameters"] for m in messages(events, "client") if m["type"] == "Bind"]
    assert ["\\x0029", "x"] in binds  # psycopg sends a Python int as binary int2
    assert any(p[0] == "\\x00ff" for p in binds if p)
    assert "SELECT $1::int + 1, $2::text" in statements(events)
    assert "SELECT 'a; b', 1; SELECT 2" in statements(events)


def test_pipeline_mode(proxy):
    app = new_app("pipeline")
    with proxy.connect(app, autocommit=True) as conn:
        with conn.pipeline():
            cursors = [conn.execute("SELECT %s::int * 2", (i,)) for i in range(50)]
        assert [c.fetchone()[0] for c in cursors] == [i * 2 for i in range(50)]
    events = proxy.events.session(app)
    assert sum(1 for m in messages(events, "client") if m["type"] == "Bind") == 50
    assert [rows for tag, rows in command_tags(events)] == [1] * 50


def test_copy_in_and_out(proxy):
    app = new_app("copy")
    rows = [(2000 + i, f"name {i}", bytes([i % 256]) * 10) for i in range(5000)]
    with proxy.connect(app, autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy(f"COPY {TABLE} (id, name, data) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            assert cur.rowcount == 5000
            with cur.copy(f"COPY (SELECT id, name, data FROM {TABLE} WHERE id >= 2000 ORDER BY id) TO STDOUT") as copy:
                back = [(int(r[0]), r[1], r[2]) for r in copy.rows()]
            assert [(i, n) for i, n, _ in back] == [(i, n) for i, n, _ in rows]
            cur.execute(f"DELETE FROM {TABLE} WHERE id >= 2000")
    events = proxy.events.session(app)
    assert ("COPY 5000", 5000) in command_tags(events)
    out = [m for m in messages(events, "server") if m["type"] == "CopyData"]
    assert message_count(out) == 5000
    copied_in = [m for m in messages(events, "client") if m["type"] == "CopyData"]
    assert b"".join(x.data for m in copied_in for x in split_run("client", m)).count(b"\n") == 5000


def test_cancel_reaches_the_right_backend_without_revealing_its_key(proxy):
    app = new_app("cancel")
    with proxy.connect(app) as conn, psycopg.connect(DIRECT) as direct:
        backend_pids = {r[0] for r in direct.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'")}
        assert conn.info.backend_pid not in backend_pids  # the client sees the proxy's key, not the target's
        # cancel_safe(): the legacy cancel() holds the GIL while it waits, which would
        # stall this in-process proxy; cancel_safe() is libpq 17's non-blocking cancel.
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
        assert time.monotonic() - started < 10
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)
    events = proxy.events.session(app)
    cancels = [m for m in messages(events, "client") if m["type"] == "CancelRequest"]
    assert len(cancels) == 1 and cancels[0]["attributes"]["redacted"] == "cancel key"


def test_listen_notify_and_notices(proxy):
    app = new_app("notify")
    with proxy.connect(app, autocommit=True) as conn:
        conn.execute("LISTEN custody_channel")
        with psycopg.connect(DIRECT, autocommit=True) as direct:
            direct.execute("NOTIFY custody_channel, 'hello'")
        notices = []
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary))
        conn.execute("DO $$ BEGIN RAISE NOTICE 'custody notice'; END $$")
        received = next(conn.notifies(timeout=5, stop_after=1))
        assert (received.channel, received.payload) == ("custody_channel", "hello")
        assert notices == ["custody notice"]
    events = proxy.events.session(app)
    server = messages(events, "server")
    assert any(m["type"] == "NotificationResponse" and m["attributes"]["payload"] == "hello" for m in server)
    assert any(m["type"] == "NoticeResponse" and m["attributes"]["message"] == "custody notice" for m in server)


def test_every_execution_of_a_prepared_statement_is_an_operation_with_its_sql(proxy):
    """psycopg prepares a query after five runs and then sends only Bind/Execute by name."""
    app = new_app("prepared")
    with proxy.connect(app, autocommit=True) as conn:
        for i in range(9):
            assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
    client = messages(proxy.events.session(app), "client")
    executions = [m for m in client if m.get("operation") == "statement"]
    assert len(executions) == 9 and {m["text"] for m in executions} == {"SELECT $1::int + 1"}
    assert any(m["type"] == "Bind" for m in executions), "the prepared runs are Binds by name"


def test_a_notify_from_another_proxied_session_names_the_pid_its_client_was_given(proxy):
    """psycopg's own notify tests compare Notify.pid with the notifier's BackendKeyData pid."""
    with proxy.connect(new_app("listener"), autocommit=True) as listener, \
            proxy.connect(new_app("notifier"), autocommit=True) as notifier:
        listener.execute("LISTEN custody_pids")
        notifier.execute("NOTIFY custody_pids, 'proxied'")
        proxied = next(listener.notifies(timeout=5, stop_after=1))
        assert proxied.pid == notifier.info.backend_pid != notifier.execute("SELECT pg_backend_pid()").fetchone()[0]
        with psycopg.connect(DIRECT, autocommit=True) as direct:
            direct.execute("NOTIFY custody_pids, 'direct'")
            real_pid = direct.info.backend_pid
        received = next(listener.notifies(timeout=5, stop_after=1))
        assert (received.payload, received.pid) == ("direct", real_pid)


def test_large_result_matches_direct_and_every_row_is_recorded(proxy):
    app = new_app("large")
    query = "SELECT g, md5(g::text) FROM generate_series(1, 200000) g"
    with psycopg.connect(DIRECT) as direct:
        expected = direct.execute(query).fetchall()
    with proxy.connect(app) as conn:
        assert conn.execute(query).fetchall() == expected
    events = proxy.events.session(app)
    rows = [m for m in messages(events, "server") if m["type"] == "DataRow"]
    assert message_count(rows) == 200000
    assert ("SELECT 200000", 200000) in command_tags(events)
    split = [x for m in rows for x in split_run("server", m)]
    assert len(split) == 200000
    assert decode_data_row(split[-1].payload).values[0] == b"200000"


def test_same_workload_same_results_direct_and_proxied(proxy):
    workload = [
        ("SELECT 1, 'x'::text, NULL::int, 1.5::numeric, now()::date", ()),
        ("SELECT * FROM generate_series(1, 100) g WHERE g %% %s = 0", (7,)),
        ("SELECT array_agg(g), json_build_object('a', 1) FROM generate_series(1, 5) g", ()),
        ("SELECT %s::bytea, %s::timestamptz", (b"\x01\x02", "2026-01-01T00:00:00Z")),
    ]

    def run(connection):
        out = []
        for query, params in workload:
            for binary in (False, True):
                with connection.cursor(binary=binary) as cur:
                    out.append(cur.execute(query, params).fetchall())
        try:
            connection.execute("SELECT no_such_column")
        except psycopg.errors.UndefinedColumn as error:
            out.append(error.sqlstate)
        return out

    with psycopg.connect(DIRECT) as direct, proxy.connect() as proxied:
        assert run(proxied) == run(direct)


def test_pgbench_init_and_eight_clients(proxy):
    host, port = proxy.address()
    env = {**os.environ, "PGPASSWORD": proxy.token(), "PGSSLMODE": "disable", "PGAPPNAME": new_app("pgbench")}
    base = ["-h", host, "-p", str(port), "-U", "alice@example.com", "postgres"]
    init = subprocess.run(["pgbench", "-i", "-s", "1", "-q", *base], env=env, capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    run = subprocess.run(["pgbench", "-c", "8", "-j", "2", "-t", "50", *base], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "number of transactions actually processed: 400/400" in run.stdout
    assert "number of failed transactions: 0" in run.stdout


def test_hundred_concurrent_sessions(proxy):
    def session(i: int) -> int:
        with proxy.connect(new_app("many")) as conn:
            time.sleep(0.5)  # all of them open at once
            return conn.execute("SELECT %s::int", (i,)).fetchone()[0]

    with ThreadPoolExecutor(100) as pool:
        assert sorted(pool.map(session, range(100))) == list(range(100))


def test_events_replay_what_the_client_did_in_order(proxy):
    app = new_app("replay")
    script = [f"SELECT generate_series(1, {n})" for n in (3, 0, 7)] + ["SELECT 'done'"]
    with proxy.connect(app, autocommit=True) as conn:
        for query in script:
            conn.execute(query, prepare=False).fetchall()
    events = proxy.events.session(app)
    assert statements(events) == script
    assert command_tags(events) == [("SELECT 3", 3), ("SELECT 0", 0), ("SELECT 7", 7), ("SELECT 1", 1)]
    assert [e.kind for e in events][0] == "session_start" and events[-1].kind == "session_end"
    assert all(e.session_id == events[0].session_id for e in events)
    assert proxy.events.rejected == []


def test_backend_killed_is_a_server_disconnect(proxy):
    app = new_app("killed")
    with proxy.connect(app, autocommit=True) as conn, psycopg.connect(DIRECT, autocommit=True) as direct:
        direct.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (app,))
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert proxy.events.session(app)[-1].body["reason"] == "server_disconnect"


def test_client_vanishing_is_a_client_disconnect(proxy):
    app = new_app("vanish")
    conn = proxy.connect(app, autocommit=True)
    conn.execute("SELECT 1")
    os.close(conn.fileno())  # no Terminate: the socket just goes away
    events = proxy.events.session(app)
    assert events[-1].body["reason"] == "client_disconnect"
    with psycopg.connect(DIRECT) as direct:  # and the target's backend is gone too
        for _ in range(50):
            if not direct.execute("SELECT 1 FROM pg_stat_activity WHERE application_name = %s", (app,)).fetchall():
                break
            time.sleep(0.1)
        else:
            pytest.fail("the upstream backend outlived its client")


def test_tls_with_client_certificate(proxy, tls):
    app = new_app("tls")
    dsn = proxy.dsn(index=1, application_name=app, sslmode="verify-ca", sslrootcert=str(tls["ca"]),
                    sslcert=str(tls["client_cert"]), sslkey=str(tls["client_key"]))
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT 7").fetchone() == (7,)
        assert conn.pgconn.ssl_in_use
    start = proxy.events.session(app)[0].body
    assert start["client_cert_fingerprint"] == tls["client_der_sha256"]
    assert start["attributes"]["tls"].startswith("TLSv1.")
    assert start["target"] == "tls-postgres"


def test_plain_listener_refuses_ssl_and_psycopg_falls_back(proxy):
    with psycopg.connect(proxy.dsn(sslmode="prefer")) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        psycopg.connect(proxy.dsn(sslmode="require"))
