"""The proxy's side of `custody.approvals`: publish a held statement's request, wait for a valid decision.

The proxy is the enforcement point, so it trusts nothing a decision document
claims in clear: it opens the sealed part with its own key, verifies the
reviewer's OIDC token itself (`TokenVerifier`), and applies `check_reviewer`
(never your own request, only as a member of an approver group) against the
request it keeps in memory, not the copy on the topic. A decision that
fails is logged and ignored; the hold goes on until a valid one or the timeout.

One consumer per proxy process, group-less, reading every partition from
the end as it was at start-up: decisions are only for holds of this process,
which did not exist before it started. It polls on its own thread (token
verification may fetch a JWKS) and hands outcomes to the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from ingest.kafka import consumer, ensure_topics, producer
from ingest.keys import PrivateKey
from ingest.settings import KafkaSettings
from proxy.approvals import (
    ApprovalError,
    ApprovalOutcome,
    ApprovalRequest,
    DecisionDocument,
    check_reviewer,
    decode,
    encode,
    open_decision,
)
from proxy.identity import AuthenticationError, TokenVerifier

log = logging.getLogger(__name__)

TOPIC = "approvals"
PUBLISH_TIMEOUT = 10.0


@dataclass
class _Waiting:
    request: ApprovalRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class ApprovalGateway:
    def __init__(self, kafka: KafkaSettings, verifier: TokenVerifier, key: PrivateKey) -> None:
        self.kafka, self.verifier, self.key = kafka, verifier, key
        self.topic = kafka.topic(TOPIC)
        self._waiting: dict[str, _Waiting] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._producer: KafkaProducer | None = None
        self._consumer: KafkaConsumer | None = None
        self._thread = threading.Thread(target=self._run, name="custody-approvals", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        """Topic, producer, and a consumer positioned at the current end (retried: Kafka may be down at start)."""
        ensure_topics(self.kafka, (TOPIC,))
        self._producer = producer(self.kafka)
        self._consumer = consumer(self.kafka, group_id=None, isolation_level="read_uncommitted")
        partitions = [TopicPartition(self.topic, p) for p in sorted(self._consumer.partitions_for_topic(self.topic))]
        self._consumer.assign(partitions)
        self._consumer.seek_to_end(*partitions)
        for partition in partitions:
            self._consumer.position(partition)  # fix "the end" now, so a decision published later is seen
        self._ready.set()

    async def decide(self, request: ApprovalRequest) -> ApprovalOutcome:
        """Publish the request and wait for a valid decision; "expired" when none comes in time."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(request, loop, loop.create_future())
        with self._lock:
            self._waiting[request.request_id] = waiting
        try:
            await asyncio.to_thread(self._publish, request)
            return await asyncio.wait_for(waiting.future, request.timeout)
        except asyncio.TimeoutError:
            return ApprovalOutcome(request.request_id, "expired", None, "")
        except KafkaError as exc:
            log.error("approval request %s could not be published: %s", request.request_id, exc)
            return ApprovalOutcome(request.request_id, "deny", None, f"the approval request could not be published: {exc}")
        finally:
            with self._lock:
                self._waiting.pop(request.request_id, None)

    def _publish(self, request: ApprovalRequest) -> None:
        if not self._ready.wait(PUBLISH_TIMEOUT) or self._producer is None:
            raise KafkaError(f"{self.topic} is not reachable")
        self._producer.send(self.topic, key=request.request_id.encode(), value=encode(request.document())) \
            .get(timeout=PUBLISH_TIMEOUT)

    def _run(self) -> None:
        while not self._stop.is_set() and not self._ready.is_set():
            try:
                self._connect()
            except (KafkaError, OSError) as exc:
                log.warning("approvals: cannot reach %s yet, retrying: %s", self.topic, exc)
                self._stop.wait(2.0)
        while not self._stop.is_set():
            assert self._consumer is not None
            try:
                batches = self._consumer.poll(timeout_ms=200)
            except KafkaError as exc:
                log.warning("approvals: poll failed, retrying: %s", exc)
                self._stop.wait(1.0)
                continue
            for batch in batches.values():
                for record in batch:
                    self._consider(record.value)

    def _consider(self, value: bytes) -> None:
        try:
            document = decode(value)
        except ApprovalError:
            return
        if not isinstance(document, DecisionDocument):
            return
        with self._lock:
            waiting = self._waiting.get(document.request_id)
        if waiting is None:
            return  # another proxy's hold, or one that has ended
        try:
            outcome = self._verify(waiting.request, document)
        except (ApprovalError, AuthenticationError) as exc:
            log.warning("approvals: decision on %s ignored: %s", document.request_id, exc)
            return
        waiting.loop.call_soon_threadsafe(_resolve, waiting.future, outcome)

    def _verify(self, request: ApprovalRequest, document: DecisionDocument) -> ApprovalOutcome:
        sealed = open_decision(document, self.key.signing_key)
        reviewer = self.verifier.verify(sealed.token)
        check_reviewer(request, reviewer.subject, reviewer.groups)
        return ApprovalOutcome(request.request_id, sealed.decision, reviewer.to_avro(), sealed.reason)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        if self._consumer is not None:
            self._consumer.close()
        if self._producer is not None:
            self._producer.close(5)


def _resolve(future: asyncio.Future, outcome: ApprovalOutcome) -> None:
    if not future.done():
        future.set_result(outcome)
