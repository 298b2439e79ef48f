"""The `databases` allow-list of a MySQL listener through the real proxy and MariaDB (PyMySQL).

The schema may change only to one of the listed (or the URL's): `USE db` sent as SQL (an executable comment
and a multi-statement included), COM_INIT_DB (PyMySQL's `select_db`) and table names qualified with a database
are refused with ERR 1044 (42000) and a PolicyDecision `databases`, and the session goes on. After a `USE`,
the policy's `attributes.database` is the new one.
"""

from __future__ import annotations

import threading
import time
import uuid

import pymysql
import pytest
from pymysql.constants import CLIENT

from mysql_fixtures import make_target, proxy_entry, root
from pg_fixtures import EventLog, messages, start_proxy

PLAIN = 1


@pytest.fixture(scope="module")
def setup(broker, tmp_path_factory):
    target = make_target()
    tag = uuid.uuid4().hex[:8]
    allowed, forbidden = f"custody_my_ok_{tag}", f"custody_my_no_{tag}"
    with root() as conn, conn.cursor() as cur:
        for name in (allowed, forbidden):
            cur.execute(f"CREATE DATABASE `{name}`")
            cur.execute(f"CREATE TABLE `{name}`.t (id INT)")
            cur.execute(f"GRANT ALL ON `{name}`.* TO '{target.user}'@'127.0.0.1'")  # MariaDB would allow it
    directory = tmp_path_factory.mktemp("custody")
    proxy = start_proxy(directory, broker, extra_proxies=proxy_entry(target, extra=f'databases = ["{allowed}"]\n'))
    policy = proxy.directory / "policies" / "default.toml"
    policy.write_text(policy.read_text().replace("\n[[rule]]", f"""
[[rule]]
name = "archive-read-only"
action = "block"
message = "the archive database is read-only"
protocols = ["mysql"]
attributes = {{ database = ["{allowed}"] }}
statements = ["insert", "update", "delete"]

[[rule]]""", 1))
    time.sleep(1.2)
    proxy.events = EventLog.open(proxy)
    yield proxy, target, allowed, forbidden
    proxy.events.close()
    proxy.background.stop()
    with root() as conn, conn.cursor() as cur:
        for name in (allowed, forbidden):
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    target.drop()


def connect(proxy, target, app: str, **kwargs) -> pymysql.connections.Connection:
    host, port = proxy.address(PLAIN)
    return pymysql.connect(host=host, port=port, user="alice@example.com", password=proxy.token(groups=("dba",)),
                           database=target.database, autocommit=True, program_name=app, **kwargs)


def test_use_init_db_and_qualified_names_outside_the_list_are_refused_with_1044(setup):
    proxy, target, allowed, forbidden = setup
    app = f"dbs-{uuid.uuid4().hex[:10]}"
    refused = [f"USE {forbidden}", f"/*!50000 USE `{forbidden}` */", f"SELECT * FROM {forbidden}.t",
               f"SELECT 1; USE {forbidden}", f"INSERT INTO `{forbidden}`.t VALUES (1)"]
    with connect(proxy, target, app, client_flag=CLIENT.MULTI_STATEMENTS) as conn, conn.cursor() as cur:
        for statement in refused:
            with pytest.raises(pymysql.err.OperationalError) as error:
                cur.execute(statement)
            assert error.value.args[0] == 1044 and forbidden in error.value.args[1], statement
            cur.execute("SELECT DATABASE()")
            assert cur.fetchone() == (target.database,)
        with pytest.raises(pymysql.err.OperationalError) as error:
            conn.select_db(forbidden)  # COM_INIT_DB
        assert error.value.args[0] == 1044
        cur.execute(f"SELECT COUNT(*) FROM {allowed}.t")
        assert cur.fetchone() == (0,)
        cur.execute(f"USE {allowed}")
        cur.execute("SELECT DATABASE()")
        assert cur.fetchone() == (allowed,)
        with pytest.raises(pymysql.err.OperationalError) as error:  # attributes.database is the new one
            cur.execute("INSERT INTO t VALUES (1)")
        assert error.value.args[0] == 1142 and "read-only" in error.value.args[1]
        conn.select_db(target.database)
        cur.execute("CREATE TABLE t (id INT)")
        cur.execute("INSERT INTO t VALUES (1)")
        assert cur.rowcount == 1
    with root() as conn, conn.cursor() as cur:
        cur.execute(f"SELECT COUNT(*) FROM `{forbidden}`.t")
        assert cur.fetchone() == (0,)
    events = proxy.events.session(app)
    decisions = [e.body for e in events if e.kind == "policy_decision"]
    assert [(d["rule"], d["action"]) for d in decisions] == [("databases", "deny")] * 6 + [
        ("archive-read-only", "block")]
    assert all(d["attributes"]["database"] == forbidden for d in decisions[:6])
    errors = [m for m in messages(events, "server") if m["type"] == "ERR"]
    assert [m["attributes"]["errno"] for m in errors] == ["1044"] * 6 + ["1142"]


def test_kill_query_with_the_proxys_connection_id_cancels_the_right_upstream_query(setup):
    proxy, target, _, _ = setup
    app = f"kill-{uuid.uuid4().hex[:10]}"
    host, port = proxy.address(PLAIN)
    sleeper = connect(proxy, target, app)
    killer = connect(proxy, target, app + "-k")
    outsider = pymysql.connect(host=host, port=port, user="eve@example.com", password=proxy.token(
        "eve@example.com", groups=("dba",)), database=target.database, autocommit=True, program_name=app + "-e")
    given = sleeper.thread_id()  # the proxy's id, from its handshake
    with sleeper.cursor() as cur:
        cur.execute("SELECT CONNECTION_ID()")
        (real,) = cur.fetchone()
    assert real != given
    outcome: dict = {}

    def sleep() -> None:
        started = time.monotonic()
        try:
            with sleeper.cursor() as cur:
                cur.execute("SELECT SLEEP(30)")
                outcome["result"] = cur.fetchone()
        except pymysql.err.MySQLError as error:
            outcome["error"] = error.args[0]
        outcome["seconds"] = time.monotonic() - started


    thread = threading.Thread(target=sleep)
    thread.start()
    time.sleep(1.0)
    with outsider.cursor() as cur, pytest.raises(pymysql.err.OperationalError) as error:  # not eve's session
        cur.execute(f"KILL QUERY {given}")
    assert error.value.args[0] == 1094
    with killer.cursor() as cur:
        with pytest.raises(pymysql.err.OperationalError) as error:
            cur.execute("KILL QUERY 999999")
        assert error.value.args[0] == 1094
        cur.execute(f"KILL QUERY {given}")
    thread.join(10)
    assert not thread.is_alive() and outcome["seconds"] < 10
    assert outcome.get("result") == (1,) or outcome.get("error") == 1317  # SLEEP interrupted
    with sleeper.cursor() as cur:  # KILL QUERY leaves the connection
        cur.execute("SELECT 7")
        assert cur.fetchone() == (7,)
    for conn in (sleeper, killer, outsider):
        conn.close()
    killed = proxy.events.session(app + "-k")
    kill = next(m for m in messages(killed, "client") if m["type"] == "COM_QUERY" and m["statement"] == f"KILL QUERY {given}")
    assert kill["attributes"]["kill_session"] == proxy.events.session(app)[0].session_id
    assert proxy.events.session(app)[0].body["attributes"]["upstream_connection_id"] == str(real)
