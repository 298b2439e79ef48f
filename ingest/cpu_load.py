"""Whether the machine has CPU to spare: the recorder folds longer rounds only when it has none.

Read from /proc/stat (Linux): the share of all CPUs' time spent idle (or waiting for I/O) since the last look,
at most every LOAD_SAMPLE seconds, so asking costs a file read ten times a second at most. Where /proc/stat
cannot be read the machine never reads as saturated: the recorder then behaves as it did before pacing.
"""

from __future__ import annotations

import time

LOAD_SAMPLE = 0.1  # seconds between two looks at the machine's idle CPU time
SATURATED_IDLE = 0.1  # below this share of idle CPU time the machine has none to spare


class CpuLoad:
    """Whether the machine's CPUs had (almost) no idle time lately, from /proc/stat, sampled every LOAD_SAMPLE s."""

    def __init__(self, stat: str = "/proc/stat") -> None:
        self._stat = stat
        self._last, self._at, self._saturated = self._read(), time.monotonic(), False

    def _read(self) -> tuple[int, int] | None:
        """Idle and total jiffies of all CPUs, or None where /proc/stat cannot be read (then: never saturated)."""
        try:
            with open(self._stat, encoding="ascii") as stat:
                values = [int(v) for v in stat.readline().split()[1:9]]
            return values[3] + values[4], sum(values)  # idle + iowait; user..steal
        except (OSError, ValueError, IndexError):
            return None

    def saturated(self) -> bool:
        now = time.monotonic()
        if now - self._at >= LOAD_SAMPLE:
            sample = self._read()
            if sample is not None and self._last is not None:
                idle, total = sample[0] - self._last[0], sample[1] - self._last[1]
                self._saturated = total > 0 and idle < total * SATURATED_IDLE
            self._last, self._at = sample, now
        return self._saturated
