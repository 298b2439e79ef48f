"""The event producer: spool first, then Kafka, in order, acknowledged.

`send` appends to the spool and returns; a drainer thread sends the spool to
`custody.events` (keyed by session id, so a session is one ordered stream) in
windows, waits for acks=all, and moves the spool cursor. If the broker fails,
the window is sent again from its first unacknowledged record when the broker
returns. `send` fails (SpoolError) only when the spool itself cannot take the
event, which is the proxy's signal to fail closed.

Known gap: if, while the broker flaps, a batch for a partition fails but a
later batch for the same partition in the same window succeeds, the later
events reach Kafka first; verifiers quarantine them as `seq_gap` and the
re-sent earlier events then leave a gap behind them. A small per-session
reorder window in the verifier would close it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from kafka.errors import KafkaError

from ingest import kafka
from ingest.events import SignedEvent
from ingest.settings import KafkaSettings
from ingest.spool import Spool

log = logging.getLogger(__name__)

WINDOW_BYTES = 4 << 20


@dataclass
class ProducerStats:
    appended: int = 0
    delivered: int = 0
    resent_windows: int = 0
    broker_up: bool = False


FLUSH_SECONDS = 15.0  # how long one window waits for the broker before it is sent again by a new producer


class EventProducer:
    def __init__(self, settings: KafkaSettings, spool: Spool, topic: str | None = None,
                 producer_options: dict | None = None, flush_seconds: float = FLUSH_SECONDS):
        """`producer_options`: kafka-python options over ingest.kafka's (the tests shorten its timeouts)."""
        self.settings, self.spool = settings, spool
        self.producer_options, self.flush_seconds = producer_options or {}, flush_seconds
        self.topic = topic or settings.topic("events")
        self.stats = ProducerStats()
        self._stop = threading.Event()
        self._drainer = threading.Thread(target=self._drain, name="custody-spool-drainer", daemon=True)
        self._drainer.start()

    def send(self, event: SignedEvent) -> int:
        """Spool `event` for delivery; returns its spool position (see `wait_delivered`)."""
        position = self.spool.append(event.session_id.encode(), event.value)
        self.stats.appended += 1
        return position

    def wait_delivered(self, position: int | None = None, timeout: float | None = 30.0) -> bool:
        """Block until the broker has acknowledged everything up to `position` (default: all sent so far)."""
        return self.spool.wait_acked(self.spool.end if position is None else position, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what can be delivered within `timeout`, then stop; the rest stays spooled for next time."""
        self.wait_delivered(timeout=timeout)
        self._stop.set()
        self._drainer.join(timeout=timeout)
        self.spool.close()

    # --- the drainer thread ----------------------------------------------------------------

    def _drain(self) -> None:
        client = None
        backoff = 0.2
        last_sync = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - last_sync >= self.spool.fsync_interval:
                self.spool.sync()
                last_sync = time.monotonic()
            if not self.spool.wait_for_data(self.spool.acked, timeout=self.spool.fsync_interval or 0.05):
                continue
            try:
                client = client or self._connect()
                self._send_window(client)
                backoff = 0.2
                self.stats.broker_up = True
            except Exception as exc:  # this thread is the only way out of the spool: it never ends on an error
                if isinstance(exc, (KafkaError, OSError)):
                    log.warning("broker unavailable (%s: %s); events stay spooled", type(exc).__name__, exc)
                else:
                    log.exception("spool drainer: delivery failed; events stay spooled and are sent again")
                self.stats.broker_up = False
                self.stats.resent_windows += 1
                _discard(client)
                client = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
        self.spool.sync()
        _discard(client, timeout=1)

    def _connect(self):
        kafka.ensure_topics(self.settings, ("events",))
        return kafka.producer(self.settings, **self.producer_options)

    def _send_window(self, client) -> None:
        futures = []
        for end, key, value in self.spool.read(self.spool.acked, WINDOW_BYTES):
            futures.append((end, client.send(self.topic, key=key, value=value)))
        client.flush(timeout=self.flush_seconds)
        acked, delivered = self.spool.acked, 0
        try:
            for end, future in futures:
                future.get(timeout=0)  # raises the delivery error of the first failed record
                acked, delivered = end, delivered + 1
        finally:
            if delivered:
                self.spool.ack(acked)
                self.stats.delivered += delivered


def _discard(client, timeout: float = 0) -> None:
    """Close a producer that failed, or None. kafka-python's close flushes first and raises the same timeout
    again when the broker still does not answer (seen after a 20 s broker hang: it killed the drainer, and nothing
    spooled was delivered until the proxy restarted); its batches are in the spool, so dropping it loses nothing."""
    if client is None:
        return
    try:
        client.close(timeout=timeout)
    except KafkaError as exc:
        log.info("a failed producer did not close cleanly (%s); dropped", exc)
