"""Per-partition ledger state: what a worker needs to carry on exactly where the last seal ended.

The seal is the truth, not the committed Kafka offset. State snapshot N
(`state/p<partition>/<N>.json`) is written durably *before* seal N, so the
rename of seal N is the single commit point: on start, the highest seal N
names the snapshot to resume from (tree, next Kafka offset, session chains,
identities of open sessions), and anything numbered above N — a segment or a
snapshot whose seal never became durable — is a crash's orphan and is removed;
the re-read rewrites it.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ingest.errors import CustodyError
from ingest.sessions import SessionIdentity
from ingest.verify import ChainPosition, SessionChains
from ledger.durable import TMP_SUFFIX, remove_durably, write_atomic
from ledger.merkle import CompactTree
from ledger.sessionmap import SessionMap, SessionState
from ledger.seals import SEALS_DIR, SEGMENTS_DIR, Seal, partition_name, seal_relpath

STATE_VERSION = 1
STATE_DIR = "state"
SNAPSHOT_RECENT = 32
"""Recent event hashes kept per session in a snapshot, so re-deliveries after a restart are still named `duplicate`."""

_NUMBERED = re.compile(r"(\d{6,})\.(json|parquet)")


class LedgerStateError(CustodyError):
    """The ledger directory is not in a state the ledger can resume from."""


@dataclass
class PartitionState:
    """Everything sealed so far for one partition, in the form needed to extend it."""

    partition: int
    last_seal: Seal | None = None
    tree: CompactTree = field(default_factory=CompactTree)
    next_offset: int = 0
    chains: SessionChains = field(default_factory=SessionChains)
    identities: dict[str, SessionIdentity] = field(default_factory=dict)
    """Identity columns of sessions still open (their SessionEnd not yet sealed)."""
    ended: set[str] = field(default_factory=set)
    """Sessions whose SessionEnd was accepted."""
    session_map: SessionMap = field(default_factory=SessionMap)
    """Every session's state as of the last seal (ledger/sessionmap.py); rebuilt from `chains` and `ended` on resume."""
    ocsf: dict = field(default_factory=dict)
    """The OCSF renderer's state at this seal ([soc] on: ingest/ocsf.py `Renderer.snapshot`): open sessions'
    attributes and protocol, their open operations."""
    published_through: int | None = None
    """The last seal whose documents (violations, OCSF) the producer confirmed before this seal was written
    (ledger/documents.py); None in a snapshot from before it was kept."""
    quarantine_violations: list = field(default_factory=list)
    """The violations of the records this seal quarantined, kept in its snapshot only (they have no segment row to
    render them again from); not carried to the next seal."""

    def session_state(self, session_id: str) -> SessionState:
        position = self.chains.sessions[session_id]
        return SessionState(position.next_seq - 1, position.last_hash, session_id in self.ended)

    @property
    def next_seal_number(self) -> int:
        return self.last_seal.number + 1 if self.last_seal else 1

    def to_bytes(self, seal_number: int) -> bytes:
        document = {
            "version": STATE_VERSION,
            "partition": self.partition,
            "seal_number": seal_number,
            "next_offset": self.next_offset,
            "tree": base64.b64encode(self.tree.to_bytes()).decode(),
            "sessions": {sid: p.to_json(SNAPSHOT_RECENT) for sid, p in self.chains.sessions.items()},
            "ocsf": self.ocsf,
            "published_through": self.published_through,
            "quarantine_violations": self.quarantine_violations,
            "identities": {sid: list(identity) for sid, identity in self.identities.items()},
            "ended": sorted(self.ended),
        }
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, last_seal: Seal) -> "PartitionState":
        document = json.loads(data)
        if document["seal_number"] != last_seal.number or document["partition"] != last_seal.partition:
            raise LedgerStateError(f"state snapshot is for seal {document['seal_number']}, not {last_seal.number}")
        chains = SessionChains()
        chains.sessions = {sid: ChainPosition.from_json(p) for sid, p in document["sessions"].items()}
        identities = {sid: SessionIdentity(*identity) for sid, identity in document["identities"].items()}
        # a snapshot from before session-state maps: a session without identity had its SessionEnd
        ended = set(document["ended"]) if "ended" in document else {s for s in chains.sessions if s not in identities}
        state = cls(
            partition=document["partition"],
            last_seal=last_seal,
            tree=CompactTree.from_bytes(base64.b64decode(document["tree"])),
            next_offset=document["next_offset"],
            ocsf=document.get("ocsf") or {},  # absent in a snapshot from before it was kept
            published_through=document.get("published_through"),
            chains=chains,
            identities=identities,
            ended=ended,
        )
        for session_id in chains.sessions:
            state.session_map.put(session_id, state.session_state(session_id))
        return state


def state_relpath(partition: int, number: int) -> str:
    return f"{STATE_DIR}/{partition_name(partition)}/{number:06d}.json"


def numbered_files(directory: Path) -> dict[int, Path]:
    """`000042.json` / `000042.parquet` files of a directory, by number."""
    if not directory.is_dir():
        return {}
    return {int(m.group(1)): directory / name for name in os.listdir(directory)
            if (m := _NUMBERED.fullmatch(name))}


def write_snapshot(ledger_dir: Path, state: PartitionState, seal_number: int) -> None:
    """Durably write the state that seal `seal_number` will commit (call before writing that seal)."""
    write_atomic(ledger_dir / state_relpath(state.partition, seal_number), state.to_bytes(seal_number))


def prune_snapshots(ledger_dir: Path, state: PartitionState, number: int) -> None:
    """After seal `number` (any seal: a key rotation's too), remove the snapshots nothing needs. Resuming needs only
    the latest, but the documents of every seal after `state.published_through` may have to be rendered again after
    a crash (ledger/documents.py), from those seals' snapshots and the one before them: those stay."""
    keep = min(number, state.published_through or 0)
    old = [p for n, p in numbered_files(ledger_dir / STATE_DIR / partition_name(state.partition)).items() if n < keep]
    if old:
        remove_durably(old)


def _remove_orphans(ledger_dir: Path, partition: int, last: int) -> None:
    """Delete what a crash left behind after seal `last`: temp files, and segments/snapshots it never sealed."""
    orphans: list[Path] = []
    for top in (SEGMENTS_DIR, STATE_DIR, SEALS_DIR):
        directory = ledger_dir / top / partition_name(partition)
        orphans += [p for n, p in numbered_files(directory).items() if n > last]
        if directory.is_dir():
            orphans += [directory / name for name in os.listdir(directory) if name.endswith(TMP_SUFFIX)]
    if orphans:
        remove_durably(orphans)


def recover(ledger_dir: Path, partition: int) -> PartitionState:
    """The state of the partition as of its last durable seal, with a crash's leftovers cleared away."""
    seals = numbered_files(ledger_dir / SEALS_DIR / partition_name(partition))
    last = max(seals, default=0)
    _remove_orphans(ledger_dir, partition, last)
    if not last:
        return PartitionState(partition)
    seal = Seal.load(seals[last])
    snapshot = ledger_dir / state_relpath(partition, last)
    try:
        state = PartitionState.from_bytes(snapshot.read_bytes(), seal)
    except FileNotFoundError:
        raise LedgerStateError(f"{snapshot}: missing; the ledger cannot resume after {seal_relpath(partition, last)}") from None
    if state.tree.size != seal.tree_size or state.tree.root() != seal.root or state.next_offset != seal.next_offset:
        raise LedgerStateError(f"{snapshot}: does not match {seal_relpath(partition, last)}")
    sessions = seal.record.get("sessions")
    if sessions is not None and bytes.fromhex(sessions["root"]) != state.session_map.root():
        raise LedgerStateError(f"{snapshot}: its sessions do not match the session-state root of "
                               f"{seal_relpath(partition, last)}")
    return state


class PartitionLock:
    """An exclusive lock on one partition's directories, so two workers never extend the same seal chain.

    A consumer group assigns a partition to one member at a time, but a paused
    member may not yet know it lost one; the lock makes the second wait. The OS
    drops it when the holder dies, SIGKILL included.
    """

    def __init__(self, ledger_dir: Path, partition: int):
        path = ledger_dir / STATE_DIR / f"{partition_name(partition)}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def acquire(self, blocking: bool = True) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            return True
        except BlockingIOError:
            return False

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
