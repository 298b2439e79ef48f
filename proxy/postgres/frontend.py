"""The PostgreSQL front end: its protocol state machine on the proxy core.

Phases: startup (SSLRequest / GSSENCRequest / CancelRequest / StartupMessage)
→ password (the proxy asked for the OIDC token as a cleartext password) →
verifying (the core checks the token) → upstream_tls (the proxy asked the
target for TLS with SSLRequest, as libpq does; `upstream_tls`) → connecting
(the proxy logs in to the target with the credentials it holds) → relay.

SessionStart is recorded once the upstream link is up (TCP, and TLS when
configured), so that it carries the target's TLS version and certificate
beside the client's; an ending before that (the target unreachable, its
certificate refused) records it with the identity, then SessionEnd.

Everything protocol-neutral — identity binding, the backlog before
SessionStart, fail closed, holds, the startup deadline, the end — is the
core's `Session`; this module only speaks PostgreSQL. A statement that the
policy holds is a paused handler: `verdict = yield from session.check(...)`
waits there for the reviewers, and what the client sends after it waits
behind it in the core.
"""

from __future__ import annotations

import logging

from ingest.protocols.postgres import messages as m
from ingest.protocols.postgres.protocol import PROTOCOL_VIOLATION, Message, MessageReader, single_messages, violation
from ingest.protocols.postgres.records import RUN_TYPES
from ingest.recorder import RecorderUnavailable
from proxy.approvals import ApprovalRequest
from proxy.core import records
from proxy.core.commands import CLIENT, SERVER, Cede, OpenUpstream, Send, SendOnce, StartTLS, TLSFailed
from proxy.core.frontend import Ending, FrontEnd, Protocol, Said, Steps
from proxy.core.session import Session
from proxy.policy import Decision
from proxy.settings import ProxySettings

from . import recording as rec
from . import cancel
from .cancel import CancelKeys, CancelTarget
from .policy_layer import StatementPolicy
from .redaction import PostgresRedactor
from .settings import PostgresSettings
from .upstream_auth import UpstreamAuthError, UpstreamLogin

log = logging.getLogger(__name__)

AUTH_FAILED = "28P01"
INVALID_AUTHORIZATION = "28000"
CONNECTION_FAILURE = "08006"
FEATURE_NOT_SUPPORTED = "0A000"
ADMIN_SHUTDOWN = "57P01"
INVALID_CATALOG_NAME = "3D000"
_LOGIN_REFUSED_CLASS = "28"
_NOT_FORWARDED = frozenset({"user", "database"})
# What Custody does not relay, and what to use instead (the client's error, the evidence, the log).
GSSENC_REFUSED = ("custody: GSSAPI encryption is not supported; connect with sslmode=require/prefer (TLS) "
                  "and the OIDC token as password")
REPLICATION_REFUSED = ("replication connections are not relayed by Custody; connect to the target directly "
                       "with a replication role")
MASK_SLICE = 32  # messages masked between two turns of the event loop (~0.5 ms at 60k rows/s)
MASK_SLICE_CONTENDED = 8  # the same while another session waits for its target's reply, which waits behind it
MASKED_SEND = 16 * 1024  # masked bytes recorded and relayed together (~250 small rows, ~2 ms of masking)
PIECE_READ = 64 * 1024  # bytes of a server read cut into messages between two turns of the loop (~0.35 ms masked)
_SYNC_POINTS = frozenset({"Query", "Sync", "FunctionCall"})  # each is answered with one ReadyForQuery
_EXTENDED = frozenset({"Parse", "Bind", "Describe", "Execute", "Close", "Flush"})  # in flight until a Sync
# The core's endings as PostgreSQL errors (auth_failed and protocol_error carry their own codes).
_ENDING_CODES = {"shutdown": ADMIN_SHUTDOWN, "recorder_failure": ADMIN_SHUTDOWN,
                 "upstream_unavailable": CONNECTION_FAILURE, "identity_expired": INVALID_AUTHORIZATION}


class PostgresProtocol(Protocol):
    """One PostgreSQL listener: its settings and the cancel keys of its live sessions."""

    name = "postgres"

    def __init__(self, settings: PostgresSettings) -> None:
        self.settings = settings
        self.listener = settings.listener
        self.upstream = settings.upstream.describe()
        replicas = settings.replicas
        self.cancel_keys = CancelKeys(replicas.replica_id if replicas is not None else None)

    @classmethod
    def from_settings(cls, proxy: ProxySettings, fail_open: bool) -> "PostgresProtocol":
        return cls(PostgresSettings.from_config(proxy, fail_open))

    def front_end(self, session: Session) -> "PostgresFrontEnd":
        return PostgresFrontEnd(session, self)


def _cut(reader: MessageReader, data: bytes) -> tuple[list[Message], bytes | None]:
    """The messages `data` completes, and `data` itself when it held exactly those (relayed as read, not joined
    again from the messages), else None."""
    whole = not reader.buffered
    messages = reader.feed(data)
    return messages, data if whole and not reader.buffered else None


def _count(messages: list[Message]) -> int:
    """Protocol messages, each of a run counted."""
    return sum([x.count for x in messages])


def _error(code: str, text: str, severity: str = "FATAL") -> Message:
    return Message("ErrorResponse", m.error_response(severity=severity, code=code, message=text))


def _said(messages: list[Message]) -> Said:
    """Messages the proxy itself sends the client, recorded as the proxy's."""
    return Said(b"".join(x.data for x in messages), [rec.message_record(x, rec.PROXY_ORIGIN) for x in messages],
                len(messages))


class PostgresFrontEnd(FrontEnd):
    def __init__(self, session: Session, protocol: PostgresProtocol) -> None:
        super().__init__(session)
        settings = protocol.settings
        self.settings = settings
        self.cancel_keys = protocol.cancel_keys
        self.phase = "startup"
        self.parameters: dict[str, str] = {}
        # Bulk messages (DataRow, CopyData) come from the readers as runs: one Message of many, which is how they
        # are recorded (proxy.postgres.recording) and relayed; only masking needs them one by one.
        self._client = MessageReader("client", max_message_size=settings.max_client_message, runs=RUN_TYPES)
        self._upstream = MessageReader("server", max_message_size=settings.max_server_message, runs=RUN_TYPES)
        self._login = UpstreamLogin(settings.upstream.user, settings.upstream.password)
        self._upstream_open = False
        self._upstream_key: m.BackendKeyData | None = None
        self._greeting: list[Message] = []  # the target's ParameterStatus/Notice before ReadyForQuery
        self._early: list[Message] = []  # client messages sent before the session was ready
        self._cancel_key: int | None = None
        self._policy: StatementPolicy | None = None
        self._prepared = rec.PreparedStatements()
        self.database = settings.upstream.database  # the target database this session logs in to
        self._pending = 0  # sync points sent to the target whose ReadyForQuery has not come back
        self._unsynced = False  # extended-protocol messages sent since the last Sync
        self._refused_gssenc = False  # answered a GSSENCRequest with 'N'
        self.redactor = PostgresRedactor(session)  # role passwords, keys, detector findings: not kept in clear

    @property
    def user(self) -> str | None:
        return self.parameters.get("user")

    @property
    def is_idle(self) -> bool:
        """Every statement sent has been answered (ReadyForQuery): an expired identity may end the session now."""
        return self._pending == 0 and not self._unsynced

    # --- client side ---------------------------------------------------------------------

    def client_data(self, data: bytes) -> Steps:
        if self.phase == "relay":
            yield from self._relay_client(data)
            return
        for message in self._client.feed(data):
            if self.phase == "startup":
                yield from self._startup_packet(message)
            elif self.phase == "password":
                yield from self._password(message)
            else:
                self._keep_early(message)
            if self.session.is_closed:
                return

    def client_closed(self) -> Steps:
        self._client.eof()  # a message cut off by the close is a protocol error
        if self.phase == "startup" and self._refused_gssenc:
            # gssencmode=require: libpq hangs up on our 'N' and shows its own words (since CVE-2024-10977 it
            # reads no server text before the handshake), so the refusal and its reason are in the evidence.
            self.session.record("policy_decision", records.decision("gssapi", "deny", GSSENC_REFUSED, None))
        yield from self.session.end("client_disconnect")

    def _startup_packet(self, message: Message) -> Steps:
        if message.type == "CancelRequest":
            yield from self._cancel(m.decode_cancel_request(message.payload))
            return
        self.session.record_messages(CLIENT, rec.message_records([message]), 0)
        if message.type == "StartupMessage":
            yield from self._startup_message(m.decode_startup_message(message.payload))
        elif message.type == "SSLRequest" and self.session.settings.tls is not None and self.session.client_tls is None:
            yield self.session.say(_said([Message("EncryptionResponse", m.SSL_ALLOWED)]))
            yield StartTLS(CLIENT, self.session.settings.tls)
        elif message.type == "GSSENCRequest":
            # 'N', as PostgreSQL answers without GSSAPI: gssencmode=prefer goes on with TLS or plain text.
            log.info("session %s from %s: %s", self.session.session_id, self.session.source_address, GSSENC_REFUSED)
            self._refused_gssenc = True
            said = _said([Message("EncryptionResponse", m.ENCRYPTION_DENIED)])
            said.records[0]["attributes"]["refused"] = GSSENC_REFUSED
            yield self.session.say(said)
        else:
            yield self.session.say(_said([Message("EncryptionResponse", m.ENCRYPTION_DENIED)]))

    def _startup_message(self, startup: m.StartupMessage) -> Steps:
        self.parameters = startup.parameters
        session = self.session
        session.client_application = self.parameters.get("application_name")
        session.attributes = dict(self.parameters)
        if not self.user:
            yield from self._refuse_login("missing_user", "no PostgreSQL user name specified in startup packet",
                                          INVALID_AUTHORIZATION)
            return
        said: list[Message] = []
        options = [name for name in startup.parameters if name.startswith("_pq_.")]
        if startup.protocol_version[1] > 0 or options:
            said.append(Message("NegotiateProtocolVersion", m.negotiate_protocol_version(0, options)))
        said.append(Message("AuthenticationRequest", m.authentication_cleartext_password()))
        self.phase = "password"
        yield session.say(_said(said))

    def _refuse_login(self, reason_code: str, detail: str, code: str) -> Steps:
        yield from self.session.deny(reason_code, detail, said=_said([_error(code, f"custody: {detail}")]))

    def _password(self, message: Message) -> Steps:
        session = self.session
        if message.type == "Terminate":
            session.record_messages(CLIENT, rec.message_records([message]), 0)
            yield from session.end("client_terminate")
            return
        if message.type != "PasswordMessage":
            raise violation(f"expected a password message (the OIDC access token), got {message.type}")
        session.record_messages(CLIENT, rec.message_records([message]), 0)  # redacted: the token is not recorded
        token = m.decode_password_message(message.payload).password
        self.phase = "verifying"
        identity = yield from session.authenticate(token, self.user, start=False)
        if identity is None:
            return
        if self.parameters.get("replication", "false").lower() not in ("false", "off", "no", "0"):
            yield from self._refuse_replication()
            return
        database = self._choose_database()
        if database is None:
            yield from self._refuse_database()
            return
        self.database = database
        session.upstream = self.settings.upstream.describe(database)
        if session.gate is not None:
            self._policy = StatementPolicy(session.gate, database)
        self.phase = "connecting"
        upstream = self.settings.upstream
        yield OpenUpstream(upstream.host, upstream.port)
        self._upstream_open = True
        if self.settings.upstream_tls.enabled:
            self.phase = "upstream_tls"
            yield Send(SERVER, m.SSL_REQUEST)  # the answer is one byte: server_data's upstream_tls phase
            return
        yield from self._start_upstream()

    def _start_upstream(self) -> Steps:
        """The upstream link is up: record SessionStart, then log in to the target."""
        self.session.open(self.session.identity)
        self.phase = "connecting"
        upstream = self.settings.upstream
        parameters = {"user": upstream.user, "database": self.database}
        parameters.update(
            (name, value) for name, value in self.parameters.items()
            if name not in _NOT_FORWARDED and not name.startswith("_pq_.")
        )
        yield Send(SERVER, m.startup_message(parameters))

    def _choose_database(self) -> str | None:
        """The database to log in to: the configured one, or one of `databases` the client named; None: refused.

        Without `databases` the client's choice is recorded but not used. A
        client that names no database (libpq then sends the user name) gets
        the configured one.
        """
        default, allowed = self.settings.upstream.database, self.settings.databases
        asked = self.parameters.get("database") or ""
        if not allowed or asked in ("", default) or (asked == self.user and asked not in allowed):
            return default
        return asked if asked in allowed else None

    def _refuse_replication(self) -> Steps:
        """A replication connection (replication=true/database), refused once the caller is known:
        PolicyDecision (replication, deny), FATAL 0A000 saying what to use instead, SessionEnd(policy)."""
        session = self.session
        session.open(session.identity)
        session.record("policy_decision", records.decision(
            "replication", "deny", REPLICATION_REFUSED, None,
            attributes={"replication": self.parameters.get("replication", "")}))
        yield from session.end_with(Ending("policy", FEATURE_NOT_SUPPORTED, REPLICATION_REFUSED),
                                    _said([_error(FEATURE_NOT_SUPPORTED, f"custody: {REPLICATION_REFUSED}")]))

    def _refuse_database(self) -> Steps:
        """A database not in `databases`: PolicyDecision (databases, deny), FATAL 3D000, SessionEnd(policy)."""
        session, asked = self.session, self.parameters.get("database", "")
        choices = ", ".join(dict.fromkeys((self.settings.upstream.database, *self.settings.databases)))
        detail = f'database "{asked}" is not served by target {self.settings.name!r} (choose one of: {choices})'
        session.open(session.identity)
        session.record("policy_decision", records.decision("databases", "deny", detail, None,
                                                           attributes={"database": asked}))
        yield from session.end_with(Ending("policy", INVALID_CATALOG_NAME, detail),
                                    _said([_error(INVALID_CATALOG_NAME, f"custody: {detail}")]))

    def _upstream_tls(self, data: bytes) -> Steps:
        """The target's one-byte answer to SSLRequest: 'S' starts TLS, anything else is a refusal."""
        tls = self.settings.upstream_tls
        if data[:1] != m.SSL_ALLOWED:
            answer = "does not offer TLS" if data[:1] == m.ENCRYPTION_DENIED else f"answered SSLRequest with {data[:1]!r}"
            yield from self.session.upstream_unavailable(
                f'the target {answer}, and upstream_tls = "{tls.mode}" requires it')
            return
        if len(data) > 1:  # bytes after 'S' would be taken as if they came over TLS (CVE-2021-23214)
            raise violation("the target sent data after agreeing to TLS, before the handshake")
        try:
            yield StartTLS(SERVER, tls.context, tls.server_hostname)
        except TLSFailed as error:
            yield from self.session.upstream_unavailable(
                f'TLS with the target failed (upstream_tls = "{tls.mode}"): {error}')
            return
        yield from self._start_upstream()

    def _keep_early(self, message: Message) -> None:
        """A client message sent before ReadyForQuery: relayed once the session is ready."""
        self._early.append(message)
        if sum(len(early.data) for early in self._early) > self.settings.max_client_message:
            raise violation("too much data sent before authentication completed")

    def _cancel(self, request: m.CancelRequest) -> Steps:
        """A connection that only cancels another session's query: not a session of its own."""
        self.session.not_a_session()
        replicas, source, secret = self.settings.replicas, self.session.source_address, request.secret
        forwarded_by: str | None = None
        if replicas is not None and cancel.is_forwarded(secret):
            forwarded = cancel.open_forwarded(replicas.channel, request.process_id, secret)
            if forwarded is None:
                log.warning("proxy %s: forwarded cancel from %s not sealed by a replica (forged, altered or "
                            "replayed): ignored", self.session.settings.name, source)
                yield from self.session.end("cancel")
                return
            forwarded_by = f"replica {forwarded.sender} ({source})"
            source, secret = forwarded.source_address, forwarded.secret
        elif replicas is not None and cancel.owner(request.process_id) != replicas.replica_id:
            yield from self._forward_cancel(request)
            return
        target = self.cancel_keys.lookup(request.process_id, secret)
        if target is None:
            log.warning("proxy %s: CancelRequest from %s with an unknown key ignored",
                        self.session.settings.name, source)
        elif target.front_end.note_cancel(request.process_id, secret, source, forwarded_by):
            yield SendOnce(target.host, target.port, m.cancel_request(target.process_id, target.secret))
        yield from self.session.end("cancel")

    def _forward_cancel(self, request: m.CancelRequest) -> Steps:
        """A key another replica issued (the load balancer chose this one): that replica checks it and cancels."""
        replicas = self.settings.replicas
        assert replicas is not None
        owner = cancel.owner(request.process_id)
        if owner >= len(replicas.peers) or len(request.secret) != cancel.SECRET_BYTES:
            log.warning("proxy %s: CancelRequest from %s for replica %s, which is not configured: ignored",
                        self.session.settings.name, self.session.source_address, owner)
        else:
            host, port = replicas.peers[owner]
            key_field = cancel.forwarded_key_field(replicas.channel, replicas.replica_id, request.process_id,
                                                   request.secret, self.session.source_address)
            yield SendOnce(host, port, m.cancel_request(request.process_id, key_field))
        yield from self.session.end("cancel")

    def note_cancel(self, process_id: int, secret: bytes, source_address: str, forwarded_by: str | None = None) -> bool:
        """Record in this session that a client cancelled its query; False: do not forward (fail closed)."""
        if self.session.is_closed:
            return False
        request = Message("CancelRequest", m.cancel_request(process_id, secret))
        attributes = {"source_address": source_address}
        if forwarded_by is not None:
            attributes["forwarded_by"] = forwarded_by
        record = rec.message_record(request, attributes)
        try:
            self.session.record_messages(CLIENT, [record], 0)
        except RecorderUnavailable:
            log.error("session %s: cancel from %s not recorded, so not forwarded", self.session.session_id,
                      source_address)
            return False
        return True

    # --- upstream login ------------------------------------------------------------------

    def server_data(self, data: bytes) -> Steps:
        if self.phase == "relay":
            yield from self._relay_server(data)
            return
        if self.phase == "upstream_tls":
            yield from self._upstream_tls(data)
            return
        messages = self._upstream.feed(data)
        for index, message in enumerate(messages):
            kind = message.type
            if kind == "AuthenticationRequest":
                try:
                    reply = self._login.respond(m.decode_authentication(message.payload))
                except UpstreamAuthError as error:
                    yield from self.session.upstream_unavailable(str(error))
                    return
                if reply is not None:
                    yield Send(SERVER, reply)
            elif kind == "ErrorResponse":
                yield from self._login_refused(m.decode_error_response(message.payload))
                return
            elif kind == "BackendKeyData":
                self._upstream_key = m.decode_backend_key_data(message.payload)
            elif kind in ("ParameterStatus", "NoticeResponse"):
                self._greeting.append(message)
            elif kind == "ReadyForQuery":
                yield from self._ready(message)
                rest = messages[index + 1:]
                if rest and not self.session.is_closed:
                    yield from self._forward_server(rest, None)
                return
            elif kind != "NegotiateProtocolVersion":
                raise violation(f"unexpected {kind} from the target during login")

    def server_closed(self) -> Steps:
        if self.phase != "relay":
            yield from self.session.upstream_unavailable("the target closed the connection during login")
            return
        self._upstream.eof()
        yield from self.session.end("server_disconnect")

    def _ready(self, ready_for_query: Message) -> Steps:
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
        said = ours + theirs
        yield self.session.say(Said(b"".join(x.data for x in said), records, len(said)))
        yield self.session.ready()
        self.phase = "relay"
        early, self._early = self._early, []
        if early:
            yield from self._forward_client(early, None)
        if self.is_idle:
            yield from self.session.between_operations()

    def _login_refused(self, error: m.ErrorResponse) -> Steps:
        """The target refused our login: its reason, unless it is about the proxy's credentials."""
        log.warning("session %s: the target refused the proxy's login: %s %s", self.session.session_id,
                    error.code, error.message)
        if error.code.startswith(_LOGIN_REFUSED_CLASS):
            yield from self.session.upstream_unavailable(f"the target refused the proxy's login ({error.code})")
            return
        said = _said([_error(error.code or CONNECTION_FAILURE, error.message)])
        yield from self.session.end_with(Ending("upstream_unavailable", error.code, error.message), said)

    # --- relay: the hot path -------------------------------------------------------------

    def _relay_client(self, data: bytes) -> Steps:
        messages, raw = _cut(self._client, data)
        if messages:
            yield from self._forward_client(messages, raw)

    def _forward_client(self, messages: list[Message], raw: bytes | None) -> Steps:
        """Record, then relay: `raw` is the messages' bytes when the read held exactly them."""
        for message in messages:
            if message.type in _SYNC_POINTS:
                self._pending += 1
                self._unsynced = False
            elif message.type in _EXTENDED:
                self._unsynced = True
        records = rec.message_records(messages)
        self._prepared.annotate(records)
        self.session.record_messages(CLIENT, records, _count(messages))
        if self._policy is not None:
            yield from self._gate_client(messages, records)
        else:
            yield Send(SERVER, raw if raw is not None else b"".join([x.data for x in messages]))
        if messages[-1].type == "Terminate":
            yield from self.session.end("client_terminate")

    def _gate_client(self, messages: list[Message], records: list[rec.Record]) -> Steps:
        """Relay what the policy lets through, in order; a held statement waits here for its verdict.

        Each statement's SQL comes from its record (decoded once, for the evidence; bulk runs fold
        into one record, statements never do)."""
        policy = self._policy
        assert policy is not None
        texts = iter([r["statement"] for r in records if r["type"] in rec.STATEMENT_TYPES])
        passed: list[bytes] = []
        for message in messages:
            if message.type not in rec.STATEMENT_TYPES:
                passed.append(message.data)
                continue
            if passed:
                yield Send(SERVER, b"".join(passed))
                passed = []
            verdict = yield from self.session.check(policy.operation(next(texts)))
            yield Send(SERVER, message.data if verdict.allowed else policy.refuse(message, verdict.reason))
        if passed:
            yield Send(SERVER, b"".join(passed))

    def _relay_server(self, data: bytes) -> Steps:
        """A read cut into messages PIECE_READ bytes at a time with a turn of the loop between pieces, as if TCP had
        delivered it so. Cut whole, a 256 KiB read held the loop while all its messages were parsed, recorded (and
        masked) and another session's query waited that long: ~1.4 ms before a masked read's first slice, and a
        `SELECT 1` beside an unmasked bulk result had a p99 ~18x its idle one (bench/policy.py)."""
        for start in range(0, len(data), PIECE_READ):
            if start:
                yield Cede()
            messages, raw = _cut(self._upstream, data[start:start + PIECE_READ])  # a small read: itself, no copy
            if messages:
                yield from self._forward_server(messages, raw)

    def _forward_server(self, messages: list[Message], raw: bytes | None) -> Steps:
        if any(x.type == "NotificationResponse" for x in messages):
            messages, raw = self._proxy_pids(messages), None
        policy = self._policy
        if policy is None or not policy.changes_results():
            self.session.record_messages(SERVER, rec.message_records(messages), _count(messages))
            yield Send(CLIENT, raw if raw is not None else b"".join([x.data for x in messages]))
        else:
            yield from self._forward_masked(policy, single_messages(messages))
        if self._pending:
            answered = sum(1 for x in messages if x.type == "ReadyForQuery")
            if answered:
                self._pending = max(0, self._pending - answered)
                if self.is_idle:
                    yield from self.session.between_operations()

    def _forward_masked(self, policy: StatementPolicy, messages: list[Message]) -> Steps:
        """Mask in slices, ceding the event loop between them, so that one large masked result does not
        stall every other session. What the slices give is recorded, then relayed, in order, MASKED_SEND
        bytes at a time: a send, a hand-off to the recorder and a seal per slice cost the relay ~20 % of a
        masked stream (a loopback send of 3 KiB runs the receiver's TCP path too, ~40 µs on this machine)."""
        originals: list[Message] = []
        shown: list[Message] = []
        changed: list[bool] = []
        start = size = 0
        step = MASK_SLICE
        while start < len(messages):
            if start:
                if size >= MASKED_SEND:
                    yield from self._relay_masked(policy, shown, originals, changed)
                    originals, shown, changed, size = [], [], [], 0
                contended = yield Cede()
                step = MASK_SLICE_CONTENDED if contended else MASK_SLICE
            part = messages[start:start + step]
            start += step
            masked = policy.shown(part)
            out, flags = masked if masked is not None else (part, [False] * len(part))
            originals += part
            shown += out
            changed += flags
            size += sum([len(x.data) for x in out])
        yield from self._relay_masked(policy, shown, originals, changed)

    def _relay_masked(self, policy: StatementPolicy, shown: list[Message], originals: list[Message],
                      changed: list[bool]) -> Steps:
        self.session.record_messages(SERVER, policy.records(shown, originals, changed), len(shown))
        yield Send(CLIENT, b"".join([x.data for x in shown]))

    def _proxy_pids(self, messages: list[Message]) -> list[Message]:
        """A NOTIFY from one of this listener's sessions names its proxy pid, as its client knows it."""
        upstream = self.settings.upstream
        out = []
        for message in messages:
            if message.type == "NotificationResponse":
                note = m.decode_notification_response(message.payload)
                proxy_pid = self.cancel_keys.proxy_pid(upstream.host, upstream.port, note.process_id)
                if proxy_pid is not None:
                    message = Message(message.type, m.notification_response(proxy_pid, note.channel, note.payload))
            out.append(message)
        return out

    # --- what only PostgreSQL can say ----------------------------------------------------

    def goodbye(self, ending: Ending) -> Said:
        if ending.reason == "auth_failed":
            return _said([_error(AUTH_FAILED,
                                 f'password authentication failed for user "{self.user}": {ending.code}')])
        if ending.reason == "protocol_error":
            code = ending.code if len(ending.code) == 5 else PROTOCOL_VIOLATION  # a SQLSTATE, or ours
        else:
            code = _ENDING_CODES.get(ending.reason, ADMIN_SHUTDOWN)
        return _said([_error(code, f"custody: {ending.text}")])

    def farewell_upstream(self, reason: str) -> bytes | None:
        if self._upstream_open and reason not in ("server_disconnect", "client_terminate"):
            return m.TERMINATE
        return None

    def hold_notice(self, request: ApprovalRequest, decision: Decision) -> Said:
        notice = m.notice_response(
            severity="NOTICE", code="00000",
            message=f"custody: {decision.message}; waiting for approval, request {request.request_id}",
            detail=f"may approve: members of {', '.join(request.approvers)} other than you; "
                   f"denied unless approved by {request.expires_at}",
            hint=f"a reviewer runs: custody approvals approve {request.request_id} --reason ...")
        return _said([Message("NoticeResponse", notice)])

    def closed(self) -> None:
        if self._cancel_key is not None:
            self.cancel_keys.release(self._cancel_key)
            self._cancel_key = None
