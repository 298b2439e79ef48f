"""One client connection of the PostgreSQL proxy, as a sans-I/O state machine.

The asyncio server (`proxy.postgres.server`) feeds it what happened — bytes
from the client or the target, a verified or refused token, an upstream
connection, a timeout — and carries out the actions it returns: send bytes to
either side, start TLS, verify a token, connect upstream, forward a cancel,
close. Recording is the one side effect the session performs itself, through
the `Recording` it is given, because whether a frame may be relayed depends on
whether its event was accepted (fail closed).

Phases: STARTUP (SSLRequest/GSSENCRequest/CancelRequest/StartupMessage) →
PASSWORD (the proxy asked for the token as a cleartext password) → VERIFYING
(the token is checked off the event loop) → CONNECTING (the proxy logs in to
the target with the credentials it holds) → RELAY → CLOSED.

Policy (`policy_layer`), when the listener has a policy file: every Query and
Parse is decided before it is relayed. A blocked one is refused (42501,
PolicyDecision "block"); a held one is kept, with everything the client sends
after it, while the server side asks reviewers (`AwaitApproval`) and feeds the
outcome back through `approval_decided`; results are masked on the way back.

Events: the session's first event is SessionStart, which needs the identity,
so what happens before the token is verified is kept in a backlog and recorded
right after SessionStart. A connection that only sent a CancelRequest, or no
byte at all (a port probe), is not a session and records nothing.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

from ingest.protocols.postgres import messages as m
from ingest.protocols.postgres.protocol import PROTOCOL_VIOLATION, Message, MessageReader, ProtocolViolation, violation
from ingest.recorder import RecorderUnavailable
from proxy.approvals import ApprovalOutcome, ApprovalRequest
from proxy.identity import Identity
from proxy.policy import Decision

from . import recording as rec
from .cancel import CancelKeys, CancelTarget
from .policy_layer import PolicyGate, PolicyRuntime, decision_record
from .settings import PostgresSettings
from .upstream_auth import UpstreamAuthError, UpstreamLogin

log = logging.getLogger(__name__)

AUTH_FAILED = "28P01"
INVALID_AUTHORIZATION = "28000"
CONNECTION_FAILURE = "08006"
FEATURE_NOT_SUPPORTED = "0A000"
ADMIN_SHUTDOWN = "57P01"
_LOGIN_REFUSED_CLASS = "28"


class Recording(Protocol):
    """What the session needs of `ingest.recorder.SessionRecording`."""

    session_id: str

    def record(self, kind: str, body: dict) -> None: ...


# --- actions ------------------------------------------------------------------


class SendClient(NamedTuple):
    data: bytes


class SendUpstream(NamedTuple):
    data: bytes


class StartTLS(NamedTuple):
    """Upgrade the client connection to TLS (the 'S' has been sent)."""


class VerifyToken(NamedTuple):
    token: str


class ConnectUpstream(NamedTuple):
    """Open the connection to the target, then call `upstream_connected`."""


class ForwardCancel(NamedTuple):
    """A CancelRequest with the proxy's key: look it up and forward it."""

    process_id: int
    secret: bytes


class Ready(NamedTuple):
    """Startup is complete: the startup deadline no longer applies."""


class Close(NamedTuple):
    """Close both connections once pending writes are sent."""

    reason: str


class AwaitApproval(NamedTuple):
    """Publish the request, wait for a reviewer's decision or the timeout, then call `approval_decided`."""

    request: ApprovalRequest


Action = (SendClient | SendUpstream | StartTLS | VerifyToken | ConnectUpstream | ForwardCancel | Ready | Close
          | AwaitApproval)
Actions = list[Action]


class Phase(enum.Enum):
    STARTUP = "startup"
    PASSWORD = "password"
    VERIFYING = "verifying"
    CONNECTING = "connecting"
    RELAY = "relay"
    CLOSED = "closed"


_STARTUP_PHASES = frozenset({Phase.STARTUP, Phase.PASSWORD, Phase.VERIFYING, Phase.CONNECTING})
_NOT_FORWARDED = frozenset({"user", "database"})


class _Held(NamedTuple):
    """A statement waiting for approval, and what the client sent after it (relayed only once it is decided)."""

    message: Message
    statement: str
    request: ApprovalRequest
    waiting: list[Message]


def _fail_closed(step: Callable[..., Actions]) -> Callable[..., Actions]:
    """Inputs other than data: a refused event ends the session (fail closed)."""

    def guarded(self: "Session", *args: object) -> Actions:
        if self.phase is Phase.CLOSED:
            return []
        try:
            return step(self, *args)
        except RecorderUnavailable as error:
            return self._recorder_failed(error)

    guarded.__doc__ = step.__doc__
    return guarded


class Session:
    def __init__(
        self,
        *,
        settings: PostgresSettings,
        recording: Recording,
        cancel_keys: CancelKeys,
        source_address: str,
        policy: PolicyRuntime | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.settings = settings
        self.recording = recording
        self.cancel_keys = cancel_keys
        self.source_address = source_address
        self.phase = Phase.STARTUP
        self.counters = rec.Counters()
        self.identity: Identity | None = None
        self.recording_failures = 0
        self._clock = clock
        self._started_ns = clock()
        self._client = MessageReader("client", max_message_size=settings.max_client_message)
        self._upstream = MessageReader("server", max_message_size=settings.max_server_message)
        self._backlog: list[tuple[str, dict]] | None = []  # None once SessionStart is recorded
        self._parameters: dict[str, str] = {}
        self._tls_version: str | None = None
        self._cert_fingerprint: str | None = None
        self._login = UpstreamLogin(settings.upstream.user, settings.upstream.password)
        self._upstream_connected = False
        self._upstream_key: m.BackendKeyData | None = None
        self._greeting: list[Message] = []  # the target's ParameterStatus/Notice before ReadyForQuery
        self._early: list[Message] = []  # client messages sent before the session was ready
        self._cancel_key: int | None = None
        self._not_a_session = False
        self._policy = policy
        self._gate: PolicyGate | None = None  # set once the identity is known
        self._held: _Held | None = None

    @property
    def session_id(self) -> str:
        return self.recording.session_id

    @property
    def user(self) -> str | None:
        return self._parameters.get("user")

    # --- inputs -------------------------------------------------------------------

    def client_data(self, data: bytes) -> Actions:
        """Bytes the client sent."""
        if self.phase is Phase.CLOSED:
            return []
        self.counters.client_bytes += len(data)
        try:
            if self.phase is Phase.RELAY:
                return self._relay_client(data)
            return self._startup(self._client.feed(data))
        except ProtocolViolation as error:
            return self._violation(error, data, side="client")
        except RecorderUnavailable as error:
            return self._recorder_failed(error)

    def upstream_data(self, data: bytes) -> Actions:
        """Bytes the target sent."""
        if self.phase is Phase.CLOSED:
            return []
        try:
            if self.phase is Phase.RELAY:
                return self._relay_upstream(data)
            return self._login_step(self._upstream.feed(data))
        except ProtocolViolation as error:
            return self._violation(error, data, side="target")
        except UpstreamAuthError as error:
            return self._upstream_unavailable(str(error))
        except RecorderUnavailable as error:
            return self._recorder_failed(error)

    @_fail_closed
    def client_tls(self, version: str, cert_fingerprint: str | None) -> Actions:
        """The TLS handshake with the client completed."""
        self._tls_version, self._cert_fingerprint = version, cert_fingerprint
        return []

    @_fail_closed
    def tls_failed(self, detail: str) -> Actions:
        """The TLS handshake failed: nothing can be said to the client any more."""
        return self._violation(violation(f"TLS handshake failed: {detail}"), b"", side="client", tell=False)

    @_fail_closed
    def token_verified(self, identity: Identity) -> Actions:
        """The token is valid; the startup user must be its username claim."""
        if self.phase is not Phase.VERIFYING:
            return []
        if identity.username != self.user:
            return self._deny(
                "user_mismatch",
                f"the token is for {identity.username!r}, the startup user is {self.user!r}",
                {"token_subject": identity.subject, "token_issuer": identity.issuer},
            )
        self.identity = identity
        self._open(identity.to_avro())
        if self._policy is not None:
            self._gate = PolicyGate(self._policy, identity, self.settings.name)
        self.phase = Phase.CONNECTING
        return [ConnectUpstream()]

    @_fail_closed
    def token_refused(self, reason_code: str, message: str) -> Actions:
        if self.phase is not Phase.VERIFYING:
            return []
        return self._deny(str(reason_code), message)

    @_fail_closed
    def upstream_connected(self) -> Actions:
        """The TCP connection to the target is up: open our own session there."""
        self._upstream_connected = True
        upstream = self.settings.upstream
        parameters = {"user": upstream.user, "database": upstream.database}
        parameters.update(
            (name, value) for name, value in self._parameters.items()
            if name not in _NOT_FORWARDED and not name.startswith("_pq_.")
        )
        return [SendUpstream(m.startup_message(parameters))]

    @_fail_closed
    def upstream_failed(self, detail: str) -> Actions:
        """The target could not be reached."""
        return self._upstream_unavailable(detail)

    @_fail_closed
    def client_eof(self) -> Actions:
        """The client closed its side (or the connection broke)."""
        try:
            self._client.eof()
        except ProtocolViolation as error:
            return self._violation(error, b"", side="client", tell=False)
        return self._end("client_disconnect")

    @_fail_closed
    def upstream_eof(self) -> Actions:
        """The target closed the connection."""
        if self.phase is not Phase.RELAY:
            return self._upstream_unavailable("the target closed the connection during login")
        try:
            self._upstream.eof()
        except ProtocolViolation as error:
            return self._violation(error, b"", side="target")
        return self._end("server_disconnect")

    @_fail_closed
    def timeout(self) -> Actions:
        """The startup deadline passed (slow or stalled client, or slow login)."""
        if self.phase not in _STARTUP_PHASES:
            return []
        detail = f"startup did not complete within {self.settings.startup_timeout:g} s (phase {self.phase.value})"
        return self._violation(violation(detail), b"", side="client")

    @_fail_closed
    def shutdown(self) -> Actions:
        """The proxy is stopping."""
        error = m.error_response(severity="FATAL", code=ADMIN_SHUTDOWN, message="custody: the proxy is shutting down")
        return self._say([Message("ErrorResponse", error)]) + self._end("shutdown")

    @_fail_closed
    def approval_decided(self, outcome: ApprovalOutcome) -> Actions:
        """A reviewer decided on the held statement, or nobody did in time: run it, or refuse it."""
        held = self._held
        if held is None or outcome.request_id != held.request.request_id:
            return []
        self._held = None
        request = held.request
        expired = outcome.decision == "expired"
        reason = f"no decision by {request.expires_at}" if expired else outcome.reason
        self._record("policy_decision", decision_record(
            request.rule, "approve" if outcome.approved else "deny", reason, held.statement,
            request_id=request.request_id, approver=outcome.approver,
            attributes={"expired": "true"} if expired else None))
        if outcome.approved:
            actions: Actions = [SendUpstream(held.message.data)]
        else:
            who = ("nobody approved it in time" if expired
                   else f"denied by {outcome.approver['subject']}" if outcome.approver else "denied")
            actions = self._refuse(held.message, f"request {request.request_id}: {who}: {reason}")
        return actions + (self._gate_client(held.waiting) if held.waiting else [])

    def note_cancel(self, process_id: int, secret: bytes, source_address: str) -> bool:
        """Record that a client cancelled this session's query; False: do not forward (fail closed)."""
        if self.phase is Phase.CLOSED:
            return False
        request = Message("CancelRequest", m.cancel_request(process_id, secret))
        record = rec.message_record(request, {"source_address": source_address})
        try:
            self._record("frames", {"direction": "client", "messages": [record]})
        except RecorderUnavailable:
            log.error("session %s: cancel from %s not recorded, so not forwarded", self.session_id, source_address)
            return False
        return True

    # --- startup ------------------------------------------------------------------

    def _startup(self, messages: list[Message]) -> Actions:
        actions: Actions = []
        for message in messages:
            if self.phase is Phase.STARTUP:
                actions += self._startup_packet(message)
            elif self.phase is Phase.PASSWORD:
                actions += self._password(message)
            elif self.phase in (Phase.VERIFYING, Phase.CONNECTING):
                self._keep_early(message)
            if self.phase is Phase.CLOSED:
                break
        return actions

    def _startup_packet(self, message: Message) -> Actions:
        if message.type == "CancelRequest":
            request = m.decode_cancel_request(message.payload)
            self._not_a_session = True
            self.phase = Phase.CLOSED
            return [ForwardCancel(request.process_id, request.secret), Close("cancel")]
        self._record("frames", rec.frames("client", [message]))
        if message.type == "StartupMessage":
            return self._startup_message(m.decode_startup_message(message.payload))
        if message.type == "SSLRequest" and self.settings.tls is not None and self._tls_version is None:
            return self._say([Message("EncryptionResponse", m.SSL_ALLOWED)]) + [StartTLS()]
        return self._say([Message("EncryptionResponse", m.ENCRYPTION_DENIED)])

    def _startup_message(self, startup: m.StartupMessage) -> Actions:
        self._parameters = startup.parameters
        if not self.user:
            return self._deny("missing_user", "no PostgreSQL user name specified in startup packet", code=INVALID_AUTHORIZATION)
        if startup.parameters.get("replication", "false").lower() not in ("false", "off", "no", "0"):
            return self._deny("replication_refused", "replication connections are not relayed", code=FEATURE_NOT_SUPPORTED)
        said: list[Message] = []
        options = [name for name in startup.parameters if name.startswith("_pq_.")]
        if startup.protocol_version[1] > 0 or options:
            said.append(Message("NegotiateProtocolVersion", m.negotiate_protocol_version(0, options)))
        said.append(Message("AuthenticationRequest", m.authentication_cleartext_password()))
        self.phase = Phase.PASSWORD
        return self._say(said)

    def _password(self, message: Message) -> Actions:
        if message.type == "Terminate":
            self._record("frames", rec.frames("client", [message]))
            return self._end("client_terminate")
        if message.type != "PasswordMessage":
            raise violation(f"expected a password message (the OIDC access token), got {message.type}")
        self._record("frames", rec.frames("client", [message]))  # redacted: the token is not recorded
        token = m.decode_password_message(message.payload).password
        self.phase = Phase.VERIFYING
        return [VerifyToken(token)]

    def _keep_early(self, message: Message) -> None:
        """A client message sent before ReadyForQuery: relayed once the session is ready."""
        self._early.append(message)
        if sum(len(early.data) for early in self._early) > self.settings.max_client_message:
            raise violation("too much data sent before authentication completed")

    def _deny(self, reason_code: str, detail: str, attributes: dict[str, str] | None = None,
              code: str = AUTH_FAILED) -> Actions:
        """Refuse the login: decision, the client's FATAL error, SessionEnd(auth_failed)."""
        self._open(None)
        self._record("policy_decision", rec.authentication_denied(f"{reason_code}: {detail}", attributes or {}))
        text = f'password authentication failed for user "{self.user}": {reason_code}'
        if code != AUTH_FAILED:
            text = f"custody: {detail}"
        error = m.error_response(severity="FATAL", code=code, message=text)
        return self._say([Message("ErrorResponse", error)]) + self._end("auth_failed")

    # --- upstream login -----------------------------------------------------------

    def _login_step(self, messages: list[Message]) -> Actions:
        actions: Actions = []
        for index, message in enumerate(messages):
            kind = message.type
            if kind == "AuthenticationRequest":
                reply = self._login.respond(m.decode_authentication(message.payload))
                if reply is not None:
                    actions.append(SendUpstream(reply))
            elif kind == "ErrorResponse":
                return self._login_refused(m.decode_error_response(message.payload))
            elif kind == "BackendKeyData":
                self._upstream_key = m.decode_backend_key_data(message.payload)
            elif kind in ("ParameterStatus", "NoticeResponse"):
                self._greeting.append(message)
            elif kind == "ReadyForQuery":
                actions += self._ready(message)
                rest = messages[index + 1 :]
                return actions + (self._forward_server(rest, None) if rest and self.phase is Phase.RELAY else [])
            elif kind != "NegotiateProtocolVersion":
                raise violation(f"unexpected {kind} from the target during login")
        return actions

    def _ready(self, ready_for_query: Message) -> Actions:
        """Logged in: greet the client as PostgreSQL would, but with the proxy's own cancel key."""
        ours = [Message("AuthenticationRequest", m.authentication_ok())]
        if self._upstream_key is not None:
            upstream, key = self.settings.upstream, self._upstream_key
            target = CancelTarget(upstream.host, upstream.port, key.process_id, key.secret, self)
            process_id, secret = self.cancel_keys.issue(target)
            self._cancel_key = process_id
            ours.append(Message("BackendKeyData", m.backend_key_data(process_id, secret)))
        theirs = [*self._greeting, ready_for_query]
        records = [rec.message_record(x, rec.PROXY_ORIGIN) for x in ours] + rec.message_records(theirs)
        self._record("frames", {"direction": "server", "messages": records})
        said = ours + theirs
        self._count_to_client(said)
        self.phase = Phase.RELAY
        actions: Actions = [SendClient(b"".join(message.data for message in said)), Ready()]
        early, self._early = self._early, []
        if early:
            actions += self._forward_client(early, None)
        return actions

    def _login_refused(self, error: m.ErrorResponse) -> Actions:
        """The target refused our login: its reason, unless it is about the proxy's credentials."""
        log.warning("session %s: the target refused the proxy's login: %s %s", self.session_id, error.code, error.message)
        if error.code.startswith(_LOGIN_REFUSED_CLASS):
            return self._upstream_unavailable(f"the target refused the proxy's login ({error.code})")
        reply = m.error_response(severity="FATAL", code=error.code or CONNECTION_FAILURE, message=error.message)
        return self._say([Message("ErrorResponse", reply)]) + self._end("upstream_unavailable")

    def _upstream_unavailable(self, detail: str) -> Actions:
        log.warning("session %s: target %s unavailable: %s", self.session_id, self.settings.upstream.describe(), detail)
        error = m.error_response(severity="FATAL", code=CONNECTION_FAILURE,
                                 message=f"custody: the target {self.settings.name!r} is unavailable")
        return self._say([Message("ErrorResponse", error)]) + self._end("upstream_unavailable")

    # --- relay: the hot path ------------------------------------------------------

    def _relay_client(self, data: bytes) -> Actions:
        reader = self._client
        whole = not reader.buffered
        messages = reader.feed(data)
        if not messages:
            return []
        return self._forward_client(messages, data if whole and not reader.buffered else None)

    def _forward_client(self, messages: list[Message], raw: bytes | None) -> Actions:
        """Record, then relay: `raw` is the messages' bytes when the read held exactly them."""
        self.counters.client_messages += len(messages)
        self._record("frames", rec.frames("client", messages))
        if self._gate is not None:
            return self._gate_client(messages)
        actions: Actions = [SendUpstream(raw if raw is not None else b"".join([x.data for x in messages]))]
        if messages[-1].type == "Terminate":
            actions += self._end("client_terminate")
        return actions

    # --- relay: policy ------------------------------------------------------------

    def _gate_client(self, messages: list[Message]) -> Actions:
        """Relay what the policy lets through, in order; stop at a held statement and keep the rest."""
        if self._held is not None:
            self._held.waiting.extend(messages)
            return []
        assert self._gate is not None
        actions: Actions = []
        passed: list[bytes] = []
        for index, message in enumerate(messages):
            verdict = self._gate.decide(message)
            if verdict is None:
                passed.append(message.data)
                continue
            decision, sql = verdict
            if passed:
                actions.append(SendUpstream(b"".join(passed)))
                passed = []
            if decision.action == "hold":
                return actions + self._hold(message, decision, sql, messages[index + 1:])
            self._record("policy_decision", decision_record(decision.rule or "", "block", decision.message, sql))
            actions += self._refuse(message, decision.message)
        if passed:
            actions.append(SendUpstream(b"".join(passed)))
        if messages[-1].type == "Terminate":
            actions += self._end("client_terminate")
        return actions

    def _refuse(self, message: Message, reason: str) -> Actions:
        assert self._gate is not None
        return [SendUpstream(self._gate.refuse(message, reason))]

    def _hold(self, message: Message, decision: Decision, sql: str, rest: list[Message]) -> Actions:
        """Keep the statement, tell the client who may approve it, and ask (AwaitApproval)."""
        assert self._gate is not None and self._policy is not None and self.identity is not None
        request = ApprovalRequest.new(
            session_id=self.session_id, requester=self.identity.to_avro(), target=self.settings.name,
            statement=sql, rule=decision.rule or "", reason=decision.message, approvers=decision.approvers,
            timeout=self._gate.hold_timeout, proxy_key_id=self._policy.proxy_key_id)
        self._held = _Held(message, sql, request, list(rest))
        self._record("policy_decision", decision_record(
            request.rule, "hold", decision.message, sql, request_id=request.request_id,
            attributes={"approvers": ",".join(request.approvers), "expires_at": request.expires_at}))
        notice = m.notice_response(
            severity="NOTICE", code="00000",
            message=f"custody: {decision.message}; waiting for approval, request {request.request_id}",
            detail=f"may approve: members of {', '.join(request.approvers)} other than you; "
                   f"denied unless approved by {request.expires_at}",
            hint=f"a reviewer runs: custody approvals approve {request.request_id} --reason ...")
        return self._say([Message("NoticeResponse", notice)]) + [AwaitApproval(request)]

    def _relay_upstream(self, data: bytes) -> Actions:
        reader = self._upstream
        whole = not reader.buffered
        messages = reader.feed(data)
        if not messages:
            return []
        return self._forward_server(messages, data if whole and not reader.buffered else None)

    def _forward_server(self, messages: list[Message], raw: bytes | None) -> Actions:
        shown = self._gate.server(messages) if self._gate is not None else None
        if shown is None:
            self._record("frames", rec.frames("server", messages))
        else:
            messages, records = shown
            raw = None
            self._record("frames", {"direction": "server", "messages": records})
        out = raw if raw is not None else b"".join([x.data for x in messages])
        self.counters.server_messages += len(messages)
        self.counters.server_bytes += len(out)
        return [SendClient(out)]

    # --- recording and endings ----------------------------------------------------

    def _record(self, kind: str, body: dict) -> None:
        if self._backlog is not None:
            self._backlog.append((kind, body))
        else:
            self._emit(kind, body)

    def _emit(self, kind: str, body: dict) -> None:
        """Hand one event to the recorder; in fail-open mode a refusal is logged and passed over."""
        try:
            self.recording.record(kind, body)
        except RecorderUnavailable as error:
            if not self.settings.fail_open:
                raise
            self.recording_failures += 1
            if self.recording_failures == 1:
                log.error("session %s: FAIL OPEN: relaying although events are not recorded: %s", self.session_id, error)

    def _open(self, identity: dict | None) -> None:
        """Record SessionStart, then everything that happened before it."""
        if self._backlog is None:
            return
        backlog, self._backlog = self._backlog, None
        parameters = dict(self._parameters)
        if self._tls_version:
            parameters["tls"] = self._tls_version
        self._emit("session_start", rec.session_start(
            identity=identity,
            source_address=self.source_address,
            client_cert_fingerprint=self._cert_fingerprint,
            target=self.settings.name,
            upstream=self.settings.upstream.describe(),
            client_application=self._parameters.get("application_name"),
            attributes=parameters,
        ))
        for kind, body in backlog:
            self._emit(kind, body)

    def _say(self, messages: list[Message]) -> Actions:
        """Messages the proxy itself sends the client: recorded as the proxy's, then sent."""
        self._record("frames", rec.proxy_frames(messages))
        self._count_to_client(messages)
        return [SendClient(b"".join(message.data for message in messages))]

    def _count_to_client(self, messages: list[Message]) -> None:
        self.counters.server_messages += len(messages)
        self.counters.server_bytes += sum(len(message.data) for message in messages)

    def _violation(self, error: ProtocolViolation, data: bytes, *, side: str, tell: bool = True) -> Actions:
        """A peer broke the protocol: ProtocolError event, FATAL to the client, SessionEnd."""
        text = error.message if side == "client" else f"the target broke the protocol: {error.message}"
        log.warning("session %s from %s: protocol error (%s): %s", self.session_id, self.source_address, side, text)
        self._record("protocol_error", rec.protocol_error(error.code, text, data))
        actions: Actions = []
        if tell:
            reply = m.error_response(severity="FATAL", code=error.code or PROTOCOL_VIOLATION, message=f"custody: {text}")
            actions = self._say([Message("ErrorResponse", reply)])
        return actions + self._end("protocol_error")

    def _end(self, reason: str) -> Actions:
        """Record SessionEnd (unless this never was a session) and close."""
        if self._backlog is not None and (self._not_a_session or self.counters.client_bytes == 0):
            self._backlog = None
        else:
            self._open(None)
            duration_us = (self._clock() - self._started_ns) // 1000
            self._emit("session_end", rec.session_end(reason, duration_us, self.counters))
        return self._closed(reason)

    def _recorder_failed(self, error: RecorderUnavailable) -> Actions:
        """Fail closed: nothing more is relayed or recorded; the client learns why."""
        log.error("session %s: FAIL CLOSED: %s", self.session_id, error)
        reply = m.error_response(severity="FATAL", code=ADMIN_SHUTDOWN,
                                 message="custody: the session cannot be recorded, so it is closed (fail closed)")
        return [SendClient(reply)] + self._closed("recorder_failure")

    def _closed(self, reason: str) -> Actions:
        actions: Actions = []
        if self._upstream_connected and self.phase is not Phase.CLOSED and reason not in ("server_disconnect", "client_terminate"):
            actions.append(SendUpstream(m.TERMINATE))
        self.phase = Phase.CLOSED
        if self._cancel_key is not None:
            self.cancel_keys.release(self._cancel_key)
            self._cancel_key = None
        return actions + [Close(reason)]

