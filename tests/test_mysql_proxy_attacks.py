"""Hostile clients against the MySQL proxy: forged, stale and other users' tokens, malformed packets,
sequence-id violations, oversized packets, socket fuzz. Each attack ends only its own connection,
with a native MySQL error and the right events; a bystander session lives through all of them.
"""

from __future__ import annotations

import socket
import uuid

import pymysql
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.protocols.mysql import messages as m
from ingest.protocols.mysql.packets import PacketReader, packet
from mysql_fixtures import make_target, proxy_entry
from pg_fixtures import EventLog, messages, start_proxy
from test_pg_proxy_attacks import TOKENS

PLAIN = 1


@pytest.fixture(scope="module")
def target():
    target = make_target()
    yield target
    target.drop()


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory, target):
    running = start_proxy(tmp_path_factory.mktemp("custody"), broker,
                          extra_proxies=proxy_entry(target, extra="max_message_bytes = 65536\nstartup_timeout = 2\n"))
    running.events = EventLog.open(running)
    yield running
    running.events.close()
    running.background.stop()


def new_app(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def bystander(proxy, target):
    host, port = proxy.address(PLAIN)
    conn = pymysql.connect(host=host, port=port, user="alice@example.com", password=proxy.token(),
                           database=target.database, program_name=new_app("bystander"))
    yield conn
    with conn.cursor() as cur:
        cur.execute("SELECT 'still here'")
        assert cur.fetchone() == ("still here",)
    conn.close()


@pytest.mark.parametrize("attack", sorted(TOKENS))
def test_bad_tokens_get_access_denied_and_are_recorded(proxy, target, bystander, attack):
    make, reason = TOKENS[attack]
    app = new_app(attack)
    host, port = proxy.address(PLAIN)
    with pytest.raises(pymysql.err.OperationalError) as refused:
        pymysql.connect(host=host, port=port, user="alice@example.com", password=make(proxy),
                        database=target.database, program_name=app)
    assert refused.value.args[0] == 1045 and reason in refused.value.args[1]
    events = proxy.events.session(app)
    assert events[0].kind == "session_start" and events[0].body["identity"] is None
    assert events[0].body["protocol"] == "mysql"
    decision = next(e.body for e in events if e.kind == "policy_decision")
    assert (decision["rule"], decision["action"]) == ("authentication", "deny")
    assert decision["reason"].startswith(f"{reason}: ")
    errors = [x for x in messages(events, "server") if x["type"] == "ERR"]
    assert [(x["error_code"], x["attributes"]["errno"]) for x in errors] == [("28000", "1045")]
    assert events[-1].body["reason"] == "auth_failed"


# --- bad bytes -------------------------------------------------------------------------------------

class Raw:
    """A raw MySQL client, logged in through the proxy with the clear-password switch."""

    def __init__(self, proxy, target, app: str) -> None:
        self.sock = socket.create_connection(proxy.address(PLAIN), timeout=10)
        self.reader = PacketReader("server")
        self.read()  # the handshake
        caps = (m.CLIENT_PROTOCOL_41 | m.CLIENT_SECURE_CONNECTION | m.CLIENT_PLUGIN_AUTH | m.CLIENT_CONNECT_WITH_DB
                | m.CLIENT_CONNECT_ATTRS | m.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA)
        self.sock.sendall(packet(1, m.handshake_response(caps, 1 << 24, 45, "alice@example.com", b"",
                                                         target.database, "mysql_native_password",
                                                         {"program_name": app})))
        switch = self.read()
        assert switch.payload[:1] == b"\xfe"
        self.sock.sendall(packet(switch.seq + 1, proxy.token().encode() + b"\x00"))
        assert self.read().payload[:1] == b"\x00"

    def read(self):
        while True:
            packets = self.reader.feed(self.sock.recv(65536) or b"")
            if packets:
                return packets[0]

    def error_then_closed(self) -> m.Err:
        received = []
        while data := self.sock.recv(65536):
            received += self.reader.feed(data)
        self.sock.close()
        errors = [p for p in received if p.payload[:1] == b"\xff"]
        assert errors, f"no ERR, got {received}"
        return m.decode_err(errors[-1].payload)


BAD_INPUTS = {
    "command_out_of_sequence": packet(5, b"\x03SELECT 1"),
    "empty_command": packet(0, b""),
    "oversized": (1 << 20).to_bytes(3, "little") + b"\x00" + b"\x03SELECT",
    "truncated_execute": packet(0, b"\x17\x01"),
    "execute_with_bad_lenenc": packet(0, b"\x16SELECT ?") + packet(0, b"\x17"),
}


@pytest.mark.parametrize("attack", sorted(BAD_INPUTS))
def test_malformed_packets_end_that_connection_with_a_protocol_error(proxy, target, bystander, attack):
    app = new_app(attack)
    raw = Raw(proxy, target, app)
    raw.sock.sendall(BAD_INPUTS[attack])
    error = raw.error_then_closed()
    assert (error.code, error.sqlstate) == (1158, "08S01")
    events = proxy.events.session(app)
    protocol_error = next(e.body for e in events if e.kind == "protocol_error")
    assert protocol_error["code"] == "08S01" and protocol_error["message"]
    assert events[-1].body["reason"] == "protocol_error"


def test_unknown_and_replication_commands_are_refused_and_the_session_goes_on(proxy, target, bystander):
    raw = Raw(proxy, target, new_app("refused"))
    for command in (b"\x99", b"\x12" + b"\x00" * 10, b"\x11alice\x00"):  # unknown, COM_BINLOG_DUMP, COM_CHANGE_USER
        raw.sock.sendall(packet(0, command))
        answer = raw.read()
        assert (answer.seq, m.decode_err(answer.payload).code) == (1, 1235)
    raw.sock.sendall(packet(0, b"\x0e"))  # COM_PING
    assert raw.read().payload[:1] == b"\x00"
    raw.sock.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(noise=st.binary(min_size=1, max_size=300), login=st.booleans())
def test_socket_fuzz_never_hurts_the_proxy(proxy, target, bystander, noise, login):
    if login:
        raw = Raw(proxy, target, new_app("fuzz"))
        sock = raw.sock
    else:
        sock = socket.create_connection(proxy.address(PLAIN), timeout=10)
        sock.recv(65536)
    sock.settimeout(3)
    try:
        sock.sendall(noise)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    except OSError:
        pass
    finally:
        sock.close()
    with bystander.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
