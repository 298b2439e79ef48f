"""What the PostgreSQL proxy refuses, with real clients: GSSAPI encryption and replication connections.

libpq only asks for GSSAPI encryption when it holds Kerberos credentials, so the test gives it a credential
cache with a (never used) ticket-granting ticket: then psql and psycopg send GSSENCRequest as they would on a
Kerberos desktop.
"""

from __future__ import annotations

import os
import struct
import subprocess
import time

import psycopg
import pytest

from pg_fixtures import EventLog, messages, new_app, start_proxy
from proxy.postgres.frontend import GSSENC_REFUSED, REPLICATION_REFUSED


def _counted(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _principal(realm: bytes, *components: bytes, name_type: int = 1) -> bytes:
    return struct.pack(">ii", name_type, len(components)) + _counted(realm) + b"".join(map(_counted, components))


def write_credential_cache(path, user: bytes = b"alice", realm: bytes = b"EXAMPLE.COM") -> None:
    """An MIT FILE ccache (format 4) with one ticket-granting ticket valid for a day: enough for
    gss_acquire_cred, which is all libpq checks before it sends GSSENCRequest."""
    client = _principal(realm, user)
    now = int(time.time())
    credential = (client + _principal(realm, b"krbtgt", realm, name_type=2)
                  + struct.pack(">H", 18) + _counted(bytes(32))            # keyblock (aes256)
                  + struct.pack(">IIII", now, now, now + 86400, now + 86400) + b"\0"  # times, is_skey
                  + struct.pack(">III", 0, 0, 0)                           # flags, no addresses, no authdata
                  + _counted(b"\x61\x03\x02\x01\x05") + _counted(b""))     # ticket, second ticket
    path.write_bytes(struct.pack(">HH", 0x0504, 0) + client + credential)


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory):
    running = start_proxy(tmp_path_factory.mktemp("custody"), broker)
    running.events = EventLog.open(running)
    yield running
    running.events.close()
    running.background.stop()


@pytest.fixture
def kerberos(tmp_path, monkeypatch):
    cache = tmp_path / "krb5cc"
    write_credential_cache(cache)
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{cache}")
    return {**os.environ, "KRB5CCNAME": f"FILE:{cache}"}


def unnamed_sessions(proxy, known: set[str], timeout: float = 20.0):
    """Sessions without a SessionStart identity that this test has not seen yet."""
    deadline = time.monotonic() + timeout
    while True:
        found = proxy.events.find(lambda start: start["identity"] is None, timeout=0.5)
        new = [events for events in found if events[0].session_id not in known]
        if new or time.monotonic() > deadline:
            return new


def test_gssapi_encryption_required_is_refused_and_the_reason_recorded(proxy, kerberos):
    known = {events[0].session_id for events in proxy.events.find(lambda start: start["identity"] is None, 0.5)}
    host, port = proxy.address()
    env = {**kerberos, "PGPASSWORD": proxy.token(), "PGGSSENCMODE": "require", "PGSSLMODE": "disable"}
    result = subprocess.run(["psql", "-X", "-h", host, "-p", str(port), "-U", "alice@example.com", "-d", "postgres",
                             "-c", "SELECT 1"], env=env, capture_output=True, text=True, timeout=30)
    # libpq hangs up on 'N' with its own words: it reads no server text before the handshake (CVE-2024-10977).
    assert result.returncode != 0
    assert "server doesn't support GSSAPI encryption, but it was required" in result.stderr
    (events,) = unnamed_sessions(proxy, known)
    assert [e.kind for e in events if e.kind != "frames"] == ["session_start", "policy_decision", "session_end"]
    asked, answered = messages(events)
    assert asked["type"] == "GSSENCRequest"
    assert answered["type"] == "EncryptionResponse" and answered["data"] == b"N"
    assert answered["attributes"] == {"origin": "proxy", "refused": GSSENC_REFUSED}
    decision = next(e.body for e in events if e.kind == "policy_decision")
    assert (decision["rule"], decision["action"], decision["reason"]) == ("gssapi", "deny", GSSENC_REFUSED)
    assert "sslmode=require/prefer (TLS) and the OIDC token as password" in decision["reason"]
    assert events[-1].body["reason"] == "client_disconnect"


def test_gssapi_encryption_preferred_falls_back_and_the_session_says_so(proxy, kerberos):
    app = new_app("gss-prefer")
    with psycopg.connect(proxy.dsn(application_name=app, gssencmode="prefer")) as conn:
        assert conn.execute("SELECT 7").fetchone() == (7,)
    events = proxy.events.session(app)
    client = messages(events, "client")
    assert [m["type"] for m in client[:2]] == ["GSSENCRequest", "StartupMessage"]
    refusal = next(m for m in messages(events, "server") if m["type"] == "EncryptionResponse")
    assert refusal["attributes"]["refused"] == GSSENC_REFUSED
    assert not any(e.kind == "policy_decision" for e in events)


def test_replication_connection_is_refused_with_what_to_use_instead_and_recorded(proxy):
    for mode in ("database", "true"):
        app = new_app(f"replication-{mode}")
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(proxy.dsn(application_name=app, replication=mode))
        assert f"custody: {REPLICATION_REFUSED}" in str(refused.value)
        assert refused.value.sqlstate in (None, "0A000")
        events = proxy.events.session(app)
        start = events[0].body
        assert start["identity"]["subject"] == "alice@example.com" and start["attributes"]["replication"] == mode
        decision = next(e.body for e in events if e.kind == "policy_decision")
        assert (decision["rule"], decision["action"], decision["reason"]) == ("replication", "deny",
                                                                              REPLICATION_REFUSED)
        assert decision["attributes"] == {"replication": mode}
        error = next(m for m in messages(events, "server") if m["type"] == "ErrorResponse")
        assert error["error_code"] == "0A000" and error["attributes"]["origin"] == "proxy"
        assert events[-1].body["reason"] == "policy"


def test_a_target_asking_for_gss_or_sspi_is_refused_with_what_to_use_instead():
    from ingest.protocols.postgres import messages as m
    from proxy.postgres.upstream_auth import UpstreamAuthError, UpstreamLogin

    for method in ("GSS", "SSPI"):
        with pytest.raises(UpstreamAuthError, match=f"asks for {method} authentication, which the proxy does not "
                                                    "support; give the proxy's upstream user a password"):
            UpstreamLogin("svc", "pw").respond(m.AuthenticationRequest(method))
