"""Sustained pgbench load through the whole stack: load slows sessions down, it never ends them.

    .venv/bin/python bench/pg_load.py [--seconds 60] [--clients 8,50] [--modes select-only,tpcb-like]

For each mode and client count, against the machine's PostgreSQL (database
`custody_bench_load`, created and filled by `pgbench -i -s 10`): the dev
broker, two ledger workers in one consumer group and `custody proxy`, as
`custody up` runs them; pgbench through the proxy; then, once the ledger has
sealed everything the proxy recorded, from the sealed ledger alone:

  * frames refused by the recorder and sessions ended by the proxy (both must be 0);
  * recorded statements against pgbench's processed transactions × the
    script's statements (± one per client: the transaction in flight at the end);
  * duplicates (same session and seq twice; must be 0) and `custody verify`;
  * the recorder's figures: events written for frames recorded (adaptive
    folding), how often it throttled, its largest backlog (the window of loss);
  * sealed frames/s end to end: frames sealed / (last seal − first event).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0:1] = [str(ROOT), str(Path(__file__).resolve().parent)]  # ROOT first: bench/ingest.py must not shadow

from pg_proxy import USER, free_port, wait_port  # noqa: E402

# Statements per transaction of pgbench's built-in scripts, and how to recognise them in the ledger.
SCRIPTS = {
    "select-only": (["-S"], 1, "SELECT abalance FROM pgbench_accounts%"),
    "tpcb-like": ([], 7, None),  # BEGIN; UPDATE; SELECT; UPDATE; UPDATE; INSERT; END
}
DATABASE = "custody_bench_load"  # its own database: a test or bench running `pgbench -i` on `postgres` cannot drop its tables
TPCB_STATEMENTS = ("BEGIN%", "UPDATE pgbench_accounts%", "SELECT abalance%", "UPDATE pgbench_tellers%",
                   "UPDATE pgbench_branches%", "INSERT INTO pgbench_history%", "END%")


def custody(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "custody", *args], capture_output=True, text=True, cwd=ROOT,
                          **kwargs)


def run_pgbench(port: int, flags: list[str], clients: int, seconds: int, token: str) -> tuple[int, int, str]:
    env = {**os.environ, "PGSSLMODE": "disable", "PGPASSWORD": token}
    out = subprocess.run(["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-c", str(clients),
                          "-j", "2", "-T", str(seconds), "-n", *flags, DATABASE],
                         env=env, capture_output=True, text=True)
    processed = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    if not processed:
        raise RuntimeError(f"pgbench failed: {out.stderr or out.stdout}")
    aborted = len(re.findall(r"aborted", out.stderr))
    return int(processed.group(1)), (int(failed.group(1)) if failed else 0) + aborted, out.stderr.strip()


def sealed_events(config: Path) -> int:
    result = custody("sql", "--config", str(config), "--format", "csv", "SELECT count(*) FROM events")
    return int(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else 0


def one_run(mode: str, clients: int, seconds: int) -> dict[str, object]:
    from custody.config import load_config
    from custody.init import initialise
    from ingest.broker import DevBroker
    from ingest.kafka import ensure_topics
    from proxy.devidp import issue_token

    work = Path(tempfile.mkdtemp(prefix="custody-load-"))
    proxy_port = free_port()
    config_path = initialise(work / "custody", proxy_port=proxy_port)
    text = config_path.read_text()
    text = text.replace('policy = "policies/default.toml"', "# no policy: pure recording load")
    upstream = 'upstream = "postgresql://postgres@127.0.0.1:5432/postgres"'
    assert upstream in text, "custody init's PostgreSQL upstream changed; update the bench"
    text = text.replace(upstream, f'upstream = "postgresql://postgres@127.0.0.1:5432/{DATABASE}"')
    with DevBroker(log_path=work / "broker.log") as broker:
        config_path.write_text(text.replace('bootstrap = "embedded"', f'bootstrap = "{broker.bootstrap}"'))
        config = load_config(config_path)
        ensure_topics(config.kafka)
        identity = config.identity
        token = issue_token(identity.dev_signing_key, identity.issuer, identity.audience, USER, ["dba"])
        base = [sys.executable, "-m", "custody"]
        ledgers = [subprocess.Popen([*base, "ledger", "--instance", f"w{i}", "--config", str(config_path)],
                                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for i in range(2)]
        proxy = subprocess.Popen([*base, "proxy", "--config", str(config_path)], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_port(proxy_port)
        flags, per_transaction, _ = SCRIPTS[mode]
        started = time.time()
        processed, failed, pgbench_err = run_pgbench(proxy_port, flags, clients, seconds, token)
        proxy.send_signal(15)
        proxy_out, _ = proxy.communicate(timeout=120)
        stats = proxy_out.strip().splitlines()[-1]
        written = int(re.search(r"recorded as (\d+)", stats).group(1))
        deadline = time.monotonic() + 300
        while (sealed := sealed_events(config_path)) < written and time.monotonic() < deadline:
            time.sleep(1)
        drained = time.time()
        for ledger in ledgers:
            ledger.send_signal(15)
            ledger.wait(60)
    patterns = [SCRIPTS[mode][2]] if mode == "select-only" else list(TPCB_STATEMENTS)
    like = " OR ".join(f"statement LIKE '{p}'" for p in patterns)
    counts = custody("sql", "--config", str(config_path), "--format", "csv", f"""
        SELECT (SELECT count(*) FROM statements WHERE {like}),
               (SELECT count(*) - count(DISTINCT (session_id, seq)) FROM events),
               (SELECT count(*) FROM sessions WHERE end_reason NOT IN ('client_terminate', 'client_disconnect')),
               (SELECT sum(len(messages)) FROM events WHERE kind = 'frames'),
               (SELECT epoch(max(ts)) - epoch(min(ts)) FROM events)""")
    recorded, duplicates, ended_by_proxy, frames, span = counts.stdout.strip().splitlines()[-1].split(",")
    verify = custody("verify", "--config", str(config_path))
    return {
        "mode": mode, "clients": clients, "processed": processed, "pgbench failed/aborted": failed,
        "expected statements": processed * per_transaction, "recorded statements": int(recorded),
        "duplicates": int(duplicates), "sessions ended by the proxy": int(ended_by_proxy),
        "events sealed": sealed, "events written": written, "frames sealed": int(float(frames)),
        "sealed frames/s end to end": float(frames) / max(drained - started, 1e-9),
        "verify": verify.stdout.strip().splitlines()[-1] if verify.stdout.strip() else verify.stderr.strip(),
        "verify exit": verify.returncode, "recorder": stats, "pgbench stderr": pgbench_err[-300:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--clients", default="8,50")
    parser.add_argument("--modes", default="select-only,tpcb-like")
    args = parser.parse_args()
    subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", DATABASE], capture_output=True)  # may exist
    subprocess.run(["pgbench", "-i", "-s", "10", "-q", "-h", "127.0.0.1", "-U", "postgres", DATABASE],
                   capture_output=True, check=True)
    for mode in args.modes.split(","):
        for clients in (int(c) for c in args.clients.split(",")):
            result = one_run(mode, clients, args.seconds)
            print(f"\npgbench {mode}, {clients} clients, {args.seconds} s, whole stack on this machine")
            for name, value in result.items():
                print(f"  {name:30} {value:,.0f}" if isinstance(value, float) else f"  {name:30} {value}")
            slack = clients
            ok = (result["duplicates"] == 0 and result["sessions ended by the proxy"] == 0
                  and result["pgbench failed/aborted"] == 0
                  and abs(result["recorded statements"] - result["expected statements"]) <= slack * SCRIPTS[mode][1]
                  and result["verify exit"] == 0 and "0 refused" in result["recorder"])
            print(f"  {'verdict':30} {'OK' if ok else 'FAILED'}")


if __name__ == "__main__":
    main()
