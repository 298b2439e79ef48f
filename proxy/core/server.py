"""The asyncio adapter: it only moves bytes and carries out a session's commands.

Every decision is the `Session`'s; this module feeds it socket events and
completions and runs what it returns, for every protocol alike. Both
connections of a session use `asyncio.BufferedProtocol` with one preallocated
receive buffer each (no per-read allocation, no stream-reader machinery on
the hot path), and pass back-pressure through: when one side's write buffer
fills, the other side stops reading.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import ssl
import threading
from typing import Any

from ingest.recorder import Pressure, Recorder
from proxy.identity import TokenVerifier

from .commands import (
    CLIENT,
    Close,
    Command,
    OpenUpstream,
    ReadControl,
    Send,
    SendOnce,
    StartTLS,
    TLSFailed,
    TLSInfo,
    UpstreamUnavailable,
)
from .frontend import Protocol as FrontEndProtocol
from .policy import PolicyRuntime
from .runner import Approvals, CommandRunner
from .session import Session

log = logging.getLogger(__name__)

READ_BUFFER = 256 * 1024
SEND_ONCE_TIMEOUT = 5.0
_PEER_FULL = "peer write buffer full"
_RECORDER_BEHIND = "recorder behind"
_LANE_FULL = "session queue full"


def heaviest(shares: list[float]) -> list[bool]:
    """Which sessions the recorder is behind on: those that filled at least the average share of its backlog's
    bounds lately (`SessionRecording.recent`, events and bytes together), if anything at all."""
    average = sum(shares) / max(len(shares), 1)
    return [share >= average and share > 0 for share in shares]


class Listener:
    """One `[[proxy]]` entry: accepts clients and gives each a Session of its protocol."""

    custodian_key = None  # [keys] custodian_public_key (nacl PublicKey): input redaction seals to it without a policy

    def __init__(self, protocol: FrontEndProtocol, verifier: TokenVerifier, recorder: Recorder,
                 policy: PolicyRuntime | None = None, approvals: Approvals | None = None,
                 identity_leeway: float | None = 30.0) -> None:
        """`identity_leeway`: a session ends this long after its token's exp (None: it does not end then)."""
        self.protocol, self.verifier, self.recorder = protocol, verifier, recorder
        self.identity_leeway = identity_leeway
        self.policy, self.approvals = policy, approvals
        self.settings = protocol.listener
        self.connections: set[ClientConnection] = set()
        self.awaiting_replies = 0  # sessions that sent their target something and have had nothing back since
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self.throttled = False

    def throttle(self, level: Pressure) -> None:
        """Back-pressure from the recorder: the sessions it is behind on stop reading (all of them at ALL)."""
        self.throttled = level is Pressure.ALL
        connections = list(self.connections)
        heavy = heaviest([connection.session.recording.recent for connection in connections])
        for connection, is_heavy in zip(connections, heavy):
            connection.throttle(level is Pressure.ALL or (level is Pressure.HEAVY and is_heavy))
            connection.session.recording.recent = 0.0

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the real port when the config said port 0)."""
        assert self._server is not None
        return self._server.sockets[0].getsockname()[:2]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self), self.settings.listen_host, self.settings.listen_port,
            reuse_address=True, backlog=1024,
        )
        log.info("proxy %s (%s) listening on %s:%s", self.settings.name, self.protocol.name, *self.address)

    async def stop(self) -> None:
        """Stop accepting, end every live session (SessionEnd reason shutdown)."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.run(connection.session.shutdown())
        if self._server is not None:
            await self._server.wait_closed()

    def send_once(self, command: SendOnce) -> None:
        """In a task of the listener's, so it outlives the connection that asked (a PostgreSQL cancel)."""
        task = asyncio.get_running_loop().create_task(self._send_once(command))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_once(self, command: SendOnce) -> None:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(command.host, command.port), SEND_ONCE_TIMEOUT)
            writer.write(command.data)
            await writer.drain()
            writer.close()
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("proxy %s: sending to %s:%s failed: %s", self.settings.name, command.host, command.port, exc)


def _address(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else peer[0]
        return f"{host}:{peer[1]}"
    return str(peer)


def _tls_info(transport: asyncio.BaseTransport) -> TLSInfo:
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return TLSInfo("unknown", None)
    der = ssl_object.getpeercert(binary_form=True)
    return TLSInfo(ssl_object.version() or "unknown", hashlib.sha256(der).hexdigest() if der else None)


_buffers = threading.local()


def _read_buffer() -> memoryview:
    """One receive buffer per event loop thread, shared by all its connections.

    Safe because a BufferedProtocol's read is get_buffer, recv_into,
    buffer_updated with no other callback between them, and buffer_updated
    copies the bytes out. Per connection it would cost 256 KiB of an idle
    session's memory on each side.
    """
    view = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(READ_BUFFER))
    return view


class _Receiver(asyncio.BufferedProtocol):
    """Reads into the thread's shared buffer; reading pauses while any reason to pause holds."""

    transport: asyncio.Transport | None

    def __init__(self) -> None:
        self._view = _read_buffer()
        self._paused_for: set[str] = set()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def pause_reading(self, reason: str) -> None:
        """Stop reading (`reason`: the peer's write buffer is full, the recorder is behind)."""
        if not self._paused_for and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._paused_for.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason not in self._paused_for:
            return
        self._paused_for.discard(reason)
        if not self._paused_for and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


class ClientConnection(_Receiver, CommandRunner):
    def __init__(self, listener: Listener) -> None:
        _Receiver.__init__(self)
        CommandRunner.__init__(self, listener.verifier, listener.approvals)
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamConnection | None = None
        self.session: Session
        self._held_writes: list[bytes] | None = None  # client writes while its TLS handshake runs
        self._awaiting_reply = False  # counted in listener.awaiting_replies

    # --- socket events ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        listener = self.listener
        self.session = Session(
            protocol=listener.protocol,
            recording=listener.recorder.open_session(),
            source_address=_address(transport.get_extra_info("peername")),
            policy=listener.policy,
            identity_leeway=listener.identity_leeway,
            custodian_key=listener.custodian_key,
        )
        listener.connections.add(self)
        if listener.throttled:
            self.pause_reading(_RECORDER_BEHIND)
        self.run(self.session.start())

    def buffer_updated(self, nbytes: int) -> None:
        self.run(self.session.data(CLIENT, self._view[:nbytes].tobytes()))

    def eof_received(self) -> bool:
        self.run(self.session.closed(CLIENT))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self.run(self.session.closed(CLIENT))
        self._shutdown()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading(_PEER_FULL)

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading(_PEER_FULL)

    def throttle(self, pressing: bool) -> None:
        """The recorder is behind (or caught up): both sides stop (or go on) reading."""
        for side in (self, self.upstream):
            if side is not None:
                if pressing:
                    side.pause_reading(_RECORDER_BEHIND)
                else:
                    side.resume_reading(_RECORDER_BEHIND)

    # --- commands ------------------------------------------------------------------

    def run(self, commands: list[Command]) -> None:
        """Carry out the session's commands, in order."""
        for command in commands:
            kind = type(command)
            if kind is Send:
                if command.side == CLIENT:
                    self._write_client(command.data)
                elif self.upstream is not None:
                    self.upstream.write(command.data)
                    self.set_awaiting_reply(True)
            elif kind is Close:
                self._close()
            elif kind is OpenUpstream:
                self.spawn(self._connect(command))
            elif kind is StartTLS:
                self._start_tls(command)
            elif kind is SendOnce:
                self.listener.send_once(command)
            elif kind is ReadControl:
                side = self if command.side == CLIENT else self.upstream
                if side is not None:
                    (side.pause_reading if command.paused else side.resume_reading)(_LANE_FULL)
            elif not self.run_shared(command):
                raise TypeError(f"no adapter for command {command!r}")

    def set_awaiting_reply(self, awaiting: bool) -> None:
        """Count this session in its listener's `awaiting_replies` while it waits for its target's answer."""
        if awaiting != self._awaiting_reply:
            self._awaiting_reply = awaiting
            self.listener.awaiting_replies += 1 if awaiting else -1

    def others_await_replies(self) -> bool:
        return self.listener.awaiting_replies > self._awaiting_reply

    def _write_client(self, data: bytes) -> None:
        if self._held_writes is not None:
            self._held_writes.append(data)
        elif self.transport is not None and not self._closed:
            self.transport.write(data)

    async def _connect(self, command: OpenUpstream) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, connection = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(self), command.host, command.port,
                                       ssl=command.tls, server_hostname=command.server_hostname
                                       if command.tls is not None else None),
                self.listener.settings.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            self.run(self.session.failed(command, UpstreamUnavailable(f"{type(exc).__name__}: {exc}")))
            return
        if self._closed:
            connection.close()
            return
        self.upstream = connection
        self.run(self.session.completed(command, _tls_info(transport) if command.tls is not None else None))

    def _start_tls(self, command: StartTLS) -> None:
        if command.side == CLIENT:
            assert self.transport is not None
            self.transport.pause_reading()  # nothing may be read in plaintext once TLS is agreed
            self._held_writes = self._held_writes or []  # nor written: TLS data can arrive before start_tls returns
        elif self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()
        self.spawn(self._tls_handshake(command))

    async def _tls_handshake(self, command: StartTLS) -> None:
        loop = asyncio.get_running_loop()
        server_side = command.side == CLIENT
        peer = self if server_side else self.upstream
        transport = self.transport if server_side else (self.upstream.transport if self.upstream else None)
        try:
            if transport is None or peer is None:
                raise ConnectionError("the connection is gone")
            if command.early:  # queued now, so it runs right after start_tls's first step, before its handshake
                loop.call_soon(_feed_early, transport, peer, command.early)
            new = await loop.start_tls(transport, peer, command.context, server_side=server_side,
                                       server_hostname=command.server_hostname)
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            self.run(self.session.failed(command, TLSFailed(str(exc))))
            return
        if new is None:
            self.run(self.session.closed(command.side))
            return
        if server_side:
            self.transport = new
            held, self._held_writes = self._held_writes or [], None
            if not self._closed and held:
                new.write(b"".join(held))
        else:
            assert self.upstream is not None
            self.upstream.transport = new
        self.run(self.session.completed(command, _tls_info(new)))

    def _close(self) -> None:
        """Close both sides once their pending writes are out."""
        if self._closed:
            return
        self._closed = True
        self.set_awaiting_reply(False)
        self.cancel_timers()
        if self.transport is not None:
            self.transport.close()
        if self.upstream is not None:
            self.upstream.close()
        self.listener.connections.discard(self)

    def _shutdown(self) -> None:
        self._close()
        self.cancel_tasks()


def _feed_early(transport: asyncio.Transport, replaced: asyncio.BaseProtocol, data: bytes) -> None:
    """Hand the TLS layer the bytes of its stream that were read before it took the transport over.

    `loop.start_tls` puts its TLS protocol on the transport in its first step, and queues the start of the
    handshake and the resumption of reading behind it; this was queued just before that step ran, so it runs
    between the two, while the transport is paused: the bytes come before anything read from the socket later.
    Fed through the protocol's public buffered-protocol methods, as the transport itself would.
    """
    protocol = transport.get_protocol()
    if protocol is replaced or not isinstance(protocol, asyncio.BufferedProtocol):
        return  # start_tls failed before it took the transport: it says why
    view = memoryview(data)
    while view:
        buffer = protocol.get_buffer(len(view))
        n = min(len(buffer), len(view))
        buffer[:n] = view[:n]
        protocol.buffer_updated(n)
        view = view[n:]


class UpstreamConnection(_Receiver):
    """The proxy's own connection to the target for one client."""

    def __init__(self, client: ClientConnection) -> None:
        super().__init__()
        self.client = client
        self.transport: asyncio.Transport | None = None
        self._eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.client.listener.throttled:
            self.pause_reading(_RECORDER_BEHIND)

    def buffer_updated(self, nbytes: int) -> None:
        self.client.set_awaiting_reply(False)
        self.client.run(self.client.session.data("server", self._view[:nbytes].tobytes()))

    def eof_received(self) -> bool:
        self._eof = True
        self.client.run(self.client.session.closed("server"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._eof:
            self.client.run(self.client.session.closed("server"))

    def pause_writing(self) -> None:
        self.client.pause_reading(_PEER_FULL)

    def resume_writing(self) -> None:
        self.client.resume_reading(_PEER_FULL)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
