"""The recorder: takes events from a proxy's data path and signs, spools and
sends them in a process of its own.

Signing, Avro encoding, the spool and the Kafka client cost far more CPU per
event than relaying a frame does; in the proxy's process they competed with the
relay for the interpreter lock, which put them on the relay's critical path
after all. So a proxy's `SessionRecording.record(kind, body)` only puts the
body on a bounded inter-process queue, and a child process (`_recorder_main`)
holds the session chains, the proxy key, the spool and the producer.

`record` raises `RecorderUnavailable`, and the proxy must not relay the frame
(fail closed), when the queue is full, when the recorder has failed (spool full
or unwritable; a full spool recovers once the broker drains it), or when an
earlier event of the same session could not be recorded (that session ends).

Window of loss: events still on the queue when the proxy's process or machine
dies were relayed but not yet spooled. The queue bound (`max_queue`) bounds that
window; `RecorderStats.max_depth` measures how deep it actually got. When only
the proxy's process dies, the recorder still spools and delivers what reached it,
then exits.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import queue
import signal
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from ingest.errors import CustodyError
from ingest.events import SessionChain, now_micros, uuid7
from ingest.keys import PrivateKey
from ingest.producer import EventProducer
from ingest.settings import KafkaSettings
from ingest.spool import Spool, SpoolError, SpoolFull

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
class SpoolOptions:
    dir: Path
    max_bytes: int = 1 << 30
    fsync_interval: float = 0.005


class Recorder:
    """The proxy-side handle of the recorder process."""

    def __init__(self, kafka: KafkaSettings, spool: SpoolOptions, key: PrivateKey, producer_name: str,
                 max_queue: int = 10_000):
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads and an event loop
        self.max_queue = max_queue
        self.stats = RecorderStats()
        self._requests = context.Queue(maxsize=max_queue)
        self._replies = context.Queue()
        self._failure: str | None = None
        self._sessions: weakref.WeakValueDictionary[str, SessionRecording] = weakref.WeakValueDictionary()
        self._flushes: dict[int, threading.Event] = {}
        self._flush_results: dict[int, bool] = {}
        self._tokens = itertools.count()
        self._process = context.Process(
            target=_recorder_main, name="custody-recorder", daemon=True,
            args=(self._requests, self._replies, kafka, spool, key.key_id, bytes(key.signing_key), producer_name))
        self._process.start()
        self._listener = threading.Thread(target=self._listen, name="custody-recorder-replies", daemon=True)
        self._listener.start()

    def open_session(self, session_id: str | None = None) -> "SessionRecording":
        session = SessionRecording(self, session_id or uuid7())
        self._sessions[session.session_id] = session
        return session

    def _put(self, session: "SessionRecording", kind: str, body: dict[str, Any]) -> None:
        if self._failure is not None:
            self.stats.refused += 1
            raise RecorderUnavailable(self._failure)
        if not self._process.is_alive():
            self.stats.refused += 1
            raise RecorderUnavailable(f"recorder process exited with code {self._process.exitcode}")
        try:
            self._requests.put_nowait(("event", session.session_id, kind, body, now_micros()))
        except queue.Full:
            self.stats.refused += 1
            raise RecorderUnavailable(f"recorder queue full ({self.max_queue} events waiting)") from None
        self.stats.queued += 1
        self.stats.max_depth = max(self.stats.max_depth, self._requests.qsize())

    def _listen(self) -> None:
        """Replies from the child: failures, recoveries, lost sessions, flushes, counts."""
        while (reply := self._replies.get()) is not None:
            what = reply[0]
            if what == "failed":
                self._failure = reply[1]
            elif what == "recovered":
                self._failure = None
            elif what == "broken":
                if (session := self._sessions.get(reply[1])) is not None:
                    session.broken = True
            elif what == "recorded":
                self.stats.recorded = reply[1]
            elif what == "flushed":
                self._flush_results[reply[1]] = reply[2]
                self._flushes.pop(reply[1]).set()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every event queued so far is spooled and delivered (tests, shutdown)."""
        token, done = next(self._tokens), threading.Event()
        self._flushes[token] = done
        self._requests.put(("flush", token, timeout))
        return done.wait(timeout + 5) and self._flush_results.pop(token, False)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what can be delivered within `timeout`; the rest stays in the spool for next time."""
        if self._process.is_alive():
            self._requests.put(("stop", timeout))
            self._process.join(timeout + 10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()
        self._replies.put(None)
        self._listener.join(timeout=5)


class SessionRecording:
    """One session's handle: every event goes through here, in order."""

    def __init__(self, recorder: Recorder, session_id: str):
        self.recorder, self.session_id = recorder, session_id
        self.broken = False

    def record(self, kind: str, body: dict[str, Any]) -> None:
        """Accept one event for recording, or raise RecorderUnavailable (do not relay)."""
        if self.broken:
            raise RecorderUnavailable(f"session {self.session_id}: an earlier event could not be recorded")
        self.recorder._put(self, kind, body)


# --- the recorder process ----------------------------------------------------------------------


class _Child:
    """Sessions' chains, the key, the spool and the producer, inside the recorder process."""

    RECOVERY_CHECK = 0.5

    def __init__(self, replies, kafka: KafkaSettings, spool: SpoolOptions, key: PrivateKey, producer_name: str):
        self.replies, self.key, self.producer_name = replies, key, producer_name
        self.producer = EventProducer(kafka, Spool(spool.dir, spool.max_bytes, spool.fsync_interval))
        self.chains: dict[str, SessionChain] = {}
        self.broken: set[str] = set()
        self.failed_full = False
        self.recorded = 0

    def event(self, session_id: str, kind: str, body: dict[str, Any], ts: int) -> None:
        if session_id in self.broken:
            return
        chain = self.chains.get(session_id)
        if chain is None:
            chain = self.chains[session_id] = SessionChain(self.key, self.producer_name, session_id)
        try:
            self.producer.send(chain.event(kind, body, ts_micros=ts))
            self.recorded += 1
        except SpoolFull as exc:
            self.failed_full = True
            self.fail(session_id, f"spool full: {exc}")
        except SpoolError as exc:
            self.fail(session_id, f"spool failed: {exc}")
        except Exception as exc:  # a bug must not kill the recorder silently
            log.exception("recording session %s failed", session_id)
            self.fail(session_id, f"recording failed: {type(exc).__name__}: {exc}")
        if kind == "session_end":
            self.chains.pop(session_id, None)
            self.broken.discard(session_id)

    def fail(self, session_id: str, reason: str) -> None:
        log.error("session %s: an event was relayed but could not be recorded (%s); ending the session",
                  session_id, reason)
        self.broken.add(session_id)
        self.chains.pop(session_id, None)
        self.replies.put(("broken", session_id))
        self.replies.put(("failed", reason))

    def idle(self) -> None:
        """A full spool recovers once the broker drained it; other spool failures do not."""
        spool = self.producer.spool
        if self.failed_full and spool.pending_bytes < spool.max_bytes * 0.9:
            self.failed_full = False
            self.replies.put(("recovered",))
        self.replies.put(("recorded", self.recorded))


def _recorder_main(requests, replies, kafka: KafkaSettings, spool: SpoolOptions, key_id: str, seed: bytes,
                   producer_name: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the proxy decides when recording stops (`stop`)
    child = _Child(replies, kafka, spool, PrivateKey(key_id, SigningKey(seed)), producer_name)
    parent = multiprocessing.parent_process()
    while True:
        try:
            request = requests.get(timeout=_Child.RECOVERY_CHECK)
        except queue.Empty:
            if not parent.is_alive():  # the proxy's process died: what reached us is delivered, then stop
                request = ("stop", 10.0)
            else:
                child.idle()
                continue
        what = request[0]
        if what == "event":
            child.event(*request[1:])
        elif what == "flush":
            _, token, timeout = request
            replies.put(("flushed", token, child.producer.wait_delivered(timeout=timeout)))
        elif what == "stop":
            child.producer.close(timeout=request[1])
            child.idle()
            return
