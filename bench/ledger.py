"""Ledger throughput: broker → verified, sealed Parquet on one process and on N worker processes, and `custody verify`.

Prints events/s and frames/s for sealing (consume, verify signature and chain,
leaf hashes, rows, zstd Parquet, fsync, signed seal) and for offline
verification, the bytes per event on disk, beside the raw PyNaCl Ed25519 verify
rate (one thread) and SHA-256 rate measured in the same run. The goal: sealing
at >= 0.8 of raw verify per event. The ledger checks signatures on threads
(libsodium runs without the GIL) while its main thread decodes and builds rows,
so the figure also depends on free cores: beside the wall-clock ratio it prints
the CPU time per sealed event (all threads) against the CPU time of one raw
verify, which does not depend on what else the machine is doing.

`--messages M` puts M messages in each Frames event (a folded, contract-v2
event), so frames/s = M x events/s. `--workers N` also seals a second copy of
the topic with N ledger worker processes, one per partition (pinned).

    .venv/bin/python bench/ledger.py [--events N] [--payload BYTES] [--messages M] [--workers N]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kafka import TopicPartition  # noqa: E402
from nacl.signing import SigningKey  # noqa: E402

from ingest import kafka  # noqa: E402
from ingest.broker import DevBroker  # noqa: E402
from ingest.events import SessionChain  # noqa: E402
from ingest.keys import Keyring, PrivateKey, TrustedKey, key_id_for  # noqa: E402
from ingest.settings import KafkaSettings  # noqa: E402
from ledger.service import LedgerService  # noqa: E402
from ledger.settings import LedgerSettings  # noqa: E402
from ledger.verify import verify_ledger  # noqa: E402

PARTITIONS = 3


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds else float("inf")


def make_key(name: str) -> PrivateKey:
    signing_key = SigningKey.generate()
    return PrivateKey(key_id_for(name, bytes(signing_key.verify_key)), signing_key)


def cpu_seconds() -> float:
    """CPU time of this process, every thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raw_verify_rate(n: int, size: int) -> tuple[float, float]:
    """Verifies/s on one thread (wall clock) and CPU seconds per verify."""
    key = SigningKey.generate()
    message = os.urandom(size)
    signature = key.sign(message).signature
    verify_key = key.verify_key
    start, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(n):
        verify_key.verify(message, signature)
    return rate(n, time.perf_counter() - start), (cpu_seconds() - cpu) / n


def sha256_rate(n: int, size: int) -> float:
    message = os.urandom(size)
    sha256 = hashlib.sha256
    start = time.perf_counter()
    for _ in range(n):
        sha256(message).digest()
    return rate(n, time.perf_counter() - start)


def make_events(key: PrivateKey, n: int, payload_size: int, messages: int = 1) -> list:
    """Frames of distinct random payloads (the worst case for compression), `messages` DataRows each."""
    chains = [SessionChain(key, "bench") for _ in range(64)]
    return [chains[i & 63].event("frames", {"direction": "server", "messages": [
        {"type": "DataRow", "data": os.urandom(payload_size)} for _ in range(messages)]}) for i in range(n)]


def produce(settings: KafkaSettings, messages: list[tuple[bytes, bytes]]) -> None:
    """(Kafka key, value) pairs to the events topic."""
    kafka.ensure_topics(settings, ("events", "quarantine", "seals", "violations"))
    producer = kafka.producer(settings)
    for key, value in messages:
        producer.send(settings.topic("events"), key=key, value=value)
    producer.flush(timeout=300)
    producer.close()


def end_offsets(settings: KafkaSettings) -> dict[int, int]:
    """Where each partition of the events topic ends, once the bench has produced into it."""
    consumer = kafka.consumer(settings, group_id=None)
    ends = consumer.end_offsets([TopicPartition(settings.topic("events"), p) for p in range(PARTITIONS)])
    consumer.close()
    return {tp.partition: offset for tp, offset in ends.items()}


def seal_through(service: LedgerService, ends: dict[int, int]) -> None:
    """Step until the service has taken every event of its partitions (read up to `ends`), then seal: the
    figure is the work of sealing, not the wait for a segment to be due (segment_max_seconds, 5 s by default,
    was most of the 1-process figure of 30,000 events before 2026-12-04)."""
    while any(writer.state.next_offset < ends[p] for p, writer in service.writers.items()):
        service.step(0.05)
    service.seal_open()


def seal_rate(settings: KafkaSettings, ledger: LedgerSettings, key: PrivateKey, keyring: Keyring,
              n: int) -> tuple[float, float]:
    """Events/s sealed by one process owning every partition, and CPU seconds per sealed event."""
    ends = end_offsets(settings)
    service = LedgerService(settings, ledger, key, keyring, partitions=list(range(PARTITIONS)))
    start, cpu = time.perf_counter(), cpu_seconds()
    seal_through(service, ends)
    elapsed, used = time.perf_counter() - start, cpu_seconds() - cpu
    assert service.sealed_leaves == n, (service.sealed_leaves, n)
    service.close()
    return rate(n, elapsed), used / n


def _worker(settings: KafkaSettings, ledger: LedgerSettings, key_id: str, seed: bytes, keyring: Keyring,
            partitions: list[int], ends: dict[int, int], ready, go, done) -> None:
    service = LedgerService(settings, ledger, PrivateKey(key_id, SigningKey(seed)), keyring, partitions=partitions)
    ready.set()
    go.wait()
    seal_through(service, ends)
    done.set()
    service.close()


def sealed_tree_sizes(ledger_dir: Path) -> int:
    total = 0
    for chain in (ledger_dir / "seals").glob("p*"):
        seals = sorted(chain.glob("*.json"))
        if seals:
            total += json.loads(seals[-1].read_bytes())["seal"]["tree"]["size"]
    return total


def workers_seal_rate(settings: KafkaSettings, ledger: LedgerSettings, key: PrivateKey, keyring: Keyring,
                      n: int, workers: int) -> float:
    """Events/s sealed by `workers` processes (pinned partitions, one each when workers = partitions), from all
    workers ready to the last one's seal."""
    context = multiprocessing.get_context("spawn")
    ends, go = end_offsets(settings), context.Event()
    readies, dones = [context.Event() for _ in range(workers)], [context.Event() for _ in range(workers)]
    processes = [context.Process(target=_worker, args=(settings, ledger, key.key_id, bytes(key.signing_key), keyring,
                                                       list(range(w, PARTITIONS, workers)), ends, readies[w], go,
                                                       dones[w]))
                 for w in range(workers)]
    for process in processes:
        process.start()
    for ready in readies:
        ready.wait(60)
    start = time.perf_counter()
    go.set()
    for done in dones:
        done.wait(600)
    elapsed = time.perf_counter() - start
    for process in processes:
        process.join(30)
    assert sealed_tree_sizes(Path(ledger.dir)) == n
    return rate(n, elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--payload", type=int, default=256, help="frame payload bytes")
    parser.add_argument("--messages", type=int, default=1, help="messages (frames) per Frames event")
    parser.add_argument("--workers", type=int, default=PARTITIONS, help=f"worker processes (<= {PARTITIONS}; 0: skip)")
    args = parser.parse_args()
    proxy_key, ledger_key = make_key("proxy"), make_key("ledger")
    keyring = Keyring([TrustedKey(proxy_key.key_id, "proxy", proxy_key.public_key),
                       TrustedKey(ledger_key.key_id, "ledger", ledger_key.public_key)])
    events = make_events(proxy_key, args.events, args.payload, args.messages)
    event_size = sum(len(e.value) for e in events) // len(events)
    envelope_size = len(events[0].envelope_bytes)
    # only the bytes are kept: a ledger process does not hold its producers' decoded events, whose ~120k objects
    # every full collection of the garbage collector would scan while the ledger seals
    messages = [(e.session_id.encode(), e.value) for e in events]
    del events
    with DevBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        settings = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix="bench.", embedded_listen=broker.bootstrap,
                                 partitions=PARTITIONS)
        produce(settings, messages)
        ledger = LedgerSettings(dir=Path(tmp) / "ledger", origin="bench/ledger", segment_max_events=100_000,
                                segment_max_bytes=256 << 20, segment_max_seconds=5.0, idle_seal_seconds=60.0)
        ceiling, verify_cpu = raw_verify_rate(min(args.events, 20_000), envelope_size)
        hashes = sha256_rate(args.events, event_size)
        sealed, seal_cpu = seal_rate(settings, ledger, ledger_key, keyring, args.events)
        on_disk = sum(p.stat().st_size for p in Path(ledger.dir).rglob("*") if p.is_file())
        start = time.perf_counter()
        report = verify_ledger(Path(ledger.dir), keyring, "bench/ledger")
        verified = rate(args.events, time.perf_counter() - start)
        assert report.ok and report.events_valid == args.events, report.summary()
        multi = None
        if args.workers:
            second = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix="bench2.", embedded_listen=broker.bootstrap,
                                   partitions=PARTITIONS)
            produce(second, messages)
            ledger2 = dataclasses.replace(ledger, dir=Path(tmp) / "ledger2")
            multi = workers_seal_rate(second, ledger2, ledger_key, keyring, args.events, min(args.workers, PARTITIONS))
            report2 = verify_ledger(Path(ledger2.dir), keyring, "bench/ledger")
            assert report2.ok and report2.events_valid == args.events, report2.summary()
    m = args.messages
    print(f"{args.events:,} events of {event_size} bytes ({m} x {args.payload}-byte frames), {PARTITIONS} partitions, "
          f"{os.cpu_count()} cores")
    print(f"{'raw Ed25519 verify/s':>28} {ceiling:>12,.0f}  (one thread; {verify_cpu * 1e6:,.1f} µs CPU each)")
    print(f"{'raw SHA-256/s':>28} {hashes:>12,.0f}  ({hashes * event_size / 1e6:,.0f} MB/s)")
    print(f"{'sealed events/s, 1 process':>28} {sealed:>12,.0f}  ({sealed / ceiling:.2f} of raw verify; "
          f"{seal_cpu * 1e6:,.1f} µs CPU/event = {verify_cpu / seal_cpu:.2f} of raw verify per CPU-second)")
    print(f"{'sealed frames/s, 1 process':>28} {sealed * m:>12,.0f}")
    if multi is not None:
        print(f"{f'sealed events/s, {min(args.workers, PARTITIONS)} workers':>28} {multi:>12,.0f}  "
              f"({multi / ceiling:.2f} of raw verify; {multi * m:,.0f} frames/s)")
    print(f"{'verify events/s':>28} {verified:>12,.0f}  ({verified / ceiling:.2f} of raw verify)")
    print(f"{'bytes/event on disk':>28} {on_disk / args.events:>12,.0f}  (event itself: {event_size})")


if __name__ == "__main__":
    main()
