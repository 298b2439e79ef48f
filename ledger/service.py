"""The ledger worker: consume `custody.events`, verify, append leaves, write segments, seal.

One seal chain per Kafka partition, so the ledger scales out as a consumer
group: a worker owns the partitions the group assigns it. On assignment it
resumes from the partition's last durable seal (not from the committed
offset: the seal is the truth) and seeks there; on revocation it drops what
it had not sealed, which the next owner re-reads. Per seal, in this order:
quarantine copies acknowledged → segment durable → state snapshot durable →
seal durable (the commit point) → seal published to `custody.seals` and
violations to `custody.violations` (and OCSF) →
offset committed (a courtesy for lag monitoring). A crash anywhere re-reads
from the last seal: nothing lost, nothing twice. A seal and its documents are
confirmed by the next seal's snapshot (or a clean release's marker); on resume
any later seal is published again and its documents rendered again from the
seal's files, at least once (ledger/documents.py). A send that fails renews the
producer and sends again what was not acknowledged, without a restart. A full
disk stops a partition's sealing the same way, in process: what it read since
its last seal is dropped, its records wait at the broker, and it resumes from
that seal once there is room (`_wait_for_space`).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
from functools import partial
from pathlib import Path

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from ingest import kafka, ocsf, violations
from ledger import documents
from ingest.consumer import Quarantined, Record, quarantine_headers, verify_record
from ingest.errors import CustodyError
from ingest.events import micros_to_datetime, now_micros
from ingest.heap import freeze_startup_heap
from ingest.keys import Keyring, KeyLookupError, PrivateKey, load_key_file
from ingest.sessions import NO_IDENTITY, SessionIdentity
from ingest.settings import KafkaSettings, KeySettings, SocSettings
from ingest.verify import EventVerifier, Rejection
from ledger.cosignatures import Collector
from ledger.witness_push import WitnessPusher
from ledger.durable import write_atomic
from ledger.merkle import SALT_SIZE, event_leaf_hashes, extension_proof
from ledger.rotation import chain_key
from ledger.seals import Seal, seal_record, seal_relpath, segment_relpath, sign_seal
from ledger.segments import SegmentBuilder, write_segment
from ledger.sessionmap import seal_field
from ledger.settings import LedgerSettings
from ledger.state import PartitionLock, PartitionState, prune_snapshots, recover, write_snapshot

log = logging.getLogger(__name__)

GROUP_ID = "custody-ledger"
GROUP_SESSION_MS = 15_000  # a dead worker's partitions move to the others after this long
MAX_POLL_RECORDS = 4096
PUBLISHER_OPTIONS = {"delivery_timeout_ms": 120_000}
"""The producer of seals and documents retries for 2 minutes (ingest.kafka's producers: 15 s). Its idempotent
retries ride out a broker hang that short exactly once; after a longer one its expired sends renew it
(documents.Publisher), and what the broker had appended before it hung comes twice (the same bytes)."""
COMMIT_TIMEOUT_MS = 5000
SPACE_CHECK_SECONDS = 2.0  # how often a partition stopped by a full disk looks for room again
"""The offset commit after a seal is a courtesy (a restart resumes from the seal): it must not hold sealing up for
the consumer's whole request timeout (30 s) when the broker has just come back from a hang."""


class LedgerConfigError(CustodyError):
    pass


class PartitionWriter:
    """One partition's open segment: verifies each record, builds rows and leaves, and seals them."""

    def __init__(self, ledger_dir: Path, settings: LedgerSettings, topic: str, state: PartitionState,
                 keyring: Keyring, key: PrivateKey):
        self.dir, self.settings, self.topic, self.state, self.key = ledger_dir, settings, topic, state, key
        self.verifier = EventVerifier(keyring, state.chains)
        self.ocsf: ocsf.Renderer | None = None  # [soc] on: OCSF documents, rendered after each seal
        self.outbox: documents.Outbox | None = None  # set by the service: its documents until confirmed
        self.last_sealed_at = time.monotonic()
        self._reset()

    def _reset(self) -> None:
        self.builder = SegmentBuilder(self.state.partition)
        self.leaves: list[bytes] = []
        self.first_offset = self.state.next_offset
        self.offset_reset_from: int | None = None  # the broker's offsets went back: where the old ones ended
        self.quarantined = 0
        self.violations: list[dict] = []
        self.opened_at: float | None = None
        self.time_range: tuple[int, int] | None = None
        self.touched: set[str] = set()  # sessions whose state the next seal changes

    def add(self, record: Record, salt: bytes) -> Quarantined | None:
        """Verify and take one record; a rejected one is returned for quarantine and never becomes a leaf."""
        outcome = verify_record(self.verifier, record)
        rejected = self.add_batch([record], salt, [outcome.rejection if isinstance(outcome, Quarantined)
                                                   else outcome.event])
        return rejected[0] if rejected else None

    def add_batch(self, records: list, salts: bytes, outcomes=None) -> list[Quarantined]:
        """Verify and take records of this partition in offset order (`salts`: SALT_SIZE bytes each); the
        rejected ones are returned for quarantine and never become leaves. A record is a `Record` or anything
        with its fields (kafka-python's ConsumerRecord: no copy per message).

        Signatures are checked by the verify threads while this thread decodes and builds rows
        (`EventVerifier.check_many`); each event is decoded once and hashed once (by the chain, whose digest
        is also the leaf's), and the leaves are hashed in one go.
        """
        if not records:
            return []
        if self.opened_at is None:
            self.opened_at = time.monotonic()
        if outcomes is None:
            outcomes = self.verifier.check_many((r.value, r.key) for r in records)
        rejected: list[Quarantined] = []
        identities, chains, builder = self.state.identities, self.state.chains.sessions, self.builder
        touched, ended = self.touched, self.state.ended
        first_leaf = self.state.tree.size + len(self.leaves)
        digests: list[bytes] = []
        taken_salts: list[bytes] = []
        first_ts = last_ts = None
        for i, (record, outcome) in enumerate(zip(records, outcomes)):
            if isinstance(outcome, Rejection):
                self.quarantined += 1
                if not isinstance(record, Record):
                    record = Record(record.topic, record.partition, record.offset, record.key, record.value)
                claimed = outcome.event
                self.violations.append(violations.from_quarantine(
                    record, outcome, identities.get(claimed.session_id) if claimed else None))
                rejected.append(Quarantined(record, outcome))
                continue
            e = outcome.envelope
            session_id, ts, kind = e["session_id"], e["ts"], e["kind"]
            if kind == "session_start":
                identity = identities[session_id] = SessionIdentity.from_session_start(e["body"])
            elif kind == "session_end":
                identity = identities.pop(session_id, NO_IDENTITY)
                ended.add(session_id)
            else:
                identity = identities.get(session_id, NO_IDENTITY)
            touched.add(session_id)
            if (violation := violations.from_event(outcome, identity)) is not None:
                self.violations.append(violation)
            if self.ocsf is not None:
                self.ocsf.take(outcome, identity, first_leaf + len(digests))
            event_hash = chains[session_id].last_hash  # hashed once, by the verifier's accept
            salt = salts[i * SALT_SIZE:(i + 1) * SALT_SIZE]
            builder.add(first_leaf + len(digests), record.offset, outcome, event_hash, salt, identity)
            digests.append(event_hash)
            taken_salts.append(salt)
            if first_ts is None:
                first_ts = last_ts = ts
            elif ts < first_ts:
                first_ts = ts
            elif ts > last_ts:
                last_ts = ts
        self.state.next_offset = records[-1].offset + 1
        if digests:
            self.leaves += event_leaf_hashes(b"".join(taken_salts), digests)
            first, last = self.time_range or (first_ts, last_ts)
            self.time_range = (min(first, first_ts), max(last, last_ts))
        return rejected

    def due(self, now: float) -> bool:
        """Roll over by events, bytes or age; with nothing new for the idle interval, seal anyway."""
        if self.opened_at is None:
            return now - self.last_sealed_at >= self.settings.idle_seal_seconds
        return (len(self.builder) >= self.settings.segment_max_events
                or self.builder.nbytes >= self.settings.segment_max_bytes
                or now - self.opened_at >= self.settings.segment_max_seconds)

    def seal(self) -> Seal:
        """Write the segment (if any rows), the state and the seal, durably and in that order."""
        state, number = self.state, self.state.next_seal_number
        segment = None
        if self.leaves:
            path = segment_relpath(state.partition, number)
            written = write_segment(self.builder.table(), self.dir / path)
            segment = {"path": path, "sha256": written.sha256.hex(), "bytes": written.size}
        proof = extension_proof(state.tree, self.leaves)
        first_leaf = state.tree.size
        state.tree.extend(self.leaves)
        for session_id in self.touched:
            state.session_map.put(session_id, state.session_state(session_id))
        record = seal_record(
            origin=self.settings.origin, partition=state.partition, number=number, key_id=self.key.key_id,
            sealed_at_us=now_micros(), previous=state.last_seal, segment=segment, first_leaf=first_leaf,
            leaf_count=len(self.leaves), time_range=self.time_range, topic=self.topic,
            first_offset=self.first_offset, next_offset=state.next_offset, quarantined=self.quarantined,
            tree_size=state.tree.size, root=state.tree.root(), sessions=seal_field(state.session_map),
            offset_reset_from=self.offset_reset_from)
        seal = sign_seal(record, self.key, proof)
        state.quarantine_violations = [v for v in self.violations if v["category"] == "quarantine"]
        write_snapshot(self.dir, state, number)
        state.quarantine_violations = []
        write_atomic(self.dir / seal_relpath(state.partition, number), seal.to_bytes())
        state.last_seal = seal
        prune_snapshots(self.dir, state, number)
        self.last_sealed_at = time.monotonic()
        self._reset()
        return seal


def quarantine_copy(topic: str, rejected: Quarantined) -> documents.Document:
    """A rejected record, unchanged, for `custody.quarantine`, its reason in the headers (as ingest.consumer's)."""
    return documents.Document(topic, rejected.record.key, rejected.record.value,
                              tuple(quarantine_headers(rejected.record, rejected.rejection)))


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, service: "LedgerService"):
        self.service = service

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        for tp in revoked:
            self.service.waiting_for_space.pop(tp.partition, None)  # its next owner finds the disk as it is
            self.service.release(tp.partition)

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            self.service.resume(tp)


def ledger_dir(settings: LedgerSettings) -> Path:
    if isinstance(settings.dir, str):
        raise LedgerConfigError(f"[ledger] dir {settings.dir!r}: only a local directory is supported so far")
    return Path(settings.dir)


class LedgerService:
    """A consumer-group member that seals the partitions it is assigned (or, pinned, the partitions it is given)."""

    def __init__(self, kafka_settings: KafkaSettings, settings: LedgerSettings, key: PrivateKey, keyring: Keyring,
                 group_id: str = GROUP_ID, instance_id: str | None = None, partitions: list[int] | None = None,
                 soc: SocSettings | None = None, publisher_options: dict | None = None):
        """`publisher_options`: kafka-python options of the producer of seals and documents over
        PUBLISHER_OPTIONS and ingest.kafka's (its timeouts, e.g.)."""
        self.kafka_settings, self.settings, self.key, self.keyring = kafka_settings, settings, key, keyring
        self.dir = ledger_dir(settings)
        self.topic = kafka_settings.topic("events")
        self.violations_topic = kafka_settings.topic("violations")
        self.soc = soc if soc is not None and soc.topics else None
        self.writers: dict[int, PartitionWriter] = {}
        self.locks: dict[int, PartitionLock] = {}
        self.waiting_for_space: dict[int, int] = {}  # partitions whose seal met a full disk: the bytes they wait for
        self._space_checked = 0.0
        kafka.ensure_topics(kafka_settings, ("events", "quarantine", "seals", "violations",
                                             *(self.soc.topics if self.soc else ())))
        self.quarantine_topic = kafka_settings.topic("quarantine")
        self.publisher = documents.Publisher(partial(kafka.producer, kafka_settings,
                                                     **{**PUBLISHER_OPTIONS, **(publisher_options or {})}))
        self.quarantined = documents.Outbox(self.publisher, 0)  # copies of rejected records, until acknowledged
        self.cosignatures = Collector(kafka_settings, self.dir, owned=lambda p: p in self.writers)  # witnesses' cosignatures, kept beside the seals
        self.pusher = WitnessPusher(self.dir, settings.witnesses) if settings.witnesses else None  # [[ledger.witness]]
        # check_crcs=False: kafka-python's CRC-32C is pure Python and would cost more than the signature check,
        # which (with the chain's SHA-256) already proves every byte; a corrupt record is quarantined, not lost.
        # A group member's session outlasts the dev broker's join and sync (3 s each): Tansu counts the session
        # from the JoinGroup, not the SyncGroup, and with kafka.consumer's 6 s a worker joining a busy group sent
        # its first heartbeat after 7 s, was expelled, rejoined, and the group rebalanced every 7 s for minutes
        # (tests/system, two CI runs). Pinned workers are in no group's rebalancing: the default is theirs.
        group = {"session_timeout_ms": GROUP_SESSION_MS} if partitions is None else {}
        self.consumer: KafkaConsumer = kafka.consumer(kafka_settings, group_id=group_id, group_instance_id=instance_id,
                                                      max_poll_records=MAX_POLL_RECORDS, check_crcs=False, **group)
        self.topic_id = None  # the events topic's id as the broker last named it: a new one is a new log
        if partitions is None:
            self.consumer.subscribe([self.topic], listener=_Rebalance(self))
        else:  # pinned: no group rebalancing, so a restart resumes at once
            assigned = [TopicPartition(self.topic, p) for p in partitions]
            self.consumer.assign(assigned)
            for tp in assigned:
                self.resume(tp)
        freeze_startup_heap()

    @classmethod
    def from_settings(cls, kafka_settings: KafkaSettings, settings: LedgerSettings, keys: KeySettings,
                      group_id: str = GROUP_ID, instance_id: str | None = None,
                      partitions: list[int] | None = None, soc: SocSettings | None = None) -> "LedgerService":
        """The service with the configured ledger key, refused early when the keyring would not trust its seals."""
        key = load_key_file(keys.ledger_key)
        keyring = Keyring.load(keys.keyring)
        try:
            keyring.key_for(key.key_id, micros_to_datetime(now_micros()), role="ledger")
        except KeyLookupError as exc:
            raise LedgerConfigError(f"{keys.ledger_key}: {exc}; the ledger's seals would not verify") from None
        return cls(kafka_settings, settings, key, keyring, group_id, instance_id, partitions, soc)

    @property
    def sealed_leaves(self) -> int:
        return sum(w.state.tree.size for w in self.writers.values())

    # --- partition ownership ----------------------------------------------------------------

    def resume(self, tp: TopicPartition) -> None:
        """Take over a partition from its last durable seal."""
        lock = PartitionLock(self.dir, tp.partition)
        lock.acquire()
        self.locks[tp.partition] = lock
        state = recover(self.dir, tp.partition)
        if state.last_seal and chain_key(state.last_seal.record) != self.key.key_id:
            lock.release()
            raise LedgerConfigError(f"partition {tp.partition}: its seal chain is signed by key "
                                    f"{chain_key(state.last_seal.record)}, not {self.key.key_id}; hand it over with a "
                                    f"witnessed rotation seal (custody ledger rotate-key)")
        writer = self.writers[tp.partition] = PartitionWriter(self.dir, self.settings, self.topic, state,
                                                               self.keyring, self.key)
        if self.soc is not None:
            writer.ocsf = ocsf.Renderer(activity=self.soc.activity, state=state.ocsf)
        self.consumer.seek(tp, state.next_offset)
        last = state.last_seal.number if state.last_seal else 0
        through = documents.published_through(self.dir, tp.partition, state.published_through, last)
        writer.outbox = documents.Outbox(self.publisher, through)
        # the seals after `through` may have been made durable just before a crash and never published, nor their
        # documents: sent again, each seal before its documents
        rendered = dict(documents.rerender(self.dir, self.kafka_settings, self.settings.origin, tp.partition,
                                           through, last, self.soc.activity if self.soc else None))
        for number in range(through + 1, last + 1):
            seal = state.last_seal if number == last else Seal.load(self.dir / seal_relpath(tp.partition, number))
            writer.outbox.send(number, [documents.seal_document(self.kafka_settings, seal), *rendered.get(number, ())])
        if state.last_seal and self.pusher is not None:
            self.pusher.submit(state.last_seal)
        writer.outbox.last = last
        if through < last:
            log.info("partition %d: documents of seals %d-%d published again", tp.partition, through + 1, last)
        log.info("partition %d: resuming after seal %s at offset %d", tp.partition,
                 state.last_seal.number if state.last_seal else "(none)", state.next_offset)

    def release(self, partition: int) -> None:
        """Give a partition up, dropping what was not sealed: its next owner re-reads it from the last seal."""
        writer = self.writers.pop(partition, None)
        if writer is not None and writer.outbox is not None:
            try:
                writer.outbox.mark(self.dir, partition)
            except OSError as exc:  # a full disk: the next owner publishes again what it cannot tell was delivered
                log.warning("partition %d: handover marker not written (%s)", partition, exc.strerror)
        lock = self.locks.pop(partition, None)
        if lock:
            lock.release()

    # --- the loop ---------------------------------------------------------------------------

    def step(self, timeout: float = 0.2) -> None:
        """One poll, then every seal that is due."""
        self._notice_new_log()
        self._resume_where_space()
        batches = self.consumer.poll(timeout_ms=int(timeout * 1000))
        for tp, messages in batches.items():
            writer = self.writers[tp.partition]
            if messages[0].offset < writer.state.next_offset and not self._offsets_went_back(writer, tp,
                                                                                            messages[0].offset):
                continue  # read again at the next step, once what came from the old log is sealed
            rejects = writer.add_batch(messages, os.urandom(SALT_SIZE * len(messages)))
            self.quarantined.send(writer.state.next_seal_number, [quarantine_copy(self.quarantine_topic, r)
                                                                  for r in rejects])
        now = time.monotonic()
        for writer in list(self.writers.values()):
            writer.outbox.confirm()  # a failed send is noticed now, not at the next seal (an idle one: an hour on)
            if writer.due(now):
                self._seal(writer)
        self.cosignatures.poll()

    def _notice_new_log(self) -> None:
        """A broker that lost its log (no persistent storage, restarted) or a recreated topic gives the events
        topic a new id, and its offsets start again below where the ledger reads: read from its beginning (without
        this the ledger would wait at its old offset and then skip the new log's first events), so that
        `_offsets_went_back` sees the first of them."""
        current = self.consumer._client.cluster.topic_id(self.topic)  # noqa: SLF001 - kafka-python keeps it there
        if current is None or current == self.topic_id:
            return
        if self.topic_id is not None:
            log.error("%s: the broker names it with a new topic id (%s, was %s): a new log; reading it from its "
                      "beginning", self.topic, current, self.topic_id)
            assigned = [TopicPartition(self.topic, p) for p in self.writers]
            self.consumer.seek_to_beginning(*assigned)
        self.topic_id = current

    def _offsets_went_back(self, writer: PartitionWriter, tp: TopicPartition, offset: int) -> bool:
        """The broker's log of a partition restarted below what was read from it: a broker without persistent
        storage came back empty, or the topic was recreated. What was read from the old log is sealed first; the
        next seal covers the new log's offsets and says, under its signature, where the old ones ended, and
        `custody verify` names it. Events the broker had acknowledged and lost cannot be sealed: the sessions
        they belonged to show gaps (seq_gap), and their proxies' spools hold only what was not acknowledged."""
        old = writer.state.next_offset
        if writer.opened_at is not None:
            self._seal(writer)
            if writer.opened_at is not None:  # its quarantine copies are not safe yet: the new records wait
                self.consumer.seek(tp, offset)
                return False
        log.error("partition %d: the broker's offsets went back from %d to %d (its log was lost or recreated): "
                  "what it had acknowledged from offset %d on is not in the ledger unless delivered again; "
                  "sealing goes on from offset %d", writer.state.partition, old, offset, old, offset)
        writer.first_offset, writer.offset_reset_from = offset, old
        return True

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                self.step()
            self.seal_open()
        finally:
            self.close()

    def seal_open(self) -> None:
        """Seal every partition's open segment now, without waiting for it to be due (stopping; benchmarks)."""
        for writer in list(self.writers.values()):
            if writer.opened_at is not None:
                self._seal(writer)

    def _rejects_safe(self) -> bool:
        """Whether Kafka acknowledged the quarantine copy of every record rejected so far (after a flush), which a
        seal needs first: its offset range covers its rejects too. Through a broker hang, seals wait step by step."""
        if self.quarantined.sent:
            self.quarantined.confirm(wait=True)
        return not self.quarantined.sent

    def _seal(self, writer: PartitionWriter) -> None:
        if not self._rejects_safe():
            return  # sealed by a later step
        pending = writer.violations
        if writer.ocsf is not None:  # kept in the seal's state snapshot: a restart renders on from here
            writer.state.ocsf = writer.ocsf.snapshot()
        writer.state.published_through = writer.outbox.confirm()  # the earlier seals' documents, kept in this seal
        try:
            seal = writer.seal()
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self._wait_for_space(writer, exc)
            return
        # after the seal: a violation always points at sealed evidence; OCSF the same moment (ingest/ocsf.py)
        evidence = ocsf.Evidence(self.settings.origin, seal.partition, seal.number, seal.tree_size)
        writer.outbox.send(seal.number, [documents.seal_document(self.kafka_settings, seal),
                                         *documents.render(self.kafka_settings, pending, writer.ocsf, evidence)])
        if self.pusher is not None:
            self.pusher.submit(seal)
        tp = TopicPartition(self.topic, writer.state.partition)
        try:
            self.consumer.commit({tp: OffsetAndMetadata(seal.next_offset, "", -1)}, timeout_ms=COMMIT_TIMEOUT_MS)
        except KafkaError as exc:  # the seal, not the committed offset, is where a restart resumes
            log.info("partition %d: offset commit failed (%s); the seal stands", tp.partition, exc)
        log.info("partition %d: seal %d, %d leaves, offset %d", tp.partition, seal.number, seal.tree_size,
                 seal.next_offset)

    def _wait_for_space(self, writer: PartitionWriter, exc: OSError) -> None:
        """The ledger's disk is full: this partition stops sealing (its records paused at the broker) and what was
        read since its last seal is dropped, to be read again once there is room; the seal on disk is where it
        resumes, as after a crash, so nothing is lost and nothing is sealed twice. The process lives on (its other
        partitions, its group membership), and `_resume_where_space` retries every SPACE_CHECK_SECONDS."""
        partition, last = writer.state.partition, writer.state.next_seal_number - 1
        needed = 2 * writer.builder.nbytes + (1 << 20)
        log.error("partition %d: no space left on the ledger's disk %s (%s): sealing stops after seal %d; what was "
                  "read since is read again from offset %d once %d bytes are free", partition, self.dir,
                  exc.strerror, last, writer.state.next_offset, needed)
        tp = TopicPartition(self.topic, partition)
        self.consumer.pause(tp)
        writer.outbox = None  # its handover marker cannot be written now; a resume publishes again what is unsure
        self.release(partition)
        self.waiting_for_space[partition] = needed

    def _resume_where_space(self) -> None:
        now = time.monotonic()
        if not self.waiting_for_space or now < self._space_checked + SPACE_CHECK_SECONDS:
            return
        self._space_checked = now
        free = shutil.disk_usage(self.dir).free
        for partition, needed in list(self.waiting_for_space.items()):
            if free >= needed:
                del self.waiting_for_space[partition]
                tp = TopicPartition(self.topic, partition)
                self.resume(tp)
                self.consumer.resume(tp)
                log.info("partition %d: %d bytes free on the ledger's disk again; sealing resumes", partition, free)

    def close(self) -> None:
        for partition in list(self.writers):
            self.release(partition)
        self.publisher.close()
        self.cosignatures.close()
        if self.pusher is not None:
            self.pusher.close()
        self.consumer.close(autocommit=False)
