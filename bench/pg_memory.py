"""Resident memory per idle proxied PostgreSQL session, at 1,000 sessions.

    .venv/bin/python bench/pg_memory.py [--sessions 1000]

The machine's PostgreSQL allows 100 connections, so this starts its own
throwaway cluster (as the postgres OS user, on a free port, max_connections
above the session count; removed after), points `custody proxy` at it, opens
the sessions through the proxy and reports (RSS after − RSS before) /
sessions, beside the same figure for a bare asyncio byte relay (the floor).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0:1] = [str(ROOT), str(ROOT / "tests"), str(Path(__file__).resolve().parent)]  # bench/ingest.py last

from pg_proxy import USER, dsn, free_port, rss_kib, wait_port  # noqa: E402


def idle_kib(pid: int, conninfo: str, sessions: int) -> float:
    import psycopg

    before = rss_kib(pid)
    connections = []
    for _ in range(sessions):
        connections.append(psycopg.connect(conninfo, autocommit=True))
    time.sleep(2)
    after = rss_kib(pid)
    for connection in connections:
        connection.close()
    return (after - before) / sessions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.sessions + 256)), hard))

    from custody.init import initialise
    from custody.config import load_config
    from ingest.broker import DevBroker
    from pg_cluster import Cluster
    from proxy.devidp import issue_token

    cluster = Cluster(max_connections=args.sessions + 100).start()
    work = Path(tempfile.mkdtemp(prefix="custody-memory-"))
    try:
        relay_port = free_port()
        relay = subprocess.Popen([sys.executable, str(ROOT / "bench" / "pg_proxy.py"), "--relay", str(relay_port),
                                  "--relay-target", str(cluster.port)])
        wait_port(relay_port)
        proxy_port = free_port()
        config = initialise(work / "custody", proxy_port=proxy_port)
        with DevBroker(log_path=work / "broker.log") as broker:
            text = config.read_text().replace('bootstrap = "embedded"', f'bootstrap = "{broker.bootstrap}"')
            config.write_text(text.replace("127.0.0.1:5432", f"127.0.0.1:{cluster.port}"))
            identity = load_config(config).identity
            token = issue_token(identity.dev_signing_key, identity.issuer, identity.audience, USER, ["dba"])
            proxy = subprocess.Popen([sys.executable, "-m", "custody", "proxy", "--config", str(config)], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(proxy_port)
            try:
                bare = idle_kib(relay.pid, dsn(relay_port), args.sessions)
                proxied = idle_kib(proxy.pid, dsn(proxy_port, USER, token), args.sessions)
            finally:
                proxy.terminate()
                proxy.wait(60)
                relay.terminate()
    finally:
        cluster.stop()
    print(f"\nresident memory per idle session, {args.sessions:,} sessions")
    print(f"  {'bare asyncio relay':26} {bare:8.1f} KiB")
    print(f"  {'custody proxy':26} {proxied:8.1f} KiB   (goal <= 128 KiB)")


if __name__ == "__main__":
    main()
