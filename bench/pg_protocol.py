"""Sans-I/O PostgreSQL parsing cost: µs per message on the proxy's hot path, and linearity for large messages.

Small DataRows are cut two ways: a Message each (what replay and tests read), and as runs (what the proxy's
readers give: one Message per run of a read, `MessageReader(runs=RUN_TYPES)`), the first the baseline.

    .venv/bin/python bench/pg_protocol.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingest.protocols.postgres import messages as m  # noqa: E402
from ingest.protocols.postgres.protocol import MessageReader  # noqa: E402
from ingest.protocols.postgres.records import RUN_TYPES  # noqa: E402


def per_message(batch: bytes, count: int, chunk: int | None, runs: frozenset[str] = frozenset()) -> float:
    reader = MessageReader("server", max_message_size=1 << 30, runs=runs)
    start = time.perf_counter()
    if chunk is None:
        reader.feed(batch)
    else:
        for offset in range(0, len(batch), chunk):
            reader.feed(batch[offset:offset + chunk])
    return (time.perf_counter() - start) / count


def main() -> None:
    rows = m.data_row([b"12345", b"hello world", None]) * 100_000
    print(f"small DataRows, one feed:          {per_message(rows, 100_000, None) * 1e6:6.2f} µs/message")
    each = per_message(rows, 100_000, 65536)
    print(f"small DataRows, 64 KiB reads:      {each * 1e6:6.2f} µs/message")
    runs = per_message(rows, 100_000, 65536, RUN_TYPES)
    print(f"small DataRows, 64 KiB reads, as runs (the proxy's readers): {runs * 1e6:.2f} µs/message ({runs / each:.2f}x a Message each)")
    print("one large DataRow in 4 KiB reads:")
    for size in (4 << 20, 16 << 20, 64 << 20):
        big = m.data_row([b"x" * size])
        seconds = per_message(big, 1, 4096)
        print(f"  {size >> 20:3d} MiB  {seconds * 1e3:7.1f} ms  ({size / seconds / 1e6:,.0f} MB/s)")


if __name__ == "__main__":
    main()
