"""One proxied connection, as a sans-I/O state machine shared by every protocol.

The adapter (`proxy.core.server`) feeds a `Session` what happened — bytes
from a side, a side closed, a command completed, a timer fired, the proxy is
stopping — and carries out the commands it returns. The session hands each
input to its front end's handler (a generator) and collects what it yields.

Lanes. Inputs from the client and from the target each run in their own
lane. A handler that yields a *blocking* command (verify a token, open the
upstream, wait for an approval) is paused with its lane: later bytes from
that side queue behind it, in order, until the completion arrives and the
handler reads on. The other side keeps flowing, so a statement held for a
reviewer does not hold back the results of the statements before it.
Endings (a side closed, a timeout, shutdown) never queue: they end the
session at once, and bytes still queued are recorded as `unrelayed`.

What the core owns, so that no front end repeats it:
* identity binding: the token is verified off the event loop and its
  username claim must equal the protocol's user (`authenticate`);
* SessionStart first: what is recorded before the identity is known waits in
  a backlog and follows SessionStart;
* recording with fail closed (a refused event ends the session; nothing more
  is relayed) or fail open (logged, relayed anyway);
* policy: decisions on operations, one hold at a time and what queues
  behind it, the reviewers' outcome (`check`);
* the startup deadline, the counters, and exactly one SessionEnd;
* input redaction: each client record passes the front end's `redactor`
  (`proxy.core.redaction`) before it is recorded, its original sealed to
  the custodian key; what is relayed is untouched;
* a session ends with its identity: when the token's `exp` plus the
  verifier's leeway passes, the session ends (`identity_expired`) as soon as
  the front end is between operations (`FrontEnd.is_idle`, or the front end
  calls `between_operations`), so a statement in flight finishes first.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from datetime import datetime, timezone
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Protocol

from ingest.protocols import ProtocolViolation
from ingest.recorder import RecorderUnavailable
from ingest.sealing import Sealer
from proxy.approvals import ApprovalRequest
from proxy.identity import AuthenticationError, Identity
from proxy.policy.operation import Operation

from . import records, redaction
from .commands import (
    CLIENT,
    SERVER,
    AwaitApproval,
    Close,
    Command,
    OpenUpstream,
    ReadControl,
    Send,
    SetTimer,
    Side,
    StartTLS,
    TLSFailed,
    TLSInfo,
    UpstreamUnavailable,
    VerifyToken,
)
from .frontend import ALLOWED, Ending, FrontEnd, Said, Steps, Verdict
from .policy import PolicyGate, PolicyRuntime
from .settings import ListenerSettings

if TYPE_CHECKING:
    from nacl.public import PublicKey

    from .frontend import Protocol as FrontEndProtocol

log = logging.getLogger(__name__)

STARTUP_TIMER = "startup"
LANE_QUEUE_BYTES = 1 << 20  # input a paused lane holds before the side is no longer read (back-pressure)
IDENTITY_TIMER = "identity"
CORE_ATTRIBUTES = ("tls", "upstream_tls", "upstream_cert_sha256", "token_exp")  # SessionStart facts only the core sets
PROTOCOL_VIOLATION = "08P01"


class Recording(Protocol):
    """What the session needs of `ingest.recorder.SessionRecording`."""

    session_id: str

    def record(self, kind: str, body: dict) -> None: ...


class _Lane:
    """One side's handlers: the one paused on a blocking command, and the inputs queued behind it."""

    __slots__ = ("side", "paused", "waiting_for", "queue", "input", "queued_bytes", "reading_paused", "opening")

    def __init__(self, side: Side) -> None:
        self.side = side
        self.input = b""  # the bytes the running handler was given: a protocol error's sample
        self.paused: Generator[Command, Any, Any] | None = None
        self.waiting_for: Command | None = None
        self.queue: deque[bytes | Event] = deque()
        self.queued_bytes = 0
        self.reading_paused = False  # the adapter was told to stop reading this side (ReadControl)
        self.opening = False  # the server side while its OpenUpstream has not completed: what it says waits


class Event:
    """A protocol event that is not raw bytes (`Session.event`): its front end's item, and the bytes it carried."""

    __slots__ = ("item", "data")

    def __init__(self, item: Any, data: bytes) -> None:
        self.item, self.data = item, data


class Session:
    def __init__(
        self,
        *,
        protocol: "FrontEndProtocol",
        recording: Recording,
        source_address: str,
        policy: PolicyRuntime | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
        identity_leeway: float | None = 30.0,
        custodian_key: "PublicKey | None" = None,
    ) -> None:
        """`identity_leeway`: seconds after the token's `exp` at which the session ends; None: it does not."""
        self.settings: ListenerSettings = protocol.listener
        self.protocol_name = protocol.name
        self.recording = recording
        self.source_address = source_address
        self.counters = records.Counters()
        self.identity: Identity | None = None
        self.gate: PolicyGate | None = None
        self.recording_failures = 0
        self.client_tls: TLSInfo | None = None
        self.upstream_tls: TLSInfo | None = None  # from OpenUpstream(tls=...) or StartTLS(SERVER, ...)
        self.upstream = protocol.upstream
        # What SessionStart says besides identity and upstream; the front end fills these before `authenticate`.
        self.client_application: str | None = None
        self.attributes: dict[str, str] = {}
        self.is_closed = False
        self._policy = policy
        # What masking and input redaction (proxy.core.redaction) seal originals to: the policy's key, or the
        # [keys] custodian_public_key the listener was given without a policy; None: originals are not kept.
        # One ephemeral key pair for the session (ingest.sealing), made on its first seal.
        key = policy.custodian_key if policy is not None else custodian_key
        self._sealer = Sealer(key) if key is not None else None
        self._seal: Callable[[bytes], bytes] | None = self._sealer.seal if self._sealer is not None else None
        self._clock = clock
        self._started_ns = clock()
        self._backlog: list[tuple[str, dict]] | None = []  # None once SessionStart is recorded
        self._not_a_session = False
        self._ready = False
        self._identity_leeway = identity_leeway
        self._identity_expired = False
        self._lanes = {CLIENT: _Lane(CLIENT), SERVER: _Lane(SERVER)}
        self.front = protocol.front_end(self)

    @property
    def session_id(self) -> str:
        return self.recording.session_id

    # --- inputs from the adapter ---------------------------------------------------------

    def start(self) -> list[Command]:
        """The client connected."""
        out: list[Command] = [SetTimer(STARTUP_TIMER, self.settings.startup_timeout)]
        return out + self._run(self._lanes[CLIENT], self.front.started())

    def data(self, side: Side, data: bytes) -> list[Command]:
        """Bytes from one side."""
        if self.is_closed:
            return []
        if side == CLIENT:
            self.counters.client_bytes += len(data)
        lane = self._lanes[side]
        if lane.paused is not None or lane.opening:
            return self._enqueue(lane, data, len(data))
        lane.input = data
        handler = self.front.client_data(data) if side == CLIENT else self.front.server_data(data)
        return self._run(lane, handler)

    def event(self, side: Side, item: Any, data: bytes = b"") -> list[Command]:
        """A protocol event from one side that is not a byte stream: the front end's `client_event`/`server_event`.

        For protocols whose library owns the sockets and parses the framing
        (asyncssh: a channel opened, an exec request, channel data with its
        channel id, a window change). It runs in that side's lane like bytes
        do, queued behind a paused handler; `data` is the payload it carries,
        counted as the client's bytes and kept as the protocol error's sample.
        """
        if self.is_closed:
            return []
        if side == CLIENT:
            self.counters.client_bytes += len(data)
        lane = self._lanes[side]
        if lane.paused is not None or lane.opening:
            return self._enqueue(lane, Event(item, data), len(data))
        lane.input = data
        handler = self.front.client_event(item) if side == CLIENT else self.front.server_event(item)
        return self._run(lane, handler)

    def closed(self, side: Side) -> list[Command]:
        """One side closed its connection (or it broke)."""
        if self.is_closed:
            return []
        lane = self._lanes[side]
        lane.input = b""
        handler = self.front.client_closed() if side == CLIENT else self.front.server_closed()
        return self._run(lane, handler, ending=True)

    def completed(self, command: Command, result: Any = None) -> list[Command]:
        """A blocking command finished: its handler reads on with `result`."""
        return self._resume(command, result, None)

    def failed(self, command: Command, error: BaseException) -> list[Command]:
        """A blocking command failed: `error` is raised where its handler waits."""
        return self._resume(command, None, error)

    def broken(self, side: Side, error: ProtocolViolation, sample: bytes = b"") -> list[Command]:
        """A peer broke the protocol below the front end, and its connection is gone.

        For libraries that own the framing (asyncssh: garbage before the
        version string, an oversized packet, a failed key exchange): the
        adapter learns of it only as the connection's end. An ending, never
        queued: ProtocolError (with `sample`, the first bytes the peer sent,
        counted as its bytes), SessionEnd(protocol_error); nothing is said to
        a client that is gone.
        """
        if self.is_closed:
            return []
        if side == CLIENT:
            self.counters.client_bytes += len(sample)
        return self._run(self._lanes[side], self._protocol_error(error, side, sample, tell=False), ending=True)

    def timer(self, name: str) -> list[Command]:
        if name == IDENTITY_TIMER:
            return self._identity_expires()
        if self.is_closed or name != STARTUP_TIMER or self._ready:
            return []
        detail = f"startup did not complete within {self.settings.startup_timeout:g} s (phase {self.front.phase})"
        return self._run(self._lanes[CLIENT], self._protocol_error(ProtocolViolation(PROTOCOL_VIOLATION, detail),
                                                                     CLIENT, b""), ending=True)

    def shutdown(self) -> list[Command]:
        """The proxy is stopping."""
        if self.is_closed:
            return []
        return self._run(self._lanes[CLIENT], self.end_with(
            Ending("shutdown", "shutdown", "the proxy is shutting down")), ending=True)

    # --- driving handlers ------------------------------------------------------------------

    def _resume(self, command: Command, result: Any, error: BaseException | None) -> list[Command]:
        for lane in self._lanes.values():
            if lane.waiting_for is command and lane.paused is not None:
                if isinstance(result, TLSInfo):
                    if isinstance(command, StartTLS) and command.side == CLIENT:
                        self.client_tls = result
                    else:  # StartTLS(SERVER) or OpenUpstream with TLS
                        self.upstream_tls = result
                handler, lane.paused, lane.waiting_for = lane.paused, None, None
                if self.is_closed:
                    handler.close()
                    return []
                out = self._run(lane, handler, value=result, error=error)
                server = self._lanes[SERVER]
                if type(command) is OpenUpstream and server.opening:
                    # A target that speaks first (MySQL, SSH) may have spoken before the open completed;
                    # its words are handled only now, after the handler that opened it read on.
                    server.opening = False
                    if not self.is_closed and server.queue:
                        out += self._run(server, _nothing())
                return out
        return []

    def _enqueue(self, lane: _Lane, entry: bytes | Event, size: int) -> list[Command]:
        """Queue an input behind the lane's paused handler; past LANE_QUEUE_BYTES, stop reading that side."""
        lane.queue.append(entry)
        lane.queued_bytes += size
        if lane.queued_bytes > LANE_QUEUE_BYTES and not lane.reading_paused:
            lane.reading_paused = True
            return [ReadControl(lane.side, True)]
        return []

    def _run(self, lane: _Lane, handler: Steps, *, value: Any = None, error: BaseException | None = None,
             ending: bool = False) -> list[Command]:
        """Drive a handler until it finishes or blocks, then the inputs queued behind it."""
        out: list[Command] = []
        while True:
            if self._step(lane, handler, value, error, ending, out) or self.is_closed:
                break
            if not lane.queue:
                break
            data = lane.queue.popleft()
            lane.queued_bytes -= len(data.data) if type(data) is Event else len(data)
            if lane.reading_paused and lane.queued_bytes <= LANE_QUEUE_BYTES // 2:
                lane.reading_paused = False
                out.append(ReadControl(lane.side, False))
            if type(data) is Event:
                lane.input, item = data.data, data.item
                handler = self.front.client_event(item) if lane.side == CLIENT else self.front.server_event(item)
            else:
                lane.input = data
                handler = self.front.client_data(data) if lane.side == CLIENT else self.front.server_data(data)
            value = error = None
        return out

    def _step(self, lane: _Lane, handler: Steps, value: Any, error: BaseException | None, ending: bool,
              out: list[Command]) -> bool:
        """Run one handler; True when it is paused on a blocking command."""
        try:
            while True:
                command = handler.throw(error) if error is not None else handler.send(value)
                value = error = None
                if type(command) is Send:
                    if command.side == CLIENT:
                        self.counters.server_bytes += len(command.data)
                out.append(command)
                if command.blocking:
                    lane.paused, lane.waiting_for = handler, command
                    if type(command) is OpenUpstream:
                        self._lanes[SERVER].opening = True
                    return True
                if type(command) is Close:
                    handler.close()
                    return False
        except StopIteration:
            return False
        except RecorderUnavailable as exc:
            out += self._fail_closed(exc)
        except Exception as exc:  # noqa: BLE001 - one connection's failure must never reach the proxy
            out += self._drive_ending(lane, self._failure(exc, lane, ending))
        return False

    def _drive_ending(self, lane: _Lane, handler: Steps) -> list[Command]:
        out: list[Command] = []
        try:
            for command in handler:
                if type(command) is Send and command.side == CLIENT:
                    self.counters.server_bytes += len(command.data)
                out.append(command)
        except RecorderUnavailable as exc:
            out += self._fail_closed(exc)
        except Exception:  # noqa: BLE001 - the ending itself failed: still close, never propagate
            log.exception("session %s: internal error while ending", self.session_id)
            out += self._close("protocol_error")
        return out

    def _hook(self, hook: Callable[..., Any], *args: Any) -> Any:
        """Call a front end's ending hook (goodbye, farewell, closed); its failure must not stop the end."""
        try:
            return hook(*args)
        except Exception:  # noqa: BLE001
            log.exception("session %s: internal error in the %s front end's %s", self.session_id,
                          self.protocol_name, getattr(hook, "__name__", hook))
            return None

    def _failure(self, exc: Exception, lane: _Lane, ending: bool) -> Steps:
        """The ending for what a handler raised."""
        side = lane.side
        if isinstance(exc, ProtocolViolation):
            return self._protocol_error(exc, side, lane.input, tell=not (ending and side == CLIENT))
        if isinstance(exc, TLSFailed):
            return self._protocol_error(ProtocolViolation(PROTOCOL_VIOLATION, f"TLS handshake failed: {exc}"),
                                        CLIENT, b"", tell=False)
        if isinstance(exc, UpstreamUnavailable):
            return self.upstream_unavailable(exc.detail)
        log.exception("session %s: internal error in the %s front end", self.session_id, self.protocol_name)
        return self._protocol_error(ProtocolViolation("XX000", f"internal error: {type(exc).__name__}"),
                                    side, b"")

    # --- recording --------------------------------------------------------------------------

    def record(self, kind: str, body: dict) -> None:
        """Record one event; before SessionStart it waits in the backlog."""
        if self._backlog is not None:
            self._backlog.append((kind, body))
        else:
            self._emit(kind, body)

    @property
    def seal(self) -> Callable[[bytes], bytes] | None:
        """What input redaction seals originals to (proxy.core.redaction); None: originals are not kept."""
        return self._seal

    def record_messages(self, direction: Side, messages: list[records.Record], count: int) -> None:
        """A Frames event of `count` protocol messages in one direction."""
        if direction == CLIENT:
            self.counters.client_messages += count
            if self.front.redactor is not None:  # the client's secrets leave the evidence (proxy.core.redaction)
                messages = redaction.redact_messages(self.front.redactor, messages, self._seal)
        else:
            self.counters.server_messages += count
        self.record("frames", {"direction": direction, "messages": messages})

    def say(self, said: Said) -> Send:
        """What the proxy itself tells the client: recorded as the proxy's, counted, sent."""
        self.record_messages(SERVER, said.records, said.count)
        return Send(CLIENT, said.data, said.channel)

    def _emit(self, kind: str, body: dict) -> None:
        try:
            self.recording.record(kind, body)
        except RecorderUnavailable as error:
            if not self.settings.fail_open:
                raise
            self.recording_failures += 1
            if self.recording_failures == 1:
                log.error("session %s: FAIL OPEN: relaying although events are not recorded: %s",
                          self.session_id, error)

    def open(self, identity: Identity | None) -> None:
        """Record SessionStart, then the backlog."""
        if self._backlog is None:
            return
        backlog, self._backlog = self._backlog, None
        attributes = {k: v for k, v in self.attributes.items() if k not in CORE_ATTRIBUTES}  # a client cannot claim them
        if self.client_tls is not None:
            attributes["tls"] = self.client_tls.version
        if self.upstream_tls is not None:
            attributes["upstream_tls"] = self.upstream_tls.version
            if self.upstream_tls.peer_cert_sha256 is not None:
                attributes["upstream_cert_sha256"] = self.upstream_tls.peer_cert_sha256
        if identity is not None:
            attributes["token_exp"] = _utc(identity.expires_at)
        self._emit("session_start", records.session_start(
            identity=identity.to_avro() if identity is not None else None,
            source_address=self.source_address,
            client_cert_fingerprint=self.client_tls.peer_cert_sha256 if self.client_tls else None,
            target=self.settings.name,
            upstream=self.upstream,
            protocol=self.protocol_name,
            client_application=self.client_application,
            attributes=attributes,
        ))
        for kind, body in backlog:
            self._emit(kind, body)

    def not_a_session(self) -> None:
        """This connection is not a session (a PostgreSQL CancelRequest): nothing is recorded."""
        self._not_a_session = True

    # --- identity ---------------------------------------------------------------------------

    def authenticate(self, token: str, user: str | None, *,
                     start: bool = True) -> Generator[Command, Any, Identity | None]:
        """Verify the token and bind it to the protocol's user; None: refused (the session has ended).

        SessionStart is recorded here unless `start` is False: then the front
        end calls `open(identity)` itself once the facts SessionStart carries
        are known (the upstream's TLS), and any ending before that records it.
        """
        result = yield VerifyToken(token)
        return (yield from self.bind_identity(result, user, start=start))

    def bind_identity(self, result: Identity | AuthenticationError, user: str | None, *,
                      start: bool = True) -> Generator[Command, Any, Identity | None]:
        """`authenticate` after the verification: an identity the protocol verified itself (an SSH
        certificate from the proxy's own CA) is bound, timed and gated exactly like a token's."""
        if isinstance(result, AuthenticationError):
            yield from self.deny(str(result.reason_code), result.message)
            return None
        assert isinstance(result, Identity)
        if result.username != user:
            yield from self.deny("user_mismatch", f"the token is for {result.username!r}, the user is {user!r}",
                                 {"token_subject": result.subject, "token_issuer": result.issuer})
            return None
        self.identity = result
        if self._identity_leeway is not None:
            left = (result.expires_at - datetime.now(timezone.utc)).total_seconds() + self._identity_leeway
            yield SetTimer(IDENTITY_TIMER, max(0.0, left))
        if start:
            self.open(result)
        if self._policy is not None:
            self.gate = PolicyGate(self._policy, result, self.settings.name, self._sealer)
        return result

    def deny(self, reason_code: str, detail: str, attributes: dict[str, str] | None = None,
             said: Said | None = None) -> Steps:
        """Refuse the login: PolicyDecision (authentication, deny), the client's error, SessionEnd(auth_failed)."""
        self.open(None)
        self.record("policy_decision", records.authentication_denied(f"{reason_code}: {detail}", attributes or {}))
        yield from self.end_with(Ending("auth_failed", reason_code, detail), said)

    def ready(self) -> SetTimer:
        """The session is established: the startup deadline no longer applies."""
        self._ready = True
        return SetTimer(STARTUP_TIMER, None)

    # --- policy -----------------------------------------------------------------------------

    def check(self, operation: Operation) -> Generator[Command, Any, Verdict]:
        """The policy's verdict on one operation; a hold waits here, with its lane, for the reviewers."""
        gate = self.gate
        if gate is None:
            return ALLOWED
        decision = gate.decide(operation)
        if decision.action == "allow":
            return ALLOWED
        rule = decision.rule or ""
        if decision.action == "block":
            self.record("policy_decision", records.decision(rule, "block", decision.message, operation.text))
            return Verdict(False, decision.message, rule)
        assert self._policy is not None and self.identity is not None
        request = ApprovalRequest.new(
            session_id=self.session_id, requester=self.identity.to_avro(), target=self.settings.name,
            statement=operation.text, rule=rule, reason=decision.message, approvers=decision.approvers,
            timeout=gate.hold_timeout, proxy_key_id=self._policy.proxy_key_id)
        self.record("policy_decision", records.decision(
            rule, "hold", decision.message, operation.text, request_id=request.request_id,
            attributes={"approvers": ",".join(request.approvers), "expires_at": request.expires_at}))
        notice = self.front.hold_notice(request, decision)
        if notice is not None:
            yield self.say(notice)
        outcome = yield AwaitApproval(request)
        expired = outcome.decision == "expired"
        reason = f"no decision by {request.expires_at}" if expired else outcome.reason
        self.record("policy_decision", records.decision(
            rule, "approve" if outcome.approved else "deny", reason, operation.text,
            request_id=request.request_id, approver=outcome.approver,
            attributes={"expired": "true"} if expired else None))
        if outcome.approved:
            return ALLOWED
        who = ("nobody approved it in time" if expired
               else f"denied by {outcome.approver['subject']}" if outcome.approver else "denied")
        return Verdict(False, f"request {request.request_id}: {who}: {reason}", rule)

    # --- endings ----------------------------------------------------------------------------

    def upstream_unavailable(self, detail: str) -> Steps:
        """The target cannot be reached or refused the proxy: the client's error (recorded as the proxy's) says why."""
        log.warning("session %s: target %s unavailable: %s", self.session_id, self.upstream, detail)
        yield from self.end_with(Ending("upstream_unavailable", "upstream_unavailable",
                                        f"the target {self.settings.name!r} is unavailable: {detail}"))

    # --- identity expiry ----------------------------------------------------------------------

    def _identity_expires(self) -> list[Command]:
        """The token's exp plus leeway passed: end now if the front end is idle, else at its next idle point."""
        if self.is_closed or self.identity is None:
            return []
        self._identity_expired = True
        if not self.front.is_idle:
            log.info("session %s: identity expired; ending once the operation in flight completes", self.session_id)
            return []
        return self._run(self._lanes[CLIENT], self.end_with(self._expiry_ending()), ending=True)

    def between_operations(self) -> Steps:
        """The front end is between operations (PostgreSQL: ReadyForQuery, nothing pending): an expired identity ends here."""
        if self._identity_expired and not self.is_closed:
            yield from self.end_with(self._expiry_ending())

    def _expiry_ending(self) -> Ending:
        assert self.identity is not None
        return Ending("identity_expired", "identity_expired",
                      f"the token of {self.identity.username} expired at {_utc(self.identity.expires_at)} "
                      f"(leeway {self._identity_leeway:g} s): reconnect with a new token")

    def _protocol_error(self, error: ProtocolViolation, side: Side, sample: bytes, tell: bool = True) -> Steps:
        """A peer broke the protocol: ProtocolError event, the client's error, SessionEnd(protocol_error)."""
        text = error.message if side == CLIENT else f"the target broke the protocol: {error.message}"
        log.warning("session %s from %s: protocol error (%s): %s", self.session_id, self.source_address, side, text)
        self.record("protocol_error", records.protocol_error(error.code, text, sample))
        ending = Ending("protocol_error", error.code or PROTOCOL_VIOLATION, text)
        yield from self.end_with(ending, None if tell else _SILENT)

    def end_with(self, ending: Ending, said: Said | None = None) -> Steps:
        """Tell the client why (`said`, or the front end's goodbye), then end."""
        if said is None:
            said = self._hook(self.front.goodbye, ending)
        if said is not None and said is not _SILENT:
            yield self.say(said)
        yield from self.end(ending.reason)

    def end(self, reason: str) -> Steps:
        """Record SessionEnd (unless this never was a session), say goodbye to the target, close."""
        if self.is_closed:
            return
        self._record_unrelayed()
        if self._backlog is not None and (self._not_a_session or self.counters.client_bytes == 0):
            self._backlog = None
        else:
            self.open(self.identity)  # None unless authenticated (a deferred SessionStart keeps its identity)
            duration_us = (self._clock() - self._started_ns) // 1000
            self._emit("session_end", records.session_end(reason, duration_us, self.counters))
        yield from self._close(reason)

    def _record_unrelayed(self) -> None:
        """Bytes queued behind a paused handler when the session ends: never relayed, still evidence."""
        for lane in self._lanes.values():
            if lane.queue:
                data = b"".join(x.data if type(x) is Event else x for x in lane.queue)
                lane.queue.clear()
                self.record("frames", records.frames(lane.side, [records.raw_message(
                    "unrelayed", data, {"reason": "the session ended while this waited"})]))

    def _close(self, reason: str) -> Steps:
        if self.is_closed:
            return
        goodbye = self._hook(self.front.farewell_upstream, reason)
        self.is_closed = True
        for lane in self._lanes.values():
            if lane.paused is not None:
                lane.paused.close()
                lane.paused = lane.waiting_for = None
        self._hook(self.front.closed)
        if goodbye is not None:
            yield Send(SERVER, goodbye)
        yield Close(reason)

    def _fail_closed(self, error: RecorderUnavailable) -> list[Command]:
        """Fail closed: nothing more is relayed or recorded; the client learns why."""
        log.error("session %s: FAIL CLOSED: %s", self.session_id, error)
        said = self._hook(self.front.goodbye, Ending(
            "recorder_failure", "recorder_failure", "the session cannot be recorded, so it is closed (fail closed)"))
        out: list[Command] = [Send(CLIENT, said.data)] if said is not None else []
        self._backlog = None
        for lane in self._lanes.values():
            lane.queue.clear()
            lane.queued_bytes = 0
        return out + list(self._close("recorder_failure"))


def _utc(when: datetime) -> str:
    """ISO-8601 UTC, as approvals write times: 2026-05-20T10:00:00Z."""
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _nothing() -> Steps:
    """A handler with nothing to do: `_run` then handles what waits in the lane."""
    yield from ()


_SILENT = Said(b"", [], 0)  # end_with: the client cannot be told (it is gone, or its TLS failed)
