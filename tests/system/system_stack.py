"""The whole stack for the system tests: `custody up` (dev broker, ledger, witness, proxies for PostgreSQL, MySQL,
HTTP, SSH and Kubernetes) from one `custody init` directory, plus a second `custody ledger` worker in the same
consumer group, and the targets (the machine's PostgreSQL and MariaDB, Debian's nginx, an OpenSSH sshd, and the
Kubernetes API test stand-in of tests/kube_server.py, since no API server can be installed here).

kubectl reaches the Kubernetes proxy as a user would: a kubeconfig from `custody kubeconfig --proxy sys-kube`, whose
exec credential plugin (`custody token`) prints the token `custody login` cached; `login()` writes that cache.

Processes are found by walking /proc from `custody up`'s pid, so faults hit exactly the process they name (the
Tansu broker, the ledger, a proxy, its recorder), never anything by a broad name.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CUSTODY = [sys.executable, "-m", "custody"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def wait_for(predicate, timeout: float, step: float = 0.2) -> bool:
    """Whether `predicate()` came true within `timeout` seconds, looked at every `step`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def children_of(pid: int) -> list[int]:
    found = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below `pid`."""
    out, todo = [], children_of(pid)
    while todo:
        child = todo.pop()
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue
        out.append((child, cmdline))
        todo += children_of(child)
    return out


def custody(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CUSTODY, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@dataclass
class Ports:
    broker: int = field(default_factory=free_port)
    postgres: int = field(default_factory=free_port)
    mysql: int = field(default_factory=free_port)
    http: int = field(default_factory=free_port)
    ssh: int = field(default_factory=free_port)
    kube: int = field(default_factory=free_port)


class SystemStack:
    """`custody up` plus extra ledger workers, for one `custody init` directory."""

    def __init__(self, directory: Path, mysql_target, nginx, sshd, kube, tls: dict, spool_max_bytes: int = 1 << 30):
        from custody.init import initialise

        self.directory = directory
        self.ports = Ports()
        self.config_path = initialise(directory / "custody", proxy_port=self.ports.postgres,
                                      broker_port=self.ports.broker)
        (self.config_path.parent / "cluster.token").write_text(kube.token + "\n")
        text = self.config_path.read_text()
        text = text.replace("segment_max_seconds = 5", "segment_max_seconds = 1")
        text = text.replace("idle_seal_seconds = 60", "idle_seal_seconds = 2")
        text = text.replace("max_bytes = 1073741824", f"max_bytes = {spool_max_bytes}")
        text += f"""
[[proxy]]
name = "sys-mysql"
protocol = "mysql"
listen = "127.0.0.1:{self.ports.mysql}"
upstream = "mysql://{mysql_target.user}@127.0.0.1:3306/{mysql_target.database}"
upstream_password_env = "{mysql_target.env}"
policy = "policies/default.toml"

[[proxy]]
name = "sys-web"
protocol = "http"
listen = "127.0.0.1:{self.ports.http}"
upstream = "{nginx.url}"
policy = "policies/default.toml"

[[proxy]]
name = "sys-ssh"
protocol = "ssh"
listen = "127.0.0.1:{self.ports.ssh}"
upstream = "ssh://root@127.0.0.1:{sshd.port}"
upstream_key_file = "{sshd.client_key}"
upstream_host_key = "{sshd.host_key_pub}"
host_key_file = "keys/ssh_host_ed25519"
policy = "policies/default.toml"

[[proxy]]
name = "sys-kube"
protocol = "kubernetes"
listen = "127.0.0.1:{self.ports.kube}"
upstream = "{kube.url}"
upstream_bearer_file = "cluster.token"
tls_cert = "{tls['server_cert']}"
tls_key = "{tls['server_key']}"
policy = "policies/default.toml"

[login]
client_id = "custody-system-test"
"""
        self.config_path.write_text(text)
        from custody.config import load_config

        self.config = load_config(self.config_path)
        self.ledger_dir = Path(self.config.ledger.dir)
        self.up: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.incarnations: dict[str, int] = {}
        self.logs = directory / "logs"
        self.logs.mkdir(exist_ok=True)

    # --- identity ---------------------------------------------------------------------------------------------
    def token(self, subject: str, groups: tuple[str, ...] = ("dba",)) -> str:
        from proxy.devidp import issue_token

        identity = self.config.identity
        return issue_token(identity.dev_signing_key, identity.issuer, identity.audience, subject, list(groups),
                           email=subject)

    def login(self, subject: str, groups: tuple[str, ...], cache: Path) -> str:
        """What `custody login` leaves behind, without its device flow (tests/test_kubeconfig.py drives that): a
        token of `subject` in the token cache at `cache` (CUSTODY_TOKEN_CACHE). Returns the token's id (jti), which
        the proxy records in every session of it: a kubectl run opens more than one connection."""
        from proxy.login import TokenCache, TokenSet

        token = self.token(subject, groups)
        TokenCache(cache).put(self.config.login.cache_key, TokenSet(token, time.time() + 3600))
        payload = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]

    def kubeconfig(self) -> Path:
        """`custody kubeconfig --proxy sys-kube`: the file plain kubectl is given (no token in it)."""
        path = self.directory / "kubeconfig"
        result = custody("kubeconfig", "--proxy", "sys-kube", "--namespace", "default", "-o", str(path),
                         "--config", str(self.config_path))
        if result.returncode != 0:
            raise RuntimeError(f"custody kubeconfig failed: {result.stderr}")
        return path

    @property
    def ssh_host_key(self) -> str:
        return (self.config_path.parent / "keys" / "ssh_host_ed25519.pub").read_text().strip()

    # --- processes --------------------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "SystemStack":
        self.up = subprocess.Popen([*CUSTODY, "--debug", "up", "--config", str(self.config_path)], cwd=ROOT,
                                   stdout=open(self.logs / "up.log", "ab"), stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        ports = (self.ports.postgres, self.ports.mysql, self.ports.http, self.ports.ssh, self.ports.kube)
        while not all(port_open(p) for p in ports):
            if self.up.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"custody up did not start: {self.tail('up.log')}")
            time.sleep(0.2)
        return self

    def start_worker(self, instance: str) -> subprocess.Popen:
        """Another `custody ledger` in the default consumer group, a static member named `instance`."""
        self.incarnations[instance] = self.incarnations.get(instance, 0) + 1
        log = self.worker_log(instance)
        worker = subprocess.Popen([*CUSTODY, "--debug", "ledger", "--instance", instance, "--config",
                                   str(self.config_path)], cwd=ROOT, stdin=subprocess.DEVNULL,
                                  stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        self.workers[instance] = worker
        return worker

    def worker_log(self, instance: str) -> Path:
        return self.logs / f"ledger-{instance}-{self.incarnations[instance]}.log"

    def owned(self, instance: str) -> set[int]:
        """The partitions the current incarnation of `instance` resumed (took over) so far."""
        return _resumed(self.worker_log(instance).read_text(errors="replace"))

    def up_log_size(self) -> int:
        return (self.logs / "up.log").stat().st_size

    def resumed_by_up(self, since: int) -> set[int]:
        """The partitions `custody up`'s own ledger resumed after byte `since` of its log (`up_log_size`)."""
        with open(self.logs / "up.log", "rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
        return _resumed("\n".join(line for line in text.splitlines() if line.startswith("ledger |")))

    def process(self, needle: str) -> int:
        """The one process below `custody up` whose command line contains `needle`."""
        found = [pid for pid, cmdline in descendants(self.up.pid) if needle in cmdline]
        if len(found) != 1:
            raise RuntimeError(f"{len(found)} processes match {needle!r}: {descendants(self.up.pid)}")
        return found[0]

    def broker_pid(self) -> int:
        """The Tansu process itself (below `custody broker`)."""
        found = [pid for pid, cmdline in descendants(self.up.pid) if "tansu" in cmdline.lower()
                 and " custody " not in cmdline]
        if len(found) != 1:
            raise RuntimeError(f"no single Tansu process: {descendants(self.up.pid)}")
        return found[0]

    def kill_worker(self, instance: str) -> None:
        worker = self.workers.pop(instance)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)

    def stop(self) -> tuple[int | None, dict[str, int | None]]:
        """SIGTERM to `custody up` (proxies, then ledger, then broker) after the extra workers; their exit codes."""
        codes = {}
        for name, worker in list(self.workers.items()):
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
            try:
                codes[name] = worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                codes[name] = worker.wait()
        self.workers.clear()
        code = None
        if self.up is not None:
            if self.up.poll() is None:
                self.up.send_signal(signal.SIGTERM)
            try:
                code = self.up.wait(90)
            except subprocess.TimeoutExpired:
                for pid, _ in descendants(self.up.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.up.kill()
                code = self.up.wait()
        return code, codes

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / name
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    # --- the sealed ledger ------------------------------------------------------------------------------------
    def sql(self, statement: str) -> list[dict]:
        result = custody("sql", "--config", str(self.config_path), "--format", "json", statement)
        if result.returncode != 0:
            raise RuntimeError(f"custody sql failed: {result.stderr}")
        return json.loads(result.stdout or "[]")

    def sealed_query(self, statement: str) -> list[tuple]:
        """In-process (for polling): the same views `custody sql` reads."""
        from query.views import open_ledger

        if not (self.ledger_dir / "seals").is_dir():
            return []
        con = open_ledger(self.ledger_dir)
        try:
            return con.sql(statement).fetchall()
        finally:
            con.close()

    def unwitnessed(self) -> list[int]:
        """Partitions whose newest seal the witness has not cosigned yet (as far as this ledger directory holds)."""
        from query.bundle import _cosignature_lines, load_seals  # what a bundle carries as the newest's cosignatures

        return [partition for partition, chain in sorted(load_seals(self.ledger_dir).items())
                if not _cosignature_lines(self.ledger_dir, chain)]

    def wait_sealed(self, predicate, timeout: float = 120) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(1)
        return predicate()


def _resumed(log: str) -> set[int]:
    """The partitions a ledger's log says it resumed (took over)."""
    return {int(line.split("partition ")[1].split(":")[0]) for line in log.splitlines()
            if "ledger.service: partition" in line and "resuming" in line}
