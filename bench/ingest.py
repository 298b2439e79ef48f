"""Ingest throughput: encode+sign, and encode+sign+produce to a real broker, beside their ceilings.

Prints events/s for 256-byte and 4 KiB frame payloads beside the raw PyNaCl
Ed25519 sign rate measured in the same run (the ceiling for encode+sign), then
the raw kafka-python ceiling in the same run: messages/s and MB/s of a bare
KafkaProducer (acks=all, idempotent, large batches, linger) sending messages of
event size (~300 B and ~4 KiB, random: the worst case for compression) with no,
lz4 and zstd compression, and beside it the recorder's producer
(`EventProducer`: spool first, then Kafka with `ingest.kafka.producer`'s
options) sending the same number of already-signed events.

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

from ingest import kafka  # noqa: E402
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


def raw_kafka_rate(settings: KafkaSettings, n: int, size: int, **options) -> float:
    """Messages/s of a bare kafka-python producer: `n` random messages of `size` bytes, 16 keys, until acked."""
    topic = settings.topic(f"raw{size}")
    kafka.ensure_topics(settings, (f"raw{size}",))
    producer = kafka.producer(settings, **options)
    values = [os.urandom(size) for _ in range(256)]
    keys = [os.urandom(18).hex().encode() for _ in range(16)]
    producer.send(topic, key=keys[0], value=values[0]).get(timeout=30)  # connected, metadata known
    start = time.perf_counter()
    for i in range(n):
        producer.send(topic, key=keys[i & 15], value=values[i & 255])
    producer.flush(timeout=300)
    elapsed = time.perf_counter() - start
    producer.close()
    return rate(n, elapsed)


def producer_rate(key: PrivateKey, n: int, payload: bytes, settings: KafkaSettings, spool_dir: Path) -> float:
    """Events/s through the recorder's EventProducer (spool, drainer, Kafka) of events signed beforehand."""
    chains = [SessionChain(key, "bench") for _ in range(16)]
    body = frame_body(payload)
    events = [chains[i & 15].event("frames", body) for i in range(n)]
    producer = EventProducer(settings, Spool(spool_dir))
    producer.send(events[0])
    producer.wait_delivered(timeout=30)  # connected, topic made
    start = time.perf_counter()
    for event in events[1:]:
        producer.send(event)
    if not producer.wait_delivered(timeout=300):
        raise SystemExit("broker did not acknowledge everything within 300 s")
    elapsed = time.perf_counter() - start
    producer.close()
    return rate(n - 1, elapsed)


CEILING_OPTIONS = {"batch_size": 1 << 20, "linger_ms": 20}


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
        current = kafka.producer(settings)
        tuned = {k: current.config[k] for k in ("compression_type", "batch_size", "linger_ms",
                                                "max_in_flight_requests_per_connection", "acks", "enable_idempotence")}
        current.close()
        print(f"\nkafka-python ceiling (acks=all, idempotent, {CEILING_OPTIONS}) vs the recorder's producer {tuned}")
        print(f"{'message':>8} {'compression':>11} {'raw msg/s':>11} {'raw MB/s':>9}")
        best: dict[int, float] = {}
        for size in (300, 4096):
            for compression in (None, "lz4", "zstd"):
                raw = raw_kafka_rate(settings, args.events, size, compression_type=compression, **CEILING_OPTIONS)
                best[size] = max(best.get(size, 0), raw)
                print(f"{size:>7}B {compression or 'none':>11} {raw:>11,.0f} {raw * size / 1e6:>9,.1f}")
        print(f"{'payload':>8} {'event B':>8} {'producer ev/s':>14} {'MB/s':>7} {'best raw msg/s':>15} {'ratio':>6}")
        for payload_size, size in ((256, 300), (4096, 4096)):
            payload = os.urandom(payload_size)
            event_bytes = len(SessionChain(key, "bench").event("frames", frame_body(payload)).value)
            produced = producer_rate(key, args.events, payload, settings, Path(tmp) / f"spool-p{payload_size}")
            print(f"{payload_size:>7}B {event_bytes:>8} {produced:>14,.0f} {produced * event_bytes / 1e6:>7,.1f} "
                  f"{best[size]:>15,.0f} {produced / best[size]:>6.2f}")


if __name__ == "__main__":
    main()
