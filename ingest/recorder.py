"""The recorder: takes events from a proxy's data path and signs, spools and
sends them in a process of its own.

Signing, Avro encoding, the spool and the Kafka client cost far more CPU per
event than relaying a frame does; in the proxy's process they competed with the
relay for the interpreter lock, which put them on the relay's critical path
after all. So a proxy's `SessionRecording.record(kind, body)` only appends the
body to a local batch, handed to a child process (`_recorder_main`) once per
turn of the proxy's event loop: one pickle and one pipe write for all the
events of that turn, not one per frame. The child holds the session chains,
the proxy key, the spool and the producer.

Load slows sessions down, it never ends them. The events handed over but not
yet recorded by the child are the recorder's backlog, bounded in events
(`max_queue`) and in frame bytes (`max_queue_bytes`, for bulk transfers whose
few events are large). Above either bound the recorder tells its pressure
listeners to stop reading from the sessions it is behind on (`Pressure.HEAVY`:
those that filled the most of the bounds, events and bytes, since the last
time; the relay slows, TCP pushes back); above twice that, from every session
(`Pressure.ALL`); below half of it, to read again (`Pressure.NONE`).

Adaptive batching. The child takes everything that waits when it wakes up and
folds each session's consecutive Frames events into one event (contract v2:
each message keeps its own direction and its offset in µs after the event's
`ts`), bounded in messages and bytes. At low load one event waits and is
written at once; under load, events per second stop growing while frames per
second go on growing, and so signing, Kafka and the ledger keep up. When the
child takes in many events at once and the machine has no idle CPU, it also
lets the next round gather for LOADED_ROUND (`_pace`): its cost is mostly per
event, and the CPU it saves is the relay's and the database's.

`record` raises `RecorderUnavailable`, and the proxy must not relay the frame
(fail closed), only when recording is impossible: the recorder has failed
(spool full or unwritable; a full spool recovers once the broker drains it),
the recorder process is gone (looked at when a hand-over batch begins, so
within `HAND_OVER_DELAY` of its death) or stuck (its backlog passed
`HARD_LIMIT` times `max_queue`), or an earlier event of the same session could
not be recorded.

Window of loss: events handed over but not yet spooled when the proxy's
process or machine dies were relayed but are lost. Back-pressure bounds that
window; `RecorderStats` reports how large it actually got, in events, frames
and bytes. When only the proxy's process dies (however: SIGKILL too), the
recorder notices at once (a watchdog thread on multiprocessing's parent
sentinel, not only when it is idle), spools what reached it and hands the spool
to Kafka within `ORPHAN_BOUND` seconds, then exits; events still waiting after
that are lost and logged. `close(timeout)` is bounded the same way by its
`timeout`. The recorder ignores SIGINT and SIGTERM: signals to the proxy's
process group must not cut it short, the proxy decides when it stops.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from collections.abc import Callable
from typing import Any

from nacl.signing import SigningKey

from ingest.batching import MAX_BYTES as FOLD_MAX_BYTES
from ingest.batching import Item, fold
from ingest.errors import CustodyError
from ingest.events import SessionChain, now_micros, uuid7
from ingest.cpu_load import CpuLoad
from ingest.handoff import HandOffClosed, Inbox, Outbox
from ingest.heap import freeze_startup_heap
from ingest.keys import PrivateKey
from ingest.producer import EventProducer
from ingest.settings import KafkaSettings
from ingest.spool import Spool, SpoolError, SpoolFull

log = logging.getLogger(__name__)


class RecorderUnavailable(CustodyError):
    """The event cannot be accepted for recording: do not relay the frame."""


HARD_LIMIT = 10  # a backlog this many times max_queue means the recorder is stuck, not busy
MAX_BATCH = 1000  # events handed over in one piece at most
HAND_OVER_DELAY = 0.002  # seconds an event waits in the proxy's batch before it goes to the recorder process
LOADED_BATCH = 32  # events taken in at once that mean the recorder is under load
LOADED_ROUND = 0.02  # seconds a fold round lasts at least under load (`_pace`)
PACE_BYTES = 256 << 10  # ... unless this much already waits in the pipe
ACK_INTERVAL = 0.01  # seconds between two progress replies to the proxy under load
MAX_FOLD = 20_000  # events the child takes in at once before recording them
ORPHAN_BOUND = 10.0  # seconds the recorder takes, once its proxy's process is gone, to spool and deliver what it holds
FINISH_SLICE = 500  # events recorded at a time while finishing, so that the bound is kept to within one slice
PROXY_LOST = "proxy_lost"  # the SessionEnd reason the recorder writes for the sessions of a proxy that died


@dataclass
class RecorderStats:
    """What the recorder did; `max_backlog_*` is the largest window of loss seen (events, frames, bytes)."""

    queued: int = 0
    recorded: int = 0
    refused: int = 0
    throttled: int = 0  # times the recorder asked the proxy to stop reading
    max_backlog: int = 0
    max_backlog_frames: int = 0
    max_backlog_bytes: int = 0
    frames: int = 0
    frame_bytes: int = 0
    events_written: int = 0  # events after folding: what was signed and sent

    @property
    def max_depth(self) -> int:
        return self.max_backlog


@dataclass(frozen=True)
class SpoolOptions:
    dir: Path
    max_bytes: int = 1 << 30
    fsync_interval: float = 0.005


class Pressure(enum.IntEnum):
    NONE = 0  # read again
    HEAVY = 1  # stop reading from the sessions that recorded the most lately
    ALL = 2  # stop reading from every session


PressureListener = Callable[[Pressure], None]


@dataclass(slots=True)
class _Tally:
    """What the recorder saw of one open session: for the SessionEnd it writes itself if the proxy dies."""

    started: int  # µs: the session's first event handed over
    client_bytes: int = 0
    server_bytes: int = 0
    client_messages: int = 0
    server_messages: int = 0

    def add(self, body: dict[str, Any], count: int, size: int) -> None:
        if body["direction"] == "client":
            self.client_messages += count
            self.client_bytes += size
        elif body["direction"] == "server":
            self.server_messages += count
            self.server_bytes += size
        else:  # already mixed: each message says its direction
            for message in body["messages"]:
                self.add({"direction": message["direction"]}, 1, len(message["data"]))

    def lost(self, now: int) -> dict[str, Any]:
        """The SessionEnd body: counters from the frames recorded (the proxy's own counters died with it)."""
        return {"reason": PROXY_LOST, "duration_us": max(0, now - self.started),
                "client_bytes": self.client_bytes, "server_bytes": self.server_bytes,
                "client_messages": self.client_messages, "server_messages": self.server_messages}


def _weight(kind: str, body: dict[str, Any]) -> tuple[int, int]:
    """Frames and bytes of one event, for the window-of-loss figures."""
    if kind != "frames":
        return 0, 0
    messages = body["messages"]
    return len(messages), sum(len(message["data"]) for message in messages)


class Recorder:
    """The proxy-side handle of the recorder process."""

    def __init__(self, kafka: KafkaSettings, spool: SpoolOptions, key: PrivateKey, producer_name: str,
                 max_queue: int = 10_000, max_queue_bytes: int = 64 << 20, cpus: frozenset[int] | None = None):
        """`cpus`: the CPUs the recorder process (and every thread of it) may run on (Linux); None: those of this
        process."""
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads and an event loop
        self.max_queue, self.max_queue_bytes = max_queue, max_queue_bytes  # the backlog's bounds, events and bytes
        self._event_share, self._byte_share = 1 / max_queue, 1 / max_queue_bytes  # of the bounds, one event, one byte
        self.stats = RecorderStats()
        inbox, outbox = context.Pipe(duplex=False)
        self._requests = Outbox(outbox)  # events, flushes, the stop: in order, written by the thread that hands over
        self._replies = context.Queue()
        self._stopping = context.Event()
        self._stop_within = context.Value("d", ORPHAN_BOUND, lock=False)  # the bound of a `close`, for the child
        self._failure: str | None = None
        self._ready = threading.Event()  # the child has its spool and producer (`wait_ready`)
        self._sessions: weakref.WeakValueDictionary[str, SessionRecording] = weakref.WeakValueDictionary()
        self._flushes: dict[int, threading.Event] = {}
        self._flush_results: dict[int, bool] = {}
        self._tokens = itertools.count()
        self._lock = threading.Lock()
        self._batch: list[tuple[str, str, dict[str, Any], int]] = []
        self._acked = (0, 0, 0)  # events, frames, bytes the child has recorded
        self._pressure_listeners: list[PressureListener] = []
        self._pressure = Pressure.NONE
        self._process = context.Process(
            target=_recorder_main, name="custody-recorder", daemon=True,
            args=(inbox, self._replies, self._stopping, self._stop_within, kafka, spool, key.key_id, bytes(key.signing_key),
                  producer_name, cpus))
        self._process.start()
        inbox.close()  # the child's now: once it dies, a hand-over fails (HandOffClosed) rather than wait for it
        self._listener = threading.Thread(target=self._listen, name="custody-recorder-replies", daemon=True)
        self._listener.start()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Return once the recorder process has opened its spool; raise RecorderUnavailable if it died or did not
        start within `timeout`. A proxy listens only then: what it relayed to a recorder still starting would be
        lost with one that died starting (16 events in one run of the fault tests)."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if not self._process.is_alive():
                raise RecorderUnavailable(f"the recorder process exited with code {self._process.exitcode} "
                                          "while starting")
            if time.monotonic() > deadline:
                raise RecorderUnavailable(f"the recorder process did not start within {timeout:g} s")

    def open_session(self, session_id: str | None = None) -> "SessionRecording":
        session = SessionRecording(self, session_id or uuid7())
        self._sessions[session.session_id] = session
        return session

    def on_pressure(self, listener: PressureListener) -> None:
        """Call `listener(level)` when the proxy should stop reading from some or all sessions, or read again.

        Called from the thread that recorded (HEAVY, ALL) or from the recorder's reply thread (NONE).
        """
        self._pressure_listeners.append(listener)

    @property
    def backlog(self) -> int:
        """Events handed over (or about to be) that the child has not recorded yet."""
        return self.stats.queued - self._acked[0]

    def _put(self, session: "SessionRecording", kind: str, body: dict[str, Any]) -> None:
        if self._failure is not None:
            self.stats.refused += 1
            raise RecorderUnavailable(self._failure)
        if not self._batch and not self._process.is_alive():  # per hand-over: a waitpid per event was 5% of the relay
            self.stats.refused += 1
            raise RecorderUnavailable(f"recorder process exited with code {self._process.exitcode}")
        stats = self.stats
        if stats.queued - self._acked[0] >= self.max_queue * HARD_LIMIT:
            stats.refused += 1
            raise RecorderUnavailable(f"the recorder is stuck: {self.backlog} events wait, none recorded lately")
        frames, size = _weight(kind, body)
        session.recent += self._event_share + size * self._byte_share
        with self._lock:
            self._batch.append((session.session_id, kind, body, now_micros()))
            first = len(self._batch) == 1
            full = len(self._batch) >= MAX_BATCH
        stats.queued += 1
        stats.frames += frames
        stats.frame_bytes += size
        self._note_backlog()
        if full:
            self._hand_over()
        elif first:
            self._hand_over_soon()

    def _hand_over_soon(self) -> None:
        """On an event loop: HAND_OVER_DELAY later, with all that was recorded meanwhile; elsewhere: now.

        The relay does not wait for it (record-before-relay means accepted for
        recording). One pickle and one pipe write per batch, not per loop turn:
        under load a batch holds many turns' frames.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._hand_over()
        else:
            loop.call_later(HAND_OVER_DELAY, self._hand_over)

    def _hand_over(self) -> None:
        with self._lock:
            batch, self._batch = self._batch, []
        if batch:
            self._send(("events", batch))

    def _send(self, request: tuple, wait: float | None = None) -> None:
        """Hand `request` to the child; with `wait`, wait up to that long until the pipe holds it, on any thread
        (flush and close: a caller on the loop's thread cannot let the loop write it meanwhile)."""
        try:
            self._requests.send(request, timeout=wait)
        except HandOffClosed as exc:
            self._failure = f"recorder process is gone: {exc}"

    @property
    def backlog_bytes(self) -> int:
        """Frame bytes handed over that the child has not recorded yet: what a fast bulk transfer piles up."""
        return self.stats.frame_bytes - self._acked[2]

    def _note_backlog(self) -> None:
        stats, (events, frames, size) = self.stats, self._acked
        backlog, backlog_bytes = stats.queued - events, stats.frame_bytes - size
        if backlog > stats.max_backlog:
            stats.max_backlog = backlog
            stats.max_backlog_frames = max(stats.max_backlog_frames, stats.frames - frames)
        stats.max_backlog_bytes = max(stats.max_backlog_bytes, backlog_bytes)
        fill = max(backlog / self.max_queue, backlog_bytes / self.max_queue_bytes)
        level = Pressure.ALL if fill >= 2 else Pressure.HEAVY if fill >= 1 else Pressure.NONE
        if level > self._pressure:
            self._pressure = level
            stats.throttled += 1
            self._tell_pressure(level)

    def _tell_pressure(self, level: Pressure) -> None:
        for listener in self._pressure_listeners:
            listener(level)

    def _listen(self) -> None:
        """Replies from the child: failures, recoveries, lost sessions, flushes, progress."""
        while (reply := self._replies.get()) is not None:
            what = reply[0]
            if what == "recorded":
                self._acked = reply[1]
                self.stats.recorded, self.stats.events_written = reply[1][0], reply[2]
                if self._pressure and self.backlog <= self.max_queue // 2 \
                        and self.backlog_bytes <= self.max_queue_bytes // 2:
                    self._pressure = Pressure.NONE
                    self._tell_pressure(Pressure.NONE)
            elif what == "failed":
                self._failure = reply[1]
            elif what == "ready":
                self._ready.set()
            elif what == "recovered":
                self._failure = None
            elif what == "broken":
                if (session := self._sessions.get(reply[1])) is not None:
                    session.broken = True
            elif what == "flushed":
                self._flush_results[reply[1]] = reply[2]
                self._flushes.pop(reply[1]).set()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every event recorded so far is spooled and delivered (tests, shutdown)."""
        self._hand_over()
        token, done = next(self._tokens), threading.Event()
        self._flushes[token] = done
        self._send(("flush", token, timeout), wait=timeout)
        return done.wait(timeout + 5) and self._flush_results.pop(token, False)

    def close(self, timeout: float = 10.0) -> None:
        """Spool what was handed over and deliver what can be, within `timeout` (the recorder process is killed
        a few seconds after that at the latest); what is spooled but not delivered stays in the spool for next time."""
        self._hand_over()
        if self._process.is_alive():
            self._stop_within.value = timeout
            self._stopping.set()  # seen between two batches, however long the backlog
            self._send(("stop", timeout), wait=timeout)  # behind all that was handed over
            self._process.join(timeout + 5)
        if self._process.is_alive():
            self._process.kill()  # it ignores SIGTERM
            self._process.join()
        self._requests.close()
        self._replies.put(None)
        self._listener.join(timeout=5)


class SessionRecording:
    """One session's handle: every event goes through here, in order."""

    def __init__(self, recorder: Recorder, session_id: str):
        self.recorder, self.session_id = recorder, session_id
        self.broken = False
        # The share of the backlog's bounds this session filled since the proxy last looked, events and bytes
        # together: whom to slow down first (a bulk transfer's few large events fill the bytes bound).
        self.recent = 0.0

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
        # A folded event never takes more than a sixteenth of the spool, so folding can never make one event too
        # large for an empty spool (which would read as "full" and then at once as recovered).
        self.fold_bytes = max(1, min(FOLD_MAX_BYTES, spool.max_bytes // 16))
        self.chains: dict[str, SessionChain] = {}
        self.tallies: dict[str, _Tally] = {}  # open sessions, as far as handed over
        self.broken: set[str] = set()
        self.failed_full = False
        # Signed events that met a full spool. They were handed over, so the proxy may have relayed their frames
        # already: they wait here, in order, and go to the spool first once it has room again (the proxy refuses
        # new frames meanwhile: "failed" ... "recovered"). Bounded by what was in flight when the spool filled.
        self.held: collections.deque = collections.deque()
        self.held_sessions: set[str] = set()  # sessions told to end because an event of theirs is held
        self.recorded = (0, 0, 0)  # events, frames, bytes as handed over by the proxy
        self.acked, self.acked_at = self.recorded, 0.0
        self.written = 0  # events after folding

    def events(self, batch: list[Item]) -> None:
        """One or more hand-overs: fold what waits together, record it, tell the proxy how far it got."""
        events, frames, size = self.recorded
        tallies = self.tallies
        for session_id, kind, body, ts in batch:
            count, weight = _weight(kind, body)
            frames, size = frames + count, size + weight
            tally = tallies.get(session_id)
            if tally is None:
                tally = tallies[session_id] = _Tally(ts)
            if count:
                tally.add(body, count, weight)
        for session_id, kind, body, ts in fold(batch, max_bytes=self.fold_bytes):
            self.event(session_id, kind, body, ts)
        self.recorded = (events + len(batch), frames, size)
        self.acknowledge(force=False)

    def acknowledge(self, force: bool = True) -> None:
        """Tell the proxy how far recording got: at most every ACK_INTERVAL under load (each reply wakes a
        thread in the proxy, which takes the interpreter lock from its relay), and whenever it is idle."""
        now = time.monotonic()
        if self.recorded == self.acked or (not force and now - self.acked_at < ACK_INTERVAL):
            return
        self.acked, self.acked_at = self.recorded, now
        self.replies.put(("recorded", self.recorded, self.written))

    def event(self, session_id: str, kind: str, body: dict[str, Any], ts: int) -> None:
        if session_id in self.broken:  # what follows an event that could not be recorded is not recorded either
            if kind == "session_end":
                self.broken.discard(session_id)
            return
        chain = self.chains.get(session_id)
        if chain is None:
            chain = self.chains[session_id] = SessionChain(self.key, self.producer_name, session_id)
        signed = None
        try:
            signed = chain.event(kind, body, ts_micros=ts)
            if self.held:
                self.held.append(signed)  # behind the events that wait for room, never ahead of them
            else:
                self.producer.send(signed)
                self.written += 1
        except SpoolFull as exc:
            self.held.append(signed)
            if not self.failed_full:
                self.failed_full = True
                log.error("recorder: spool full (%s); new frames are refused, %s and what follows it wait for room",
                          exc, kind)
                self.replies.put(("failed", f"spool full: {exc}"))
            if session_id not in self.held_sessions:  # the proxy ends this session (its own events are kept)
                self.held_sessions.add(session_id)
                self.replies.put(("broken", session_id))
        except SpoolError as exc:
            self.fail(session_id, f"spool failed: {exc}")
        except Exception as exc:  # a bug must not kill the recorder silently
            log.exception("recording session %s failed", session_id)
            self.fail(session_id, f"recording failed: {type(exc).__name__}: {exc}")
        if kind == "session_end":
            self.chains.pop(session_id, None)
            self.tallies.pop(session_id, None)
            self.broken.discard(session_id)

    def end_lost_sessions(self) -> None:
        """The proxy's process died: each session it had open gets the SessionEnd the proxy could not write
        (reason `proxy_lost`), after everything of it that was handed over."""
        now, lost = now_micros(), list(self.chains)
        for session_id in lost:
            tally = self.tallies.get(session_id) or _Tally(now)
            self.event(session_id, "session_end", tally.lost(now), now)
        if lost:
            log.warning("recorder: the proxy's process is gone; %d open sessions ended as %s", len(lost), PROXY_LOST)

    def fail(self, session_id: str, reason: str) -> None:
        log.error("session %s: an event was relayed but could not be recorded (%s); ending the session",
                  session_id, reason)
        self.broken.add(session_id)
        self.chains.pop(session_id, None)
        self.tallies.pop(session_id, None)
        self.replies.put(("broken", session_id))
        self.replies.put(("failed", reason))

    def release_held(self) -> None:
        """Spool the events held back by a full spool, oldest first, as far as there is room."""
        while self.held:
            try:
                self.producer.send(self.held[0])
            except SpoolFull:
                return
            except SpoolError as exc:
                log.error("recorder: %d held events could not be spooled (%s); they are lost", len(self.held), exc)
                self.held.clear()
                return
            self.held.popleft()
            self.written += 1

    def idle(self) -> None:
        """A full spool recovers once the broker drained it (and what it held back is spooled); other spool
        failures do not."""
        spool = self.producer.spool
        self.release_held()
        if self.failed_full and not self.held and spool.pending_bytes < spool.max_bytes * 0.9:
            self.failed_full = False
            self.held_sessions.clear()
            self.replies.put(("recovered",))


def _take_waiting(requests, batch: list[Item]) -> tuple[list[Item], tuple | None]:
    """Add to `batch` the events that already wait behind it; also the first other request met, if any."""
    while len(batch) < MAX_FOLD:
        try:
            request = requests.get_nowait()
        except queue.Empty:
            break
        if request[0] != "events":
            return batch, request
        batch += request[1]
    return batch, None


def _pace(requests: Inbox, started: float) -> None:
    """When the recorder is loaded and the machine has no CPU to spare, let the next round gather more: a
    session's frames of one round fold into one event, and most of the recorder's cost is per event (signing,
    hashing, encoding, the spool, Kafka), not per frame, so the relay and the database get the CPU saved.
    The relay never waits for this; the recording does, within LOADED_ROUND (the window of loss, which
    back-pressure bounds as before). A bulk transfer fills the pipe at once and is not paused. With CPU to
    spare it does not pace: longer rounds measurably slowed a lone session's round trips (SELECT 1 p50
    +50 µs on 2 cores), and there they save nothing another process needed."""
    deadline = started + LOADED_ROUND
    while (left := deadline - time.monotonic()) > 0 and requests.waiting_bytes() < PACE_BYTES:
        time.sleep(min(left, 0.002))


def _watch_parent(sentinel, orphaned: threading.Event) -> None:
    """Set `orphaned` the moment the proxy's process is gone, however busy the recorder is."""
    multiprocessing.connection.wait([sentinel])
    orphaned.set()


class _NoReplies:
    """Where replies go once nobody reads them."""

    def put(self, *_: Any) -> None:
        pass


def _wait_delivered(child: _Child, timeout: float, *stop_waiting: Any) -> bool:
    """Wait until everything spooled is delivered, at most `timeout`, and no longer once one of the events is set."""
    deadline = time.monotonic() + timeout
    while not child.producer.wait_delivered(timeout=min(0.5, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline or any(e.is_set() for e in stop_waiting):
            return False
    return True


def _finish(child: _Child, requests, bound: float, *, orphaned: bool) -> None:
    """Spool what was handed over and hand the spool to Kafka, within `bound` seconds; then the caller exits."""
    deadline = time.monotonic() + bound
    if orphaned:  # nobody reads the replies: never wait for their pipe at exit
        child.replies.cancel_join_thread()
        child.replies = _NoReplies()
        watchdog = threading.Timer(bound + 5, os._exit, (1,))  # whatever hangs (a disk, Kafka), the process ends
        watchdog.daemon = True  # and when nothing hangs, the exit does not wait for the watchdog
        watchdog.start()
    left = False
    while True:
        if time.monotonic() >= deadline:
            left = True
            break
        try:
            request = requests.get(timeout=0.05)
        except queue.Empty:
            break  # what the proxy handed over (before its "stop", or before it died) has all been read
        if request[0] != "events":
            continue
        batch = request[1]
        for i in range(0, len(batch), FINISH_SLICE):
            if time.monotonic() >= deadline:
                left = True
                log.error("recorder: %d events handed over were not spooled within %.0fs of stopping; they are lost",
                          len(batch) - i, bound)
                break
            child.events(batch[i:i + FINISH_SLICE])
        if left:
            break
    if left:
        log.error("recorder: stopped after %.0fs with events still waiting; they are lost", bound)
    elif orphaned:  # a session whose events were lost stays open in the evidence: never ended as if complete
        child.end_lost_sessions()
    child.release_held()
    if child.held:
        log.error("recorder: %d events held back by a full spool were not spooled before stopping; they are lost",
                  len(child.held))
    child.producer.close(timeout=max(0.5, (deadline - time.monotonic()) / 2))  # it waits, then joins its drainer
    child.acknowledge()
    child.idle()


def _recorder_main(inbox: Connection, replies, stopping, stop_within, kafka: KafkaSettings, spool: SpoolOptions, key_id: str, seed: bytes,
                   producer_name: str, cpus: frozenset[int] | None) -> None:
    if cpus is not None:  # first: the threads started below (the producer's, the parent watch) inherit it
        os.sched_setaffinity(0, cpus)
    for signum in (signal.SIGINT, signal.SIGTERM):  # the proxy decides when recording stops (`stop`), or its death
        signal.signal(signum, signal.SIG_IGN)
    requests = Inbox(inbox)
    child = _Child(replies, kafka, spool, PrivateKey(key_id, SigningKey(seed)), producer_name)
    freeze_startup_heap()
    replies.put(("ready",))
    orphaned, machine = threading.Event(), CpuLoad()
    threading.Thread(target=_watch_parent, args=(multiprocessing.parent_process().sentinel, orphaned),
                     name="custody-recorder-parent", daemon=True).start()
    while True:
        if orphaned.is_set():  # the proxy's process died: what reached us is spooled and delivered, then stop
            _finish(child, requests, ORPHAN_BOUND, orphaned=True)
            return
        if stopping.is_set():  # the proxy is closing: what it handed over before its "stop" is ours to spool
            _finish(child, requests, stop_within.value, orphaned=False)
            return
        try:
            request = requests.get(timeout=ACK_INTERVAL if child.recorded != child.acked else _Child.RECOVERY_CHECK)
        except queue.Empty:
            child.acknowledge()
            child.idle()
            continue
        if request[0] == "events":
            batch, request = _take_waiting(requests, request[1])
            started = time.monotonic()
            child.events(batch)
            if len(batch) >= LOADED_BATCH and machine.saturated():
                _pace(requests, started)
            if request is None:
                continue
        what = request[0]
        if what == "flush":
            _, token, timeout = request
            child.acknowledge()
            replies.put(("flushed", token, _wait_delivered(child, timeout, orphaned, stopping)))
        elif what == "stop":
            _finish(child, requests, request[1], orphaned=orphaned.is_set())
            return
