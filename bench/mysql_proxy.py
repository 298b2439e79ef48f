"""MySQL proxy figures, each beside its same-run baselines: direct MariaDB, a bare relay, `custody proxy`.

    .venv/bin/python bench/mysql_proxy.py [--queries 3000] [--slap-queries 16000] [--rows 1000000]

Against the machine's MariaDB (127.0.0.1:3306, root, no password):
  * `SELECT 1` latency p50/p99 over one PyMySQL connection: direct, through a
    bare asyncio byte relay (bench/pg_proxy.py's `run_relay`, the floor for a
    Python proxy) and through the proxy with recording on (dev broker, spool,
    signing) and the default policy;
  * mysqlslap (MariaDB's, `SELECT 1`, 8 clients) queries/s: direct, relay,
    proxy (skipped when mysqlslap is not installed);
  * one large result's rows/s (`--rows` rows of MariaDB's sequence engine,
    read by PyMySQL): direct vs proxy.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pg_proxy import free_port, run_relay, stop, wait_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
USER = "bench@example.com"
MARIADB = ("127.0.0.1", 3306)
RUN_ALL_ARGS = ["--queries", "1000", "--slap-queries", "8000", "--rows", "100000"]  # bench/run_all.py's short form
SLAP_SCHEMA = "custody_bench_slap"  # mysqlslap's --create-schema: its own, so that nothing of the machine's is touched


def connect(port: int, user: str = "root", password: str = ""):
    import pymysql

    return pymysql.connect(host="127.0.0.1", port=port, user=user, password=password, database="mysql",
                           autocommit=True)


def latency(port: int, queries: int, **login) -> tuple[float, float]:
    with connect(port, **login) as conn, conn.cursor() as cur:
        for _ in range(200):
            cur.execute("SELECT 1")
            cur.fetchall()
        times = []
        for _ in range(queries):
            start = time.perf_counter_ns()
            cur.execute("SELECT 1")
            cur.fetchall()
            times.append((time.perf_counter_ns() - start) / 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def rows_per_second(port: int, rows: int, **login) -> float:
    with connect(port, **login) as conn, conn.cursor() as cur:
        start = time.perf_counter()
        cur.execute(f"SELECT seq, concat('row ', seq) FROM mysql.seq_1_to_{rows}")
        got = len(cur.fetchall())
        elapsed = time.perf_counter() - start
    assert got == rows, got
    return rows / elapsed


def mysqlslap(port: int, queries: int, user: str = "root", password: str = "", clients: int = 8) -> float | None:
    """mysqlslap's `SELECT 1` from `clients` connections: queries per second (None: not installed)."""
    binary = shutil.which("mariadb-slap") or shutil.which("mysqlslap")
    if binary is None:
        return None
    result = subprocess.run([binary, "-h", "127.0.0.1", "-P", str(port), "-u", user, f"--create-schema={SLAP_SCHEMA}",
                             "--no-drop", "--query=SELECT 1", f"--concurrency={clients}",
                             f"--number-of-queries={queries}", "--iterations=1"],
                            env={**os.environ, "MYSQL_PWD": password}, capture_output=True, text=True, timeout=600)
    found = re.search(r"Average number of seconds to run all queries: ([\d.]+)", result.stdout)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"mysqlslap on port {port} failed: {(result.stderr or result.stdout).strip()[:300]}")
    return queries / max(float(found.group(1)), 0.001)


def start_proxy(work: Path, bootstrap: str):
    from custody.config import load_config
    from custody.init import initialise
    from proxy.devidp import issue_token

    port = free_port()
    config = initialise(work / "custody", proxy_port=free_port())
    text = config.read_text().replace('bootstrap = "embedded"', f'bootstrap = "{bootstrap}"')
    text += f"""
[[proxy]]
name = "bench-mysql"
protocol = "mysql"
listen = "127.0.0.1:{port}"
upstream = "mysql://root@127.0.0.1:3306/"
policy = "policies/default.toml"
"""
    config.write_text(text)
    identity = load_config(config).identity
    token = issue_token(identity.dev_signing_key, identity.issuer, identity.audience, USER, ["dba"])
    process = subprocess.Popen([sys.executable, "-m", "custody", "proxy", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    wait_port(port)
    return process, port, token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--slap-queries", type=int, default=16000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--relay", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay:
        return run_relay(args.relay, MARIADB)
    from ingest.broker import DevBroker

    import pymysql

    with pymysql.connect(host=MARIADB[0], port=MARIADB[1], user="root", autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE IF NOT EXISTS `{SLAP_SCHEMA}`")
    work = Path(tempfile.mkdtemp(prefix="custody-bench-mysql-"))
    relay_port = free_port()
    relay = subprocess.Popen([sys.executable, __file__, "--relay", str(relay_port)])
    wait_port(relay_port)
    with DevBroker(log_path=work / "broker.log") as broker:
        proxy, port, token = start_proxy(work, broker.bootstrap)
        login = {"user": USER, "password": token}
        try:
            lat = {"direct": latency(MARIADB[1], args.queries), "bare relay": latency(relay_port, args.queries),
                   "custody proxy": latency(port, args.queries, **login)}
            slap = {"direct": mysqlslap(MARIADB[1], args.slap_queries),
                    "bare relay": mysqlslap(relay_port, args.slap_queries),
                    "custody proxy": mysqlslap(port, args.slap_queries, USER, token)}
            rows = {"direct": rows_per_second(MARIADB[1], args.rows),
                    "custody proxy": rows_per_second(port, args.rows, **login)}
        finally:
            stop(proxy)
            relay.terminate()
    direct_p50 = lat["direct"][0]
    print("\nSELECT 1 round trip, PyMySQL (µs)   p50      p99   added p50")
    for name, (p50, p99) in lat.items():
        print(f"  {name:30} {p50:8.1f} {p99:8.1f} {p50 - direct_p50:9.1f}")
    relay_added = max(lat["bare relay"][0] - direct_p50, 0.1)
    print(f"  proxy added / relay added = {(lat['custody proxy'][0] - direct_p50) / relay_added:.2f}x")
    if slap["direct"] is None:
        print("\nmysqlslap: not installed (apt-get install mariadb-client), skipped")
    else:
        print(f"\nmysqlslap SELECT 1, 8 clients, {args.slap_queries:,} queries (queries/s)")
        for name, value in slap.items():
            print(f"  {name:30} {value:10,.0f}")
        print(f"  proxy / direct = {slap['custody proxy'] / slap['direct']:.2f}x, "
              f"proxy / relay = {slap['custody proxy'] / slap['bare relay']:.2f}x")
    print(f"\n{args.rows:,}-row result, PyMySQL (rows/s)")
    for name, value in rows.items():
        print(f"  {name:30} {value:12,.0f}")
    print(f"  proxy / direct = {rows['custody proxy'] / rows['direct']:.2f}x")


if __name__ == "__main__":
    main()
