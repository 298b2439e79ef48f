"""Database choice under policy, with psycopg through the proxy and two databases the test creates on the
machine's PostgreSQL: `[[proxy]] databases` lets the client's `database` pick one of them, the
configured one stays the default, any other is refused with 3D000 and recorded, and policy rules match
`attributes.database`.
"""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest
from psycopg import errors, sql

from pg_fixtures import DIRECT, EventLog, messages, new_app, start_proxy, statements

SUFFIX = uuid.uuid4().hex[:8]
APP, ANALYTICS = f"custody_app_{SUFFIX}", f"custody_analytics_{SUFFIX}"

READ_ONLY_RULE = f"""
[[rule]]
name = "analytics-read-only"
action = "block"
message = "the analytics database is read-only through Custody"
attributes = {{ database = ["custody_analytics_*"] }}
statements = ["insert", "update", "delete"]
"""


@pytest.fixture(scope="module")
def databases():
    with psycopg.connect(DIRECT, autocommit=True) as direct:
        for name in (APP, ANALYTICS):
            direct.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    for name in (APP, ANALYTICS):
        with psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={name}", autocommit=True) as db:
            db.execute("CREATE TABLE t (x int)")
    yield
    with psycopg.connect(DIRECT, autocommit=True) as direct:
        for name in (APP, ANALYTICS):
            direct.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory, databases):
    running = start_proxy(tmp_path_factory.mktemp("custody"), broker, replace={
        'policy = "policies/default.toml"': f'policy = "policies/default.toml"\ndatabases = ["{APP}", "{ANALYTICS}"]'})
    policy = running.directory / "policies" / "default.toml"
    policy.write_text(policy.read_text() + READ_ONLY_RULE)
    time.sleep(1.2)  # the holder looks at the file at most once a second
    running.events = EventLog.open(running)
    yield running
    running.events.close()
    running.background.stop()


def connect(proxy, app: str, dbname: str | None) -> psycopg.Connection:
    dsn = proxy.dsn(application_name=app) if dbname is None else proxy.dsn(application_name=app, dbname=dbname)
    if dbname is None:
        dsn = dsn.replace(" dbname='postgres'", "")  # libpq then asks for a database named like the user
    return psycopg.connect(dsn, autocommit=True)


@pytest.mark.parametrize("dbname, expected", [(APP, APP), (ANALYTICS, ANALYTICS), ("postgres", "postgres"),
                                              (None, "postgres")])
def test_the_client_picks_a_listed_database_or_gets_the_configured_one(proxy, dbname, expected):
    app = new_app("db")
    with connect(proxy, app, dbname) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (expected,)
    start = proxy.events.session(app)[0].body
    assert start["upstream"] == f"127.0.0.1:5432/{expected}"


def test_a_database_not_listed_is_refused_with_3d000_and_recorded(proxy):
    app = new_app("db-refused")
    with pytest.raises(psycopg.OperationalError) as refused:
        connect(proxy, app, "template1")
    assert 'database "template1" is not served by target' in str(refused.value)
    events = proxy.events.session(app)
    start = events[0].body
    assert start["identity"]["subject"] == "alice@example.com" and start["attributes"]["database"] == "template1"
    [decision] = [e.body for e in events if e.kind == "policy_decision"]
    assert (decision["rule"], decision["action"]) == ("databases", "deny")
    assert decision["attributes"] == {"database": "template1"}
    [error] = [m for m in messages(events, "server") if m["type"] == "ErrorResponse"]
    assert error["error_code"] == "3D000" and APP in error["error_message"]
    assert events[-1].body["reason"] == "policy"
    assert not any(m["type"] == "StartupMessage" for m in messages(events, "client")[1:])  # never sent upstream


def test_a_policy_rule_matches_the_database(proxy):
    app = new_app("db-policy")
    with connect(proxy, app, ANALYTICS) as conn:
        with pytest.raises(errors.InsufficientPrivilege, match="analytics database is read-only"):
            conn.execute("INSERT INTO t VALUES (1)")
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
    with connect(proxy, new_app("db-policy"), APP) as conn:
        conn.execute("INSERT INTO t VALUES (1)")  # the same statement in another database is allowed
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
    events = proxy.events.session(app)
    [decision] = [e.body for e in events if e.kind == "policy_decision"]
    assert (decision["rule"], decision["action"]) == ("analytics-read-only", "block")
    assert statements(events) == ["INSERT INTO t VALUES (1)", "SELECT count(*) FROM t"]
