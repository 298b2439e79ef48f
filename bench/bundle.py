"""Bundle export and offline verification throughput.

Builds a demo ledger (query.sample, the ledger's own writer) of about --events
events, exports all of it as one bundle, verifies it, and prints events/s for
each and bundle bytes per event. Verify runs twice, with jobs=1 (in-process) and
jobs=cores (`custody bundle verify`'s default), beside the raw single-core Ed25519
verify rate (pynacl) measured in the same run, times the cores used: verification's
floor cost per event. The goal (issue 11) is verify/raw >= 0.8 at jobs=cores.

    .venv/bin/python bench/bundle.py [--events 1000000] [--jobs N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nacl.signing import SigningKey  # noqa: E402

from ingest.keys import Keyring, add_to_keyring, generate_key_file  # noqa: E402
from query.bundle import Scope, export_bundle  # noqa: E402
from query.bundle_verify import verify_bundle  # noqa: E402
from query.sample import ORIGIN, build_demo_ledger  # noqa: E402

EVENTS_PER_SESSION = 45  # measured: 745,847 events from 16,666 sessions of statements=20


def raw_verify_rate(n: int = 20_000) -> float:
    key = SigningKey.generate()
    message = os.urandom(400)
    signature = key.sign(message).signature
    verify = key.verify_key.verify
    start = time.perf_counter()
    for _ in range(n):
        verify(message, signature)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="cores for the parallel run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        demo = build_demo_ledger(root, sessions=max(1, args.events // EVENTS_PER_SESSION), statements=20,
                                 segment_events=50_000, workers=2)
        print(f"ledger: {demo.events:,} events built in {time.perf_counter() - start:.1f}s")
        exporter = generate_key_file(root / "keys" / "exporter.key", "exporter")
        keyring = add_to_keyring(demo.keyring, exporter, "exporter")

        out = root / "all.custody"
        start = time.perf_counter()
        predicate = export_bundle(demo.ledger_dir, out, Scope(where="true"), case="BENCH", purpose="benchmark",
                                  recipient=None, exporter_key=exporter, keyring=keyring, origin=ORIGIN)
        export_s = time.perf_counter() - start
        events = predicate["counts"]["events"]

        trust = Keyring.load(demo.keyring)
        rates = {}
        for jobs in sorted({1, args.jobs}):
            start = time.perf_counter()
            report = verify_bundle(out, trust, jobs=jobs)
            rates[jobs] = events / (time.perf_counter() - start)
            if not report.ok:
                raise SystemExit(f"bundle did not verify: {report.problems[:3]}")
        raw = raw_verify_rate()
        size = out.stat().st_size
        print(f"{events:,} events, {size / events:,.0f} bytes/event, export {events / export_s:,.0f} events/s")
        print(f"{'jobs':>5} {'verify ev/s':>12} {'raw Ed25519 verify/s x jobs':>28} {'verify/raw':>10}")
        for jobs, rate in rates.items():
            print(f"{jobs:>5} {rate:>12,.0f} {raw * jobs:>28,.0f} {rate / (raw * jobs):>10.2f}")
        print(f"(raw single-core Ed25519 verify: {raw:,.0f}/s; load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
