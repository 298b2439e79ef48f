"""Witness cosignatures, stored beside the seals they cosign.

A witness that reads `custody.seals` publishes each cosignature it makes to
`custody.cosignatures` (key `p<partition>`, value JSON: origin, partition,
seal number, tree size, the signature line). The ledger collects them into

    <ledger dir>/cosignatures/p<partition>/<NNNNNN>.<witness key ID hex>.sig

(one signature line per file, seal NNNNNN's checkpoint is what it signs), so a
bundle can carry them and `custody verify` can check them. The ledger does not
trust them: they are verified offline, against witness keys the auditor trusts.
A stored line is never replaced by another for the same seal and witness.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Callable

from kafka import KafkaConsumer, TopicPartition

from ingest import kafka
from ingest.settings import KafkaSettings
from ledger import checkpoint
from ledger.durable import write_atomic
from ledger.seals import partition_name

log = logging.getLogger(__name__)

COSIGNATURES_DIR = "cosignatures"
COSIGNATURES_TOPIC = "cosignatures"
_FILE = re.compile(r"(\d{6,})\.([0-9a-f]{8})\.sig")


def cosignature_relpath(partition: int, number: int, key_id: bytes) -> str:
    return f"{COSIGNATURES_DIR}/{partition_name(partition)}/{number:06d}.{key_id.hex()}.sig"


def store(ledger_dir: Path, partition: int, number: int, line: str) -> bool:
    """Keep a cosignature line for seal `number`; False if one of that witness key is already kept."""
    cosignature = checkpoint.Cosignature.parse_line(line)
    path = ledger_dir / cosignature_relpath(partition, number, cosignature.key_id)
    if path.exists():
        return False
    write_atomic(path, (cosignature.line + "\n").encode())
    return True


def load(ledger_dir: Path, partition: int, number: int) -> list[str]:
    """The cosignature lines kept for seal `number` of `partition`."""
    directory = ledger_dir / COSIGNATURES_DIR / partition_name(partition)
    if not directory.is_dir():
        return []
    return [p.read_text(encoding="utf-8").rstrip("\n") for p in sorted(directory.glob(f"{number:06d}.*.sig"))
            if _FILE.fullmatch(p.name)]


def message(origin: str, partition: int, number: int, tree_size: int, line: str) -> bytes:
    return json.dumps({"origin": origin, "partition": partition, "seal": number, "tree_size": tree_size,
                       "cosignature": line}, sort_keys=True).encode()


class Collector:
    """Reads `custody.cosignatures` from the start (storing is idempotent) and keeps what it reads."""

    def __init__(self, settings: KafkaSettings, ledger_dir: Path, owned: Callable[[int], bool] = lambda _: True):
        self.dir, self.owned = ledger_dir, owned
        kafka.ensure_topics(settings, (COSIGNATURES_TOPIC,))
        self.consumer: KafkaConsumer = kafka.consumer(settings, group_id=None)
        topic = settings.topic(COSIGNATURES_TOPIC)
        partitions = self.consumer.partitions_for_topic(topic) or {0}
        self.consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        self.stored = 0

    def poll(self, timeout: float = 0.0) -> int:
        """Store what has arrived; returns how many new cosignatures were kept."""
        kept = 0
        for messages in self.consumer.poll(timeout_ms=int(timeout * 1000)).values():
            for m in messages:
                try:
                    value: dict[str, Any] = json.loads(m.value)
                    if not self.owned(int(value["partition"])):
                        continue  # another worker's partition: it keeps those
                    kept += store(self.dir, int(value["partition"]), int(value["seal"]), value["cosignature"])
                except (ValueError, KeyError, TypeError, checkpoint.NoteError) as exc:
                    log.warning("custody.cosignatures offset %d: not a cosignature (%s)", m.offset, exc)
        self.stored += kept
        return kept

    def close(self) -> None:
        self.consumer.close(autocommit=False)
