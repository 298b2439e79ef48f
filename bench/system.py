"""The whole system under load and faults (tests/system), as figures: the same run with faults beside one without.

    .venv/bin/python bench/system.py [--long] [--seconds N] [--pg-sessions N]

Each run is tests/system/test_system_stack.py through `custody up` (dev broker, ledger, the PostgreSQL, MySQL,
HTTP and SSH proxies) with a second ledger worker in the group and real clients; with faults, a ledger worker is
SIGKILLed and restarted, the broker SIGSTOPped, forgeries written into custody.events. Printed per run: client
sessions and operations, operations/s the clients achieved, what was sealed (events, messages, operations), how
long sealing took after the last client ended, the recorder's largest backlog, duplicates/losses (the checker's
problems, must be 0), `custody verify`, the quarantine by reason.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ROWS = ["client_sessions", "client_operations", "clients s", "client operations/s", "sealed_events",
        "sealed_messages", "sealed_operations", "sealed s after the clients ended", "recorder", "verify",
        "quarantine", "w1 owned when killed", "w1 resumed", "broker hung s", "problems"]


def run(faults: bool, args) -> dict:
    out = Path(tempfile.mkdtemp(prefix="custody-system-")) / "figures.json"
    env = {**os.environ, "CUSTODY_SYSTEM_FAULTS": "1" if faults else "0", "CUSTODY_SYSTEM_FIGURES": str(out)}
    if args.long:
        env["CUSTODY_SYSTEM"] = "long"
    if args.seconds:
        env["CUSTODY_SYSTEM_SECONDS"] = str(args.seconds)
    if args.pg_sessions:
        env["CUSTODY_SYSTEM_PG_SESSIONS"] = str(args.pg_sessions)
    result = subprocess.run([sys.executable, "-m", "pytest", "tests/system/test_system_stack.py", "-q", "-p",
                             "no:cacheprovider", "-o", "timeout=1800"], cwd=ROOT, env=env, capture_output=True, text=True)
    if not out.exists():
        raise SystemExit(f"the system run failed before its figures:\n{result.stdout[-3000:]}")
    figures = json.loads(out.read_text())
    figures["pytest"] = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.returncode
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="the long form: 50 PostgreSQL sessions, 180 s")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--pg-sessions", type=int)
    args = parser.parse_args()
    baseline, faulted = run(False, args), run(True, args)
    print(f"\nsystem run {baseline['profile']}, whole stack on this machine ({os.cpu_count()} cores)")
    print(f"  {'figure':36} {'no faults (baseline)':>40}   with faults")
    for row in ROWS + ["pytest"]:
        a, b = baseline.get(row, "-"), faulted.get(row, "-")
        print(f"  {row:36} {str(a)[:40]:>40}   {b}")


if __name__ == "__main__":
    main()
