"""Bad input to the SSH proxy from raw sockets: garbage before the version string, an oversized packet, a key
exchange that cannot agree, a client that stalls past the startup deadline. Each ends only that connection, with a ProtocolError event (its code, the first
bytes as the sample) and SessionEnd(protocol_error); a bystander's session (the real ssh running `cat`) keeps
working through all of them, and the proxy still takes new sessions. A connection that sends nothing and leaves
before the deadline is not a session.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time

import pytest

from pg_fixtures import EventLog, messages, start_proxy
from ssh_fixtures import Client, new_user, ssh_proxy_entry, start_sshd


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory):
    sshd = start_sshd(tmp_path_factory.mktemp("sshd"))
    directory = tmp_path_factory.mktemp("custody")
    # A second listener with a short startup deadline: the slow clients (the first keeps the default 10 s).
    running = start_proxy(directory, broker, extra_proxies=ssh_proxy_entry(sshd, policy="policies/default.toml") +
                          ssh_proxy_entry(sshd, name="slow-ssh", policy="policies/default.toml",
                                          extra=f"startup_timeout = {STARTUP_TIMEOUT}"))
    running.events = EventLog.open(running)
    host_pub = (directory / "keys" / "ssh_host_ed25519.pub").read_text().strip()
    running.client = Client(tmp_path_factory.mktemp("client"), *running.address(1), host_pub)
    yield running
    running.events.close()
    running.background.stop()
    sshd.stop()


STARTUP_TIMEOUT = 1.5  # the slow-ssh listener's


def attack(proxy, payload: bytes, listener: int = 1) -> tuple[str, bytes]:
    """Send `payload` from a raw socket; what the proxy sent until it closed the connection, and our address."""
    with socket.create_connection(proxy.address(listener), timeout=10) as sock:
        address = "%s:%d" % sock.getsockname()[:2]
        sock.sendall(payload)
        received, deadline = b"", time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        else:
            pytest.fail(f"the proxy did not close the connection: {received!r}")
    return address, received


def ssh_packet(payload: bytes) -> bytes:
    """An unencrypted SSH binary packet (RFC 4253 §6), block size 8."""
    padding = 8 - (5 + len(payload)) % 8
    padding += 8 if padding < 4 else 0
    return struct.pack(">IB", 1 + len(payload) + padding, padding) + payload + b"\0" * padding


def name_list(*names: str) -> bytes:
    text = ",".join(names).encode()
    return struct.pack(">I", len(text)) + text


def kexinit(kex: str) -> bytes:
    """SSH_MSG_KEXINIT offering only `kex` as key exchange and otherwise usual algorithms."""
    lists = [name_list(kex), name_list("ssh-ed25519"), *[name_list("aes128-ctr")] * 2,
             *[name_list("hmac-sha2-256")] * 2, *[name_list("none")] * 2, name_list(), name_list()]
    return bytes([20]) + os.urandom(16) + b"".join(lists) + b"\0" + b"\0\0\0\0"


def error_session(proxy, address: str):
    found = proxy.events.find(lambda start: start["protocol"] == "ssh" and start["source_address"] == address)
    assert len(found) == 1, f"no session from {address}"
    events = found[0]
    assert [e.kind for e in events] == ["session_start", "protocol_error", "session_end"], [e.kind for e in events]
    assert events[0].body["identity"] is None
    assert events[-1].body["reason"] == "protocol_error"
    return events[1].body


# (what, payload, listener, code, text in the message); the slow-ssh listener (2) for the stalls.
ATTACKS = [
    ("garbage before the version string", b"GET / HTTP/1.1\r\nHost: bastion\r\n\r\n", 1,
     "ssh_version_not_supported", "Unsupported SSH version"),
    ("an oversized packet", b"SSH-2.0-attacker\r\n" + struct.pack(">I", 0x40000000) + b"\0" * 60, 1,
     "ssh_protocol_error", "Max packet size exceeded"),
    ("a key exchange that cannot agree", b"SSH-2.0-attacker\r\n" + ssh_packet(kexinit("no-such-kex@example.com")),
     1, "ssh_key_exchange_failed", "No matching key exchange algorithm"),
    ("a client that stalls after its version string", b"SSH-2.0-slowloris\r\n", 2,
     "ssh_login_timeout", f"did not log in within {STARTUP_TIMEOUT:g} s (after 'SSH-2.0-slowloris')"),
    ("a client that stalls inside its version string", b"SSH-2.0-slo", 2,
     "ssh_login_timeout", "before its version string"),
]


def test_bad_input_ends_only_that_connection_with_a_protocol_error(proxy):
    user = new_user()
    bystander = subprocess.Popen(["ssh", *proxy.client.options(), "-p", str(proxy.client.port), "-l", user,
                                  proxy.client.host, "cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=proxy.client.env(proxy.token(user, ("dev",))))
    try:
        bystander.stdin.write(b"before\n")
        bystander.stdin.flush()
        assert bystander.stdout.readline() == b"before\n"
        for what, payload, listener, code, text in ATTACKS:
            address, received = attack(proxy, payload, listener)
            assert received.startswith(b"SSH-2.0-"), (what, received)  # the proxy's version, then nothing
            error = error_session(proxy, address)
            assert error["code"] == code and text in error["message"], (what, error)
            assert payload.startswith(error["sample"]) and error["sample"], (what, error)
            bystander.stdin.write(f"after {what}\n".encode())
            bystander.stdin.flush()
            assert bystander.stdout.readline() == f"after {what}\n".encode(), what
        bystander.stdin.close()
        assert bystander.wait(20) == 0, bystander.stderr.read()
    finally:
        if bystander.poll() is None:
            bystander.kill()
    events = proxy.events.find(lambda s: s["protocol"] == "ssh" and s["attributes"].get("user") == user)[0]
    output = b"".join(m["data"] for m in messages(events, "server") if m["type"] == "data")
    assert output == b"before\n" + b"".join(f"after {what}\n".encode() for what, *_ in ATTACKS)
    assert events[-1].body["reason"] == "client_disconnect"
    assert not any(e.kind == "protocol_error" for e in events)
    later = new_user()  # and the proxy takes new sessions
    ran = proxy.client.ssh(later, proxy.token(later, ("dev",)), "echo still-here")
    assert ran.returncode == 0 and ran.stdout == b"still-here\n", ran.stderr


def test_a_connection_that_sends_nothing_is_not_a_session(proxy):
    with socket.create_connection(proxy.address(2), timeout=10) as sock:  # it leaves before the deadline
        address = "%s:%d" % sock.getsockname()[:2]
        assert sock.recv(256).startswith(b"SSH-2.0-")
    time.sleep(STARTUP_TIMEOUT + 1)
    proxy.events.poll(1)
    assert not proxy.events.find(lambda s: s["source_address"] == address, timeout=1)


def test_a_connection_that_sends_nothing_past_the_deadline_is_a_slow_client(proxy):
    address, received = attack(proxy, b"", 2)
    assert received.startswith(b"SSH-2.0-")
    error = error_session(proxy, address)
    assert error["code"] == "ssh_login_timeout" and "before its version string" in error["message"], error
    assert error["sample"] == b""
