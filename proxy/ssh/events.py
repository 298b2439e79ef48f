"""What the SSH glue tells the core (`Session.event` items) and what the SSH front end asks of the glue.

asyncssh parses SSH; the glue turns its callbacks into these items, in the
order they happen, and feeds them to the session's client or server lane.
Channel ids are the proxy's own numbers for the client's channels (0, 1, …),
the `channel` of every recorded message and of the SSH commands below.

Data to a channel is the core's `Send(side, data, channel)`: `channel` is the
id as a string, with the suffix `STDERR` for a session's extended data
(stderr) — only the glue and this front end read that convention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from proxy.core.commands import Command, UpstreamUnavailable

STDERR = ".stderr"


def channel_name(channel: int, stderr: bool = False) -> str:
    return f"{channel}{STDERR}" if stderr else str(channel)


# --- from the client ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Login:
    """A password or keyboard-interactive answer: the OIDC token, for the SSH user."""

    user: str
    token: str
    method: str  # password | keyboard-interactive | publickey (a certificate of the proxy's CA, or a key mapped in the config)
    client_version: str | None = None
    identity: Any = None  # publickey: the Identity the certificate or mapped key carries, or its CertificateRefused
    attributes: dict[str, str] = field(default_factory=dict)  # publickey: the certificate's serial, fingerprints


@dataclass(frozen=True, slots=True)
class ChannelStart:
    """A session channel's request was made: exec, shell or a subsystem, with its pty and environment."""

    channel: int
    kind: str  # exec | shell | subsystem
    command: str | None = None
    subsystem: str | None = None
    term: str | None = None
    size: tuple[int, int, int, int] | None = None  # columns, rows, pixel width, pixel height
    modes: dict[int, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ForwardOpen:
    """A direct-tcpip channel (local port forwarding, `ssh -L`/`-W`): to host:port on the target's side."""

    channel: int
    host: str
    port: int
    origin_host: str
    origin_port: int


@dataclass(frozen=True, slots=True)
class ForwardRequest:
    """A forwarding request: remote (tcpip-forward, `ssh -R`), agent (`ssh -A`) or X11 (`ssh -X`).

    Remote and agent: decided by policy like a direct-tcpip (closed by
    default), answered with `ForwardAnswer`. X11 is never relayed: asyncssh
    refuses it; the front end records the request and the refusal.
    """

    kind: str  # remote | agent | x11
    channel: int | None = None  # the session channel of an agent or X11 request
    host: str = ""
    port: int = 0
    detail: str = ""  # X11: the auth protocol and screen


@dataclass(frozen=True, slots=True)
class ForwardedOpen:
    """From the target: a channel to relay to the client — a connection to a remote forwarding's listener
    (`ssh -R`, forwarded-tcpip) or to the client's agent (`ssh -A`, auth-agent@openssh.com).

    `host`:`port` is where the target listens (the port it bound); the origin
    is the connecting peer, as the target reports it. An agent channel has none.
    """

    channel: int
    host: str = ""
    port: int = 0
    origin_host: str = ""
    origin_port: int = 0
    agent: bool = False


@dataclass(frozen=True, slots=True)
class WindowChange:
    channel: int
    size: tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class Signal:
    channel: int
    name: str


@dataclass(frozen=True, slots=True)
class Break:
    channel: int
    msec: int


# --- from either side -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ChannelData:
    channel: int
    data: bytes
    stderr: bool = False


@dataclass(frozen=True, slots=True)
class ChannelEof:
    channel: int


@dataclass(frozen=True, slots=True)
class ChannelClosed:
    channel: int


# --- from the target ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ExitStatus:
    channel: int
    status: int


@dataclass(frozen=True, slots=True)
class ExitSignal:
    channel: int
    signal: str
    core_dumped: bool
    message: str


# --- commands for the glue --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ConnectTarget(Command):
    """Log in to the target with the proxy's credential, its host key pinned.

    Completes with the target's host key fingerprint (SHA256:…); raises
    `HostKeyRefused` or `UpstreamUnavailable` into the handler.
    """

    blocking: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class LoginResult(Command):
    """Answer the client's pending authentication attempt."""

    accepted: bool


@dataclass(frozen=True, slots=True)
class OpenChannel(Command):
    """Open the other side of a channel: the target's of a client's session or direct-tcpip, or the client's
    forwarded-tcpip of a connection to the target's remote forwarding listener (`ForwardedOpen`).

    Completes with None; raises `ChannelRefused` into the handler.
    """

    blocking: ClassVar[bool] = True
    start: ChannelStart | ForwardOpen | ForwardedOpen


@dataclass(frozen=True, slots=True)
class ListenTarget(Command):
    """Ask the target to listen for a remote forwarding (tcpip-forward on the proxy's connection to it).

    Completes with the port the target listens on; raises `ChannelRefused`.
    """

    blocking: ClassVar[bool] = True
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ForwardAnswer(Command):
    """Answer the client's oldest pending tcpip-forward (the target's listener, or a refusal) or agent request."""

    accepted: bool


@dataclass(frozen=True, slots=True)
class SendEof(Command):
    side: str
    channel: int


@dataclass(frozen=True, slots=True)
class CloseChannel(Command):
    side: str
    channel: int


@dataclass(frozen=True, slots=True)
class Exit(Command):
    """End a client session channel with the target's (or the proxy's) exit status or signal."""

    channel: int
    status: int | None = None
    signal: str | None = None
    core_dumped: bool = False
    message: str = ""


@dataclass(frozen=True, slots=True)
class Resize(Command):
    channel: int
    size: tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class SendSignal(Command):
    channel: int
    name: str


@dataclass(frozen=True, slots=True)
class SendBreak(Command):
    channel: int
    msec: int


class HostKeyRefused(UpstreamUnavailable):
    """The target's host key is not the pinned one: nobody can tell a changed key from an impostor."""


class ChannelRefused(Exception):
    """The target refused to open the channel (or its request)."""
