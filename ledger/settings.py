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
    witnesses: tuple[str, ...] = ()
    """`[[ledger.witness]] url`: remote witnesses the ledger pushes each checkpoint to (C2SP add-checkpoint)."""

    @classmethod
    def from_table(cls, t: Table) -> LedgerSettings:
        witnesses = t._get("witness", [])
        if not isinstance(witnesses, list) or not all(isinstance(w, dict) and isinstance(w.get("url"), str)
                                                      and w["url"].startswith(("http://", "https://"))
                                                      for w in witnesses):
            raise t.error("witness", "must be [[ledger.witness]] tables, each with url = \"http(s)://…\"")
        return cls(
            dir=t.path("dir", "ledger"),
            origin=t.str("origin", "custody.example/ledger/dev"),
            segment_max_events=t.int("segment_max_events", 100_000, minimum=1),
            segment_max_bytes=t.int("segment_max_bytes", 256 * 1024 * 1024, minimum=1024),
            segment_max_seconds=t.float("segment_max_seconds", 5.0, minimum=0.01),
            idle_seal_seconds=t.float("idle_seal_seconds", 60.0, minimum=0.01),
            witnesses=tuple(w["url"] for w in witnesses),
        )


@dataclass(frozen=True)
class WitnessSettings:
    """`[witness]`: a witness's key, state, HTTP listener, and the ledgers it witnesses."""

    key: Path
    state_dir: Path
    listen: str
    """host:port of the C2SP add-checkpoint endpoint; empty for none."""
    logs: tuple[str, ...]
    """Ledger origins it witnesses (their partitions `<origin>/p<N>` are the logs); default: `[ledger] origin`."""
    group: str

    @classmethod
    def from_table(cls, t: Table, ledger_origin: str) -> WitnessSettings:
        logs = t._get("logs", [ledger_origin])
        if not isinstance(logs, list) or not all(isinstance(x, str) and x for x in logs):
            raise t.error("logs", "must be a list of ledger origins")
        return cls(
            key=t.path("key", "keys/witness.key"),
            state_dir=t.path("state_dir", "witness"),
            listen=t._get("listen", "127.0.0.1:9380") or "",
            logs=tuple(logs),
            group=t.str("group", "custody-witness"),
        )
