"""The protocol-neutral proxy core (proxy.core.session), without sockets and without PostgreSQL.

A minimal line protocol exists only here: the proxy greets with "HELLO", the
client sends "LOGIN <user> <token>" (or "STARTTLS" first), then lines; each
line is an SSH-like `command` operation that the policy decides on, and the
target echoes. The tests drive `Session` with the inputs the asyncio adapter
would feed it and look at the commands it returns and the events it records.
"""

from __future__ import annotations

import ssl
from datetime import datetime, timezone
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from ingest.protocols import ProtocolViolation
from ingest.recorder import RecorderUnavailable
from proxy.approvals import ApprovalOutcome, ApprovalRequest
from proxy.core import records
from proxy.core.commands import (
    CLIENT,
    SERVER,
    AwaitApproval,
    Close,
    Command,
    OpenUpstream,
    Send,
    SetTimer,
    StartTLS,
    TLSFailed,
    TLSInfo,
    UpstreamUnavailable,
    VerifyToken,
)
from proxy.core.frontend import Ending, FrontEnd, Said, Steps
from proxy.core.policy import PolicyRuntime
from proxy.core.session import Session
from proxy.core.settings import ListenerSettings
from proxy.identity import AuthenticationError, Identity, Reason
from proxy.policy import Decision, PolicyHolder
from proxy.policy.operation import Operation

SESSION_ID = "01900000-0000-7000-8000-000000000000"
SOURCE = "10.0.0.9:5555"
HELLO = b"HELLO\n"
LOGIN = b"LOGIN alice tok\n"
EXIT = b"EXIT\n"
ALICE = Identity("alice-sub", "alice", "alice@example.com", ("dev",), "https://idp/", "jti-1",
                 datetime(2030, 1, 1, tzinfo=timezone.utc))
BOB = Identity("bob-sub", "bob", "bob@example.com", ("ops",), "https://idp/", None,
               datetime(2030, 1, 1, tzinfo=timezone.utc))

POLICY = """
hold_timeout_seconds = 60

[[rule]]
name = "block-rm"
action = "block"
message = "rm is not allowed"
protocols = ["ssh"]
operations = ["command"]
text = '^rm\\b'

[[rule]]
name = "hold-reboot"
action = "hold"
message = "reboot needs approval by ops"
protocols = ["ssh"]
operations = ["command"]
text = '^reboot\\b'
approvers = ["ops"]
"""


# --- the test-only line protocol -------------------------------------------------------


def _proxy_said(data: bytes, kind: str) -> Said:
    return Said(data, [records.raw_message(kind, data, records.PROXY_ORIGIN)])


class LineFrontEnd(FrontEnd):
    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.phase = "login"
        self.buffer = b""
        self.upstream_open = False
        self.closed_calls = 0

    def started(self) -> Steps:
        yield self.session.say(_proxy_said(HELLO, "greeting"))

    def client_data(self, data: bytes) -> Steps:
        self.buffer += data
        while b"\n" in self.buffer and not self.session.is_closed:
            line, _, self.buffer = self.buffer.partition(b"\n")
            if self.phase == "login":
                yield from self._login(line)
            else:
                yield from self._command(line)

    def _login(self, line: bytes) -> Steps:
        session = self.session
        if line == b"STARTTLS":
            session.record_messages(CLIENT, [records.raw_message("starttls", line)], 1)
            yield StartTLS(CLIENT, ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
            return
        parts = line.split(b" ")
        if len(parts) != 3 or parts[0] != b"LOGIN":
            raise ProtocolViolation("bad_login", "expected LOGIN <user> <token>")
        session.record_messages(CLIENT, [records.raw_message("login", b"LOGIN " + parts[1] + b" <token>")], 1)
        self.phase = "verifying"
        identity = yield from session.authenticate(parts[2].decode(), parts[1].decode())
        if identity is None:
            return
        self.phase = "connecting"
        yield OpenUpstream("web.internal", 22)
        self.upstream_open = True
        yield session.ready()
        self.phase = "relay"

    def _command(self, line: bytes) -> Steps:
        session = self.session
        if line == b"CRASH":
            raise RuntimeError("a bug in the front end")
        if not line.isascii() or b"\x00" in line:
            raise ProtocolViolation("bad_line", "a line must be ASCII text without NUL")
        session.record_messages(CLIENT, [records.raw_message("line", line + b"\n")], 1)
        verdict = yield from session.check(Operation("ssh", "command", line.decode()))
        if verdict.allowed:
            yield Send(SERVER, line + b"\n")
        else:
            yield session.say(_proxy_said(f"DENIED {verdict.reason}\n".encode(), "denied"))

    def server_data(self, data: bytes) -> Steps:
        self.session.record_messages(SERVER, [records.raw_message("output", data)], 1)
        yield Send(CLIENT, data)

    def goodbye(self, ending: Ending) -> Said:
        return _proxy_said(f"BYE {ending.reason} {ending.code}: {ending.text}\n".encode(), "bye")

    def farewell_upstream(self, reason: str) -> bytes | None:
        return EXIT if self.upstream_open and reason != "server_disconnect" else None

    def hold_notice(self, request: ApprovalRequest, decision: Decision) -> Said:
        return _proxy_said(f"HOLD {request.request_id} {decision.message}\n".encode(), "hold")

    def closed(self) -> None:
        self.closed_calls += 1


class LineProtocol:
    name = "ssh"
    upstream = "web.internal:22"

    def __init__(self, **listener) -> None:
        self.listener = ListenerSettings(**{
            "name": "web", "listen_host": "127.0.0.1", "listen_port": 0, "tls": None,
            "startup_timeout": 10.0, "connect_timeout": 5.0, "fail_open": False, **listener})

    def front_end(self, session: Session) -> LineFrontEnd:
        return LineFrontEnd(session)


class FakeRecording:
    session_id = SESSION_ID

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []
        self.refuse = False
        self.refused = 0

    def record(self, kind: str, body: dict) -> None:
        if self.refuse:
            self.refused += 1
            raise RecorderUnavailable("the recorder's queue is full")
        self.events.append((kind, body))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]

    def of(self, kind: str) -> list[dict]:
        return [body for k, body in self.events if k == kind]

    def frames(self) -> list[tuple[str, bytes]]:
        """(direction, data) of every recorded message, in order."""
        return [(body["direction"], message["data"]) for kind, body in self.events if kind == "frames"
                for message in body["messages"]]


# --- helpers ---------------------------------------------------------------------------


def make(policy: PolicyRuntime | None = None, clock=None, **listener) -> tuple[Session, FakeRecording]:
    recording = FakeRecording()
    extra = {"clock": clock} if clock is not None else {}
    session = Session(protocol=LineProtocol(**listener), recording=recording, source_address=SOURCE,
                      policy=policy, **extra)
    return session, recording


def only(commands: list[Command], kind: type) -> Command:
    found = [c for c in commands if type(c) is kind]
    assert len(found) == 1, commands
    return found[0]


def sent(commands: list[Command], side: str) -> bytes:
    return b"".join(c.data for c in commands if type(c) is Send and c.side == side)


def login(session: Session, identity: Identity = ALICE, first: bytes = LOGIN) -> list[Command]:
    """Start, log in as alice, open the upstream; the commands of the upstream's completion."""
    assert session.start() == [SetTimer("startup", 10.0), Send(CLIENT, HELLO)]
    verify = only(session.data(CLIENT, first), VerifyToken)
    assert verify == VerifyToken("tok")
    open_upstream = only(session.completed(verify, identity), OpenUpstream)
    assert open_upstream == OpenUpstream("web.internal", 22)
    out = session.completed(open_upstream, None)
    assert out[0] == SetTimer("startup", None)
    return out


@pytest.fixture
def policy(tmp_path: Path) -> PolicyRuntime:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return PolicyRuntime(PolicyHolder(path), PrivateKey.generate().public_key, "proxy+key")


def held(session: Session, data: bytes = b"reboot now\n") -> tuple[AwaitApproval, list[Command]]:
    out = session.data(CLIENT, data)
    wait = only(out, AwaitApproval)
    assert out[-1] is wait
    return wait, out


# --- identity --------------------------------------------------------------------------


def test_verified_token_records_session_start_first_then_the_backlog_in_order():
    session, recording = make()
    session.start()
    verify = only(session.data(CLIENT, LOGIN), VerifyToken)
    assert recording.events == []  # nothing is recorded before the identity is known
    out = session.completed(verify, ALICE)
    assert [type(c) for c in out] == [SetTimer, OpenUpstream]
    assert out[0].name == "identity" and out[0].seconds > 0  # the session ends with its token
    assert out[1] == OpenUpstream("web.internal", 22)

    kind, start = recording.events[0]
    assert kind == "session_start"
    assert start["identity"] == ALICE.to_avro()
    assert start["protocol"] == "ssh"
    assert start["target"] == "web"
    assert start["upstream"] == "web.internal:22"
    assert start["source_address"] == SOURCE
    assert start["client_cert_fingerprint"] is None
    assert start["attributes"] == {"token_exp": "2030-01-01T00:00:00Z"}
    assert recording.kinds() == ["session_start", "frames", "frames"]
    assert recording.frames() == [(SERVER, HELLO), (CLIENT, b"LOGIN alice <token>")]
    assert session.identity == ALICE


def test_user_mismatch_is_refused_and_ends_the_session():
    session, recording = make()
    session.start()
    verify = only(session.data(CLIENT, b"LOGIN bob tok\n"), VerifyToken)
    out = session.completed(verify, ALICE)

    assert [type(c) for c in out] == [Send, Close]
    assert out[0].side == CLIENT and out[0].data.startswith(b"BYE auth_failed user_mismatch: ")
    assert out[1] == Close("auth_failed")
    assert recording.kinds() == ["session_start", "frames", "frames", "policy_decision", "frames", "session_end"]
    assert recording.of("session_start")[0]["identity"] is None
    [decision] = recording.of("policy_decision")
    assert (decision["rule"], decision["action"]) == ("authentication", "deny")
    assert decision["reason"].startswith("user_mismatch: ")
    assert decision["attributes"] == {"token_subject": "alice-sub", "token_issuer": "https://idp/"}
    assert recording.of("session_end")[0]["reason"] == "auth_failed"
    assert session.identity is None and session.is_closed
    assert session.front.closed_calls == 1


def test_authentication_error_is_refused_with_its_reason_code():
    session, recording = make()
    session.start()
    verify = only(session.data(CLIENT, LOGIN), VerifyToken)
    out = session.completed(verify, AuthenticationError(Reason.EXPIRED, "the token expired"))

    assert out == [Send(CLIENT, b"BYE auth_failed expired: the token expired\n"), Close("auth_failed")]
    [decision] = recording.of("policy_decision")
    assert (decision["rule"], decision["action"]) == ("authentication", "deny")
    assert decision["reason"] == "expired: the token expired"
    assert recording.of("session_end")[0]["reason"] == "auth_failed"
    assert not any(type(c) is OpenUpstream for c in out)


def test_client_tls_goes_into_session_start():
    session, recording = make()
    session.start()
    tls = only(session.data(CLIENT, b"STARTTLS\n"), StartTLS)
    assert tls.side == CLIENT
    assert session.completed(tls, TLSInfo("TLSv1.3", "ab" * 32)) == []
    verify = only(session.data(CLIENT, LOGIN), VerifyToken)
    session.completed(verify, ALICE)
    [start] = recording.of("session_start")
    assert start["client_cert_fingerprint"] == "ab" * 32
    assert start["attributes"]["tls"] == "TLSv1.3"


def test_failed_client_tls_is_a_protocol_error_the_client_is_not_told():
    session, recording = make()
    session.start()
    tls = only(session.data(CLIENT, b"STARTTLS\n"), StartTLS)
    out = session.failed(tls, TLSFailed("handshake failure"))
    assert out == [Close("protocol_error")]  # nothing in plaintext after TLS was agreed
    [error] = recording.of("protocol_error")
    assert "TLS handshake failed: handshake failure" in error["message"]
    assert recording.of("session_end")[0]["reason"] == "protocol_error"


# --- blocking commands pause their lane -------------------------------------------------


def test_client_data_waits_behind_token_verification_then_runs_in_order():
    session, recording = make()
    session.start()
    verify = only(session.data(CLIENT, LOGIN + b"ls\n"), VerifyToken)
    assert session.data(CLIENT, b"pwd\n") == []
    assert session.data(CLIENT, b"id\n") == []
    assert recording.events == []

    # verified: the handler reads on to OpenUpstream, which blocks again; the lines still wait
    open_upstream = only(session.completed(verify, ALICE), OpenUpstream)
    assert (CLIENT, b"ls\n") not in recording.frames()
    assert session.data(CLIENT, b"whoami\n") == []

    out = session.completed(open_upstream, None)
    assert out == [SetTimer("startup", None), Send(SERVER, b"ls\n"), Send(SERVER, b"pwd\n"),
                   Send(SERVER, b"id\n"), Send(SERVER, b"whoami\n")]
    client_lines = [data for side, data in recording.frames() if side == CLIENT]
    assert client_lines == [b"LOGIN alice <token>", b"ls\n", b"pwd\n", b"id\n", b"whoami\n"]


def test_a_completion_nobody_waits_for_does_nothing():
    session, recording = make()
    login(session)
    before = list(recording.events)
    assert session.completed(VerifyToken("tok"), ALICE) == []
    assert session.failed(OpenUpstream("web.internal", 22), UpstreamUnavailable("late")) == []
    assert recording.events == before


def test_server_data_keeps_flowing_while_the_client_lane_waits_for_a_hold(policy):
    session, recording = make(policy)
    login(session)
    wait, _ = held(session)
    assert session.data(CLIENT, b"ls\n") == []
    assert session.data(SERVER, b"uptime 3 days\n") == [Send(CLIENT, b"uptime 3 days\n")]
    assert recording.frames()[-1] == (SERVER, b"uptime 3 days\n")
    assert (CLIENT, b"ls\n") not in recording.frames()
    approve = ApprovalOutcome(wait.request.request_id, "approve", BOB.to_avro(), "fine")
    assert session.completed(wait, approve) == [Send(SERVER, b"reboot now\n"), Send(SERVER, b"ls\n")]


# --- policy: holds and blocks -----------------------------------------------------------


def test_hold_then_approval_relays_the_held_line_then_the_waiting_ones(policy):
    session, recording = make(policy)
    login(session)
    wait, out = held(session, b"reboot now\nls\n")
    request = wait.request
    assert out == [Send(CLIENT, f"HOLD {request.request_id} reboot needs approval by ops\n".encode()), wait]
    assert (request.session_id, request.target, request.statement) == (SESSION_ID, "web", "reboot now")
    assert (request.rule, request.approvers, request.proxy_key_id) == ("hold-reboot", ("ops",), "proxy+key")
    assert request.requester == ALICE.to_avro()
    [hold] = recording.of("policy_decision")
    assert (hold["rule"], hold["action"], hold["request_id"]) == ("hold-reboot", "hold", request.request_id)
    assert hold["statement"] == "reboot now"
    assert hold["attributes"] == {"approvers": "ops", "expires_at": request.expires_at}

    assert session.data(CLIENT, b"pwd\n") == []
    assert (CLIENT, b"ls\n") not in recording.frames()
    out = session.completed(wait, ApprovalOutcome(request.request_id, "approve", BOB.to_avro(), "planned"))
    assert out == [Send(SERVER, b"reboot now\n"), Send(SERVER, b"ls\n"), Send(SERVER, b"pwd\n")]
    approve = recording.of("policy_decision")[1]
    assert (approve["action"], approve["request_id"], approve["reason"]) == ("approve", request.request_id, "planned")
    assert approve["approver"] == BOB.to_avro()
    assert approve["statement"] == "reboot now"


def test_hold_then_denial_refuses_the_held_line_and_relays_the_waiting_ones(policy):
    session, recording = make(policy)
    login(session)
    wait, _ = held(session)
    request_id = wait.request.request_id
    assert session.data(CLIENT, b"ls\n") == []
    out = session.completed(wait, ApprovalOutcome(request_id, "deny", BOB.to_avro(), "not today"))
    assert out == [Send(CLIENT, f"DENIED request {request_id}: denied by bob-sub: not today\n".encode()),
                   Send(SERVER, b"ls\n")]
    deny = recording.of("policy_decision")[1]
    assert (deny["action"], deny["request_id"], deny["reason"]) == ("deny", request_id, "not today")
    assert deny["approver"] == BOB.to_avro()
    assert not session.is_closed


def test_hold_that_expires_is_denied(policy):
    session, recording = make(policy)
    login(session)
    wait, _ = held(session)
    request = wait.request
    assert session.data(CLIENT, b"ls\n") == []
    out = session.completed(wait, ApprovalOutcome(request.request_id, "expired", None, ""))
    reason = f"no decision by {request.expires_at}"
    assert out == [Send(CLIENT, f"DENIED request {request.request_id}: nobody approved it in time: {reason}\n"
                          .encode()), Send(SERVER, b"ls\n")]
    deny = recording.of("policy_decision")[1]
    assert (deny["action"], deny["request_id"], deny["reason"]) == ("deny", request.request_id, reason)
    assert deny["approver"] is None
    assert deny["attributes"] == {"expired": "true"}


def test_block_rule_refuses_at_once_without_waiting(policy):
    session, recording = make(policy)
    login(session)
    out = session.data(CLIENT, b"rm -rf /\nls\n")
    assert out == [Send(CLIENT, b"DENIED rm is not allowed\n"), Send(SERVER, b"ls\n")]
    [block] = recording.of("policy_decision")
    assert (block["rule"], block["action"], block["statement"]) == ("block-rm", "block", "rm -rf /")
    assert block["request_id"] is None


def test_without_a_policy_everything_is_allowed():
    session, recording = make()
    login(session)
    assert session.data(CLIENT, b"rm -rf /\n") == [Send(SERVER, b"rm -rf /\n")]
    assert recording.of("policy_decision") == []


# --- recording: fail closed and fail open -----------------------------------------------


def test_fail_closed_ends_the_session_and_relays_nothing_more():
    session, recording = make()
    login(session)
    recording.refuse = True
    out = session.data(CLIENT, b"ls\n")
    assert out[0] == Send(CLIENT, b"BYE recorder_failure recorder_failure: the session cannot be recorded, "
                                  b"so it is closed (fail closed)\n")
    assert out[-1] == Close("recorder_failure")
    assert Send(SERVER, b"ls\n") not in out
    assert session.is_closed and session.front.closed_calls == 1

    recording.refuse = False
    assert session.data(CLIENT, b"pwd\n") == []
    assert session.data(SERVER, b"output\n") == []
    assert session.closed(CLIENT) == []
    assert session.shutdown() == []
    assert "session_end" not in recording.kinds()
    assert (CLIENT, b"pwd\n") not in recording.frames()


def test_fail_closed_at_session_start_never_opens_the_upstream():
    session, recording = make()
    session.start()
    verify = only(session.data(CLIENT, LOGIN + b"ls\n"), VerifyToken)
    recording.refuse = True
    out = session.completed(verify, ALICE)
    assert not any(type(c) is OpenUpstream for c in out)
    assert sent(out, CLIENT).startswith(b"BYE recorder_failure ")
    assert out[-1] == Close("recorder_failure")
    assert session.identity == ALICE and session.is_closed


def test_fail_open_relays_and_counts_recording_failures():
    session, recording = make(fail_open=True)
    recording.refuse = True
    login(session)
    assert session.recording_failures == 3  # SessionStart, greeting, login
    assert session.data(CLIENT, b"ls\n") == [Send(SERVER, b"ls\n")]
    assert session.data(SERVER, b"file\n") == [Send(CLIENT, b"file\n")]
    assert session.recording_failures == 5
    assert session.closed(CLIENT) == [Send(SERVER, EXIT), Close("client_disconnect")]
    assert session.recording_failures == 6 == recording.refused
    assert recording.events == []


# --- the startup deadline ----------------------------------------------------------------


def test_startup_timeout_before_ready_is_a_protocol_error():
    session, recording = make(startup_timeout=2.5)
    assert session.start()[0] == SetTimer("startup", 2.5)
    assert session.data(CLIENT, b"LOGIN al") == []
    out = session.timer("startup")
    assert [type(c) for c in out] == [Send, Close]
    assert out[0].data.startswith(b"BYE protocol_error 08P01: startup did not complete within 2.5 s (phase login)")
    assert out[1] == Close("protocol_error")
    assert recording.kinds() == ["session_start", "frames", "protocol_error", "frames", "session_end"]
    [error] = recording.of("protocol_error")
    assert error["code"] == "08P01" and "phase login" in error["message"]
    assert recording.of("session_end")[0]["reason"] == "protocol_error"


def test_startup_timeout_while_verifying_ignores_the_late_identity():
    session, recording = make()
    session.start()
    verify = only(session.data(CLIENT, LOGIN), VerifyToken)
    out = session.timer("startup")
    assert out[-1] == Close("protocol_error")
    assert b"(phase verifying)" in sent(out, CLIENT)
    assert session.completed(verify, ALICE) == []
    assert session.identity is None
    assert recording.kinds().count("session_end") == 1


def test_after_ready_the_startup_timer_does_nothing():
    session, recording = make()
    login(session)
    before = list(recording.events)
    assert session.timer("startup") == []
    assert session.timer("something-else") == []
    assert recording.events == before and not session.is_closed
    assert session.data(CLIENT, b"ls\n") == [Send(SERVER, b"ls\n")]


# --- the upstream ------------------------------------------------------------------------


def test_unreachable_upstream_ends_the_session_and_tells_the_client():
    session, recording = make()
    session.start()
    verify = only(session.data(CLIENT, LOGIN), VerifyToken)
    open_upstream = only(session.completed(verify, ALICE), OpenUpstream)
    out = session.failed(open_upstream, UpstreamUnavailable("ConnectionRefusedError: refused"))
    assert out == [Send(CLIENT, b"BYE upstream_unavailable upstream_unavailable: the target 'web' is unavailable: "
                                b"ConnectionRefusedError: refused\n"),
                   Close("upstream_unavailable")]  # no EXIT: the upstream never opened
    assert recording.of("session_end")[0]["reason"] == "upstream_unavailable"
    assert recording.frames()[-1] == (SERVER, out[0].data)  # what the proxy told the client is recorded


# --- a single end --------------------------------------------------------------------------


def test_the_session_ends_exactly_once():
    session, recording = make()
    login(session)
    assert session.closed(CLIENT) == [Send(SERVER, EXIT), Close("client_disconnect")]
    assert session.closed(CLIENT) == []
    assert session.closed(SERVER) == []
    assert session.shutdown() == []
    assert session.timer("startup") == []
    assert session.data(CLIENT, b"ls\n") == []
    assert recording.kinds().count("session_end") == 1
    assert recording.of("session_end")[0]["reason"] == "client_disconnect"
    assert session.front.closed_calls == 1


def test_shutdown_tells_the_client_and_ends_once():
    session, recording = make()
    login(session)
    out = session.shutdown()
    assert out == [Send(CLIENT, b"BYE shutdown shutdown: the proxy is shutting down\n"), Send(SERVER, EXIT),
                   Close("shutdown")]
    assert session.closed(CLIENT) == []
    assert session.closed(SERVER) == []
    assert [body["reason"] for body in recording.of("session_end")] == ["shutdown"]


def test_target_disconnect_ends_the_session():
    session, recording = make()
    login(session)
    assert session.closed(SERVER) == [Close("server_disconnect")]  # no EXIT to a target that is gone
    assert [body["reason"] for body in recording.of("session_end")] == ["server_disconnect"]


def test_a_connection_that_sent_nothing_records_nothing():
    session, recording = make()
    session.start()
    assert session.closed(CLIENT) == [Close("client_disconnect")]
    assert recording.events == []
    other, other_recording = make()
    other.start()
    assert other.shutdown()[-1] == Close("shutdown")
    assert other_recording.events == []


def test_protocol_violation_records_the_sample_and_ends():
    session, recording = make()
    login(session)
    chunk = b"ls\nbad\x00line\n"
    out = session.data(CLIENT, chunk)
    assert out == [Send(SERVER, b"ls\n"),
                   Send(CLIENT, b"BYE protocol_error bad_line: a line must be ASCII text without NUL\n"),
                   Send(SERVER, EXIT), Close("protocol_error")]
    [error] = recording.of("protocol_error")
    assert error == {"code": "bad_line", "message": "a line must be ASCII text without NUL", "sample": chunk}
    assert recording.kinds()[-1] == "session_end"
    assert recording.of("session_end")[0]["reason"] == "protocol_error"


def test_protocol_violation_during_login():
    session, recording = make()
    session.start()
    out = session.data(CLIENT, b"HELO there\n")
    assert out[-1] == Close("protocol_error")
    assert sent(out, CLIENT).startswith(b"BYE protocol_error bad_login: ")
    assert recording.kinds() == ["session_start", "frames", "protocol_error", "frames", "session_end"]
    assert recording.of("protocol_error")[0]["sample"] == b"HELO there\n"


def test_protocol_error_sample_is_cut_to_its_limit():
    session, recording = make()
    login(session)
    chunk = b"x" * 100 + b"\x00\n"
    session.data(CLIENT, chunk)
    assert recording.of("protocol_error")[0]["sample"] == chunk[:records.SAMPLE_BYTES]


def test_an_exception_in_the_front_end_ends_only_its_session():
    session, recording = make()
    other, other_recording = make()
    login(session)
    login(other)
    out = session.data(CLIENT, b"CRASH\n")  # must not raise
    assert out == [Send(CLIENT, b"BYE protocol_error XX000: internal error: RuntimeError\n"), Send(SERVER, EXIT),
                   Close("protocol_error")]
    [error] = recording.of("protocol_error")
    assert error["code"] == "XX000" and error["message"] == "internal error: RuntimeError"
    assert recording.of("session_end")[0]["reason"] == "protocol_error"
    assert other.data(CLIENT, b"ls\n") == [Send(SERVER, b"ls\n")]
    assert "session_end" not in other_recording.kinds()


def test_client_disconnect_during_a_hold_ends_at_once_and_records_what_waited(policy):
    session, recording = make(policy)
    login(session)
    wait, _ = held(session)
    assert session.data(CLIENT, b"ls\n") == []
    assert session.data(CLIENT, b"pwd\n") == []
    assert session.closed(CLIENT) == [Send(SERVER, EXIT), Close("client_disconnect")]

    assert recording.kinds()[-2:] == ["frames", "session_end"]
    unrelayed = recording.events[-2][1]
    assert unrelayed["direction"] == CLIENT
    [message] = unrelayed["messages"]
    assert (message["type"], message["data"]) == ("unrelayed", b"ls\npwd\n")
    end = recording.of("session_end")
    assert [body["reason"] for body in end] == ["client_disconnect"]
    assert end[0]["client_bytes"] == len(LOGIN) + len(b"reboot now\n") + len(b"ls\n") + len(b"pwd\n")

    # the reviewers' late answer changes nothing
    approve = ApprovalOutcome(wait.request.request_id, "approve", BOB.to_avro(), "ok")
    assert session.completed(wait, approve) == []
    assert recording.kinds().count("session_end") == 1
    assert session.front.closed_calls == 1


def test_session_end_counts_bytes_and_messages():
    ticks = iter([1_000_000_000, 1_001_500_000])
    session, recording = make(clock=lambda: next(ticks))
    login(session)
    session.data(CLIENT, b"ls\n")
    session.data(CLIENT, b"pwd\nid\n")
    session.data(SERVER, b"a b c\n")
    session.data(SERVER, b"/home\n")
    session.closed(CLIENT)
    [end] = recording.of("session_end")
    assert end == {
        "reason": "client_disconnect",
        "duration_us": 1500,
        "client_bytes": len(LOGIN) + len(b"ls\n") + len(b"pwd\nid\n"),
        "server_bytes": len(HELLO) + len(b"a b c\n") + len(b"/home\n"),
        "client_messages": 4,  # login, ls, pwd, id
        "server_messages": 3,  # greeting, two outputs
    }


def test_what_the_proxy_says_counts_towards_the_client(policy):
    session, recording = make(policy)
    login(session)
    out = session.data(CLIENT, b"rm x\n")
    session.closed(CLIENT)
    [end] = recording.of("session_end")
    assert end["server_bytes"] == len(HELLO) + len(sent(out, CLIENT))
    assert end["server_messages"] == 2  # greeting, DENIED


def test_two_holds_in_one_read_wait_one_after_the_other(policy):
    session, recording = make(policy)
    login(session)
    first, _ = held(session, b"reboot a\nreboot b\nls\n")
    assert session.data(CLIENT, b"pwd\n") == []
    out = session.completed(first, ApprovalOutcome(first.request.request_id, "approve", BOB.to_avro(), "ok"))
    second = out[-1]
    assert isinstance(second, AwaitApproval) and second.request.statement == "reboot b"
    assert out[0] == Send(SERVER, b"reboot a\n")
    assert sent(out, SERVER) == b"reboot a\n"
    out = session.completed(second, ApprovalOutcome(second.request.request_id, "approve", BOB.to_avro(), "ok"))
    assert out == [Send(SERVER, b"reboot b\n"), Send(SERVER, b"ls\n"), Send(SERVER, b"pwd\n")]
    actions = [(body["action"], body["statement"]) for body in recording.of("policy_decision")]
    assert actions == [("hold", "reboot a"), ("approve", "reboot a"), ("hold", "reboot b"), ("approve", "reboot b")]


def test_recorder_failure_during_a_hold_ends_it_and_the_late_approval_relays_nothing(policy):
    session, recording = make(policy)
    login(session)
    wait, _ = held(session, b"reboot now\nls\n")
    recording.refuse = True
    out = session.data(SERVER, b"output\n")
    assert out[-1] == Close("recorder_failure") and Send(CLIENT, b"output\n") not in out
    recording.refuse = False
    assert session.completed(wait, ApprovalOutcome(wait.request.request_id, "approve", BOB.to_avro(), "ok")) == []


class _TruncatingFrontEnd(LineFrontEnd):
    def client_closed(self) -> Steps:
        if self.buffer:
            raise ProtocolViolation("truncated", "the connection closed in the middle of a line")
        yield from self.session.end("client_disconnect")


class _TruncatingProtocol(LineProtocol):
    def front_end(self, session: Session) -> LineFrontEnd:
        return _TruncatingFrontEnd(session)


def test_protocol_violation_at_client_close_is_recorded_but_not_told():
    recording = FakeRecording()
    session = Session(protocol=_TruncatingProtocol(), recording=recording, source_address=SOURCE)
    login(session)
    assert session.data(CLIENT, b"partial") == []
    assert session.closed(CLIENT) == [Send(SERVER, EXIT), Close("protocol_error")]  # the client is gone
    assert recording.of("protocol_error")[0]["code"] == "truncated"
    assert [body["reason"] for body in recording.of("session_end")] == ["protocol_error"]


@pytest.mark.parametrize("hook", ["goodbye", "farewell_upstream", "closed"])
def test_a_failing_ending_hook_still_ends_the_session_once(hook):
    def broken(*args):
        raise RuntimeError(f"{hook} is broken")

    session, recording = make()
    login(session)
    setattr(session.front, hook, broken)
    out = session.shutdown()  # must not raise
    assert out[-1] == Close("shutdown")
    assert recording.kinds()[-1] == "session_end"
    assert [body["reason"] for body in recording.of("session_end")] == ["shutdown"]
    assert session.is_closed and session.closed(CLIENT) == []


# --- back-pressure behind a paused handler ------------------------------------------------


def test_a_lane_that_queues_too_much_stops_reading_its_side_until_it_drains(policy):
    """A client pipelining megabytes behind a held command is slowed down (TCP), not buffered without bound."""
    from proxy.core.commands import ReadControl
    from proxy.core.session import LANE_QUEUE_BYTES

    session, _ = make(policy)
    login(session)
    wait, _ = held(session)
    chunk = b"x" * 4095 + b"\n"
    outs = [session.data(CLIENT, chunk) for _ in range(LANE_QUEUE_BYTES // len(chunk) + 2)]
    pauses = [c for out in outs for c in out]
    assert pauses == [ReadControl(CLIENT, True)]
    approve = ApprovalOutcome(wait.request.request_id, "approve", BOB.to_avro(), "fine")
    out = session.completed(wait, approve)
    assert ReadControl(CLIENT, False) in out
    assert sum(1 for c in out if isinstance(c, Send) and c.data == chunk) == len(outs)


def test_what_the_target_says_before_its_open_completes_waits_for_the_handler_that_opened_it():
    """A target that speaks first (MySQL's greeting, an SSH banner) can be heard before OpenUpstream completes."""
    session, recording = make()
    session.start()
    verify = only(session.data(CLIENT, LOGIN), VerifyToken)
    open_upstream = only(session.completed(verify, ALICE), OpenUpstream)
    assert session.data(SERVER, b"banner 1\n") == [] and session.data(SERVER, b"banner 2\n") == []
    out = session.completed(open_upstream, None)
    assert out[0] == SetTimer("startup", None)
    assert [c for c in out if isinstance(c, Send) and c.side == CLIENT] == [
        Send(CLIENT, b"banner 1\n"), Send(CLIENT, b"banner 2\n")]
