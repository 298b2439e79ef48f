"""The recorder: takes events from a proxy's data path without blocking it, and
signs and spools them in order on a background thread.

A proxy calls `SessionRecording.record(kind, body)` for each frame *before*
relaying it. The call only puts the body on a bounded queue (no encoding, no
signing on the relay's critical path). If the queue is full, or the recorder
has failed (spool full or unwritable), `record` raises `RecorderUnavailable`
and the proxy must not relay the frame: it fails closed.

Window of loss: events still on the queue when the proxy process dies were
relayed but not yet spooled. The queue bound (`max_queue`) bounds that window;
`RecorderStats.max_depth` measures how deep it actually gets.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

from custody.errors import CustodyError
from ingest.events import SessionChain, now_micros
from ingest.keys import PrivateKey
from ingest.producer import EventProducer
from ingest.spool import SpoolError, SpoolFull

log = logging.getLogger(__name__)


class RecorderUnavailable(CustodyError):
    """The event cannot be accepted for recording: do not relay the frame."""


@dataclass
class RecorderStats:
    queued: int = 0
    recorded: int = 0
    max_depth: int = 0
    refused: int = 0


@dataclass(frozen=True)
class _Flush:
    """A queue item that signals when the recorder thread reaches it."""

    done: threading.Event


_STOP = object()


class Recorder:
    def __init__(self, producer: EventProducer, key: PrivateKey, producer_name: str, max_queue: int = 10_000):
        self.producer, self.key, self.producer_name = producer, key, producer_name
        self.stats = RecorderStats()
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._failure: str | None = None
        self._thread = threading.Thread(target=self._run, name="custody-recorder", daemon=True)
        self._thread.start()

    def open_session(self, session_id: str | None = None) -> "SessionRecording":
        return SessionRecording(self, SessionChain(self.key, self.producer_name, session_id))

    def _put(self, session: "SessionRecording", kind: str, body: dict[str, Any]) -> None:
        if self._failure is not None and not self._recovered():
            self.stats.refused += 1
            raise RecorderUnavailable(self._failure)
        try:
            self._queue.put_nowait((session, kind, body, now_micros()))
        except queue.Full:
            self.stats.refused += 1
            raise RecorderUnavailable(f"recorder queue full ({self._queue.maxsize} events waiting)") from None
        self.stats.queued += 1
        self.stats.max_depth = max(self.stats.max_depth, self._queue.qsize())

    def _recovered(self) -> bool:
        """A full spool recovers once the broker drained it; other spool failures do not."""
        spool = self.producer.spool
        if self._failure and self._failure.startswith("spool full") and spool.pending_bytes < spool.max_bytes * 0.9:
            self._failure = None
            return True
        return False

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if isinstance(item, _Flush):
                item.done.set()
                continue
            session, kind, body, ts = item
            if session.broken:
                continue
            try:
                self.producer.send(session.chain.event(kind, body, ts_micros=ts))
                self.stats.recorded += 1
            except SpoolFull as exc:
                self._fail(session, f"spool full: {exc}")
            except SpoolError as exc:
                self._fail(session, f"spool failed: {exc}")
            except Exception as exc:  # a bug must not kill the recorder thread silently
                log.exception("recording session %s failed", session.session_id)
                self._fail(session, f"recording failed: {type(exc).__name__}: {exc}")

    def _fail(self, session: "SessionRecording", reason: str) -> None:
        log.error("session %s: an event was relayed but could not be recorded (%s); ending the session",
                  session.session_id, reason)
        session.broken = True
        self._failure = reason

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every event queued so far is spooled and delivered (tests, shutdown)."""
        done = threading.Event()
        self._queue.put(_Flush(done))
        return done.wait(timeout) and self.producer.wait_delivered(timeout=timeout)

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self.producer.close(timeout)


class SessionRecording:
    """One session's handle: every event goes through here, in order."""

    def __init__(self, recorder: Recorder, chain: SessionChain):
        self.recorder, self.chain = recorder, chain
        self.broken = False

    @property
    def session_id(self) -> str:
        return self.chain.session_id

    def record(self, kind: str, body: dict[str, Any]) -> None:
        """Accept one event for recording, or raise RecorderUnavailable (do not relay)."""
        if self.broken:
            raise RecorderUnavailable(f"session {self.session_id}: an earlier event could not be recorded")
        self.recorder._put(self, kind, body)
