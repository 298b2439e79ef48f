"""Bundle export and offline verification throughput.

Builds a demo ledger (query.sample, the ledger's own writer) of about --events
events, exports all of it as one bundle, verifies it, and prints events/s for
each and bundle bytes per event, beside the raw Ed25519 verify rate measured in
the same run (verification's floor cost per event).

    .venv/bin/python bench/bundle.py [--events 1000000]
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

        start = time.perf_counter()
        report = verify_bundle(out, Keyring.load(demo.keyring))
        verify_s = time.perf_counter() - start
        if not report.ok:
            raise SystemExit(f"bundle did not verify: {report.problems[:3]}")
        ceiling = raw_verify_rate()
        size = out.stat().st_size
        print(f"{'events':>10} {'export ev/s':>12} {'verify ev/s':>12} {'raw Ed25519 verify/s':>21} {'verify/raw':>10} {'bytes/event':>12}")
        print(f"{events:>10,} {events / export_s:>12,.0f} {events / verify_s:>12,.0f} {ceiling:>21,.0f} "
              f"{events / verify_s / ceiling:>10.2f} {size / events:>12,.0f}")


if __name__ == "__main__":
    main()
