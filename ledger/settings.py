"""`[ledger]`: where the segments and seals go, the log's origin, and when a segment is sealed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ingest.settings import Table


@dataclass(frozen=True)
class LedgerSettings:
    dir: str | Path
    origin: str
    segment_max_events: int
    segment_max_bytes: int
    segment_max_seconds: float
    idle_seal_seconds: float

    @classmethod
    def from_table(cls, t: Table) -> LedgerSettings:
        return cls(
            dir=t.path("dir", "ledger"),
            origin=t.str("origin", "custody.example/ledger/dev"),
            segment_max_events=t.int("segment_max_events", 100_000, minimum=1),
            segment_max_bytes=t.int("segment_max_bytes", 256 * 1024 * 1024, minimum=1024),
            segment_max_seconds=t.float("segment_max_seconds", 5.0, minimum=0.01),
            idle_seal_seconds=t.float("idle_seal_seconds", 60.0, minimum=0.01),
        )
