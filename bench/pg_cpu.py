"""Where a proxied pgbench transaction's CPU goes, process by process: what bounds the proxy's TPS.

    .venv/bin/python bench/pg_cpu.py [--seconds 10] [--mode select-only|tpcb-like] [--profile] [--proxy-tree DIR]
                                     [--relay-cpus 0]

Runs pgbench (8 clients) directly, through bench/pg_proxy.py's bare asyncio relay (the floor of a Python
proxy) and through `custody proxy` (recording on, dev broker), and reads each process's CPU time (user +
system, all threads) from /proc before and after: PostgreSQL's backends, pgbench, the relay process, the
proxy's recorder child, the broker. Divided by the transactions processed, that is CPU µs per transaction
per component, and the sum is what one transaction costs the machine: on C cores the TPS cannot exceed
C / sum. The direct and bare-relay runs are the same-run baselines. `--profile` also samples the relay and
the recorder with py-spy while they hold the GIL (their Python CPU, not their waits) during the proxied
run and prints the functions and files with the most samples, so a missed throughput goal is read off a
profile, not guessed.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pg_proxy import ROOT, USER, free_port, start_proxy, stop, wait_port  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
MODES = {"select-only": ["-S"], "tpcb-like": []}
RUN_ALL_ARGS = ["--seconds", "8", "--profile"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads; 0 for one that is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def pids_named(name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def recorder_of(pid: int) -> list[int]:
    """The proxy's recorder: its multiprocessing child (spawned), not the resource tracker beside it."""
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()]


class Meter:
    """CPU seconds of long-lived processes (the proxy's relay and recorder, the broker) over one run."""

    def __init__(self, components: dict[str, list[int]]):
        self.components = components
        self.start = {name: sum(cpu_seconds(p) for p in pids) for name, pids in components.items()}

    def stop(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(p) for p in pids) - self.start[name] for name, pids in self.components.items()}


def run_pgbench(port: int, mode: str, seconds: int, user: str, token: str | None) -> tuple[int, float]:
    """(transactions processed, CPU seconds pgbench used: this process's reaped children's times)."""
    env = {**os.environ, "PGSSLMODE": "disable", **({"PGPASSWORD": token} if token else {})}
    command = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-c", "8", "-j", "2", "-T", str(seconds),
               "-n", *MODES[mode], "postgres"]
    before = os.times()
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    after = os.times()
    match = re.search(r"actually processed: (\d+)", out.stdout)
    if not match:
        raise RuntimeError(f"pgbench failed: {out.stderr or out.stdout}")
    return int(match.group(1)), (after.children_user - before.children_user) + (after.children_system - before.children_system)


def postgres_cpu() -> float:
    """CPU of PostgreSQL: every postgres process alive, plus what the postmaster's exited children (the
    backends of finished sessions, reaped by it) used, which the kernel adds to its cutime/cstime."""
    total = 0.0
    for pid in pids_named("postgres"):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a backend that exited since it was listed: the postmaster counts it
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
        try:
            parent = Path(f"/proc/{fields[1]}/comm").read_text().strip()
        except FileNotFoundError:
            parent = None
        if parent != "postgres":
            total += (int(fields[13]) + int(fields[14])) / TICK  # the postmaster: its reaped backends
    return total


def measure(port: int, mode: str, seconds: int, user: str, token: str | None,
            processes: dict[str, list[int]]) -> tuple[int, dict[str, float]]:
    """Transactions and CPU seconds by component over one pgbench run."""
    meter = Meter(processes)
    pg_before = postgres_cpu()
    transactions, pgbench_cpu = run_pgbench(port, mode, seconds, user, token)
    time.sleep(0.3)  # the backends' exit, reaped by the postmaster
    used = meter.stop()
    used["postgres"] = postgres_cpu() - pg_before
    used["pgbench"] = pgbench_cpu
    return transactions, used


def py_spy() -> str:
    """py-spy (PyPI), installed into this venv on first use: a bench tool, not a dependency of the product."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return spy


def profile(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    spy = py_spy()
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                             "--format", "raw", "--output", str(out), "--nonblocking", "--gil"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def top_frames(path: Path, count: int = 12) -> list[str]:
    """Leaf frames (self time) and files with the most samples, from py-spy's collapsed stacks."""
    leaves: collections.Counter[str] = collections.Counter()
    modules: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        samples = int(n)
        total += samples
        leaf = frames[-1]
        leaves[re.sub(r":\d+\)", ")", leaf)] += samples
        match = re.search(r"\(([^:)]+)", leaf)
        modules[match.group(1) if match else leaf] += samples
    lines = [f"    {100 * n / total:5.1f}%  {frame}" for frame, n in leaves.most_common(count)]
    lines.append("    by file (self):")
    lines += [f"    {100 * n / total:5.1f}%  {module}" for module, n in modules.most_common(8)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--mode", choices=sorted(MODES), default="select-only")
    parser.add_argument("--profile", action="store_true", help="py-spy the relay and the recorder meanwhile")
    parser.add_argument("--relay-cpus", default=None,
                        help="the proxy's [cpus] relay (e.g. 0: its recorder then runs on the other CPUs)")
    parser.add_argument("--proxy-tree", type=Path, default=ROOT,
                        help="run `custody proxy` from this checkout (a worktree of an earlier commit: before/after)")
    args = parser.parse_args()

    from ingest.broker import DevBroker

    work = Path(tempfile.mkdtemp(prefix="custody-bench-cpu-"))
    subprocess.run(["pgbench", "-i", "-s", "10", "-q", "-h", "127.0.0.1", "-U", "postgres", "postgres"],
                   capture_output=True, check=True)
    direct_tx, direct = measure(5432, args.mode, args.seconds, "postgres", None, {})
    relay_port = free_port()
    bare = subprocess.Popen([sys.executable, str(Path(__file__).parent / "pg_proxy.py"), "--relay", str(relay_port)])
    try:
        wait_port(relay_port)
        bare_tx, bare_used = measure(relay_port, args.mode, args.seconds, "postgres", None, {"relay": [bare.pid]})
    finally:
        bare.terminate()
    with DevBroker(log_path=work / "broker.log") as broker:
        proxy, port, token = start_proxy(work, broker.bootstrap, 10_000, args.proxy_tree, args.relay_cpus)
        try:
            recorder = recorder_of(proxy.pid)
            brokers = [broker._process.pid] if getattr(broker, "_process", None) else []
            spies: list = []
            if args.profile:
                spies = [(name, pid, work / f"{name}.txt", profile(pid, args.seconds - 1, work / f"{name}.txt"))
                         for name, pid in (("relay", proxy.pid), *(("recorder", p) for p in recorder))]
            proxied_tx, proxied = measure(port, args.mode, args.seconds, USER, token,
                                          {"relay": [proxy.pid], "recorder": recorder, "broker": brokers})
            for *_, spy in spies:
                spy.wait(timeout=60)
        finally:
            stop(proxy)

    print(f"\npgbench {args.mode}, 8 clients, {args.seconds} s: CPU µs per transaction, by process")
    names = ["postgres", "pgbench", "relay", "recorder", "broker"]
    print(f"  {'':14}{'TPS':>10}" + "".join(f"{n:>10}" for n in names) + f"{'sum':>10}{'TPS ceiling':>13}")
    cores = os.cpu_count() or 1
    for label, tx, used in (("direct", direct_tx, direct), ("bare relay", bare_tx, bare_used),
                            ("custody", proxied_tx, proxied)):
        per = {n: 1e6 * used.get(n, 0.0) / tx for n in names}
        total = sum(per.values())
        print(f"  {label:14}{tx / args.seconds:>10,.0f}" + "".join(f"{per[n]:>10.1f}" for n in names)
              + f"{total:>10.1f}{cores * 1e6 / total:>13,.0f}")
    print(f"  (the ceiling: {cores} cores / the CPU one transaction costs the machine)")
    for name, pid, path, _ in spies:
        if path.exists() and path.stat().st_size:
            print(f"\npy-spy, {name} (pid {pid}), self time:")
            print("\n".join(top_frames(path)))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
