"""The SSH front end as a sans-I/O state machine: SSH events in, commands out, no sockets.

The asyncio glue (`proxy.ssh.server`) is exercised against a real sshd in
test_ssh_proxy.py; what depends on the order sshd happens to send things in
is pinned down here, where the order can be chosen.
"""

from __future__ import annotations

from datetime import datetime, timezone

import asyncssh

from proxy.core.commands import CLIENT, SERVER, Command, Send, SetTimer, VerifyToken
from proxy.core.session import Session
from proxy.core.settings import ListenerSettings
from proxy.identity import Identity
from proxy.ssh import events as ev
from proxy.ssh.frontend import SSHProtocol
from proxy.ssh.settings import SSHSettings, SSHUpstream

ALICE = Identity("alice-sub", "alice", "alice@example.com", ("dev",), "https://idp/", "jti-1",
                 datetime(2030, 1, 1, tzinfo=timezone.utc))
HOST_KEY = asyncssh.generate_private_key("ssh-ed25519")


class Recording:
    session_id = "01900000-0000-7000-8000-000000000001"

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def record(self, kind: str, body: dict) -> None:
        self.events.append((kind, body))

    def message_types(self) -> list[tuple[str, str]]:
        return [(body["direction"], m["type"]) for kind, body in self.events if kind == "frames"
                for m in body["messages"]]


def _protocol() -> SSHProtocol:
    listener = ListenerSettings(name="web", listen_host="127.0.0.1", listen_port=0, tls=None,
                                startup_timeout=10.0, connect_timeout=5.0, fail_open=False)
    upstream = SSHUpstream("web.internal", 22, "deploy", None, "secret", HOST_KEY)
    return SSHProtocol(SSHSettings(listener, upstream, HOST_KEY, 1 << 18))


def _only(commands: list[Command], kind: type) -> Command:
    found = [c for c in commands if type(c) is kind]
    assert len(found) == 1, commands
    return found[0]


def _relaying() -> tuple[Session, Recording]:
    """A session past login: alice's token verified, the target connected."""
    recording = Recording()
    session = Session(protocol=_protocol(), recording=recording, source_address="10.0.0.9:5555")
    session.start()
    verify = _only(session.event(CLIENT, ev.Login("alice", "tok", "password")), VerifyToken)
    connect = _only(session.completed(verify, ALICE), ev.ConnectTarget)
    assert ev.LoginResult(True) in session.completed(connect, "SHA256:target")
    return session, recording


def _exec(session: Session, command: str = "make test") -> None:
    start = ev.ChannelStart(0, "exec", command=command)
    open_channel = _only(session.event(CLIENT, start), ev.OpenChannel)
    session.completed(open_channel, None)


def test_output_after_the_exit_status_reaches_the_client_before_the_exit():
    """sshd may report the exit status before the last of the output (RFC 4254 allows data until close):
    relaying the exit closes the client's channel, so it is held until the target's channel closes."""
    session, recording = _relaying()
    _exec(session)
    out: list[Command] = []
    out += session.event(SERVER, ev.ChannelData(0, b"out\n", False))
    out += session.event(SERVER, ev.ExitStatus(0, 3))
    assert not any(type(c) is ev.Exit for c in out)
    out += session.event(SERVER, ev.ChannelData(0, b"err\n", True))
    out += session.event(SERVER, ev.ChannelEof(0))
    out += session.event(SERVER, ev.ChannelClosed(0))
    relayed = [c for c in out if type(c) in (Send, ev.Exit, ev.CloseChannel, ev.SendEof)]
    assert relayed == [Send(CLIENT, b"out\n", "0"), Send(CLIENT, b"err\n", "0" + ev.STDERR),
                       ev.SendEof(CLIENT, 0), ev.Exit(0, status=3), ev.CloseChannel(CLIENT, 0)]
    # the evidence keeps the target's own order
    assert recording.message_types()[-5:] == [("server", "data"), ("server", "exit-status"), ("server", "data"),
                                              ("server", "eof"), ("server", "close")]


def test_an_exit_signal_is_held_like_an_exit_status():
    session, _ = _relaying()
    _exec(session, "sleep 100")
    out = session.event(SERVER, ev.ExitSignal(0, "TERM", False, "terminated"))
    assert not any(type(c) is ev.Exit for c in out)
    out = session.event(SERVER, ev.ChannelClosed(0))
    assert out[0] == ev.Exit(0, signal="TERM", core_dumped=False, message="terminated")


def test_a_target_channel_closed_without_an_exit_status_closes_the_client_channel_only():
    session, _ = _relaying()
    _exec(session)
    out = session.event(SERVER, ev.ChannelClosed(0))
    assert [c for c in out if type(c) in (ev.Exit, ev.CloseChannel)] == [ev.CloseChannel(CLIENT, 0)]
