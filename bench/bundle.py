"""Bundle export and offline verification throughput.

Builds a demo ledger (query.sample, the ledger's own writer) of about --events
events, exports all of it as one bundle, verifies it, and prints events/s for
each and bundle bytes per event. Verify runs with --jobs 1 (checked in the
program's own process) and --jobs cores (`custody bundle verify`'s default).

Each verify is the `custody bundle verify` program an auditor runs (this
venv's console script, a process of its own: its start-up and its workers'
imports are counted, as an auditor pays them). The machine may be shared, so
wall-clock rates are shown but not compared: each run's CPU time is counted,
the program's and its workers' (reaped children), and set beside the raw
Ed25519 verify (pynacl, `crypto_sign_open`) of the same events' signatures and envelopes, in verifies per CPU second of a
process that runs them in a loop during the verify run (the same window, the same
contention for the cores). Events per CPU second over raw verifies per CPU second
is verify / (raw x cores used), cores used being CPU seconds per wall second: the
goal (issue 11) is >= 0.8 at jobs=cores.

    .venv/bin/python bench/bundle.py [--events 1000000] [--jobs N]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Iterator, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow.parquet as pq  # noqa: E402
from nacl.bindings import crypto_sign_open  # noqa: E402

from ingest.events import open_event  # noqa: E402
from ingest.keys import Keyring, add_to_keyring, generate_key_file  # noqa: E402
from query.bundle import Scope, export_bundle  # noqa: E402
from query.bundle_format import EVENTS  # noqa: E402
from query.sample import ORIGIN, build_demo_ledger  # noqa: E402

EVENTS_PER_SESSION = 45  # measured: 745,847 events from 16,666 sessions of statements=20
RAW_SAMPLE = 20_000


def signed_pairs(bundle: Path, trust: Keyring, n: int = RAW_SAMPLE) -> list[tuple[bytes, bytes]]:
    """(signature + envelope bytes, public key) of the bundle's first `n` events: what `crypto_sign_open` takes."""
    with zipfile.ZipFile(bundle) as archive:
        values = pq.read_table(io.BytesIO(archive.read(EVENTS)), columns=["event"]).column("event")[:n].to_pylist()
    events = [open_event(v) for v in values]
    return [(e.signature + e.envelope_bytes, bytes(trust.key_for(e.key_id, e.ts, "proxy"))) for e in events]


def raw_verifier(pairs: list[tuple[bytes, bytes]], stop: Event, rate: Queue) -> None:
    """Verify `pairs` over and over until `stop`, then put verifies per CPU second of this process."""
    done, start = 0, time.process_time()
    while not stop.is_set():
        for signed, key in pairs[:1000]:
            crypto_sign_open(signed, key)
        done += 1000
        pairs = pairs[1000:] + pairs[:1000]
    rate.put(done / (time.process_time() - start))


@contextmanager
def raw_verify_rate(pairs: list[tuple[bytes, bytes]]) -> Iterator[list[float]]:
    """Raw verifies per CPU second during the `with` block: its one item once the block ends."""
    context = multiprocessing.get_context("spawn")
    stop, rate = context.Event(), context.Queue()
    process = context.Process(target=raw_verifier, args=(pairs, stop, rate))
    process.start()
    result: list[float] = []
    try:
        yield result
    finally:
        stop.set()
        result.append(rate.get())
        process.join()


class Run(NamedTuple):
    wall: float
    cpu: float


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_verify(bundle: Path, keyring: Path, jobs: int) -> Run:
    """`custody bundle verify --jobs N`: its wall and CPU seconds, its workers' included (the raw verifier, running
    meanwhile, is not reaped yet, so not counted)."""
    program = Path(sys.executable).parent / "custody"
    wall, children = time.perf_counter(), children_cpu()
    done = subprocess.run([str(program), "bundle", "verify", str(bundle), "--trust", str(keyring), "--jobs", str(jobs)],
                          capture_output=True, text=True)
    run = Run(time.perf_counter() - wall, children_cpu() - children)
    if done.returncode != 0:
        raise SystemExit(f"bundle did not verify (exit {done.returncode}): {(done.stdout + done.stderr)[-600:]}")
    return run


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
        print(f"{events:,} events, {out.stat().st_size / events:,.0f} bytes/event, "
              f"export {events / export_s:,.0f} events/s")

        trust = Keyring.load(demo.keyring)
        pairs = signed_pairs(out, trust)
        print(f"{'jobs':>4} {'wall ev/s':>10} {'cores used':>10} {'ev/CPU-s':>9} {'raw verify/CPU-s':>16} "
              f"{'verify/(raw x cores used)':>25}")
        for jobs in sorted({1, args.jobs}):
            with raw_verify_rate(pairs) as raw_rate:
                run = timed_verify(out, demo.keyring, jobs)
            raw, cpu = raw_rate[0], run.cpu
            print(f"{jobs:>4} {events / run.wall:>10,.0f} {cpu / run.wall:>10.2f} {events / cpu:>9,.0f} {raw:>16,.0f} "
                  f"{events / cpu / raw:>25.2f}")
        print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
