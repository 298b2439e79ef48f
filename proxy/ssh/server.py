"""The SSH glue: asyncssh on both sides, driving the core's `Session`.

asyncssh owns its sockets and the SSH transport (key exchange, ciphers,
channels, windows), so the byte adapter `proxy.core.server` does not fit.
This module turns asyncssh's callbacks into `proxy.ssh.events` items fed to
`Session.event` (client side: the proxy's asyncssh server; server side: its
asyncssh client connection to the target) and carries out the commands the
session returns — the core's (`Send`, `Close`, `SetTimer`, `VerifyToken`,
`AwaitApproval`) and SSH's (`ConnectTarget`, `OpenChannel`, `Exit`…).
Nothing here decides anything: identity, recording, policy and endings are
the session's and the front end's.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from datetime import datetime, timezone
from typing import Any, Callable

import asyncssh
from asyncssh.public_key import SSHOpenSSHCertificate, decode_ssh_certificate, decode_ssh_public_key

from ingest.recorder import Recorder
from ingest.protocols import ProtocolViolation
from proxy.core.commands import (
    CLIENT,
    SERVER,
    Close,
    Command,
    ReadControl,
    Send,
    UpstreamUnavailable,
)
from proxy.core.policy import PolicyRuntime
from proxy.core.runner import Approvals, CommandRunner
from proxy.core.server import _address
from proxy.core.session import STARTUP_TIMER, Session
from proxy.identity import TokenVerifier

from . import authorized_keys, certificates
from . import events as ev

log = logging.getLogger(__name__)

_STDERR = asyncssh.EXTENDED_DATA_STDERR
AGENT_RELAY = "custody-agent-relay"  # a target session asks for the agent; its channels are relayed, no socket
SAMPLE_BYTES = 256  # the first bytes a client sends, kept as a transport error's sample
MAX_OFFERED_KEYS = 8  # unknown keys named in an authentication failure; the rest are counted

# What asyncssh reports as a connection's end when the peer broke SSH itself (not a disconnect of its own):
# the ProtocolError event's code. Anything else unexpected is a transport error too.
_TRANSPORT_ERRORS: tuple[tuple[type[BaseException], str], ...] = (
    (asyncssh.ProtocolNotSupported, "ssh_version_not_supported"),
    (asyncssh.KeyExchangeFailed, "ssh_key_exchange_failed"),
    (asyncssh.MACError, "ssh_mac_error"),
    (asyncssh.CompressionError, "ssh_compression_error"),
    (asyncssh.ServiceNotAvailable, "ssh_service_not_available"),
    (asyncssh.ProtocolError, "ssh_protocol_error"),
)
# Ends that are the peer's own choice (a disconnect, a dropped TCP connection, a refused login): no error.
_ORDINARY_ENDS = (asyncssh.ConnectionLost, asyncssh.DisconnectError, OSError)


def transport_error(exc: BaseException | None) -> ProtocolViolation | None:
    """The ProtocolViolation for how asyncssh ended a connection; None for an ordinary end."""
    if exc is None:
        return None
    for kind, code in _TRANSPORT_ERRORS:
        if isinstance(exc, kind):
            return ProtocolViolation(code, f"SSH transport: {exc}")
    if isinstance(exc, _ORDINARY_ENDS):
        return None
    return ProtocolViolation("ssh_transport_error", f"SSH transport: {type(exc).__name__}: {exc}")


class SSHListener:
    """One `[[proxy]] protocol = "ssh"`: the proxy's SSH server; a Session per client connection."""

    def __init__(self, protocol: Any, verifier: TokenVerifier, recorder: Recorder,
                 policy: PolicyRuntime | None = None, approvals: Approvals | None = None,
                 identity_leeway: float | None = 30.0) -> None:
        self.protocol, self.verifier, self.recorder = protocol, verifier, recorder
        self.policy, self.approvals, self.identity_leeway = policy, approvals, identity_leeway
        self.settings = protocol.listener
        self.ssh = protocol.settings
        self.connections: set[ClientConnection] = set()
        self._server: asyncssh.SSHAcceptor | None = None
        self.throttled = False

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[:2]

    async def start(self) -> None:
        self._server = await asyncssh.create_server(
            lambda: ClientConnection(self), self.settings.listen_host, self.settings.listen_port,
            server_host_keys=[self.ssh.host_key], encoding=None, line_editor=False,
            agent_forwarding=False, x11_forwarding=False, allow_scp=False, sftp_factory=None,
            login_timeout=self.settings.startup_timeout * 2, reuse_address=True, backlog=1024)
        log.info("proxy %s (ssh) listening on %s:%s", self.settings.name, *self.address)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.run(connection.session.shutdown())
        if self._server is not None:
            await self._server.wait_closed()

    def throttle(self, pressing: bool) -> None:
        """The recorder is behind: every channel stops reading (both sides) until it catches up."""
        self.throttled = pressing
        for connection in list(self.connections):
            connection.throttle(pressing)


class ClientConnection(asyncssh.SSHServer, CommandRunner):
    """One client: asyncssh's server-side callbacks in, the session's commands out."""

    def __init__(self, listener: SSHListener) -> None:
        CommandRunner.__init__(self, listener.verifier, listener.approvals)
        self.listener = listener
        self.conn: asyncssh.SSHServerConnection | None = None
        self.session: Session
        self.upstream: asyncssh.SSHClientConnection | None = None
        self.client_channels: dict[int, ServerChannelSession] = {}
        self.upstream_channels: dict[int, asyncssh.SSHClientChannel | asyncssh.SSHTCPChannel] = {}
        self._next_channel = 0
        self._login: asyncio.Future | None = None
        self._refused_forwards: dict[int, str] = {}
        # The client's tcpip-forward and auth-agent-req requests, oldest first (the front end answers in order),
        # each with its session channel (an agent request's).
        self._forward_answers: deque[tuple[asyncio.Future, int | None]] = deque()
        self._agent_channels: set[int] = set()  # session channels whose agent requests were allowed
        self._remote_listener: asyncssh.SSHListener | None = None  # the target's, until its request is answered
        self._farewell = ""
        self._sample = b""
        self._offered_keys: list[str] = []  # fingerprints of keys that log no one in, as offered
        self._offered_user = ""
        self._offered_count = 0
        self._upstream_paused: dict[int, set[str]] = {}  # why each target channel is not read

    # --- asyncssh server callbacks -------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        listener = self.listener
        self.session = Session(protocol=listener.protocol, recording=listener.recorder.open_session(),
                               source_address=_address(conn.get_extra_info("peername")), policy=listener.policy,
                               identity_leeway=listener.identity_leeway)
        listener.connections.add(self)
        self._keep_sample(conn)
        self._decide_agent_refuse_x11(conn)
        if self.public_key_auth_supported():
            self._check_public_keys(conn)
        self.run(self.session.start())

    def _decide_agent_refuse_x11(self, conn: asyncssh.SSHServerConnection) -> None:
        """asyncssh asks its connection for an agent listener or an X11 display (both off): these ask the session.

        A session channel's auth-agent-req awaits the front end's decision
        (closed by default; allowed, the target's session of that channel asks
        for the agent and the target's agent channels are relayed to the
        client's agent, `TargetConnection`); X11 is recorded and refused.
        """
        async def create_agent_listener() -> bool:
            channel = self._channel_of(None)
            if self._closed or channel is None:
                return False
            answer = asyncio.get_running_loop().create_future()
            self._forward_answers.append((answer, channel))
            self._forward_request(ev.ForwardRequest("agent", channel))
            return bool(await answer)

        async def attach_x11_listener(chan: Any, auth_proto: bytes, auth_data: bytes, screen: int) -> None:
            self._forward_request(ev.ForwardRequest("x11", self._channel_of(chan),
                                                    detail=f"{_text(auth_proto)} screen {screen}"))
            return None

        conn.create_agent_listener = create_agent_listener  # type: ignore[method-assign]
        conn.attach_x11_listener = attach_x11_listener  # type: ignore[method-assign]

    def _check_public_keys(self, conn: asyncssh.SSHServerConnection) -> None:
        """Public-key login carries its identity: a certificate of the proxy's CA (`custody ssh-login`) or a key
        of `[[proxy.authorized_key]]`.

        asyncssh's `validate_ca_key` hook sees the CA key but not the
        certificate, and its `validate_public_key` the key but not the user, so
        its connection's `validate_public_key` (the whole check: the key or
        certificate, then the client's signature) is wrapped on this one
        instance: what the key says of its holder is checked here
        (`_presented`). A query without a signature only learns whether the
        key would do; a signed attempt that passes is this connection's login,
        decided by the session like a token's. A known key that fails (an
        expired certificate or mapping, another user) is an authentication
        failure of its own, once its holder signed; unknown keys and other
        CAs' certificates are not accepted, as sshd does, and are recorded as
        an authentication failure if the client leaves without logging in
        (`_refuse_offered_keys`).
        """
        validate = conn.validate_public_key

        async def validate_public_key(username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
            presented = self._presented(username, key_data)
            if presented is None:
                self._offered(username, key_data)
                return False
            key, identity, attributes = presented
            if isinstance(identity, certificates.CertificateRefused):
                if not msg:
                    return True  # let it sign: then its refusal is recorded, for the key's proven holder
                if not _signed_by(conn, key, msg, signature):
                    return False
            elif not await validate(username, key_data, msg, signature):
                return False  # a bad signature: not this key's holder
            elif not msg:
                return True  # the query: the key would be accepted
            return await self._authenticate(username, "", "publickey", identity, attributes)

        conn.validate_public_key = validate_public_key  # type: ignore[method-assign]

    def _presented(self, username: str, key_data: bytes) -> tuple[asyncssh.SSHKey, Any, dict[str, str]] | None:
        """A presented key's holder key, identity (or CertificateRefused) and facts; None: it logs no one in."""
        ssh = self.listener.ssh
        try:
            cert = decode_ssh_certificate(key_data)
        except (asyncssh.KeyImportError, ValueError):
            cert = None
        if cert is not None:
            ca = ssh.user_ca
            if ca is None or not isinstance(cert, SSHOpenSSHCertificate):
                return None
            if cert.signing_key.public_data != ca.public_data:
                return None  # another CA's: this proxy trusts none but its own
            return cert.key, _checked(certificates.check, ca, cert, username), certificates.describe(cert)
        try:
            entry = ssh.authorized_keys.get(decode_ssh_public_key(key_data).public_data)
        except (asyncssh.KeyImportError, ValueError):
            return None
        if entry is None:
            return None
        now = datetime.now(timezone.utc)
        return entry.key, _checked(authorized_keys.check, entry, username, now), authorized_keys.describe(entry)

    def _offered(self, username: str, key_data: bytes) -> None:
        """Note a key that logs no one in: the first few by fingerprint, then only how many (a client may send many)."""
        self._offered_user = username
        self._offered_count += 1
        if len(self._offered_keys) < MAX_OFFERED_KEYS:
            self._offered_keys.append(_fingerprint(key_data))

    def _refuse_offered_keys(self) -> None:
        """A client that offered only keys nobody maps and left: its attempt is an authentication failure.

        Refused keys are not the end while the client is there: it may offer
        another, or a token. The fingerprints are the ones offered, not proven.
        """
        if self._login is not None or not self._offered_keys:
            return
        offered = self._offered_keys
        more = self._offered_count - len(offered)
        refused = certificates.CertificateRefused("unknown_public_key", (
            f"no [[proxy.authorized_key]] or certificate of this proxy's CA for the offered key(s) "
            f"{', '.join(offered)}" + (f" and {more} more" if more else "")))
        self._login_event(self._offered_user, "", "publickey", refused, {"key_fingerprints": ",".join(offered)})

    def public_key_auth_supported(self) -> bool:
        ssh = self.listener.ssh
        return ssh.user_ca is not None or bool(ssh.authorized_keys)

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """asyncssh's own check of a plain key, after `_presented` found it mapped: is it one of the config's?"""
        return key.public_data in self.listener.ssh.authorized_keys

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        ca = self.listener.ssh.user_ca
        return ca is not None and key.public_data == ca.public_data

    def _channel_of(self, chan: Any) -> int | None:
        """Our id of a client session channel (None: the newest, which is the one asking for the agent)."""
        for channel_id, session in sorted(self.client_channels.items(), reverse=True):
            if chan is None or session.chan is chan:
                return channel_id
        return None

    def _forward_request(self, request: ev.ForwardRequest) -> None:
        if not self._closed:
            self.run(self.session.event(CLIENT, request))

    def server_requested(self, listen_host: str, listen_port: int) -> "asyncio.Future | bool":
        """tcpip-forward (remote forwarding, `ssh -R`): the front end decides; asyncssh awaits the answer.

        Allowed, the answer is the target's listener (`_listen`), so asyncssh
        replies with its port and cancels it with the client's
        cancel-tcpip-forward; refused, False.
        """
        if self._closed:
            return False
        answer = asyncio.get_running_loop().create_future()
        self._forward_answers.append((answer, None))
        self._forward_request(ev.ForwardRequest("remote", host=listen_host, port=listen_port))
        return answer

    async def _listen(self, command: ev.ListenTarget) -> None:
        """The target listens for the client's remote forwarding; each connection to it is a ForwardedOpen."""
        def accept(origin_host: str, origin_port: int) -> TargetChannelSession:
            return self._forwarded(command.host, bound, origin_host, origin_port)

        bound = command.port
        try:
            if self.upstream is None:
                raise ev.ChannelRefused("the target is not connected")
            listener = await self.upstream.create_server(accept, command.host, command.port, encoding=None)
        except (asyncssh.Error, OSError, ev.ChannelRefused) as exc:
            self.run(self.session.failed(command, ev.ChannelRefused(getattr(exc, "reason", None) or str(exc))))
            return
        if self._closed:
            listener.close()
            return
        bound = listener.get_port()
        self._remote_listener = listener
        self.run(self.session.completed(command, bound))

    def _answer_forward(self, accepted: bool) -> None:
        """Answer the oldest request: a tcpip-forward's with the target's listener, an agent request's with True; else
        False (and a listener nobody gets is closed)."""
        listener, self._remote_listener = self._remote_listener, None
        answer, channel = self._forward_answers.popleft() if self._forward_answers else (None, None)
        result: Any = False
        if accepted and answer is not None and not answer.done():
            if channel is not None:
                self._agent_channels.add(channel)
                result = True
            elif listener is not None:
                result, listener = listener, None
        if listener is not None:
            listener.close()
        if answer is not None and not answer.done():
            answer.set_result(result)

    def _forwarded_agent(self) -> "TargetChannelSession":
        """The target opened an agent channel: allowed for a channel of this client, a new channel to relay."""
        if self._closed or not self._agent_channels:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "agent forwarding not allowed")
        channel = self._new_channel()
        self.run(self.session.event(SERVER, ev.ForwardedOpen(channel, agent=True)))
        return TargetChannelSession(self, channel)

    def _forwarded(self, host: str, port: int, origin_host: str, origin_port: int) -> "TargetChannelSession":
        """A connection to the target's remote forwarding listener: a new channel, for the front end to relay."""
        if self._closed:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "the client's session is ending")
        channel = self._new_channel()
        self.run(self.session.event(SERVER, ev.ForwardedOpen(channel, host, port, origin_host, origin_port)))
        return TargetChannelSession(self, channel)

    def _keep_sample(self, conn: asyncssh.SSHServerConnection) -> None:
        """Keep the first bytes the client sends (asyncssh has no hook for them): a transport error's sample.

        asyncssh's connection is the transport's protocol, so its
        `data_received` is wrapped on this one instance until the sample is
        full, then the wrapper is gone.
        """
        receive = conn.data_received

        def data_received(data: bytes, datatype: Any = None) -> None:
            self._sample += data[:SAMPLE_BYTES - len(self._sample)]
            if len(self._sample) >= SAMPLE_BYTES:
                del conn.data_received  # the class's own again
            receive(data, datatype)

        conn.data_received = data_received  # type: ignore[method-assign]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            error = transport_error(exc)
            if error is not None:
                self.run(self.session.broken(CLIENT, error, self._sample))
            else:
                self._refuse_offered_keys()
                self.run(self.session.closed(CLIENT))
        self._shutdown()

    def _timer_fired(self, name: str) -> None:
        """The startup deadline before any login attempt: a slow client, which the session alone cannot see."""
        if name == STARTUP_TIMER and self._login is None and not self._closed:
            self._timers.pop(name, None)
            self._stalled()
            return
        super()._timer_fired(name)

    def _stalled(self) -> None:
        """A client that held its connection past the deadline without logging in: ProtocolError, ssh_login_timeout.

        asyncssh reads the version string and key exchange itself, so the
        session has counted none of the client's bytes and, left alone, would
        keep no record of it (a connection that sends nothing and leaves is
        not a session). One that stalls — before its version string, in the
        key exchange, or before authenticating — is a slow client: the session
        is opened (no identity), then broken, with whatever the client sent as
        the sample. asyncssh's own login timeout (twice as long) is only a
        backstop.
        """
        assert self.conn is not None
        version = self.conn.get_extra_info("client_version")
        stage = f"after {version!r}" if version else "before its version string"
        error = ProtocolViolation("ssh_login_timeout", (
            f"SSH transport: the client did not log in within {self.listener.settings.startup_timeout:g} s "
            f"({stage})"))
        self.session.open(None)
        self.run(self.session.broken(CLIENT, error, self._sample))

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        return await self._authenticate(username, password, "password")

    def kbdint_auth_supported(self) -> bool:
        return True

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str):
        return "Custody", "Your OIDC access token is your password.", "", [("Token: ", False)]

    async def validate_kbdint_response(self, username: str, responses: list[str]) -> bool:
        return await self._authenticate(username, responses[0] if responses else "", "keyboard-interactive")

    def session_requested(self) -> "ServerChannelSession":
        return ServerChannelSession(self, self._new_channel())

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int):
        """direct-tcpip: the front end decides at once (or holds); a refusal is the channel's open failure."""
        channel = self._new_channel()
        self.run(self.session.event(CLIENT, ev.ForwardOpen(channel, dest_host, dest_port, orig_host, orig_port)))
        refused = self._refused_forwards.pop(channel, None)
        if refused is not None or self._closed:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, refused or "closed")
        return ForwardChannelSession(self, channel)

    def _new_channel(self) -> int:
        channel, self._next_channel = self._next_channel, self._next_channel + 1
        return channel

    async def _authenticate(self, username: str, token: str, method: str, identity: Any = None,
                            attributes: dict[str, str] | None = None) -> bool:
        if self._closed or self._login is not None:
            return False
        self._login = asyncio.get_running_loop().create_future()
        self._login_event(username, token, method, identity, attributes or {})
        return await self._login

    def _login_event(self, username: str, token: str, method: str, identity: Any, attributes: dict[str, str]) -> None:
        version = self.conn.get_extra_info("client_version") if self.conn is not None else None
        # The event's bytes (counted, a protocol error's sample) are the user name: never the token.
        self.run(self.session.event(CLIENT, ev.Login(username, token, method, version, identity, attributes),
                                    username.encode()))

    def _answer_login(self, accepted: bool) -> None:
        if self._login is not None and not self._login.done():
            self._login.set_result(accepted)

    def throttle(self, pressing: bool) -> None:
        for channel in list(self.client_channels.values()):
            channel.pause(pressing)
        for channel_id in list(self.upstream_channels):
            self.pause_upstream(channel_id, pressing, "recorder")

    def pause_upstream(self, channel_id: int, pressing: bool, reason: str) -> None:
        """Stop (or go on) reading a target channel while any reason holds (recorder, client, lane)."""
        upstream = self.upstream_channels.get(channel_id)
        reasons = self._upstream_paused.setdefault(channel_id, set())
        if upstream is None:
            return
        if pressing:
            if not reasons:
                upstream.pause_reading()
            reasons.add(reason)
        elif reason in reasons:
            reasons.discard(reason)
            if not reasons:
                upstream.resume_reading()

    def _read_control(self, command: ReadControl) -> None:
        """The session's lane for that side holds too much: every channel of that side stops (or goes on) reading."""
        if command.side == CLIENT:
            for channel in list(self.client_channels.values()):
                channel.pause(command.paused, "lane")
        else:
            for channel_id in list(self.upstream_channels):
                self.pause_upstream(channel_id, command.paused, "lane")

    # --- commands ---------------------------------------------------------------------------------

    def run(self, commands: list[Command]) -> None:
        """Carry out the session's commands, in order."""
        for command in commands:
            kind = type(command)
            if kind is Send:
                self._send(command)
            elif kind is Close:
                self._close(command.reason)
            elif kind is ReadControl:
                self._read_control(command)
            elif kind is ev.ConnectTarget:
                self.spawn(self._connect(command))
            elif kind is ev.LoginResult:
                self._answer_login(command.accepted)
            elif kind is ev.OpenChannel and isinstance(command.start, ev.ForwardedOpen):
                self.spawn(self._open_forwarded(command))
            elif kind is ev.OpenChannel:
                self.spawn(self._open_channel(command))
            elif kind is ev.ListenTarget:
                self.spawn(self._listen(command))
            elif kind is ev.ForwardAnswer:
                self._answer_forward(command.accepted)
            elif kind is ev.SendEof:
                self._channel_call(command.side, command.channel, "write_eof")
            elif kind is ev.CloseChannel:
                if command.side == CLIENT and command.channel not in self.client_channels:
                    self._refused_forwards[command.channel] = "refused by policy"
                self._channel_call(command.side, command.channel, "close")
            elif kind is ev.Exit:
                self._exit(command)
            elif kind is ev.Resize:
                self._channel_call(SERVER, command.channel, "change_terminal_size", *command.size)
            elif kind is ev.SendSignal:
                self._channel_call(SERVER, command.channel, "send_signal", command.name)
            elif kind is ev.SendBreak:
                self._channel_call(SERVER, command.channel, "send_break", command.msec)
            elif not self.run_shared(command):
                raise TypeError(f"no SSH adapter for command {command!r}")

    def _send(self, command: Send) -> None:
        if command.channel is None:  # the proxy's own line for the whole connection
            text = command.data.decode("utf-8", "replace")
            if self._login is not None and not self._login.done() and self.conn is not None:
                try:
                    self.conn.send_auth_banner(text)
                except (asyncssh.Error, OSError):
                    pass
            self._farewell = text.strip()
            return
        stderr = command.channel.endswith(ev.STDERR)
        channel = int(command.channel[:-len(ev.STDERR)] if stderr else command.channel)
        if command.side == CLIENT:
            target = self.client_channels.get(channel)
            if target is not None:
                target.write(command.data, stderr)
        else:
            upstream = self.upstream_channels.get(channel)
            if upstream is not None and not upstream.is_closing():
                upstream.write(command.data)

    def _channel_call(self, side: str, channel: int, method: str, *args: Any) -> None:
        target: Any = self.client_channels.get(channel) if side == CLIENT else self.upstream_channels.get(channel)
        if target is None:
            return
        chan = target.chan if side == CLIENT else target
        if chan is None:
            return
        try:
            getattr(chan, method)(*args)
        except (asyncssh.Error, OSError, BrokenPipeError) as exc:
            log.debug("ssh %s channel %s: %s failed: %s", side, channel, method, exc)

    def _exit(self, command: ev.Exit) -> None:
        target = self.client_channels.get(command.channel)
        if target is None or target.chan is None:
            return
        try:
            if command.signal is not None:
                target.chan.exit_with_signal(command.signal, command.core_dumped, command.message)
            else:
                target.chan.exit(command.status if command.status is not None else 255)
        except (asyncssh.Error, OSError) as exc:
            log.debug("ssh channel %s: exit failed: %s", command.channel, exc)

    async def _connect(self, command: ev.ConnectTarget) -> None:
        upstream = self.listener.ssh.upstream
        try:
            conn = await asyncio.wait_for(asyncssh.connect(
                upstream.host, upstream.port, username=upstream.user,
                client_keys=[upstream.key] if upstream.key is not None else (), password=upstream.password,
                known_hosts=([upstream.host_key], [], []), agent_path=None, config=None,
                preferred_auth="publickey" if upstream.key is not None else "password,keyboard-interactive",
                client_factory=lambda: TargetConnection(self)), self.listener.settings.connect_timeout)
        except asyncssh.HostKeyNotVerifiable as exc:
            self.run(self.session.failed(command, ev.HostKeyRefused(
                f"the target's host key is not the pinned upstream_host_key "
                f"({upstream.host_key.get_fingerprint()}): {exc}")))
            return
        except (OSError, asyncio.TimeoutError, asyncssh.Error) as exc:
            self.run(self.session.failed(command, UpstreamUnavailable(f"{type(exc).__name__}: {exc}")))
            return
        if self._closed:
            conn.close()
            return
        self.upstream = conn
        key = conn.get_server_host_key()
        self.run(self.session.completed(command, key.get_fingerprint() if key is not None else ""))

    async def _open_channel(self, command: ev.OpenChannel) -> None:
        start = command.start
        channel_id = start.channel
        conn = self.upstream
        try:
            if conn is None:
                raise ev.ChannelRefused("the target is not connected")
            if isinstance(start, ev.ForwardOpen):
                chan, _ = await conn.create_connection(lambda: TargetChannelSession(self, channel_id),
                                                       start.host, start.port)
            else:
                options: dict[str, Any] = {"encoding": None, "env": start.env or ()}
                if start.term is not None:
                    options.update(term_type=start.term, term_size=start.size or (), term_modes=start.modes or ())
                else:
                    options["request_pty"] = False
                if start.kind == "exec":
                    options["command"] = start.command
                elif start.kind == "subsystem":
                    options["subsystem"] = start.subsystem
                # asyncssh asks for the agent on a session when its connection forwards one (a connection-wide
                # option): set for this open only. No other session opens meanwhile: the client's lane waits.
                conn._agent_forward_path = AGENT_RELAY if channel_id in self._agent_channels else None  # noqa: SLF001
                chan, _ = await conn.create_session(lambda: TargetChannelSession(self, channel_id), **options)
        except (asyncssh.ChannelOpenError, asyncssh.Error, OSError, ev.ChannelRefused) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            self.run(self.session.failed(command, ev.ChannelRefused(reason)))
            return
        if self._closed:
            chan.close()
            return
        self.upstream_channels[channel_id] = chan
        if self.listener.throttled:
            self.pause_upstream(channel_id, True, "recorder")
        self.run(self.session.completed(command, None))

    async def _open_forwarded(self, command: ev.OpenChannel) -> None:
        """The client's side of a channel the target opened: forwarded-tcpip (a remote forwarding's connection) or
        auth-agent@openssh.com (to the client's agent)."""
        start = command.start
        assert isinstance(start, ev.ForwardedOpen) and self.conn is not None

        def factory() -> ForwardChannelSession:
            return ForwardChannelSession(self, start.channel)

        # A connection may reach the target's new listener before the client had the answer to its tcpip-forward
        # (and would refuse a forwarding it does not know yet): the answer goes first (asyncssh awaits it too).
        pending = [answer for answer, channel in self._forward_answers if channel is None]
        if pending and not start.agent:
            await asyncio.wait(pending)
        try:
            if start.agent:
                chan = self.conn.create_agent_channel()
                await chan.open(factory)
            else:
                chan, _ = await self.conn.create_connection(factory, start.host, start.port, start.origin_host,
                                                            start.origin_port)
        except (asyncssh.ChannelOpenError, asyncssh.Error, OSError) as exc:
            self.run(self.session.failed(command, ev.ChannelRefused(getattr(exc, "reason", None) or str(exc))))
            return
        if self._closed:
            chan.close()
            return
        channel = self.client_channels.get(start.channel)
        if self.listener.throttled and channel is not None:
            channel.pause(True)
        self.run(self.session.completed(command, None))

    def _close(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._answer_login(False)
        while self._forward_answers:
            self._answer_forward(False)
        self.cancel_timers()
        if self.upstream is not None:
            self.upstream.close()
        if self.conn is not None:
            text = self._farewell or f"custody: session ended ({reason})"
            try:
                self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, text)
            except (asyncssh.Error, OSError):
                self.conn.abort()
        self.listener.connections.discard(self)

    def _shutdown(self) -> None:
        self._close("client_disconnect")
        self.cancel_tasks()


class ServerChannelSession(asyncssh.SSHServerSession):
    """A client's session channel: its requests and data, as events of the client lane."""

    def __init__(self, owner: ClientConnection, channel: int) -> None:
        self.owner, self.id = owner, channel
        self.chan: asyncssh.SSHServerChannel | None = None
        self.kind = "shell"
        self.command: str | None = None
        self.subsystem: str | None = None
        self.term: str | None = None
        self.size: tuple[int, int, int, int] | None = None
        self.modes: dict[int, int] = {}
        self._paused_by: set[str] = set()

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self.chan = chan
        self.owner.client_channels[self.id] = self

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int], term_modes: dict) -> bool:
        self.term, self.size, self.modes = term_type, tuple(term_size), dict(term_modes)
        return True

    def shell_requested(self) -> bool:
        self.kind = "shell"
        return True

    def exec_requested(self, command: str) -> bool:
        self.kind, self.command = "exec", command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        self.kind, self.subsystem = "subsystem", subsystem
        return True

    def session_started(self) -> None:
        assert self.chan is not None
        env = {_text(k): _text(v) for k, v in self.chan.get_environment_bytes().items()}
        command = self.command.decode("utf-8", "surrogateescape") if isinstance(self.command, bytes) else self.command
        start = ev.ChannelStart(self.id, self.kind, command=command, subsystem=self.subsystem, term=self.term,
                                size=self.size, modes=self.modes, env=env)
        self.owner.run(self.owner.session.event(CLIENT, start))
        if self.owner.listener.throttled:
            self.pause(True)

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.owner.run(self.owner.session.event(CLIENT, ev.ChannelData(self.id, data, datatype == _STDERR), data))

    def eof_received(self) -> bool:
        self.owner.run(self.owner.session.event(CLIENT, ev.ChannelEof(self.id)))
        return True  # half-open: the target's output still comes back

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        self.owner.run(self.owner.session.event(CLIENT, ev.WindowChange(self.id, (width, height, pixwidth, pixheight))))

    def signal_received(self, signal: str) -> None:
        self.owner.run(self.owner.session.event(CLIENT, ev.Signal(self.id, signal)))

    def break_received(self, msec: int) -> bool:
        self.owner.run(self.owner.session.event(CLIENT, ev.Break(self.id, msec)))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.client_channels.pop(self.id, None)
        if not self.owner._closed:
            self.owner.run(self.owner.session.event(CLIENT, ev.ChannelClosed(self.id)))

    def write(self, data: bytes, stderr: bool) -> None:
        if self.chan is None or self.chan.is_closing():
            return
        if stderr:
            self.chan.write_stderr(data)
        else:
            self.chan.write(data)

    def pause(self, pressing: bool, reason: str = "recorder") -> None:
        if self.chan is None:
            return
        if pressing:
            if not self._paused_by:
                self.chan.pause_reading()
            self._paused_by.add(reason)
        elif reason in self._paused_by:
            self._paused_by.discard(reason)
            if not self._paused_by:
                self.chan.resume_reading()

    def pause_writing(self) -> None:  # the client reads slowly: so does the proxy from the target
        self.owner.pause_upstream(self.id, True, "client")

    def resume_writing(self) -> None:
        self.owner.pause_upstream(self.id, False, "client")


class ForwardChannelSession(ServerChannelSession, asyncssh.SSHTCPSession):
    """A client's direct-tcpip channel: data, EOF and close only."""

    def session_started(self) -> None:
        pass


class TargetConnection(asyncssh.SSHClient):
    def __init__(self, owner: ClientConnection) -> None:
        self.owner = owner
        self.conn: asyncssh.SSHClientConnection | None = None

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn
        self._relay_agent(conn)

    def _relay_agent(self, conn: asyncssh.SSHClientConnection) -> None:
        """The target's auth-agent@openssh.com channels go to the client's agent, through the session.

        asyncssh would connect them to a local agent socket
        (`agent_forward_path`); its handler is replaced on this one instance.
        """
        def open_agent_channel(packet: Any) -> tuple[Any, TargetChannelSession]:
            packet.check_end()
            return conn.create_unix_channel(), self.owner._forwarded_agent()

        conn._process_auth_agent_at_openssh_dot_com_open = open_agent_channel  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        # Only once logged in: a connect that fails reports itself through ConnectTarget.
        if not self.owner._closed and self.owner.upstream is self.conn:
            error = transport_error(exc)
            session = self.owner.session
            self.owner.run(session.broken(SERVER, error) if error is not None else session.closed(SERVER))


class TargetChannelSession(asyncssh.SSHClientSession, asyncssh.SSHTCPSession):
    """The target's side of one channel: its data, exit and close, as events of the server lane."""

    def __init__(self, owner: ClientConnection, channel: int) -> None:
        self.owner, self.id = owner, channel

    def connection_made(self, chan: asyncssh.SSHClientChannel | asyncssh.SSHTCPChannel) -> None:
        self.owner.upstream_channels[self.id] = chan  # a remote forwarding's: nobody else has its channel

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.owner.run(self.owner.session.event(SERVER, ev.ChannelData(self.id, data, datatype == _STDERR)))

    def eof_received(self) -> bool:
        self.owner.run(self.owner.session.event(SERVER, ev.ChannelEof(self.id)))
        return True

    def exit_status_received(self, status: int) -> None:
        self.owner.run(self.owner.session.event(SERVER, ev.ExitStatus(self.id, status)))

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.owner.run(self.owner.session.event(SERVER, ev.ExitSignal(self.id, signal, core_dumped, msg)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.upstream_channels.pop(self.id, None)
        self.owner._upstream_paused.pop(self.id, None)
        if not self.owner._closed:
            self.owner.run(self.owner.session.event(SERVER, ev.ChannelClosed(self.id)))

    def pause_writing(self) -> None:  # the target reads slowly: so does the proxy from the client
        channel = self.owner.client_channels.get(self.id)
        if channel is not None:
            channel.pause(True, "target")

    def resume_writing(self) -> None:
        channel = self.owner.client_channels.get(self.id)
        if channel is not None:
            channel.pause(False, "target")


def _signed_by(conn: asyncssh.SSHServerConnection, key: asyncssh.SSHKey, msg: bytes, signature: bytes) -> bool:
    """The client's userauth signature, checked as asyncssh checks it (RFC 4252 §7: over the session id first).

    Only for a certificate or mapped key that is refused (expired, another
    user), so that the recorded refusal names someone who holds the key.
    """
    from asyncssh.packet import String

    return key.verify(String(conn._session_id) + msg, signature)  # noqa: SLF001 - asyncssh keeps it private


def _checked(check: Callable[..., Any], *args: Any) -> Any:
    """`check(*args)`'s identity, or the CertificateRefused it raised: the front end records either."""
    try:
        return check(*args)
    except certificates.CertificateRefused as refused:
        return refused


def _fingerprint(key_data: bytes) -> str:
    """An offered key's fingerprint for the record (a certificate's: its key's, and whose CA signed it)."""
    try:
        cert = decode_ssh_certificate(key_data)
    except (asyncssh.KeyImportError, ValueError):
        try:
            return decode_ssh_public_key(key_data).get_fingerprint()
        except (asyncssh.KeyImportError, ValueError):
            return "undecodable"
    if isinstance(cert, SSHOpenSSHCertificate):
        return f"{cert.key.get_fingerprint()} (certificate of {cert.signing_key.get_fingerprint()})"
    return f"{cert.key.get_fingerprint()} (certificate)"


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
