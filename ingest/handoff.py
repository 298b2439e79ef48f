"""The pipe from a proxy to its recorder process: length-prefixed pickles, written by the proxy's own thread.

`multiprocessing.Queue` writes through a feeder thread: each `put` takes a lock
and wakes that thread (`Condition.notify`), which then takes the interpreter
lock from the relay to pickle and write. py-spy put the two at ~12 % of the
relay's samples under pgbench. Here the thread that hands over (the event
loop's, once per batch) pickles and writes to a non-blocking pipe itself; what
the pipe cannot take at once waits in memory and the loop writes it when the
pipe has room. So the relay never blocks on a busy recorder; what waits here is
part of the recorder's backlog, which its back-pressure already bounds. A
caller without an event loop (synchronous use) writes and waits, and so does one
that gives a timeout (flush, close).

The reading side (`Inbox`) keeps `queue.Queue`'s `get`/`get_nowait` so the
recorder's loop reads as it did.
"""

from __future__ import annotations

import array
import asyncio
import collections
import fcntl
import os
import pickle
import queue
import select
import struct
import termios
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

HEADER = struct.Struct("!Q")  # the length of the pickle that follows
PIPE_BYTES = 1 << 20  # asked of the kernel for the pipe (Linux's default limit for a user); fewer waits for room
READ_BYTES = 1 << 20


class HandOffClosed(Exception):
    """The recorder process closed its end of the pipe (it died): nothing more can be handed over."""


def _widen(fd: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:  # a lower /proc/sys/fs/pipe-max-size: the default 64 KiB works, with more waits
        pass


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Outbox:
    """The proxy's end: `send` one message at a time, in order, from any thread."""

    def __init__(self, end: Connection):
        self._end = end  # kept: the Connection closes its descriptor when collected
        self._fd = end.fileno()
        os.set_blocking(self._fd, False)
        _widen(self._fd)
        self._pending: collections.deque[memoryview] = collections.deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None  # whose writer drains what waits
        self.closed: str | None = None

    def send(self, message: Any, timeout: float | None = None) -> bool:
        """Hand `message` over. On an event loop's thread and without `timeout` this never blocks (the loop
        writes what the pipe cannot take yet); otherwise it waits until the pipe holds the message and everything
        before it, at most `timeout` (False: some still waits). Raises HandOffClosed if the reader is gone."""
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        loop = _running_loop() if timeout is None else None
        with self._lock:
            if self.closed is not None:
                raise HandOffClosed(self.closed)
            self._pending.append(memoryview(HEADER.pack(len(data)) + data))
            if loop is not None:
                self._write()
                if self._pending and self._loop is None:
                    loop.add_writer(self._fd, self._on_writable)
                    self._loop = loop
                return True
        return self.wait_written(timeout)

    def wait_written(self, timeout: float | None = None) -> bool:
        """Block until everything sent is in the pipe (or `timeout` passed: False). Raises HandOffClosed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self.closed is not None:
                    raise HandOffClosed(self.closed)
                self._write()
                if not self._pending:
                    return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            select.select([], [self._fd], [], left)

    def _on_writable(self) -> None:
        """The loop's writer: the pipe has room again."""
        with self._lock:
            try:
                self._write()
            except HandOffClosed:
                pass  # `closed` says so to the next `send`
            if not self._pending and self._loop is not None:
                self._loop.remove_writer(self._fd)
                self._loop = None

    def _write(self) -> None:
        """As much of what waits as the pipe takes now (the lock is held)."""
        pending = self._pending
        try:
            while pending:
                written = os.write(self._fd, pending[0])
                if written == len(pending[0]):
                    pending.popleft()
                else:
                    pending[0] = pending[0][written:]
        except BlockingIOError:
            return
        except OSError as exc:  # EPIPE: the recorder process is gone
            self.closed = f"the recorder's end of the hand-off pipe is closed ({exc.strerror or exc})"
            pending.clear()
            raise HandOffClosed(self.closed) from None

    def close(self) -> None:
        with self._lock:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._loop.remove_writer, self._fd)
            self._loop = None
            self.closed = self.closed or "the hand-off pipe was closed by the proxy"
            self._pending.clear()
        self._end.close()


class Inbox:
    """The recorder's end: `get` messages in the order they were sent."""

    def __init__(self, end: Connection):
        self._end = end
        self._fd = end.fileno()
        self._buffer = bytearray()
        self._messages: collections.deque[Any] = collections.deque()
        self.ended = False  # the writer is gone (the proxy's process closed or died)

    def get(self, timeout: float | None = None) -> Any:
        """The next message; queue.Empty if none came within `timeout` (at once when the writer is gone)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._messages:
            if self.ended:
                if timeout:  # a caller polling with a timeout must not spin on an ended pipe
                    time.sleep(timeout)
                raise queue.Empty
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._fd], [], [], left)[0]:
                raise queue.Empty
            self._read()
        return self._messages.popleft()

    def get_nowait(self) -> Any:
        return self.get(timeout=0)

    def waiting_bytes(self) -> int:
        """Bytes sent but not yet taken by `get` (in the pipe, or read and not yet whole messages)."""
        available = array.array("i", [0])
        fcntl.ioctl(self._fd, termios.FIONREAD, available)
        return available[0] + len(self._buffer)

    def _read(self) -> None:
        chunk = os.read(self._fd, READ_BYTES)
        if not chunk:
            self.ended = True
            return
        buffer = self._buffer
        buffer += chunk
        start, size = 0, len(buffer)
        with memoryview(buffer) as view:
            while size - start >= HEADER.size:
                (length,) = HEADER.unpack_from(view, start)
                end = start + HEADER.size + length
                if end > size:
                    break
                self._messages.append(pickle.loads(view[start + HEADER.size:end]))
                start = end
        del buffer[:start]
