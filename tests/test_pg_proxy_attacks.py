"""Hostile clients against the PostgreSQL proxy: forged and stale tokens, bad
bytes, slow-loris, and a recorder that cannot record (fail closed / open).
Each attack ends only its own connection, with the right SQLSTATE and events.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import socket
import struct
import time

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg_fixtures import EventLog, messages, new_app, start_proxy
from ingest.protocols.postgres import MessageReader
from ingest.protocols.postgres import messages as m
from proxy.server import ServiceOptions

STARTUP_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory):
    running = start_proxy(tmp_path_factory.mktemp("custody"), broker,
                          proxy_keys=f"startup_timeout = {STARTUP_TIMEOUT}\nmax_message_bytes = 65536\n")
    running.events = EventLog.open(running)
    yield running
    running.events.close()
    running.background.stop()


@pytest.fixture(scope="module")
def bystander(proxy):
    """A healthy session that lives through every attack of the module."""
    with proxy.connect(new_app("bystander"), autocommit=True) as conn:
        yield conn
        assert conn.execute("SELECT 'still here'").fetchone() == ("still here",)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _dev_kid(proxy) -> str:
    return json.loads(proxy.config.identity.jwks.read_text())["keys"][0]["kid"]


def _claims(proxy, **changes) -> dict:
    now = int(time.time())
    claims = {"iss": proxy.config.identity.issuer, "aud": proxy.config.identity.audience,
              "sub": "alice@example.com", "iat": now, "nbf": now, "exp": now + 600}
    claims.update(changes)
    return claims


def alg_none(proxy) -> str:
    header = _b64(json.dumps({"alg": "none", "kid": _dev_kid(proxy), "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(_claims(proxy)).encode())}."


def hs256_with_public_key(proxy) -> str:
    public = json.loads(proxy.config.identity.jwks.read_text())["keys"][0]
    secret = base64.urlsafe_b64decode(public["x"] + "==")
    header = {"alg": "HS256", "kid": public["kid"], "typ": "JWT"}
    body = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(_claims(proxy)).encode())}"
    import hashlib
    import hmac
    return f"{body}.{_b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())}"


def unknown_kid(proxy) -> str:
    return jwt.encode(_claims(proxy), Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": "dev-unknown"})


def wrong_key_same_kid(proxy) -> str:
    return jwt.encode(_claims(proxy), Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": _dev_kid(proxy)})


TOKENS = {
    "alg_none": (alg_none, "alg_not_allowed"),
    "hs256_public_key": (hs256_with_public_key, "alg_not_allowed"),
    "expired": (lambda p: p.token(ttl=dt.timedelta(minutes=-10)), "expired"),
    "not_yet_valid": (lambda p: p.token(nbf=int(time.time()) + 3600), "not_yet_valid"),
    "wrong_audience": (lambda p: p.token(audience="someone-else"), "wrong_audience"),
    "wrong_issuer": (lambda p: p.token(issuer="https://evil.example/"), "wrong_issuer"),
    "unknown_kid": (unknown_kid, "unknown_kid"),
    "bad_signature": (wrong_key_same_kid, "bad_signature"),
    "not_a_jwt": (lambda p: "hunter2", "malformed"),
    "other_users_token": (lambda p: p.token("mallory@example.com"), "user_mismatch"),
}


@pytest.mark.parametrize("attack", sorted(TOKENS))
def test_bad_tokens_are_refused_with_28P01_and_recorded(proxy, bystander, attack):
    make, reason = TOKENS[attack]
    app = new_app(attack)
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(proxy.dsn(password=make(proxy), application_name=app))
    assert "password authentication failed" in str(refused.value) and reason in str(refused.value)
    events = proxy.events.session(app)
    assert [e.kind for e in events][0] == "session_start" and events[0].body["identity"] is None
    decision = next(e.body for e in events if e.kind == "policy_decision")
    assert (decision["rule"], decision["action"]) == ("authentication", "deny")
    assert decision["reason"].startswith(f"{reason}: ")
    errors = [x for x in messages(events, "server") if x["type"] == "ErrorResponse"]
    assert [x["error_code"] for x in errors] == ["28P01"]
    assert events[-1].body["reason"] == "auth_failed"


# --- bad bytes -------------------------------------------------------------------


def raw_session(proxy, app: str) -> socket.socket:
    """A raw client that has logged in and is ready for queries."""
    sock = socket.create_connection(proxy.address(), timeout=10)
    sock.sendall(m.startup_message({"user": "alice@example.com", "database": "postgres", "application_name": app}))
    reader = MessageReader("server")
    read_until(sock, reader, "AuthenticationRequest")
    sock.sendall(m.password_message(proxy.token()))
    read_until(sock, reader, "ReadyForQuery")
    return sock


def read_until(sock: socket.socket, reader: MessageReader, wanted: str) -> list:
    seen = []
    while not any(x.type == wanted for x in seen):
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed before {wanted}; got {[x.type for x in seen]}")
        seen += reader.feed(data)
    return seen


def fatal_then_closed(sock: socket.socket, started: bool = True) -> m.ErrorResponse:
    """The proxy's FATAL ErrorResponse, after which it closes the connection."""
    reader = MessageReader("server")
    received = []
    while (data := sock.recv(65536)):
        received += reader.feed(data)
    sock.close()
    errors = [x for x in received if x.type == "ErrorResponse"]
    assert errors, f"no ErrorResponse, got {[x.type for x in received]}"
    return m.decode_error_response(errors[-1].payload)


BAD_INPUTS = {
    "unknown_type": b"\xfe\x00\x00\x00\x08abcd",
    "length_too_small": b"Q\x00\x00\x00\x02",
    "oversized": b"Q" + struct.pack(">I", 1 << 30) + b"SELECT",
    "over_configured_max": b"Q" + struct.pack(">I", 65536 + 100) + b"x" * 100,
    "query_without_terminator": b"Q\x00\x00\x00\x08abcd",
    "sync_with_body": b"S\x00\x00\x00\x08abcd",
}


@pytest.mark.parametrize("attack", sorted(BAD_INPUTS))
def test_malformed_messages_get_08P01_and_a_protocol_error_event(proxy, bystander, attack):
    app = new_app(attack)
    sock = raw_session(proxy, app)
    sock.sendall(BAD_INPUTS[attack])
    error = fatal_then_closed(sock)
    assert (error.code, error.severity) == ("08P01", "FATAL")
    events = proxy.events.session(app)
    protocol_error = next(e.body for e in events if e.kind == "protocol_error")
    assert protocol_error["code"] == "08P01" and protocol_error["sample"]
    assert events[-1].body["reason"] == "protocol_error"


def test_garbage_before_startup(proxy, bystander):
    sock = socket.create_connection(proxy.address(), timeout=10)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    error = fatal_then_closed(sock)
    assert error.code == "08P01"
    found = proxy.events.find(lambda start: start["identity"] is None and start["attributes"] == {})
    assert any(e.kind == "protocol_error" and e.body["sample"].startswith(b"GET /") for s in found for e in s)


def test_truncated_message_then_disconnect(proxy, bystander):
    app = new_app("truncated")
    sock = raw_session(proxy, app)
    sock.sendall(b"Q\x00\x00\x00\x20SELE")
    sock.close()
    events = proxy.events.session(app)
    assert any(e.kind == "protocol_error" and "incomplete message" in e.body["message"] for e in events)
    assert events[-1].body["reason"] == "protocol_error"


@pytest.mark.parametrize("stall", ["half_startup", "no_password"])
def test_slow_loris_is_cut_off_at_the_startup_deadline(proxy, bystander, stall):
    sock = socket.create_connection(proxy.address(), timeout=10)
    startup = m.startup_message({"user": "alice@example.com", "application_name": f"loris-{stall}"})
    sock.sendall(startup[:10] if stall == "half_startup" else startup)
    started = time.monotonic()
    error = fatal_then_closed(sock)
    assert error.code == "08P01" and "startup did not complete" in error.message
    assert STARTUP_TIMEOUT - 0.1 < time.monotonic() - started < STARTUP_TIMEOUT + 2


def test_unknown_cancel_key_is_ignored(proxy, bystander):
    sock = socket.create_connection(proxy.address(), timeout=10)
    sock.sendall(m.cancel_request(12345, b"nope"))
    assert sock.recv(100) == b""
    sock.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.sampled_from([b"", m.startup_message({"user": "alice@example.com"})]),
       noise=st.binary(min_size=1, max_size=300))
def test_socket_fuzz_never_hurts_the_proxy(proxy, bystander, prefix, noise):
    sock = socket.create_connection(proxy.address(), timeout=5)
    try:
        sock.sendall(prefix + noise)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        sock.close()
    assert bystander.execute("SELECT 1").fetchone() == (1,)


# --- the recorder cannot take events ----------------------------------------------


@pytest.fixture(scope="module")
def unrecorded(tmp_path_factory):
    """A proxy whose broker is unreachable and whose spool is tiny: recording fails soon.
    Listener 0 fails closed (the default), listener 1 fails open."""
    fail_open = """
[[proxy]]
name = "fail-open"
protocol = "postgres"
listen = "127.0.0.1:0"
upstream = "postgresql://postgres@127.0.0.1:5432/postgres"
fail_open = true
"""

    class NoBroker:
        bootstrap = "127.0.0.1:1"

    running = start_proxy(tmp_path_factory.mktemp("custody"), NoBroker(), ServiceOptions(max_queue=100),
                          extra_proxies=fail_open, replace={"max_bytes = 1073741824": "max_bytes = 65536"})
    yield running
    running.background.stop(timeout=0.5)


def test_fail_closed_when_the_spool_is_full(unrecorded):
    with pytest.raises(psycopg.OperationalError) as closed:
        with psycopg.connect(unrecorded.dsn(index=0)) as conn:
            for _ in range(200):
                conn.execute("SELECT repeat('x', 1000) FROM generate_series(1, 50)").fetchall()
                time.sleep(0.01)
    assert "fail closed" in str(closed.value)
    with psycopg.connect(unrecorded.dsn(index=1)) as conn:  # fail_open listener: relays anyway
        for _ in range(5):
            assert len(conn.execute("SELECT repeat('x', 1000) FROM generate_series(1, 50)").fetchall()) == 50
