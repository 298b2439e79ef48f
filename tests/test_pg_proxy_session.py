"""The proxy's session state machine and upstream login, without sockets."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import pytest
import scramp

from ingest.protocols.postgres import MessageReader
from ingest.protocols.postgres import messages as m
from ingest.recorder import RecorderUnavailable
from ingest.settings import Table
from proxy.identity import Identity
from proxy.postgres.cancel import CancelKeys
from proxy.postgres.session import (
    Close,
    ConnectUpstream,
    Phase,
    Ready,
    SendClient,
    SendUpstream,
    Session,
    VerifyToken,
)
from proxy.postgres.settings import PostgresSettings
from proxy.postgres.upstream_auth import UpstreamAuthError, UpstreamLogin, md5_password
from proxy.settings import ProxySettings

ALICE = Identity("alice@example.com", "alice@example.com", "alice@example.com", ("dba",),
                 "https://idp/", None, datetime(2030, 1, 1, tzinfo=timezone.utc))


class FakeRecording:
    session_id = "01900000-0000-7000-8000-000000000000"

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []
        self.refuse = False

    def record(self, kind: str, body: dict) -> None:
        if self.refuse:
            raise RecorderUnavailable("queue full")
        self.events.append((kind, body))


def settings(**keys) -> PostgresSettings:
    raw = {"name": "db", "protocol": "postgres", "listen": "127.0.0.1:0",
           "upstream": "postgresql://svc@db.internal:5433/app", **keys}
    table = Table(__import__("pathlib").Path("/x/custody.toml"), "proxy.0", raw)
    return PostgresSettings.from_config(ProxySettings("db", "postgres", raw["listen"], raw["upstream"], None, table))


def sent(actions, kind) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, kind))


def upstream_greeting(process_id: int = 4242, secret: bytes = b"real") -> bytes:
    return (m.authentication_ok() + b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00"
            + m.backend_key_data(process_id, secret) + m.ready_for_query("I"))


def ready_session(**keys) -> tuple[Session, FakeRecording, CancelKeys]:
    recording, keys_registry = FakeRecording(), CancelKeys()
    session = Session(settings=settings(**keys), recording=recording, cancel_keys=keys_registry,
                      source_address="10.0.0.9:5555")
    actions = session.client_data(m.startup_message({"user": "alice@example.com", "application_name": "psql"}))
    assert sent(actions, SendClient) == m.authentication_cleartext_password()
    assert session.client_data(m.password_message("the-token")) == [VerifyToken("the-token")]
    assert session.token_verified(ALICE) == [ConnectUpstream()]
    startup = sent(session.upstream_connected(), SendUpstream)
    parameters = m.decode_startup_message(startup[4:]).parameters
    assert parameters == {"user": "svc", "database": "app", "application_name": "psql"}
    actions = session.upstream_data(upstream_greeting())
    assert Ready() in actions and session.phase is Phase.RELAY
    return session, recording, keys_registry


def test_startup_records_session_start_first_and_hides_secrets():
    session, recording, keys = ready_session()
    kinds = [kind for kind, _ in recording.events]
    assert kinds[0] == "session_start" and set(kinds[1:]) == {"frames"}
    start = recording.events[0][1]
    assert start["identity"]["subject"] == "alice@example.com" and start["upstream"] == "db.internal:5433/app"
    everything = repr(recording.events)
    assert "the-token" not in everything and "real" not in everything and "svc" not in everything
    assert len(keys) == 1


def test_client_gets_the_proxys_cancel_key_and_the_registry_maps_it_to_the_real_one():
    recording, registry = FakeRecording(), CancelKeys()
    session = Session(settings=settings(), recording=recording, cancel_keys=registry, source_address="x")
    session.client_data(m.startup_message({"user": "alice@example.com"}))
    session.client_data(m.password_message("t"))
    session.token_verified(ALICE)
    session.upstream_connected()
    greeting = MessageReader("server").feed(sent(session.upstream_data(upstream_greeting()), SendClient))
    key = m.decode_backend_key_data(next(x for x in greeting if x.type == "BackendKeyData").payload)
    assert (key.process_id, key.secret) != (4242, b"real")
    target = registry.lookup(key.process_id, key.secret)
    assert (target.host, target.port, target.process_id, target.secret) == ("db.internal", 5433, 4242, b"real")
    assert registry.lookup(key.process_id, b"xxxx") is None


def test_relay_records_before_it_forwards():
    session, recording, _ = ready_session()
    query = m.query("SELECT 1")
    assert session.client_data(query) == [SendUpstream(query)]
    kind, body = recording.events[-1]
    assert kind == "frames" and body["messages"][0]["statement"] == "SELECT 1"


def test_a_query_sent_before_login_completes_waits_and_is_relayed_once_ready():
    """Clients may pipeline a query right behind the password; it must not run before the session is ready."""
    recording = FakeRecording()
    session = Session(settings=settings(), recording=recording, cancel_keys=CancelKeys(), source_address="x")
    session.client_data(m.startup_message({"user": "alice@example.com"}))
    early = m.query("SELECT 'early'")
    assert session.client_data(m.password_message("t") + early) == [VerifyToken("t")]
    assert session.token_verified(ALICE) == [ConnectUpstream()]
    assert early not in sent(session.upstream_connected(), SendUpstream)
    assert early in sent(session.upstream_data(upstream_greeting()), SendUpstream)
    statements = [msg.get("statement") for kind, body in recording.events if kind == "frames" for msg in body["messages"]]
    assert "SELECT 'early'" in statements


def test_a_message_split_across_reads_is_forwarded_once_complete():
    session, recording, _ = ready_session()
    query = m.query("SELECT 2")
    assert session.client_data(query[:3]) == []
    assert session.client_data(query[3:] + query) == [SendUpstream(query + query)]


def test_fail_closed_sends_nothing_upstream():
    session, recording, _ = ready_session()
    recording.refuse = True
    actions = session.client_data(m.query("DROP TABLE important"))
    assert not [a for a in actions if isinstance(a, SendUpstream) and a.data != m.TERMINATE]
    error = m.decode_error_response(MessageReader("server").feed(sent(actions, SendClient))[0].payload)
    assert error.code == "57P01" and "fail closed" in error.message
    assert actions[-1] == Close("recorder_failure") and session.phase is Phase.CLOSED


def test_fail_open_relays_anyway():
    session, recording, _ = ready_session(fail_open=True)
    recording.refuse = True
    query = m.query("SELECT 3")
    assert session.client_data(query) == [SendUpstream(query)]
    assert session.recording_failures == 1


def test_token_for_another_user_is_denied():
    recording = FakeRecording()
    session = Session(settings=settings(), recording=recording, cancel_keys=CancelKeys(), source_address="x")
    session.client_data(m.startup_message({"user": "postgres"}))
    session.client_data(m.password_message("t"))
    actions = session.token_verified(ALICE)
    assert actions[-1] == Close("auth_failed")
    assert [k for k, _ in recording.events] == ["session_start", "frames", "frames", "frames", "policy_decision",
                                                "frames", "session_end"]
    assert recording.events[0][1]["identity"] is None


def test_cancel_only_connection_records_nothing():
    recording = FakeRecording()
    session = Session(settings=settings(), recording=recording, cancel_keys=CancelKeys(), source_address="x")
    actions = session.client_data(m.cancel_request(7, b"abcd"))
    assert actions[-1] == Close("cancel") and recording.events == []


# --- upstream login ---------------------------------------------------------------


def test_scram_sha_256_login_against_a_scram_server():
    mechanism = scramp.ScramMechanism("SCRAM-SHA-256")
    auth_info = mechanism.make_auth_info("s3cret")
    server = mechanism.make_server(lambda username: auth_info)
    login = UpstreamLogin("svc", "s3cret")

    first = login.respond(m.AuthenticationRequest("SASL", mechanisms=("SCRAM-SHA-256",)))
    initial = m.decode_sasl_initial_response(first[5:])
    server.set_client_first(initial.data.decode())
    final = login.respond(m.AuthenticationRequest("SASLContinue", data=server.get_server_first().encode()))
    server.set_client_final(final[5:].decode())
    assert login.respond(m.AuthenticationRequest("SASLFinal", data=server.get_server_final().encode())) is None
    assert login.respond(m.AuthenticationRequest("Ok")) is None


def test_scram_refuses_a_server_that_skips_its_proof():
    login = UpstreamLogin("svc", "s3cret")
    login.respond(m.AuthenticationRequest("SASL", mechanisms=("SCRAM-SHA-256",)))
    with pytest.raises(UpstreamAuthError, match="before proving"):
        login.respond(m.AuthenticationRequest("Ok"))


def test_md5_and_missing_password():
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5(b"pwsvc").hexdigest()
    assert md5_password("svc", "pw", salt) == "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
    with pytest.raises(UpstreamAuthError, match="none is configured"):
        UpstreamLogin("svc", None).respond(m.AuthenticationRequest("MD5Password", salt=salt))
    with pytest.raises(UpstreamAuthError, match="does not support"):
        UpstreamLogin("svc", "pw").respond(m.AuthenticationRequest("GSS"))
