"""PostgreSQL proxy benchmark: every figure beside its same-run baselines.

    .venv/bin/python bench/pg_proxy.py [--queries 5000] [--seconds 10] [--rows 1000000]

Measures, against the machine's PostgreSQL (127.0.0.1:5432, trust):
  * `SELECT 1` round-trip latency p50/p99: direct, through a bare asyncio byte
    relay (the floor for a Python proxy), through pgbouncer (session pooling)
    and through `custody proxy` with recording on (dev broker, spool, signing);
  * pgbench TPS, select-only and tpcb-like, 8 clients: direct, pgbouncer, proxy
    (transactions processed over the whole run, and the clients that aborted);
  * the same `SELECT 1` and pgbench through a second `custody proxy` whose relay
    and recorder run on CPUs of their own (`[cpus] relay` = the first CPU, the
    recorder the others), where the machine has two or more;
  * rows/s for one large result: direct vs proxy;
  * resident memory per idle proxied session;
  * the recorder's deepest queue (the window a proxy crash could lose).
`--proxy-tree DIR` runs the proxy from another checkout (a `git worktree` of
an older commit) for before/after comparisons, everything else unchanged.
pgbouncer is the Debian package; if it is missing the bench tries
`apt-get install -y pgbouncer` and otherwise skips its columns.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DIRECT = ("127.0.0.1", 5432)
USER = "alice@example.com"


# --- the bare relay: the floor a Python proxy can reach ------------------------------


def run_relay(port: int, target: tuple[str, int] = DIRECT) -> None:
    """Moves bytes both ways with BufferedProtocol and one preallocated buffer; nothing else."""
    shared = memoryview(bytearray(256 * 1024))

    class Side(asyncio.BufferedProtocol):
        def __init__(self, peer=None):
            self.buffer = shared
            self.peer, self.transport, self.pending = peer, None, []

        def connection_made(self, transport):
            self.transport = transport
            for data in self.pending:
                transport.write(data)

        def get_buffer(self, hint):
            return self.buffer

        def buffer_updated(self, n):
            data = self.buffer[:n].tobytes()
            if self.peer.transport is None:
                self.peer.pending.append(data)
            else:
                self.peer.transport.write(data)

        def connection_lost(self, exc):
            if self.peer.transport is not None:
                self.peer.transport.close()

    class Client(Side):
        def connection_made(self, transport):
            super().connection_made(transport)
            self.peer = Side(self)
            loop = asyncio.get_running_loop()
            loop.create_task(loop.create_connection(lambda: self.peer, *target))

    async def main():
        server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(main())


# --- helpers ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def dsn(port: int, user: str = "postgres", password: str | None = None) -> str:
    text = f"host=127.0.0.1 port={port} user={user} dbname=postgres sslmode=disable"
    return text + (f" password={password}" if password else "")


def latency(conninfo: str, queries: int) -> tuple[float, float]:
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as conn:
        cursor = conn.cursor()
        for _ in range(500):
            cursor.execute("SELECT 1", prepare=False)
        samples = []
        for _ in range(queries):
            start = time.perf_counter_ns()
            cursor.execute("SELECT 1", prepare=False)
            cursor.fetchone()
            samples.append(time.perf_counter_ns() - start)
    samples.sort()
    return samples[len(samples) // 2] / 1000, samples[int(len(samples) * 0.99)] / 1000


def pgbench(port: int, mode: list[str], seconds: int, user: str = "postgres",
            password: str | None = None) -> tuple[float, int]:
    """(transactions per second over the whole run, clients aborted).

    pgbench's own `tps` divides by the time its threads ran: when a proxy ends
    sessions, the clients abort early and that figure rises. Counting the
    processed transactions over the requested duration keeps a proxy that
    kills sessions from looking faster than one that does not.
    """
    env = {**os.environ, "PGSSLMODE": "disable"}
    if password:
        env["PGPASSWORD"] = password
    out = subprocess.run(["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-c", "8", "-j", "2",
                          "-T", str(seconds), "-n", *mode, "postgres"], env=env, capture_output=True, text=True)
    match = re.search(r"actually processed: (\d+)", out.stdout)
    if not match:
        raise RuntimeError(f"pgbench failed: {out.stderr or out.stdout}")
    aborted = len(re.findall(r"client \d+ (?:script \d+ )?aborted", out.stderr))
    return int(match.group(1)) / seconds, aborted


def rows_per_second(conninfo: str, rows: int) -> float:
    import psycopg

    with psycopg.connect(conninfo) as conn:
        start = time.perf_counter()
        got = conn.execute(f"SELECT g FROM generate_series(1, {rows}) g").fetchall()
        elapsed = time.perf_counter() - start
    assert len(got) == rows
    return rows / elapsed


# --- the contenders -------------------------------------------------------------------


def start_pgbouncer(work: Path) -> tuple[subprocess.Popen | None, int | None]:
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        print("pgbouncer missing: trying apt-get install -y pgbouncer", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "pgbouncer"], capture_output=True)
        if not Path(binary).exists():
            print("pgbouncer unavailable: its columns are skipped (install the Debian package pgbouncer)", file=sys.stderr)
            return None, None
    port = free_port()
    directory = work / "pgbouncer"
    directory.mkdir()
    (directory / "users.txt").write_text('"postgres" ""\n')
    (directory / "pgbouncer.ini").write_text(f"""[databases]
postgres = host=127.0.0.1 port=5432 dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
auth_type = trust
auth_file = {directory}/users.txt
pool_mode = session
max_client_conn = 500
default_pool_size = 50
unix_socket_dir =
logfile = {directory}/pgbouncer.log
""")
    os.chmod(work, 0o755)
    shutil.chown(directory, "postgres") if os.geteuid() == 0 else None
    for file in directory.iterdir():
        shutil.chown(file, "postgres") if os.geteuid() == 0 else None
    command = [binary, str(directory / "pgbouncer.ini")] + (["-u", "postgres"] if os.geteuid() == 0 else [])
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return process, port


def start_proxy(work: Path, bootstrap: str, max_queue: int,
                tree: Path = ROOT, relay_cpus: str | None = None) -> tuple[subprocess.Popen, int, str]:
    """`custody proxy` from `tree` (this checkout, or another one for a before/after comparison); with
    `relay_cpus`, its `[cpus] relay` (the recorder then runs on the other CPUs)."""
    from custody.config import load_config
    from custody.init import initialise
    from proxy.devidp import issue_token

    port = free_port()
    config = initialise(work / ("custody" if relay_cpus is None else "custody-cpus"), proxy_port=port)
    text = config.read_text().replace('bootstrap = "embedded"', f'bootstrap = "{bootstrap}"')
    config.write_text(text + (f'\n[cpus]\nrelay = "{relay_cpus}"\n' if relay_cpus is not None else ""))
    identity = load_config(config).identity
    token = issue_token(identity.dev_signing_key, identity.issuer, identity.audience, USER, ["dba"])
    custody = [sys.executable, "-m", "custody"]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    process = subprocess.Popen([*custody, "proxy", "--config", str(config), "--max-queue", str(max_queue)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tree, env=env)
    wait_port(port)
    return process, port, token


def stop(process: subprocess.Popen | None) -> str:
    if process is None:
        return ""
    process.send_signal(signal.SIGTERM)
    try:
        out, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return out or ""


PINNED = "custody, [cpus] apart"
"""The proxy whose relay runs on the first CPU and its recorder on the others."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=5000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--idle-sessions", type=int, default=50)
    parser.add_argument("--max-queue", type=int, default=10_000)
    parser.add_argument("--proxy-tree", type=Path, default=ROOT,
                        help="run `custody proxy` from this checkout (e.g. a git worktree of an older commit)")
    parser.add_argument("--relay", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--relay-target", type=int, default=DIRECT[1], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay:
        return run_relay(args.relay, (DIRECT[0], args.relay_target))

    from ingest.broker import DevBroker

    work = Path(tempfile.mkdtemp(prefix="custody-bench-"))
    subprocess.run(["pgbench", "-i", "-s", "10", "-q", "-h", "127.0.0.1", "-U", "postgres", "postgres"],
                   capture_output=True, check=True)
    relay_port = free_port()
    relay = subprocess.Popen([sys.executable, __file__, "--relay", str(relay_port)])
    wait_port(relay_port)
    bouncer, bouncer_port = start_pgbouncer(work)
    with DevBroker(log_path=work / "broker.log") as broker:
        proxy, proxy_port, token = start_proxy(work, broker.bootstrap, args.max_queue, args.proxy_tree)
        proxied = dsn(proxy_port, USER, token)
        cpus = sorted(os.sched_getaffinity(0))
        pinned = start_proxy(work, broker.bootstrap, args.max_queue, args.proxy_tree, str(cpus[0])) \
            if len(cpus) >= 2 else None
        try:
            lat = {"direct": latency(dsn(5432), args.queries), "bare relay": latency(dsn(relay_port), args.queries)}
            if bouncer_port:
                lat["pgbouncer"] = latency(dsn(bouncer_port), args.queries)
            lat["custody proxy"] = latency(proxied, args.queries)
            if pinned:
                lat[PINNED] = latency(dsn(pinned[1], USER, pinned[2]), args.queries)

            tps: dict[str, dict[str, tuple[float, int]]] = {}
            for mode, flags in (("select-only", ["-S"]), ("tpcb-like", [])):
                tps[mode] = {"direct": pgbench(5432, flags, args.seconds)}
                if bouncer_port:
                    tps[mode]["pgbouncer"] = pgbench(bouncer_port, flags, args.seconds)
                tps[mode]["custody proxy"] = pgbench(proxy_port, flags, args.seconds, USER, token)
                if pinned:
                    tps[mode][PINNED] = pgbench(pinned[1], flags, args.seconds, USER, *pinned[2:])

            rows = {"direct": rows_per_second(dsn(5432), args.rows),
                    "custody proxy": rows_per_second(proxied, args.rows)}

            import psycopg
            before = rss_kib(proxy.pid)
            idle = [psycopg.connect(proxied) for _ in range(args.idle_sessions)]
            time.sleep(1)
            per_session = (rss_kib(proxy.pid) - before) / args.idle_sessions
            for conn in idle:
                conn.close()
        finally:
            proxy_out = stop(proxy)
            stop(pinned[0] if pinned else None)
            stop(bouncer)
            relay.terminate()

    direct_p50 = lat["direct"][0]
    print("\nSELECT 1 round trip (µs)        p50      p99   added p50")
    for name, (p50, p99) in lat.items():
        print(f"  {name:26} {p50:8.1f} {p99:8.1f} {p50 - direct_p50:9.1f}")
    relay_added = lat["bare relay"][0] - direct_p50
    relay_p99 = lat["bare relay"][1]
    for name in ("custody proxy", PINNED):
        if name in lat:
            added, p99 = lat[name][0] - direct_p50, lat[name][1]
            print(f"  {name}: added / relay added = {added / relay_added:.2f}x, p99 / relay p99 = "
                  f"{p99 / relay_p99:.2f}x (goals <= 1.5x)")
    for mode, figures in tps.items():
        print(f"\npgbench {mode}, 8 clients, {args.seconds} s        TPS  clients aborted")
        for name, (value, aborted) in figures.items():
            print(f"  {name:26} {value:10.0f} {aborted:6}")
        if "pgbouncer" in figures:
            goal = {"select-only": 0.5, "tpcb-like": 0.8}[mode]
            for name in ("custody proxy", PINNED):
                if name in figures:
                    print(f"  {name} / pgbouncer = {figures[name][0] / figures['pgbouncer'][0]:.2f}x (goal >= {goal}x)")
    print(f"\n{args.rows:,}-row result (rows/s)")
    for name, value in rows.items():
        print(f"  {name:26} {value:12,.0f}")
    print(f"  proxy / direct = {rows['custody proxy'] / rows['direct']:.2f}x (goal >= 0.6x)")
    print(f"\nresident memory per idle proxied session: {per_session:.1f} KiB ({args.idle_sessions} sessions)")
    print(proxy_out.strip().splitlines()[-1] if proxy_out.strip() else "(no recorder stats)")


if __name__ == "__main__":
    main()
