"""What each seal publishes besides itself, at least once: `custody.violations` and, with [soc] on, the OCSF topics.

A seal is durable before its documents are sent (a violation always points at sealed evidence), so a crash
between the two would lose them. So the ledger keeps two facts on disk, written only after the producer
confirmed (flushed, every send acknowledged) the documents of the seals they name:

* each state snapshot N records `published_through`: the last seal whose documents Kafka had acknowledged when seal
  N was written (sealing never waits for it: through a broker outage it only falls behind, and more is rendered
  again after a crash);
* a clean release or close writes the partition's `published.json` marker (after a last flush), so a handover
  does not re-publish its last seal's documents.

On resume, every seal after the larger of the two is re-rendered from what is durable: its segment's events (in
offset order, with the identity on their rows: the same `violations.from_event` and OCSF renderer as when it was
sealed), the quarantine violations its snapshot keeps (a rejected record has no row), and the OCSF renderer's state
from the snapshot of the seal before (snapshots are pruned only up to `published_through`). Ids are deterministic, so a seal whose
documents were in fact delivered just before a crash and are re-published is de-duplicated by the SOC.

The seal itself goes to `custody.seals` through the same outbox, first of its seal's documents, and is sent again
the same way (a witness skips a seal it has seen: same number, same hash). A send that expires (a broker hung past
the producer's delivery timeout) renews the worker's producer (`Publisher`) and sends again everything not yet
acknowledged, without a restart; what the broker had in fact appended before it hung comes twice, byte for byte
the same, and is de-duplicated like a re-delivery.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import pyarrow.parquet as pq
from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.producer.future import FutureRecordMetadata

from ingest import ocsf, violations
from ingest.events import open_event
from ingest.sessions import SessionIdentity
from ingest.settings import KafkaSettings
from ledger.durable import write_atomic
from ledger.seals import Seal, partition_name, seal_relpath
from ledger.segments import SCHEMA
from ledger.state import STATE_DIR, state_relpath

log = logging.getLogger(__name__)

FLUSH_SECONDS = 10.0
_IDENTITY = SessionIdentity._fields
_COLUMNS = ["kafka_offset", "leaf_index", "event", *_IDENTITY]
VIOLATION_KINDS = ["protocol_error", "policy_decision"]
"""The only kinds `violations.from_event` makes a violation of: with [soc] off, the only rows read again."""


class Document(NamedTuple):
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


def seal_document(settings: KafkaSettings, seal: Seal) -> Document:
    """The seal file on `custody.seals`, keyed by its partition's chain."""
    return Document(settings.topic("seals"), partition_name(seal.partition).encode(), seal.to_bytes())


def render(settings: KafkaSettings, pending: list[dict], renderer: ocsf.Renderer | None,
           evidence: ocsf.Evidence) -> list[Document]:
    """One seal's documents: its violations (custody's own shape), then, with a renderer, their OCSF findings and
    the activity the seal completed."""
    docs = [Document(settings.topic("violations"), (v["session_id"] or "").encode(), violations.encode(v))
            for v in pending]
    if renderer is not None:
        findings, activity = renderer.sealed(pending, evidence)
        for topic, items in (("violations.ocsf", findings), ("activity.ocsf", activity)):
            docs += [Document(settings.topic(topic), (d["metadata"].get("correlation_uid") or "").encode(),
                              ocsf.encode(d)) for d in items]
    return docs


def marker_path(ledger_dir: Path, partition: int) -> Path:
    return ledger_dir / STATE_DIR / partition_name(partition) / "published.json"


def published_through(ledger_dir: Path, partition: int, snapshot_says: int | None, last: int) -> int:
    """The last seal whose documents are known to be delivered: the snapshot's record or the marker, whichever is
    later (a snapshot from before either was kept: the last seal, as the ledger then assumed)."""
    if snapshot_says is None:
        return last
    try:
        marked = json.loads(marker_path(ledger_dir, partition).read_bytes())["through"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        marked = 0
    return min(last, max(snapshot_says, marked))


def rerender(ledger_dir: Path, settings: KafkaSettings, origin: str, partition: int, after: int, last: int,
             activity: bool | None) -> Iterator[tuple[int, list[Document]]]:
    """The documents of seals `after`+1 … `last`, rendered again from their segments and snapshots (`activity`
    None: [soc] off, custody.violations only)."""
    renderer: ocsf.Renderer | None = None
    for number in range(after + 1, last + 1):
        seal = Seal.load(ledger_dir / seal_relpath(partition, number))
        snapshot = _snapshot(ledger_dir, partition, number) or {}
        pending = list(snapshot.get("quarantine_violations") or [])
        if seal.segment is None and not pending:
            continue  # nothing sealed here, and the renderer's state did not move
        if activity is not None and renderer is None:
            before = _snapshot(ledger_dir, partition, number - 1) if number > 1 else {}
            if before is None:
                log.warning("partition %d: seals %d-%d: their OCSF documents cannot be rendered again (the snapshot of "
                            "seal %d is gone); custody.violations only", partition, number, last, number - 1)
                activity = None
            else:
                renderer = ocsf.Renderer(activity=activity, state=before.get("ocsf"))
        if seal.segment is not None:
            # with [soc] off only the rows that can be violations: a restart after a crash reads a few, not all
            rows = pq.read_table(ledger_dir / seal.segment["path"], schema=SCHEMA, columns=_COLUMNS,
                                 filters=None if renderer is not None else [("kind", "in", VIOLATION_KINDS)])
            columns = rows.sort_by("kafka_offset").to_pydict()
            for i, (leaf, value) in enumerate(zip(columns["leaf_index"], columns["event"])):
                event = open_event(value)
                identity = SessionIdentity(*(columns[f][i] for f in _IDENTITY))
                if (violation := violations.from_event(event, identity)) is not None:
                    pending.append(violation)
                if renderer is not None:
                    renderer.take(event, identity, leaf)
        evidence = ocsf.Evidence(origin, partition, number, seal.tree_size)
        yield number, render(settings, pending, renderer, evidence)


def _snapshot(ledger_dir: Path, partition: int, number: int) -> dict[str, Any] | None:
    try:
        return json.loads((ledger_dir / state_relpath(partition, number)).read_bytes())
    except FileNotFoundError:
        return None


class Sending(NamedTuple):
    future: FutureRecordMetadata
    generation: int
    """Which of the publisher's producers took it."""


class Publisher:
    """A worker's one producer of seals and documents, replaced by a new one once a send of it expired.

    kafka-python's idempotent producer (3.0.12) whose batches expired (a broker hung past delivery_timeout_ms)
    resets its producer id and from then on sends nothing, not even the InitProducerId it needs: sending again with
    it waits for ever (tests/test_ledger_broker_hang.py). A new producer is built with the old one's broker version,
    so that building it does not wait for a broker that may still hang.
    """

    def __init__(self, make: Callable[..., KafkaProducer]):
        self._make = make
        self.producer = make()
        self.generation = 0

    def send(self, doc: Document) -> Sending | None:
        """The document handed to the producer, or None if the producer could not take it within its max_block_ms
        (no metadata for a new producer while the broker is still away)."""
        try:
            future = self.producer.send(doc.topic, key=doc.key, value=doc.value, headers=list(doc.headers) or None)
            return Sending(future, self.generation)
        except KafkaTimeoutError as exc:
            log.warning("%s: not sent yet (%s)", doc.topic, exc)
            return None

    def renew(self) -> None:
        """A new producer in place of the current one."""
        old = self.producer
        self.producer = self._make(api_version=old.config["api_version"])
        self.generation += 1
        _discard(old)  # every outbox sends again what it held, with the new one
        log.warning("producer of seals and documents renewed after an expired send; what was not acknowledged is "
                    "sent again")

    def flush(self, timeout: float) -> None:
        self.producer.flush(timeout=timeout)

    def close(self) -> None:
        try:
            self.producer.flush(timeout=FLUSH_SECONDS)
        except KafkaError as exc:  # not confirmed: the next owner renders it again
            log.warning("documents not yet confirmed at close (%s)", exc)
            _discard(self.producer)
        else:
            self.producer.close(timeout=5)


def _discard(producer: KafkaProducer) -> None:
    """Close a producer that holds batches it will never send. kafka-python's close flushes first and, while a batch
    is pending, raises instead of closing (3.0.12), so its sender thread is stopped first: that fails the batches."""
    producer._sender.force_close()
    producer._sender.join(timeout=1)
    try:
        producer.close(timeout=0)
    except KafkaError as exc:
        log.warning("the replaced producer did not close (%s)", exc)


class Outbox:
    """One partition's seals and documents sent but not yet acknowledged, and the last seal all of whose are."""

    def __init__(self, publisher: Publisher, confirmed: int):
        self.publisher = publisher
        self.sent: list[tuple[int, Document, Sending | None]] = []  # (seal number, document, its send or None)
        self.confirmed = self.last = confirmed

    def send(self, number: int, docs: list[Document]) -> None:
        self.sent += self._send([(number, d, None) for d in docs])
        self.last = number

    def confirm(self, wait: bool = False) -> int:
        """The last seal whose documents (and every earlier seal's) Kafka acknowledged. A send that expired renews
        the producer, and whatever its producer did not acknowledge is sent again, to be confirmed by a later call.
        Only with `wait` (a release) does it flush first: a seal does not wait for the producer (by then the
        previous seal's sends are normally long acknowledged)."""
        if self.sent:
            if wait:
                try:
                    self.publisher.flush(timeout=FLUSH_SECONDS)
                except KafkaError as exc:  # a timeout: what is still in flight is confirmed by the next owner
                    log.warning("documents not yet confirmed (%s)", exc)
            waiting = [(number, doc, self._unless_failed(number, doc, sending)) for number, doc, sending in self.sent
                       if not (sending is not None and sending.future.is_done and sending.future.succeeded())]
            self.sent = self._send(waiting)
        self.confirmed = min(n for n, _, _ in self.sent) - 1 if self.sent else self.last
        return self.confirmed

    def _unless_failed(self, number: int, doc: Document, sending: Sending | None) -> Sending | None:
        """`sending` as it stands (in flight, or from a replaced producer: `_send` sends it again), or None if it
        failed after the producer's own retries: sent again, by a new producer if it expired."""
        if sending is None or not sending.future.is_done or sending.generation != self.publisher.generation:
            return sending
        log.warning("%s: a document of seal %d was not delivered (%s)", doc.topic, number, sending.future.exception)
        if isinstance(sending.future.exception, KafkaTimeoutError):  # expired: kafka-python's producer is stuck now
            self.publisher.renew()
        return None

    def _send(self, entries: list[tuple[int, Document, Sending | None]]) -> list[tuple[int, Document, Sending | None]]:
        """The entries, those not sent by the current producer handed to it, in order; after one it could not take,
        the rest wait for the next call (each try may block for the producer's max_block_ms)."""
        out, stuck = [], False
        for number, doc, sending in entries:
            if not stuck and (sending is None or sending.generation != self.publisher.generation):
                sending = self.publisher.send(doc)
                stuck = sending is None
            out.append((number, doc, sending))
        return out

    def mark(self, ledger_dir: Path, partition: int) -> None:
        """After a last confirm: the marker a clean handover leaves, so the next owner re-publishes nothing."""
        if self.confirm(wait=True) == self.last and self.last:
            write_atomic(marker_path(ledger_dir, partition), json.dumps({"through": self.last}).encode())
