"""The PostgreSQL front end on the proxy core, driven through the core's commands, without sockets."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path

import pytest
import scramp

from ingest.protocols.postgres import MessageReader
from ingest.protocols.postgres import messages as m
from ingest.recorder import RecorderUnavailable
from ingest.settings import Table
from proxy.core.commands import Close, OpenUpstream, Send, SendOnce, VerifyToken
from proxy.core.session import Session
from proxy.identity import Identity
from proxy.postgres.frontend import PostgresProtocol
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


def protocol(**keys) -> PostgresProtocol:
    raw = {"name": "db", "protocol": "postgres", "listen": "127.0.0.1:0",
           "upstream": "postgresql://svc@db.internal:5433/app", "upstream_tls": "disable", **keys}
    table = Table(Path("/x/custody.toml"), "proxy.0", raw)
    return PostgresProtocol.from_settings(ProxySettings.from_table(table), False)


def new_session(pg: PostgresProtocol | None = None) -> tuple[Session, FakeRecording]:
    recording = FakeRecording()
    return Session(protocol=pg or protocol(), recording=recording, source_address="10.0.0.9:5555"), recording


def sent(commands, side: str) -> bytes:
    return b"".join(c.data for c in commands if isinstance(c, Send) and c.side == side)


def only(commands, kind):
    [command] = [c for c in commands if isinstance(c, kind)]
    return command


def upstream_greeting(process_id: int = 4242, secret: bytes = b"real") -> bytes:
    return (m.authentication_ok() + b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00"
            + m.backend_key_data(process_id, secret) + m.ready_for_query("I"))


def log_in(session: Session, user: str = "alice@example.com", extra: bytes = b"") -> list:
    """Startup, password (+ `extra` in the same read), token verified, upstream opened: the startup it sends."""
    session.start()
    commands = session.data("client", m.startup_message({"user": user, "application_name": "psql"}))
    assert sent(commands, "client") == m.authentication_cleartext_password()
    verify = only(session.data("client", m.password_message("the-token") + extra), VerifyToken)
    assert verify.token == "the-token"
    return session.completed(verify, ALICE)


def ready_session(pg: PostgresProtocol | None = None) -> tuple[Session, FakeRecording, PostgresProtocol]:
    pg = pg or protocol()
    session, recording = new_session(pg)
    opening = only(log_in(session), OpenUpstream)
    assert (opening.host, opening.port) == ("db.internal", 5433)
    startup = sent(session.completed(opening, None), "server")
    parameters = m.decode_startup_message(startup[4:]).parameters
    assert parameters == {"user": "svc", "database": "app", "application_name": "psql"}
    session.data("server", upstream_greeting())
    assert session.front.phase == "relay"
    return session, recording, pg


def test_startup_records_session_start_first_and_hides_secrets():
    session, recording, pg = ready_session()
    kinds = [kind for kind, _ in recording.events]
    assert kinds[0] == "session_start" and set(kinds[1:]) == {"frames"}
    start = recording.events[0][1]
    assert start["identity"]["subject"] == "alice@example.com" and start["upstream"] == "db.internal:5433/app"
    assert start["protocol"] == "postgres" and start["client_application"] == "psql"
    everything = repr(recording.events)
    assert "the-token" not in everything and "real" not in everything and "svc" not in everything
    assert len(pg.cancel_keys) == 1


def test_client_gets_the_proxys_cancel_key_and_the_registry_maps_it_to_the_real_one():
    pg = protocol()
    session, _ = new_session(pg)
    session.completed(only(log_in(session), OpenUpstream), None)
    greeting = MessageReader("server").feed(sent(session.data("server", upstream_greeting()), "client"))
    key = m.decode_backend_key_data(next(x for x in greeting if x.type == "BackendKeyData").payload)
    assert (key.process_id, key.secret) != (4242, b"real")
    target = pg.cancel_keys.lookup(key.process_id, key.secret)
    assert (target.host, target.port, target.process_id, target.secret) == ("db.internal", 5433, 4242, b"real")
    assert pg.cancel_keys.lookup(key.process_id, b"xxxx") is None


def test_a_cancel_connection_forwards_the_real_key_and_records_only_in_the_cancelled_session():
    session, recording, pg = ready_session()
    [(process_id, (secret, _))] = pg.cancel_keys._targets.items()
    canceller, canceller_recording = new_session(pg)
    canceller.start()
    commands = canceller.data("client", m.cancel_request(process_id, secret))
    assert only(commands, SendOnce) == SendOnce("db.internal", 5433, m.cancel_request(4242, b"real"))
    assert commands[-1] == Close("cancel") and canceller_recording.events == []
    cancel = recording.events[-1][1]["messages"][0]
    assert cancel["type"] == "CancelRequest" and cancel["data"] == b"" and "real" not in repr(cancel)


def test_relay_records_before_it_forwards():
    session, recording, _ = ready_session()
    query = m.query("SELECT 1")
    assert session.data("client", query) == [Send("server", query)]
    kind, body = recording.events[-1]
    assert kind == "frames" and body["messages"][0]["statement"] == "SELECT 1"
    assert body["messages"][0]["operation"] == "statement" and body["messages"][0]["text"] == "SELECT 1"


def test_a_query_sent_before_login_completes_waits_and_is_relayed_once_ready():
    """Clients may pipeline a query right behind the password; it must not run before the session is ready."""
    session, recording = new_session()
    early = m.query("SELECT 'early'")
    opening = only(log_in(session, extra=early), OpenUpstream)
    assert early not in sent(session.completed(opening, None), "server")
    assert early in sent(session.data("server", upstream_greeting()), "server")
    statements = [msg.get("statement") for kind, body in recording.events if kind == "frames" for msg in body["messages"]]
    assert "SELECT 'early'" in statements


def test_bytes_sent_while_the_token_is_checked_wait_behind_it_in_order():
    session, recording = new_session()
    session.start()
    session.data("client", m.startup_message({"user": "alice@example.com"}))
    verify = only(session.data("client", m.password_message("t")), VerifyToken)
    assert session.data("client", m.query("SELECT 'a'")) == [] and session.data("client", m.query("SELECT 'b'")) == []
    opening = only(session.completed(verify, ALICE), OpenUpstream)
    session.completed(opening, None)
    relayed = sent(session.data("server", upstream_greeting()), "server")
    assert relayed == m.query("SELECT 'a'") + m.query("SELECT 'b'")


def test_a_message_split_across_reads_is_forwarded_once_complete():
    session, recording, _ = ready_session()
    query = m.query("SELECT 2")
    assert session.data("client", query[:3]) == []
    assert session.data("client", query[3:] + query) == [Send("server", query + query)]


def test_fail_closed_sends_nothing_upstream():
    session, recording, _ = ready_session()
    recording.refuse = True
    commands = session.data("client", m.query("DROP TABLE important"))
    assert not [c for c in commands if isinstance(c, Send) and c.side == "server" and c.data != m.TERMINATE]
    error = m.decode_error_response(MessageReader("server").feed(sent(commands, "client"))[0].payload)
    assert error.code == "57P01" and "fail closed" in error.message
    assert commands[-1] == Close("recorder_failure") and session.is_closed


def test_fail_open_relays_anyway():
    session, recording, _ = ready_session(protocol(fail_open=True))
    recording.refuse = True
    query = m.query("SELECT 3")
    assert session.data("client", query) == [Send("server", query)]
    assert session.recording_failures == 1


def test_token_for_another_user_is_denied():
    session, recording = new_session()
    commands = log_in(session, user="postgres")
    assert commands[-1] == Close("auth_failed")
    error = m.decode_error_response(MessageReader("server").feed(sent(commands, "client"))[0].payload)
    assert error.code == "28P01" and error.message.endswith("user_mismatch")
    assert [k for k, _ in recording.events] == ["session_start", "frames", "frames", "frames", "policy_decision",
                                                "frames", "session_end"]
    assert recording.events[0][1]["identity"] is None


def test_cancel_only_connection_with_an_unknown_key_records_nothing():
    session, recording = new_session()
    session.start()
    commands = session.data("client", m.cancel_request(7, b"abcd"))
    assert commands[-1] == Close("cancel") and recording.events == [] and not any(
        isinstance(c, SendOnce) for c in commands)


def test_a_notification_names_the_notifying_sessions_proxy_pid():
    """psycopg compares NotificationResponse's pid with BackendKeyData's: it must be the pid the proxy gave."""
    session, recording, pg = ready_session()
    [(proxy_pid, _)] = pg.cancel_keys._targets.items()
    ours = sent(session.data("server", m.notification_response(4242, "jobs", "hi")), "client")
    [note] = MessageReader("server").feed(ours)
    assert m.decode_notification_response(note.payload).process_id == proxy_pid
    direct = sent(session.data("server", m.notification_response(999, "jobs", "hi")), "client")
    assert m.decode_notification_response(MessageReader("server").feed(direct)[0].payload).process_id == 999


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


def test_startup_parameters_cannot_claim_what_only_the_core_records():
    session, recording = new_session()
    session.start()
    session.data("client", m.startup_message({"user": "alice@example.com", "upstream_tls": "TLSv1.3",
                                              "upstream_cert_sha256": "00" * 32, "tls": "TLSv1.3", "token_exp": "x"}))
    verify = only(session.data("client", m.password_message("t")), VerifyToken)
    session.completed(only(session.completed(verify, ALICE), OpenUpstream), None)
    [start] = [body for kind, body in recording.events if kind == "session_start"]
    assert start["attributes"]["token_exp"] == "2030-01-01T00:00:00Z"
    assert not {"upstream_tls", "upstream_cert_sha256", "tls"} & set(start["attributes"])


def test_a_target_that_sends_bytes_after_agreeing_to_tls_is_a_protocol_error():
    session, recording = new_session(protocol(upstream_tls="require"))
    session.start()
    session.data("client", m.startup_message({"user": "alice@example.com"}))
    verify = only(session.data("client", m.password_message("t")), VerifyToken)
    opened = session.completed(only(session.completed(verify, ALICE), OpenUpstream), None)
    assert sent(opened, "server") == m.SSL_REQUEST
    assert not [kind for kind, _ in recording.events]  # SessionStart waits for the upstream's TLS
    out = session.data("server", b"S" + m.ready_for_query("I"))  # injected plaintext before the handshake
    assert any(isinstance(c, Close) for c in out)
    kinds = [kind for kind, _ in recording.events]
    assert kinds[0] == "session_start" and "protocol_error" in kinds and kinds[-1] == "session_end"


def test_a_repeated_server_message_gets_a_record_of_its_own_each_time():
    """Records of repeating messages are built once and copied: changing one must not change the next."""
    from ingest.protocols.postgres.protocol import Message
    from proxy.postgres import recording as rec

    description = Message("RowDescription", m.row_description(
        [m.FieldDescription(name, 0, 0, 23, 4, -1, 0) for name in ("aid", "abalance")]))
    first = rec.message_record(description, rec.PROXY_ORIGIN)
    first["attributes"]["redacted"] = "x"
    second = rec.message_record(description)
    assert second["attributes"] == {"columns": '["aid", "abalance"]', "type_oids": "[23, 23]"}
    assert second["data"] == description.data and second is not first
    assert first["attributes"]["origin"] == rec.PROXY_ORIGIN["origin"]
    complete = rec.message_record(Message("CommandComplete", m.command_complete("UPDATE 3")))
    assert (complete["command_tag"], complete["rows"], complete["outcome"]) == ("UPDATE 3", 3, "ok")
