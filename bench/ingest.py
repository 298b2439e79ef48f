"""Ingest throughput: encode+sign, and encode+sign+produce to a real broker.

Prints events/s for 256-byte and 4 KiB frame payloads beside the raw PyNaCl
Ed25519 sign rate measured in the same run (the ceiling for encode+sign).

    .venv/bin/python bench/ingest.py [--events N]
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

from ingest.broker import DevBroker  # noqa: E402
from ingest.events import SessionChain  # noqa: E402
from ingest.keys import PrivateKey, key_id_for  # noqa: E402
from ingest.producer import EventProducer  # noqa: E402
from ingest.settings import KafkaSettings  # noqa: E402
from ingest.spool import Spool  # noqa: E402


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds else float("inf")


def raw_sign_rate(n: int, size: int) -> float:
    key = SigningKey.generate()
    message = os.urandom(size)
    start = time.perf_counter()
    for _ in range(n):
        key.sign(message)
    return rate(n, time.perf_counter() - start)


def frame_body(payload: bytes) -> dict:
    return {"direction": "server", "messages": [{"type": "DataRow", "data": payload}]}


def encode_sign_rate(key: PrivateKey, n: int, payload: bytes) -> float:
    chains = [SessionChain(key, "bench") for _ in range(16)]
    body = frame_body(payload)
    start = time.perf_counter()
    for i in range(n):
        chains[i & 15].event("frames", body)
    return rate(n, time.perf_counter() - start)


def produce_rate(key: PrivateKey, n: int, payload: bytes, settings: KafkaSettings, spool_dir: Path) -> float:
    producer = EventProducer(settings, Spool(spool_dir))
    chains = [SessionChain(key, "bench") for _ in range(16)]
    body = frame_body(payload)
    start = time.perf_counter()
    for i in range(n):
        producer.send(chains[i & 15].event("frames", body))
    if not producer.wait_delivered(timeout=300):
        raise SystemExit("broker did not acknowledge everything within 300 s")
    elapsed = time.perf_counter() - start
    producer.close()
    return rate(n, elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    args = parser.parse_args()
    signing_key = SigningKey.generate()
    key = PrivateKey(key_id_for("proxy", bytes(signing_key.verify_key)), signing_key)
    print(f"{'payload':>8} {'raw sign/s':>12} {'encode+sign/s':>14} {'ratio':>6} {'+produce/s':>12} {'ratio':>6}")
    with DevBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        settings = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix="bench.", embedded_listen=broker.bootstrap, partitions=3)
        for size in (256, 4096):
            payload = os.urandom(size)
            ceiling = raw_sign_rate(args.events, 300 + size)
            signed = encode_sign_rate(key, args.events, payload)
            produced = produce_rate(key, args.events, payload, settings, Path(tmp) / f"spool-{size}")
            print(f"{size:>7}B {ceiling:>12,.0f} {signed:>14,.0f} {signed / ceiling:>6.2f} {produced:>12,.0f} {produced / ceiling:>6.2f}")


if __name__ == "__main__":
    main()
