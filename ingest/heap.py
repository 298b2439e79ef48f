"""Out of the cyclic garbage collector's sight: what a long-running process holds once it is set up.

A proxy, its recorder and a ledger each import large libraries (pglast, sqlglot, asyncssh, h11, pyarrow,
kafka-python) and then allocate thousands of short-lived objects per second on their hot paths. Every
full collection those allocations trigger scans the whole startup heap again: ~50 ms each in the ledger
(bench/ledger.py, ~90k objects), 44–110 ms pauses seen in the proxy during a masked stream, and every
session waits for them. Freezing once, after set-up, leaves later objects collected as before.
"""

from __future__ import annotations

import gc

_frozen = False


def freeze_startup_heap() -> None:
    """Freeze the objects alive now (after collecting what is garbage already), once per process."""
    global _frozen
    if not _frozen:
        gc.collect()
        gc.freeze()
        _frozen = True
