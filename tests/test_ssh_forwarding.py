"""Port forwarding through the SSH proxy with the real OpenSSH client and a real sshd: `ssh -W` and `ssh -L` to a
local TCP echo server that a policy rule allows, and `ssh -R` on a target listen port a rule allows (the target
listens, its connections come back through the proxy to the client, which connects them to the echo server), each
forwarded connection recorded as its own channel with its destination and the bytes each way; destinations and
listen ports no rule allows, agent (`-A`) and X11 (`-X`) forwarding refused and recorded (PolicyDecision block,
forwarding-closed-by-default).
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import socketserver
import subprocess
import threading
import time

import pytest

from pg_fixtures import EventLog, messages, start_proxy
from ssh_fixtures import Client, free_port, keygen, new_user, ssh_proxy_entry, sshd  # noqa: F401 (sshd: a fixture)


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = allow_reuse_address = True


@pytest.fixture(scope="module")
def echo():
    server = EchoServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory, sshd, echo):
    remote_port = free_port()  # the one listen port on the target that the policy lets `ssh -R` open
    directory = tmp_path_factory.mktemp("custody")
    (directory / "policies").mkdir()
    (directory / "policies" / "ssh.toml").write_text(f'''
[[rule]]
name = "allow-forward-to-echo"
action = "allow"
message = "the echo service may be reached through Custody"
protocols = ["ssh"]
operations = ["forward"]
objects = ["127.0.0.1:{echo}"]
attributes = {{ direction = ["local"] }}

[[rule]]
name = "allow-remote-listen"
action = "allow"
message = "the target may listen on this port for the client"
protocols = ["ssh"]
operations = ["forward"]
objects = ["127.0.0.1:{remote_port}"]
attributes = {{ direction = ["remote"] }}

[[rule]]
name = "allow-agent-for-ops"
action = "allow"
message = "ops may use their agent on the target"
protocols = ["ssh"]
operations = ["forward"]
groups = ["ops"]
attributes = {{ direction = ["agent"] }}
''')
    running = start_proxy(directory, broker, extra_proxies=ssh_proxy_entry(sshd))
    running.events = EventLog.open(running)
    running.remote_port = remote_port
    host_pub = (directory / "keys" / "ssh_host_ed25519.pub").read_text().strip()
    running.client = Client(tmp_path_factory.mktemp("client"), *running.address(1), host_pub)
    yield running
    running.events.close()
    running.background.stop()


def session_of(proxy, user: str):
    found = proxy.events.find(lambda s: s["protocol"] == "ssh" and s["attributes"].get("user") == user)
    assert len(found) == 1, f"no session of {user}"
    return found[0]


def forwards(events) -> dict[str, dict]:
    """Each forwarded channel: its destination, the bytes recorded each way, and its close record's counts."""
    channels: dict[str, dict] = {}
    for m in messages(events):
        if m["type"] in ("direct-tcpip", "forwarded-tcpip"):
            channels[m["channel"]] = {"destination": m["text"], "client": b"", "server": b"", "close": None}
    for direction in ("client", "server"):
        for m in messages(events, direction):
            if m["channel"] in channels and m["type"] == "data":
                channels[m["channel"]][direction] += m["data"]
            elif m["channel"] in channels and m["type"] == "close":
                channels[m["channel"]]["close"] = m["attributes"]
    return channels


def test_ssh_W_to_an_allowed_destination_relays_and_records_the_bytes(proxy, echo):
    user = new_user()
    payload = os.urandom(200_000)
    result = proxy.client.ssh(user, proxy.token(user, ("dev",)), input=payload, extra=("-W", f"127.0.0.1:{echo}"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == payload
    events = session_of(proxy, user)
    [channel] = forwards(events).values()
    assert channel["destination"] == f"127.0.0.1:{echo}"
    assert channel["client"] == payload and channel["server"] == payload
    assert channel["close"] == {"destination": f"127.0.0.1:{echo}", "client_bytes": str(len(payload)),
                                "server_bytes": str(len(payload))}
    assert any(m["type"] == "open-confirmation" and m["outcome"] == "ok" for m in messages(events, "server"))
    assert not [e for e in events if e.kind == "policy_decision"]


PROBE = b"probe"


def echoed(port: int, data: bytes) -> bytes:
    """`data` sent through `port` on a connection of its own, and what came back until the other end closed."""
    with socket.create_connection(("127.0.0.1", port), 10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        back = b""
        while chunk := sock.recv(65536):
            back += chunk
    return back


def tunnel_through(proxy, user: str, forwarding: tuple[str, str], port: int, sent: list[bytes],
                   probe: bool = False) -> None:
    """`ssh -N` with one forwarding (-L or -R), then each of `sent` through `port` on its own connection, echoed.

    It waits until `port` accepts (with `probe`: until a PROBE comes back —
    a target's -R port listens before the client knows of the forwarding).
    """
    tunnel = subprocess.Popen(["ssh", *proxy.client.options(), "-N", "-o", "ExitOnForwardFailure=yes",
                               *forwarding, "-p", str(proxy.client.port), "-l", user, proxy.client.host],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=proxy.client.env(proxy.token(user, ("dev",))))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if not probe:
                    socket.create_connection(("127.0.0.1", port), 1).close()
                    break
                if echoed(port, PROBE) == PROBE:
                    break
            except OSError:
                pass
            assert tunnel.poll() is None and time.monotonic() < deadline, tunnel.stderr.read()
            time.sleep(0.1)
        for data in sent:
            assert echoed(port, data) == data
    finally:
        tunnel.terminate()
        tunnel.wait(10)


def test_ssh_L_records_each_forwarded_connection_on_its_own_channel(proxy, echo):
    user = new_user()
    local = free_port()
    sent = [b"first connection " * 1000, b"second " * 3000]
    tunnel_through(proxy, user, ("-L", f"127.0.0.1:{local}:127.0.0.1:{echo}"), local, sent)
    events = session_of(proxy, user)
    channels = [c for c in forwards(events).values() if c["client"]]
    assert [(c["destination"], c["client"], c["server"]) for c in channels] == [
        (f"127.0.0.1:{echo}", data, data) for data in sent]
    assert [c["close"]["client_bytes"] for c in channels] == [str(len(data)) for data in sent]
    assert [c["close"]["server_bytes"] for c in channels] == [str(len(data)) for data in sent]


def test_a_destination_no_rule_allows_is_refused(proxy, sshd):
    user = new_user()
    result = proxy.client.ssh(user, proxy.token(user, ("dev",)), extra=("-W", f"127.0.0.1:{sshd.port}"))
    assert result.returncode == 255 and b"stdio forwarding failed" in result.stderr
    events = session_of(proxy, user)
    assert [(e.body["rule"], e.body["action"], e.body["statement"]) for e in events if e.kind == "policy_decision"] \
        == [("forwarding-closed-by-default", "block", f"127.0.0.1:{sshd.port}")]
    failure = next(m for m in messages(events, "server") if m["type"] == "open-failure")
    assert failure["error_code"] == "administratively_prohibited"


def test_ssh_R_on_an_allowed_listen_port_relays_the_targets_connections_back_to_the_client(proxy, echo):
    user, remote_port = new_user(), proxy.remote_port
    sent = [b"remote one " * 2000, os.urandom(150_000)]
    tunnel_through(proxy, user, ("-R", f"127.0.0.1:{remote_port}:127.0.0.1:{echo}"), remote_port, sent, probe=True)
    events = session_of(proxy, user)
    listen = f"127.0.0.1:{remote_port}"
    request = next(m for m in messages(events, "client") if m["type"] == "tcpip-forward")
    assert (request["operation"], request["text"], request["objects"]) == ("forward", f"remote {listen}", [listen])
    success = next(m for m in messages(events, "server") if m["type"] == "request-success")
    assert success["attributes"] == {"host": "127.0.0.1", "port": str(remote_port)} and success["outcome"] == "ok"
    assert not [e for e in events if e.kind == "policy_decision"]  # an allow is no decision event, as for -L
    opened = [m for m in messages(events, "server") if m["type"] == "forwarded-tcpip"]
    assert opened and all((m["operation"], m["text"]) == ("forward", f"remote {listen}") for m in opened)
    channels = [c for c in forwards(events).values() if c["server"] not in (b"", PROBE)]  # not the probes
    # server: what reached the target's listener; client: what came back through the client from the echo server
    assert [(c["destination"], c["server"], c["client"]) for c in channels] == [
        (f"remote {listen}", data, data) for data in sent]
    assert [c["close"] for c in channels] == [
        {"destination": listen, "client_bytes": str(len(data)), "server_bytes": str(len(data))} for data in sent]


def test_remote_forwarding_is_refused_and_recorded(proxy, echo):
    user = new_user()
    result = proxy.client.ssh(user, proxy.token(user, ("dev",)), "echo ran", extra=(
        "-o", "ExitOnForwardFailure=yes", "-R", f"127.0.0.1:{free_port()}:127.0.0.1:{echo}"))
    assert result.returncode == 255 and b"remote port forwarding failed" in result.stderr, result.stderr
    events = session_of(proxy, user)
    request = next(m for m in messages(events, "client") if m["type"] == "tcpip-forward")
    assert request["operation"] == "forward" and request["text"].startswith("remote 127.0.0.1:")
    assert [(e.body["rule"], e.body["action"]) for e in events if e.kind == "policy_decision"] == [
        ("forwarding-closed-by-default", "block")]
    assert any(m["type"] == "request-failure" and m["attributes"]["origin"] == "proxy"
               for m in messages(events, "server"))


@contextlib.contextmanager
def ssh_agent(directory):
    """A running ssh-agent of the client's: its socket."""
    agent_sock = directory / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_sock)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not agent_sock.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield agent_sock
    finally:
        agent.terminate()
        agent.wait(10)


def ssh_A(proxy, user: str, groups: tuple[str, ...], agent_sock, command: str) -> subprocess.CompletedProcess:
    env = {**proxy.client.env(proxy.token(user, groups)), "SSH_AUTH_SOCK": str(agent_sock), "DISPLAY": ":93"}
    return subprocess.run(["ssh", *proxy.client.options(), "-A", "-X", "-p", str(proxy.client.port), "-l",
                           user, proxy.client.host, command],
                          env=env, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)


def test_agent_and_x11_forwarding_are_refused_and_recorded(proxy, tmp_path):
    user = new_user()
    with ssh_agent(tmp_path) as agent_sock:
        result = ssh_A(proxy, user, ("dev",), agent_sock, "echo ran; echo ${SSH_AUTH_SOCK:-no-agent}")
    assert result.returncode == 0 and result.stdout == b"ran\nno-agent\n", result.stderr
    events = session_of(proxy, user)
    requests = [(m["type"], m["text"]) for m in messages(events, "client") if m["operation"] == "forward"]
    assert sorted(requests) == [("auth-agent-req", "agent"), ("x11-req", "x11")]
    assert sorted(e.body["statement"] for e in events if e.kind == "policy_decision") == ["agent", "x11"]
    exec_channel = next(m["channel"] for m in messages(events, "client") if m["type"] == "exec")
    assert {m["channel"] for m in messages(events, "client") if m["operation"] == "forward"} == {exec_channel}


def test_agent_forwarding_a_rule_allows_reaches_the_clients_agent_and_is_recorded(proxy, tmp_path):
    user = new_user()
    public = keygen(tmp_path / "agent_key")
    with ssh_agent(tmp_path) as agent_sock:
        subprocess.run(["ssh-add", "-q", str(tmp_path / "agent_key")], env={"SSH_AUTH_SOCK": str(agent_sock)},
                       check=True, capture_output=True, timeout=20)
        result = ssh_A(proxy, user, ("ops",), agent_sock, "ssh-add -L")  # on the target: the client's agent
    assert result.returncode == 0 and public.split()[1].encode() in result.stdout, result
    events = session_of(proxy, user)
    client, server = messages(events, "client"), messages(events, "server")
    exec_channel = next(m["channel"] for m in client if m["type"] == "exec")
    request = next(m for m in client if m["type"] == "auth-agent-req")
    assert (request["channel"], request["operation"], request["text"]) == (exec_channel, "forward", "agent")
    assert any(m["type"] == "request-success" and m["channel"] == exec_channel for m in server)
    assert [(e.body["rule"], e.body["statement"]) for e in events if e.kind == "policy_decision"] == [
        ("forwarding-closed-by-default", "x11")]  # X11 is refused whatever the policy
    [opened] = [m for m in server if m["type"] == "auth-agent"]
    agent_channel = opened["channel"]
    assert agent_channel != exec_channel and (opened["operation"], opened["text"]) == ("forward", "agent")
    asked = b"".join(m["data"] for m in server if m["type"] == "data" and m["channel"] == agent_channel)
    answered = b"".join(m["data"] for m in client if m["type"] == "data" and m["channel"] == agent_channel)
    assert asked[4:5] == bytes([11])  # SSH_AGENTC_REQUEST_IDENTITIES, from the target
    assert answered[4:5] == bytes([12]) and base64.b64decode(public.split()[1]) in answered  # the key's blob
    close = next(m for m in client + server if m["type"] == "close" and m["channel"] == agent_channel)
    assert close["attributes"] == {"destination": "agent", "client_bytes": str(len(answered)),
                                   "server_bytes": str(len(asked))}
