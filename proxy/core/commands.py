"""What a session asks its I/O adapter to do, and what it is told back.

A front end's handlers are generators that yield these commands. A command
whose class is `blocking` pauses the handler (and everything that arrives
after it from the same side) until the adapter reports its completion, which
is sent back into the generator as the value of the `yield`:

    identity = yield VerifyToken(token)        # an Identity, or an AuthenticationError
    yield OpenUpstream(host, port)              # returns, or raises UpstreamUnavailable
    outcome = yield AwaitApproval(request)      # an ApprovalOutcome

so code that waits reads straight down, like blocking code, without blocking
(mitmproxy's `proxy/layer.py` is the model). Non-blocking commands are carried
out in order and the handler goes on at once.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from proxy.approvals import ApprovalRequest

Side = Literal["client", "server"]
CLIENT: Side = "client"
SERVER: Side = "server"


class Command:
    """Something for the adapter to do; `blocking` ones pause the handler until completed."""

    __slots__ = ()
    blocking: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class Send(Command):
    """Write bytes to one side (the upstream side: once it is open).

    `channel`: where the protocol multiplexes streams (SSH channels), which
    one, as the front end and its adapter agree; None where there is one.
    """

    side: Side
    data: bytes
    channel: str | None = None


@dataclass(frozen=True, slots=True)
class OpenUpstream(Command):
    """Connect to the target; with `tls`, the TLS handshake is part of the connect.

    Completes with an `UpstreamTLS` (or None for plaintext); raises
    `UpstreamUnavailable` into the handler when the target cannot be reached.
    """

    blocking: ClassVar[bool] = True
    host: str
    port: int
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None


@dataclass(frozen=True, slots=True)
class StartTLS(Command):
    """Upgrade one side's connection to TLS in place; completes with a `TLSInfo`.

    Nothing is read from or written to that side in plaintext while the
    handshake runs: what the session sends meanwhile waits for it. `early`
    is what was already read from that side past the request to start TLS:
    the start of the TLS stream (a MySQL client sends its ClientHello right
    behind its SSLRequest, without waiting for an answer).
    """

    blocking: ClassVar[bool] = True
    side: Side
    context: ssl.SSLContext
    server_hostname: str | None = None
    early: bytes = b""


@dataclass(frozen=True, slots=True)
class VerifyToken(Command):
    """Check a bearer token off the event loop; completes with an Identity or an AuthenticationError."""

    blocking: ClassVar[bool] = True
    token: str


@dataclass(frozen=True, slots=True)
class AwaitApproval(Command):
    """Publish a held operation to reviewers; completes with their ApprovalOutcome (or its expiry)."""

    blocking: ClassVar[bool] = True
    request: ApprovalRequest


@dataclass(frozen=True, slots=True)
class SetTimer(Command):
    """Call the session's `timer(name)` after `seconds`; None cancels the timer of that name."""

    name: str
    seconds: float | None


@dataclass(frozen=True, slots=True)
class Cede(Command):
    """Let the event loop serve other sessions once before going on: long CPU work (masking) in slices.

    Completes on the loop's next turn, with whether another session of the
    listener is waiting for its target's reply (it sent the target something
    and has had nothing back since): that reply will wait behind the next
    slice, which should then be short. Blocking, so what arrives meanwhile
    from the same side queues behind it, in order.
    """

    blocking: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class ReadControl(Command):
    """Stop (or resume) reading from one side: its lane queues more than the session should hold."""

    side: Side
    paused: bool


@dataclass(frozen=True, slots=True)
class SendOnce(Command):
    """Open a short connection, send `data`, close: owned by the listener, so it outlives this session."""

    host: str
    port: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Close(Command):
    """Close both sides once what was written before is sent."""

    reason: str


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """A completed TLS handshake: the negotiated version and the peer certificate's SHA-256 (hex)."""

    version: str
    peer_cert_sha256: str | None


class UpstreamUnavailable(Exception):
    """The target cannot be reached or refused the proxy's own login: the session ends, the client is told."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class TLSFailed(Exception):
    """A TLS handshake with a side failed: raised into the handler that asked for it."""


Completion = Any  # what a blocking command's `yield` evaluates to
