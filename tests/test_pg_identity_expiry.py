"""A session ends with its identity: psycopg through the proxy with dev tokens of a few seconds
(`[identity] leeway_seconds = 0`). An idle session ends when the token expires; a statement in flight
at expiry finishes and its result reaches the client first. SessionStart carries the token's exp.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import jwt
import psycopg
import pytest

from pg_fixtures import EventLog, command_tags, messages, new_app, start_proxy, statements
from proxy.core.session import IDENTITY_TIMER, Session
from proxy.core.commands import SetTimer, VerifyToken


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory):
    running = start_proxy(tmp_path_factory.mktemp("custody"), broker, replace={
        'policy = "policies/default.toml"': "# no policy",
        'dev_signing_key = "keys/dev-idp.key"': 'dev_signing_key = "keys/dev-idp.key"\nleeway_seconds = 0'})
    running.events = EventLog.open(running)
    yield running
    running.events.close()
    running.background.stop()


def exp_of(token: str) -> datetime:
    return datetime.fromtimestamp(jwt.decode(token, options={"verify_signature": False})["exp"], timezone.utc)


def expiry_error(events) -> tuple[str, str]:
    [error] = [(m["error_code"], m["error_message"]) for m in messages(events, "server")
               if m["type"] == "ErrorResponse" and m["attributes"].get("origin") == "proxy"]
    return error


def test_an_idle_session_ends_when_its_token_expires(proxy):
    app = new_app("exp-idle")
    token = proxy.token(ttl=timedelta(seconds=3))
    exp = exp_of(token)
    conn = psycopg.connect(proxy.dsn(password=token, application_name=app), autocommit=True)
    assert conn.execute("SELECT 1").fetchone() == (1,)
    time.sleep(max(0.0, (exp - datetime.now(timezone.utc)).total_seconds()) + 1.0)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 2")
    conn.close()
    events = proxy.events.session(app)
    start, end = events[0].body, events[-1].body
    assert start["attributes"]["token_exp"] == exp.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert end["reason"] == "identity_expired"
    code, message = expiry_error(events)
    assert code == "28000"
    assert f"custody: the token of alice@example.com expired at {start['attributes']['token_exp']}" in message
    assert "reconnect with a new token" in message
    assert statements(events) == ["SELECT 1"]  # the statement after expiry never reached the target
    assert events[-1].ts >= exp


def test_a_statement_in_flight_at_expiry_finishes_first(proxy):
    app = new_app("exp-busy")
    token = proxy.token(ttl=timedelta(seconds=2))
    exp = exp_of(token)
    conn = psycopg.connect(proxy.dsn(password=token, application_name=app), autocommit=True)
    left = (exp - datetime.now(timezone.utc)).total_seconds()
    assert left > 0.5
    began = time.monotonic()
    assert conn.execute("SELECT pg_sleep(%s), 'done'", (left + 1.5,)).fetchone() == ("", "done")
    assert time.monotonic() - began > left + 1.4  # it ran past the expiry, to its end
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 'after'")
    conn.close()
    events = proxy.events.session(app)
    assert events[-1].body["reason"] == "identity_expired"
    assert command_tags(events) == [("SELECT 1", 1)]  # the slow statement's result, then the end
    kinds = [(e.kind, [m["type"] for m in e.body["messages"]] if e.kind == "frames" else None) for e in events]
    last_ready = max(i for i, (kind, types) in enumerate(kinds) if types and "ReadyForQuery" in types)
    ending = max(i for i, (kind, types) in enumerate(kinds) if types and "ErrorResponse" in types)
    assert last_ready <= ending  # FATAL after the statement's ReadyForQuery (one folded event may hold both)
    assert expiry_error(events)[0] == "28000"


def test_no_identity_timer_when_sessions_outlive_their_tokens():
    """`[identity] end_sessions_on_expiry = false`: the listener passes no leeway, the core sets no timer."""
    from test_pg_proxy_session import ALICE, FakeRecording, protocol

    for leeway, timers in ((None, []), (0.0, [IDENTITY_TIMER])):
        session = Session(protocol=protocol(), recording=FakeRecording(), source_address="10.0.0.9:1",
                          identity_leeway=leeway)
        session.start()
        from ingest.protocols.postgres import messages as m
        session.data("client", m.startup_message({"user": "alice@example.com"}))
        verify = next(c for c in session.data("client", m.password_message("t")) if isinstance(c, VerifyToken))
        out = session.completed(verify, ALICE)
        assert [c.name for c in out if isinstance(c, SetTimer)] == timers
