"""`[cpus]`: `custody proxy` on the CPUs it is given, its recorder (every thread of it) on others."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ingest.settings import ConfigError, Table
from proxy.settings import CpuSettings, parse_cpu_list
from pg_fixtures import write_config


def test_cpu_lists_read_as_taskset_writes_them() -> None:
    assert parse_cpu_list("0") == {0}
    assert parse_cpu_list("1-3") == {1, 2, 3}
    assert parse_cpu_list("0, 2-3,7") == {0, 2, 3, 7}
    for bad, why in (("a", "'a' is not a CPU number"), ("3-1", "runs backwards"), ("", "'' is not"), ("1-", "'1-'")):
        with pytest.raises(ValueError, match=why):
            parse_cpu_list(bad)


def cpus(**raw: str) -> CpuSettings:
    return CpuSettings.from_table(Table(Path("/etc/custody.toml"), "cpus", raw))


def test_a_bad_list_is_one_line_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^/etc/custody.toml: \[cpus\] recorder: '1-x' is not a CPU"):
        cpus(recorder="1-x")


def test_the_recorder_gets_the_cpus_the_relay_is_not_given() -> None:
    assert cpus().placement(frozenset({0, 1})) == (None, None)
    assert cpus(relay="0").placement(frozenset({0, 1, 2, 3})) == ({0}, {1, 2, 3})
    assert cpus(relay="0", recorder="3").placement(frozenset({0, 1, 2, 3})) == ({0}, {3})
    assert cpus(relay="0-1").placement(frozenset({0, 1})) == ({0, 1}, None)  # nothing left: it shares the relay's
    assert cpus(recorder="1").placement(frozenset({0, 1})) == (None, {1})


def test_a_cpu_the_process_may_not_use_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"\[cpus\] relay: CPU 9 not available to this process \(it may run on 0, 1\)"):
        cpus(relay="0,9").placement(frozenset({0, 1}))


def allowed(pid: int) -> dict[str, str]:
    """Each thread of `pid` (by name) and the CPUs the kernel lets it run on."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line)
        threads[f"{status['Name'].strip()} {task.name}"] = status["Cpus_allowed_list"].strip()
    return threads


def recorder_of(pid: int) -> int:
    """The proxy's recorder: its multiprocessing child (spawned), not the resource tracker beside it."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    [child] = [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    return child


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to place the processes apart")
def test_custody_proxy_runs_where_cpus_says_and_its_recorder_elsewhere(tmp_path: Path, broker) -> None:
    first = min(os.sched_getaffinity(0))
    rest = sorted(os.sched_getaffinity(0) - {first})
    config = write_config(tmp_path, broker.bootstrap, f"t{uuid.uuid4().hex[:10]}.", proxy_keys=f'\n[cpus]\nrelay = "{first}"\n')
    proxy = subprocess.Popen([sys.executable, "-m", "custody", "proxy", "--config", str(config)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proxy.stdout is not None
        line = proxy.stdout.readline()
        assert line.startswith("proxy "), line  # listening: the recorder is up and has its threads
        relay, recorder = allowed(proxy.pid), allowed(recorder_of(proxy.pid))
        assert len(relay) > 1 and len(recorder) > 1  # the loop and its helpers; the recorder, producer, drainer
        assert set(relay.values()) == {str(first)}, relay
        expected = str(rest[0]) if len(rest) == 1 else f"{rest[0]}-{rest[-1]}"
        assert set(recorder.values()) == {expected}, recorder
    finally:
        proxy.terminate()
        proxy.communicate(timeout=30)


def test_custody_proxy_refuses_a_cpu_it_may_not_use_in_one_line(tmp_path: Path, broker) -> None:
    missing = max(os.sched_getaffinity(0)) + 1
    config = write_config(tmp_path, broker.bootstrap, "t.", proxy_keys=f'\n[cpus]\nrecorder = "{missing}"\n')
    done = subprocess.run([sys.executable, "-m", "custody", "proxy", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"[cpus] recorder: CPU {missing} not available to this process" in done.stderr
    assert "Traceback" not in done.stderr
