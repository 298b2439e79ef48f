"""The PostgreSQL proxy's asyncio side: it only moves bytes and runs actions.

Every decision is the `Session`'s; this module feeds it socket events and
carries out what it returns. Both connections of a session use
`asyncio.BufferedProtocol` with one preallocated receive buffer each (no
per-read buffer allocation, no stream-reader machinery on the hot path), and
pass back-pressure through: when one side's write buffer fills, the other
side stops reading.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import ssl
from typing import Any, Protocol

from ingest.protocols.postgres import messages as m
from ingest.recorder import Recorder
from proxy.approvals import ApprovalOutcome, ApprovalRequest
from proxy.identity import AuthenticationError, TokenVerifier

from .cancel import CancelKeys
from .policy_layer import PolicyRuntime
from .session import (
    Actions,
    AwaitApproval,
    Close,
    ConnectUpstream,
    ForwardCancel,
    Ready,
    SendClient,
    SendUpstream,
    Session,
    StartTLS,
    VerifyToken,
)
from .settings import PostgresSettings

log = logging.getLogger(__name__)

READ_BUFFER = 256 * 1024
CANCEL_TIMEOUT = 5.0


class Approvals(Protocol):
    """What a listener needs of `proxy.approvals_gateway.ApprovalGateway`: a held statement's outcome."""

    async def decide(self, request: ApprovalRequest) -> ApprovalOutcome: ...


class PostgresProxy:
    """One listener (`[[proxy]]` entry): accepts clients, owns their cancel keys."""

    def __init__(self, settings: PostgresSettings, verifier: TokenVerifier, recorder: Recorder,
                 policy: PolicyRuntime | None = None, approvals: Approvals | None = None) -> None:
        self.settings, self.verifier, self.recorder = settings, verifier, recorder
        self.policy, self.approvals = policy, approvals
        self.cancel_keys = CancelKeys()
        self.connections: set[ClientConnection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._cancels: set[asyncio.Task] = set()

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
        log.info("proxy %s listening on %s:%s", self.settings.name, *self.address)

    async def stop(self) -> None:
        """Stop accepting, end every live session (SessionEnd reason shutdown)."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.run(connection.session.shutdown())
        if self._server is not None:
            await self._server.wait_closed()

    def cancel(self, process_id: int, secret: bytes, source: str) -> None:
        """Forward a cancel in a task of the listener's: it outlives the connection that asked."""
        task = asyncio.get_running_loop().create_task(self._forward_cancel(process_id, secret, source))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _forward_cancel(self, process_id: int, secret: bytes, source: str) -> None:
        """A client's CancelRequest: to the right backend with the real key, if the key is ours."""
        target = self.cancel_keys.lookup(process_id, secret)
        if target is None:
            log.warning("proxy %s: CancelRequest from %s with an unknown key ignored", self.settings.name, source)
            return
        if not target.session.note_cancel(process_id, secret, source):
            return
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(target.host, target.port), CANCEL_TIMEOUT)
            writer.write(m.cancel_request(target.process_id, target.secret))
            await writer.drain()
            writer.close()
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("proxy %s: forwarding a cancel to %s:%s failed: %s", self.settings.name, target.host, target.port, exc)


def _address(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else peer[0]
        return f"{host}:{peer[1]}"
    return str(peer)


class _Receiver(asyncio.BufferedProtocol):
    """One receive buffer, reused for every read of one connection."""

    def __init__(self) -> None:
        self._buffer = bytearray(READ_BUFFER)
        self._view = memoryview(self._buffer)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view


class ClientConnection(_Receiver):
    def __init__(self, proxy: PostgresProxy) -> None:
        super().__init__()
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamConnection | None = None
        self.session: Session
        self._deadline: asyncio.TimerHandle | None = None
        self._closed = False
        self._tasks: set[asyncio.Task] = set()
        self._held_writes: list[bytes] | None = None

    # --- socket events ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        source = _address(transport.get_extra_info("peername"))
        self.session = Session(
            settings=self.proxy.settings,
            recording=self.proxy.recorder.open_session(),
            cancel_keys=self.proxy.cancel_keys,
            source_address=source,
            policy=self.proxy.policy,
        )
        self.proxy.connections.add(self)
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.proxy.settings.startup_timeout, self._startup_timeout)

    def buffer_updated(self, nbytes: int) -> None:
        self.run(self.session.client_data(self._view[:nbytes].tobytes()))

    def eof_received(self) -> bool:
        self.run(self.session.client_eof())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self.run(self.session.client_eof())
        self._shutdown()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # --- actions ------------------------------------------------------------------

    def run(self, actions: Actions) -> None:
        """Carry out the session's actions, in order."""
        for action in actions:
            kind = type(action)
            if kind is SendUpstream:
                if self.upstream is not None:
                    self.upstream.write(action.data)
            elif kind is SendClient:
                if self._held_writes is not None:
                    self._held_writes.append(action.data)
                elif self.transport is not None and not self._closed:
                    self.transport.write(action.data)
            elif kind is Close:
                self._close()
            elif kind is Ready:
                self._cancel_deadline()
            elif kind is VerifyToken:
                self._spawn(self._verify(action.token))
            elif kind is ConnectUpstream:
                self._spawn(self._connect())
            elif kind is StartTLS:
                assert self.transport is not None
                self.transport.pause_reading()  # nothing may be read in plaintext after the 'S'
                self._held_writes = []  # nor written: TLS data can arrive before start_tls returns
                self._spawn(self._start_tls())
            elif kind is ForwardCancel:
                self.proxy.cancel(action.process_id, action.secret, self.session.source_address)
            elif kind is AwaitApproval:
                self._spawn(self._await_approval(action.request))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _verify(self, token: str) -> None:
        try:
            identity = await asyncio.to_thread(self.proxy.verifier.verify, token)
        except AuthenticationError as error:
            self.run(self.session.token_refused(error.reason_code, error.message))
        else:
            self.run(self.session.token_verified(identity))

    async def _await_approval(self, request: ApprovalRequest) -> None:
        assert self.proxy.approvals is not None, "a policy without an approvals gateway"
        self.run(self.session.approval_decided(await self.proxy.approvals.decide(request)))

    async def _connect(self) -> None:
        upstream = self.proxy.settings.upstream
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(self), upstream.host, upstream.port),
                self.proxy.settings.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            self.run(self.session.upstream_failed(f"{type(exc).__name__}: {exc}"))
            return
        if self._closed:
            connection.close()
            return
        self.upstream = connection
        self.run(self.session.upstream_connected())

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None and self.proxy.settings.tls is not None
        try:
            transport = await loop.start_tls(self.transport, self, self.proxy.settings.tls, server_side=True)
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            self.run(self.session.tls_failed(str(exc)))
            return
        if transport is None:
            self.run(self.session.client_eof())
            return
        self.transport = transport
        held, self._held_writes = self._held_writes or [], None
        if not self._closed:
            transport.write(b"".join(held))
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        fingerprint = hashlib.sha256(der).hexdigest() if der else None
        self.run(self.session.client_tls(ssl_object.version() if ssl_object else "unknown", fingerprint))

    def _startup_timeout(self) -> None:
        self._deadline = None
        self.run(self.session.timeout())

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _close(self) -> None:
        """Close both sides once their pending writes are out."""
        if self._closed:
            return
        self._closed = True
        self._cancel_deadline()
        if self.transport is not None:
            self.transport.close()
        if self.upstream is not None:
            self.upstream.close()
        self.proxy.connections.discard(self)

    def _shutdown(self) -> None:
        self._close()
        for task in self._tasks:
            task.cancel()


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

    def buffer_updated(self, nbytes: int) -> None:
        self.client.run(self.client.session.upstream_data(self._view[:nbytes].tobytes()))

    def eof_received(self) -> bool:
        self._eof = True
        self.client.run(self.client.session.upstream_eof())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._eof:
            self.client.run(self.client.session.upstream_eof())

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
