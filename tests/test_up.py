"""`custody up` as a user runs it: its children die with it, however it dies, and its stop is bounded."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from custody.init import initialise
from custody.up import STOP_BOUNDS, stop_bound
from ingest.broker import free_port
from ingest.recorder import ORPHAN_BOUND

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def descendants(root: int) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            parents[int(entry)] = stat[1]
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie holds no port and runs nothing


def listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.2):
            return True
    except OSError:
        return False


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def start_up(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "custody", "up", "--config", str(config)],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def wait_listening(process: subprocess.Popen, addresses: list[str], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(listening(a) for a in addresses):
        assert process.poll() is None, f"custody up exited with {process.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"custody up did not listen on {addresses}:\n{log.read_text()}"
        time.sleep(0.2)


def test_children_die_with_a_killed_supervisor_and_the_next_up_starts(tmp_path):
    proxy_port, broker_port = free_port(), free_port()
    config = initialise(tmp_path / "deployment", proxy_port=proxy_port, broker_port=broker_port)
    addresses = [f"127.0.0.1:{proxy_port}", f"127.0.0.1:{broker_port}"]
    log = tmp_path / "up.log"
    first = start_up(config, log)
    children: set[int] = set()
    try:
        wait_listening(first, addresses, log)
        children = descendants(first.pid)
        names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                 for pid in children}
        # broker, ledger, proxy, the proxy's recorder process and Tansu
        assert len(children) >= 5, names.values()
        first.send_signal(signal.SIGKILL)
        first.wait()
        # The bound each child keeps once orphaned, the longest being a proxy's recorder: it outlives its proxy
        # (STOP_BOUNDS) by ORPHAN_BOUND to spool what it holds, and its own watchdog ends it 5 s after that.
        # Usually all are gone within a second or two; one CI run on a loaded machine needed more than 15 s.
        bound = max(STOP_BOUNDS.values()) + ORPHAN_BOUND + 5
        deadline = time.monotonic() + bound
        while (left := {pid for pid in children if alive(pid)}) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, (f"still running {bound:.0f} s after the supervisor was killed: "
                          f"{[names[p] for p in left]}\n{log.read_text()}")
    finally:
        kill_all({first.pid, *children, *descendants(first.pid)})

    second = start_up(config, log)
    try:
        wait_listening(second, addresses, log)  # the ports are free again: "in use" would have exited at once
        started = time.monotonic()
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=stop_bound() + 5)
        assert time.monotonic() - started <= stop_bound()
        assert "is in use" not in log.read_text()
    finally:
        kill_all({second.pid, *descendants(second.pid)})
        second.wait()
