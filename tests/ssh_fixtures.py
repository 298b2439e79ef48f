"""Helpers for the SSH proxy tests: a real OpenSSH sshd on a free loopback port with its own config, host
key and AuthorizedKeysFile in a temp dir, the proxy in front of it, and the real ssh/scp/sftp clients with
the OIDC token as the password (SSH_ASKPASS with SSH_ASKPASS_REQUIRE=force) and the proxy's host key pinned.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Sshd:
    """A running sshd that lets in root with `client_key` (the proxy's upstream credential)."""

    directory: Path
    port: int
    process: subprocess.Popen
    client_key: Path
    host_key_pub: str

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def keygen(path: Path, kind: str = "ed25519") -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    return path.with_name(path.name + ".pub").read_text().strip()


def start_sshd(directory: Path) -> Sshd:
    directory.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory sshd insists on
    host_pub = keygen(directory / "ssh_host_ed25519_key")
    client_pub = keygen(directory / "proxy_client_key")
    (directory / "authorized_keys").write_text(client_pub + "\n")
    port = free_port()
    sftp_server = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/sftp-server") if Path(p).exists()),
                       "internal-sftp")
    config = directory / "sshd_config"
    config.write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {directory}/ssh_host_ed25519_key
PidFile {directory}/sshd.pid
AuthorizedKeysFile {directory}/authorized_keys
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding yes
AcceptEnv LANG LC_* CUSTODY_*
Subsystem sftp {sftp_server}
LogLevel VERBOSE
""")
    log = open(directory / "sshd.log", "w")
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {(directory / 'sshd.log').read_text()}")
            time.sleep(0.05)
    return Sshd(directory, port, process, directory / "proxy_client_key", host_pub)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """One sshd per test module: a module imports it by name (`from ssh_fixtures import sshd`)."""
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


def ssh_proxy_entry(sshd: Sshd, name: str = "local-ssh", host_key: str | None = None,
                    policy: str = "policies/ssh.toml", extra: str = "") -> str:
    return f"""
[[proxy]]
name = "{name}"
protocol = "ssh"
listen = "127.0.0.1:0"
upstream = "ssh://root@127.0.0.1:{sshd.port}"
upstream_key_file = "{sshd.client_key}"
upstream_host_key = "{host_key or sshd.host_key_pub}"
host_key_file = "keys/ssh_host_ed25519"
policy = "{policy}"
{extra}"""


def new_user() -> str:
    """A unique SSH user (= the token's subject): how a test finds its session among the events."""
    return f"u{uuid.uuid4().hex[:10]}@example.com"


class Client:
    """The real OpenSSH clients against one proxy listener, the proxy's host key pinned."""

    def __init__(self, directory: Path, host: str, port: int, host_key_pub: str) -> None:
        self.directory, self.host, self.port = directory, host, port
        directory.mkdir(parents=True, exist_ok=True)
        self.known_hosts = directory / "known_hosts"
        self.known_hosts.write_text(f"[{host}]:{port} {host_key_pub}\n")
        self.askpass = directory / "askpass"
        self.askpass.write_text('#!/bin/sh\nprintf "%s\\n" "$CUSTODY_TOKEN"\n')
        self.askpass.chmod(0o700)

    def options(self) -> list[str]:
        return ["-F", "/dev/null", "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=keyboard-interactive,password",
                "-o", "NumberOfPasswordPrompts=1", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]

    def certificate_options(self, key: Path) -> list[str]:
        """Plain OpenSSH with `key` and the `KEY-cert.pub` beside it, nothing else: no password, no agent."""
        return ["-F", "/dev/null", "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "PreferredAuthentications=publickey", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", "-i", str(key)]

    def ssh_with_key(self, user: str, key: Path, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "DISPLAY", "SSH_ASKPASS")}
        return subprocess.run(["ssh", *self.certificate_options(key), "-p", str(self.port), "-l", user, self.host,
                               *command], stdin=subprocess.DEVNULL, env=env, capture_output=True, timeout=timeout)

    def env(self, token: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "DISPLAY")}
        return {**env, "SSH_ASKPASS": str(self.askpass), "SSH_ASKPASS_REQUIRE": "force", "CUSTODY_TOKEN": token}

    def ssh(self, user: str, token: str, *command: str, input: bytes | None = None, extra: tuple[str, ...] = (),
            timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", *self.options(), "-p", str(self.port), *extra, "-l", user, self.host,
                               *command], input=input, stdin=None if input is not None else subprocess.DEVNULL,
                              env=self.env(token), capture_output=True, timeout=timeout)

    def sftp(self, user: str, token: str, batch: str, timeout: float = 60) -> subprocess.CompletedProcess:
        script = self.directory / f"batch-{uuid.uuid4().hex[:8]}"
        script.write_text(batch)
        return subprocess.run(["sftp", *self.options(), "-o", "BatchMode=no", "-o", f"User={user}", "-P", str(self.port), "-b", str(script),
                               self.host], env=self.env(token), capture_output=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def scp(self, user: str, token: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["scp", *self.options(), "-o", f"User={user}", "-P", str(self.port), *args], env=self.env(token),
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def target(self, path: str) -> str:
        return f"{self.host}:{path}"

    def terminal(self, user: str, token: str) -> "Terminal":
        """An interactive `ssh -tt` (a shell, no command) on a PTY of its own, as a person's terminal is."""
        return Terminal(["ssh", *self.options(), "-tt", "-p", str(self.port), "-l", user, self.host], self.env(token))


class Terminal:
    """A real ssh on a PTY: keys written to the master, what the terminal shows read back from it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        import pty

        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.shown = b""

    def expect(self, marker: bytes, timeout: float = 20.0) -> bytes:
        """Read until `marker` shows; returns what showed up to and including it (and keeps the rest)."""
        import select

        deadline = time.monotonic() + timeout
        while marker not in self.shown:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.master], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"{marker!r} did not show within {timeout} s; the terminal shows {self.shown[-400:]!r}")
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                raise AssertionError(f"the session ended before {marker!r}: {self.shown[-400:]!r}")
            self.shown += chunk
        end = self.shown.index(marker) + len(marker)
        seen, self.shown = self.shown[:end], self.shown[end:]
        return seen

    def send(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def close(self, timeout: float = 20.0) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            os.close(self.master)
