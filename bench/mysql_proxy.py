"""MySQL proxy figures, direct MariaDB vs through `custody proxy`, in one run.

`SELECT 1` latency p50/p99 over one PyMySQL connection (`--queries`), and a large
result's rows/s (`--rows` rows of MariaDB's sequence engine, read by PyMySQL),
direct to 127.0.0.1:3306 (root, no password) and through the proxy with
recording on (dev broker, spool, signing) and the default policy; ratios
printed. Run: `.venv/bin/python bench/mysql_proxy.py`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pg_proxy import free_port, stop, wait_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
USER = "bench@example.com"


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


def start_proxy(work: Path, bootstrap: str):
    import subprocess

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
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    from ingest.broker import DevBroker

    work = Path(tempfile.mkdtemp(prefix="custody-bench-mysql-"))
    with DevBroker(log_path=work / "broker.log") as broker:
        proxy, port, token = start_proxy(work, broker.bootstrap)
        login = {"user": USER, "password": token}
        try:
            direct, proxied = latency(3306, args.queries), latency(port, args.queries, **login)
            rows_direct, rows_proxied = rows_per_second(3306, args.rows), rows_per_second(port, args.rows, **login)
        finally:
            stop(proxy)
    print(f"SELECT 1 p50: direct {direct[0]:.0f} µs, proxy {proxied[0]:.0f} µs ({proxied[0] / direct[0]:.2f}x)")
    print(f"SELECT 1 p99: direct {direct[1]:.0f} µs, proxy {proxied[1]:.0f} µs ({proxied[1] / direct[1]:.2f}x)")
    print(f"{args.rows:,}-row result: direct {rows_direct:,.0f} rows/s, proxy {rows_proxied:,.0f} rows/s "
          f"({rows_proxied / rows_direct:.2f}x)")


if __name__ == "__main__":
    main()
