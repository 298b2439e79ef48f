"""The event consumer: read `custody.events`, verify, quarantine what fails.

Nothing is dropped silently: a message that fails any check is copied, bytes
unchanged, to `custody.quarantine` with headers that say why
(`custody-reason`, `custody-detail`, `custody-source` = topic/partition@offset).
Offsets are committed only after the quarantine copies are acknowledged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from kafka import KafkaConsumer, KafkaProducer

from ingest import kafka
from ingest.events import SignedEvent
from ingest.settings import KafkaSettings
from ingest.verify import EventVerifier, Rejection


@dataclass(frozen=True)
class Record:
    """Where a message came from, for seals and quarantine."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


@dataclass(frozen=True)
class Accepted:
    record: Record
    event: SignedEvent


@dataclass(frozen=True)
class Quarantined:
    record: Record
    rejection: Rejection


def quarantine_headers(record: Record, rejection: Rejection) -> list[tuple[str, bytes]]:
    return [
        ("custody-reason", rejection.reason.encode()),
        ("custody-detail", rejection.detail.encode()),
        ("custody-source", f"{record.topic}/{record.partition}@{record.offset}".encode()),
    ]


class Quarantine:
    """Sends rejected messages, unchanged, to the quarantine topic."""

    def __init__(self, settings: KafkaSettings):
        self.topic = settings.topic("quarantine")
        self._producer: KafkaProducer = kafka.producer(settings)

    def send(self, record: Record, rejection: Rejection) -> None:
        self._producer.send(self.topic, key=record.key, value=record.value,
                            headers=quarantine_headers(record, rejection))

    def flush(self) -> None:
        self._producer.flush(timeout=30)

    def close(self) -> None:
        self._producer.close(timeout=5)


def verify_record(verifier: EventVerifier, record: Record) -> Accepted | Quarantined:
    try:
        return Accepted(record, verifier.check(record.value, record.key))
    except Rejection as rejection:
        return Quarantined(record, rejection)


class EventConsumer:
    """Verified events from `custody.events`; rejected ones go to quarantine."""

    def __init__(self, settings: KafkaSettings, verifier: EventVerifier, group_id: str | None = "custody-verifier"):
        """`group_id` None: no consumer group (no join to wait for, no commit), every partition from the start."""
        self.verifier = verifier
        self.quarantine = Quarantine(settings)
        kafka.ensure_topics(settings, ("events", "quarantine"))
        self._consumer: KafkaConsumer = kafka.consumer(settings, settings.topic("events"), group_id=group_id)

    def poll(self, timeout: float = 1.0) -> Iterator[Accepted | Quarantined]:
        """One poll's results, in partition order; quarantined ones are already sent."""
        batches = self._consumer.poll(timeout_ms=int(timeout * 1000))
        for tp, messages in batches.items():
            for m in messages:
                outcome = verify_record(self.verifier, Record(tp.topic, tp.partition, m.offset, m.key, m.value))
                if isinstance(outcome, Quarantined):
                    self.quarantine.send(outcome.record, outcome.rejection)
                yield outcome

    def commit(self) -> None:
        """Commit what was polled, once its quarantine copies are safe."""
        self.quarantine.flush()
        self._consumer.commit()

    def close(self) -> None:
        self.quarantine.close()
        self._consumer.close()
