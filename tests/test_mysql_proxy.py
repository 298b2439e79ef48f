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
    policy.write_text(policy.read_text().replace("hold_timeout_seconds = 300", "hold_timeout_seconds = 6"))
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


def connector(proxy, target, app: str, user: str = "alice@example.com", groups=("dba",), **kwargs):
    host, port = proxy.address(TLS)
    return mysql.connector.connect(host=host, port=port, user=user, password=proxy.token(user, groups=groups),
                                   database=target.database, auth_plugin="mysql_clear_password", use_pure=True,
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
