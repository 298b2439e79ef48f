"""Ledger throughput: broker → verified, sealed Parquet on one process, and `custody verify`.

Prints events/s for sealing (consume, verify signature and chain, leaf hashes,
rows, zstd Parquet, fsync, signed seal) and for offline verification, the bytes
per event on disk, beside the raw PyNaCl Ed25519 verify rate and SHA-256 rate
measured in the same run (the goal: sealing at >= 50% of raw verify).

    .venv/bin/python bench/ledger.py [--events N] [--payload BYTES]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def raw_verify_rate(n: int, size: int) -> float:
    key = SigningKey.generate()
    message = os.urandom(size)
    signature = key.sign(message).signature
    verify_key = key.verify_key
    start = time.perf_counter()
    for _ in range(n):
        verify_key.verify(message, signature)
    return rate(n, time.perf_counter() - start)


def sha256_rate(n: int, size: int) -> float:
    message = os.urandom(size)
    sha256 = hashlib.sha256
    start = time.perf_counter()
    for _ in range(n):
        sha256(message).digest()
    return rate(n, time.perf_counter() - start)


def make_events(key: PrivateKey, n: int, payload_size: int) -> list:
    """Frames of distinct random payloads: the worst case for compression."""
    chains = [SessionChain(key, "bench") for _ in range(64)]
    return [chains[i & 63].event("frames", {"direction": "server", "messages": [
        {"type": "DataRow", "data": os.urandom(payload_size)}]}) for i in range(n)]


def produce(settings: KafkaSettings, events: list) -> None:
    kafka.ensure_topics(settings, ("events", "quarantine", "seals"))
    producer = kafka.producer(settings)
    for event in events:
        producer.send(settings.topic("events"), key=event.session_id.encode(), value=event.value)
    producer.flush(timeout=300)
    producer.close()


def seal_rate(settings: KafkaSettings, ledger: LedgerSettings, key: PrivateKey, keyring: Keyring, n: int) -> float:
    service = LedgerService(settings, ledger, key, keyring, partitions=list(range(PARTITIONS)))
    start = time.perf_counter()
    while service.sealed_leaves < n:
        service.step(0.05)
    elapsed = time.perf_counter() - start
    service.close()
    return rate(n, elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--payload", type=int, default=256, help="frame payload bytes")
    args = parser.parse_args()
    proxy_key, ledger_key = make_key("proxy"), make_key("ledger")
    keyring = Keyring([TrustedKey(proxy_key.key_id, "proxy", proxy_key.public_key),
                       TrustedKey(ledger_key.key_id, "ledger", ledger_key.public_key)])
    events = make_events(proxy_key, args.events, args.payload)
    event_size = sum(len(e.value) for e in events) // len(events)
    with DevBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        settings = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix="bench.", embedded_listen=broker.bootstrap,
                                 partitions=PARTITIONS)
        produce(settings, events)
        ledger = LedgerSettings(dir=Path(tmp) / "ledger", origin="bench/ledger", segment_max_events=100_000,
                                segment_max_bytes=256 << 20, segment_max_seconds=5.0, idle_seal_seconds=60.0)
        ceiling = raw_verify_rate(args.events, len(events[0].envelope_bytes))
        hashes = sha256_rate(args.events, event_size)
        sealed = seal_rate(settings, ledger, ledger_key, keyring, args.events)
        on_disk = sum(p.stat().st_size for p in Path(ledger.dir).rglob("*") if p.is_file())
        start = time.perf_counter()
        report = verify_ledger(Path(ledger.dir), keyring, "bench/ledger")
        verified = rate(args.events, time.perf_counter() - start)
        assert report.ok and report.events_valid == args.events, report.summary()
    print(f"{args.events:,} events of {event_size} bytes ({args.payload}-byte frames), {PARTITIONS} partitions, one process")
    print(f"{'raw Ed25519 verify/s':>24} {ceiling:>12,.0f}")
    print(f"{'raw SHA-256/s':>24} {hashes:>12,.0f}  ({hashes * event_size / 1e6:,.0f} MB/s)")
    print(f"{'sealed events/s':>24} {sealed:>12,.0f}  ({sealed / ceiling:.2f} of raw verify)")
    print(f"{'verify events/s':>24} {verified:>12,.0f}  ({verified / ceiling:.2f} of raw verify)")
    print(f"{'bytes/event on disk':>24} {on_disk / args.events:>12,.0f}  (event itself: {event_size})")


if __name__ == "__main__":
    main()
