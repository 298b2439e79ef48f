"""The local spool: an append-only write-ahead log of Kafka records.

Every event is appended here before it goes to the broker, and a drainer sends
the log to Kafka in order, persisting how far the broker has acknowledged. So
when the broker is unreachable nothing is lost and per-session order is kept:
the log simply grows until the broker returns (up to `max_bytes`, after which
appends fail and the proxy fails closed). After a crash, whatever was appended
but not acknowledged is sent again; the ledger drops those re-deliveries as
duplicates (same session, seq and bytes).

Files: `<first offset>.log` segments of records framed as
`u32 length | u32 crc32 | u16 key length | key | value`, and `cursor`, the
acknowledged offset. Offsets are byte positions in the concatenated log.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Iterator

from ingest.errors import CustodyError

SEGMENT_BYTES = 64 * 1024 * 1024
CURSOR_INTERVAL = 0.5


class SpoolError(CustodyError):
    """The spool cannot take an event: callers must fail closed."""


class SpoolFull(SpoolError):
    pass


def _write_failure(directory: Path, code: int | None, reason: str) -> SpoolError:
    """A full disk (or quota) is a full spool, which recovers once there is room (the recorder holds what
    met it and spools it first); any other write error fails the session that met it."""
    if code in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFull(f"spool {directory}: no space left on its disk ({reason})")
    return SpoolError(f"spool {directory}: write failed: {reason}")


def _frame(key: bytes, value: bytes) -> bytes:
    payload_len = 2 + len(key) + len(value)
    head = struct.pack(">H", len(key))
    crc = zlib.crc32(value, zlib.crc32(key, zlib.crc32(head)))
    return struct.pack(">II", payload_len, crc) + head + key + value


class Spool:
    """Thread-safe appends from producers; one drainer reads in order and acknowledges."""

    def __init__(self, directory: Path, max_bytes: int = 1 << 30, fsync_interval: float = 0.005,
                 segment_bytes: int = SEGMENT_BYTES):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.fsync_interval, self.segment_bytes = max_bytes, fsync_interval, segment_bytes
        self._lock = threading.Lock()
        self._appended = threading.Condition(self._lock)
        self._dirty = False
        self.acked = self._read_cursor()
        self.end = self._recover()
        self._fd, self._segment_start = self._open_tail()
        self._starts = self._segments()
        self._cursor_written = time.monotonic()
        self._closed = False
        self._damaged: str | None = None

    # --- state on disk ---------------------------------------------------------------------

    def _segments(self) -> list[int]:
        return sorted(int(p.stem) for p in self.dir.glob("*.log"))

    def _path(self, start: int) -> Path:
        return self.dir / f"{start:020d}.log"

    def _read_cursor(self) -> int:
        try:
            return int((self.dir / "cursor").read_text())
        except FileNotFoundError:
            return 0
        except ValueError as exc:
            raise SpoolError(f"{self.dir / 'cursor'}: corrupt ({exc})") from None

    def _recover(self) -> int:
        """The end of the valid log; a torn tail (crash mid-append, before fsync) is cut off."""
        segments = self._segments()
        if not segments:
            return self.acked
        last = segments[-1]
        path = self._path(last)
        data = path.read_bytes()
        good = 0
        for end, _key, _value in _parse(data, 0):
            good = end
        if good != len(data):
            with open(path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        return last + good

    def _open_tail(self) -> tuple[int, int]:
        segments = self._segments()
        start = segments[-1] if segments else self.end
        fd = os.open(self._path(start), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if not segments:
            _fsync_dir(self.dir)
        return fd, start

    # --- producer side ---------------------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        return self.end - self.acked

    def append(self, key: bytes, value: bytes) -> int:
        """Append one record (in the OS page cache at return; fsync'd in groups). Returns its end offset."""
        record = _frame(key, value)
        with self._lock:
            if self._closed:
                raise SpoolError("spool is closed")
            if self.end - self.acked + len(record) > self.max_bytes:
                raise SpoolFull(f"spool {self.dir} holds {self.end - self.acked} unacknowledged bytes (max_bytes {self.max_bytes}); broker unreachable?")
            if self._damaged:
                raise SpoolError(self._damaged)
            try:
                if self.end - self._segment_start >= self.segment_bytes:
                    self._roll()
                written = os.write(self._fd, record)
            except OSError as exc:
                self._cut_back()
                raise _write_failure(self.dir, exc.errno, exc.strerror) from None
            if written != len(record):  # the file system took what fit: out of space, as the next write would say
                self._cut_back()
                raise _write_failure(self.dir, errno.ENOSPC, f"short write ({written} of {len(record)} bytes)")
            self.end += len(record)
            self._dirty = True
            self._appended.notify_all()
            return self.end

    def _roll(self) -> None:
        """Open the next segment first: if that fails (no space for a file), the spool is as it was."""
        fd = os.open(self._path(self.end), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd, self._segment_start = fd, self.end
        self._starts.append(self.end)
        _fsync_dir(self.dir)

    def _cut_back(self) -> None:
        """Remove what a failed write left of its record (a full disk takes part of it): the segment must end
        where the log does, or every later record would follow bytes the reader stops at, never delivered.
        If even that fails, the spool takes nothing more (fail closed) rather than append after garbage."""
        try:
            if os.fstat(self._fd).st_size != self.end - self._segment_start:
                os.ftruncate(self._fd, self.end - self._segment_start)
        except OSError as exc:
            self._damaged = f"spool {self.dir}: a failed write's remains could not be cut off ({exc.strerror}); " \
                            f"restart the proxy to recover the spool"

    def sync(self) -> None:
        """Make every appended record durable (called by the drainer every fsync_interval)."""
        with self._lock:
            if not self._dirty or self._closed:
                return
            self._dirty = False
            fd = self._fd
        try:
            os.fsync(fd)
        except OSError as exc:  # the kernel may have dropped what it could not write: durability is not known
            with self._lock:
                self._damaged = f"spool {self.dir}: fsync failed ({exc.strerror}); records appended before it " \
                                f"may not be on disk, so the spool takes nothing more (fail closed)"

    def wait_for_data(self, position: int, timeout: float) -> bool:
        with self._lock:
            return self._appended.wait_for(lambda: self.end > position or self._closed, timeout)

    # --- drainer side ----------------------------------------------------------------------

    def read(self, position: int, max_bytes: int = 4 << 20) -> Iterator[tuple[int, bytes, bytes]]:
        """Records after `position`, in order: (end offset, key, value). Reads only what was fully appended."""
        with self._lock:
            end, starts = self.end, list(self._starts)
        for i, start in enumerate(starts):
            seg_end = starts[i + 1] if i + 1 < len(starts) else end
            if seg_end <= position:
                continue
            with open(self._path(start), "rb") as f:
                f.seek(position - start)
                data = f.read(min(seg_end - position, max_bytes))
            for rec_end, key, value in _parse(data, 0):
                yield position + rec_end, key, value
            return

    def ack(self, position: int) -> None:
        """The broker has everything up to `position`.

        The cursor file is written at most every CURSOR_INTERVAL (and always before
        a spent segment is deleted): a cursor that lags after a crash only means
        re-sending what the broker already has, which verifiers reject as duplicates.
        Writing it on every acknowledgement cost a file write per small batch.
        """
        with self._lock:
            self.acked = position
            self._appended.notify_all()
            spent = [s for i, s in enumerate(self._starts[:-1]) if self._starts[i + 1] <= position]
        if spent or time.monotonic() - self._cursor_written >= CURSOR_INTERVAL:
            self._write_cursor(position)
        for start in spent:
            self._path(start).unlink(missing_ok=True)
            with self._lock:
                self._starts.remove(start)

    def _write_cursor(self, position: int) -> None:
        tmp = self.dir / "cursor.tmp"
        with open(tmp, "w") as f:
            f.write(str(position))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / "cursor")
        self._cursor_written = time.monotonic()

    def wait_acked(self, position: int, timeout: float | None) -> bool:
        with self._lock:
            return self._appended.wait_for(lambda: self.acked >= position, timeout)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._appended.notify_all()
            os.fsync(self._fd)
            os.close(self._fd)
        self._write_cursor(self.acked)


def _parse(data: bytes, offset: int) -> Iterator[tuple[int, bytes, bytes]]:
    """Whole, intact records in `data`; stops at the first torn or corrupt one."""
    view = memoryview(data)
    while offset + 8 <= len(data):
        length, crc = struct.unpack_from(">II", data, offset)
        body_start, body_end = offset + 8, offset + 8 + length
        if length < 2 or body_end > len(data) or zlib.crc32(view[body_start:body_end]) != crc:
            return
        key_len = struct.unpack_from(">H", data, body_start)[0]
        key = bytes(view[body_start + 2: body_start + 2 + key_len])
        value = bytes(view[body_start + 2 + key_len: body_end])
        yield body_end, key, value
        offset = body_end


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
