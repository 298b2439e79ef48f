"""Offline verification of a ledger directory, in the manner of `aws cloudtrail validate-logs`.

Trusts nothing in the directory: only the keyring (ledger keys for seals and
checkpoints, proxy keys for events). For each partition it walks the seal
chain in order and runs small named checks; each failure is a typed
`LedgerProblem` that prints as one line, `<what> INVALID: <why>`, and
verification carries on so that one run reports every problem.

Seal checks: readable, numbered in sequence, signed by a trusted ledger key,
linked to its predecessor (the first one says it is first), origin, leaf and
offset ranges continuing the previous seal, checkpoint signed and equal to
the seal's tree, consistency proof from the previous checkpoint. Segment
checks: present, SHA-256 as sealed, rows = sealed leaves, leaf indexes,
(session_id, seq) order, row columns matching the signed event, Merkle root
recomputed from salts and event bytes, then every event's signature and
session chain. Finally, segment files that no seal covers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from ingest.keys import Keyring
from ingest.verify import Rejection, SessionChains, check_key, check_signature, decode
from ledger import checkpoint, merkle, sessionmap
from ledger.seals import (FIRST_SEAL, SEALS_DIR, SEGMENTS_DIR, MalformedSealError, Seal, SealError,
                          UntrustedSealKeyError, checkpoint_verifiers, parse_iso, partition_origin,
                          seal_relpath, verify_seal_signature)
from ledger.rotation import RotationError, chain_key, check_rotation, with_key
from ledger.segments import file_sha256, read_segment
from ledger.state import numbered_files

_PARTITION_DIR = re.compile(r"p(\d+)")


class LedgerProblem(Exception):
    """One thing wrong with the ledger; `line` is what `custody verify` prints."""

    def __init__(self, subject: str, message: str):
        super().__init__(f"{subject} INVALID: {message}")
        self.subject, self.message = subject, message

    @property
    def line(self) -> str:
        return str(self)


class SealMissing(LedgerProblem): pass
class SealMalformed(LedgerProblem): pass
class SealUntrustedKey(LedgerProblem): pass
class SealBadSignature(LedgerProblem): pass
class SealChainBroken(LedgerProblem): pass
class SealRangeError(LedgerProblem): pass
class CheckpointInvalid(LedgerProblem): pass
class CheckpointMismatch(LedgerProblem): pass
class ConsistencyProofInvalid(LedgerProblem): pass
class SegmentMissing(LedgerProblem): pass
class SegmentHashMismatch(LedgerProblem): pass
class SegmentUnreadable(LedgerProblem): pass
class SegmentRowCountMismatch(LedgerProblem): pass
class SegmentLeafIndexMismatch(LedgerProblem): pass
class SegmentRowOrder(LedgerProblem): pass
class SegmentNotSealed(LedgerProblem): pass
class MerkleRootMismatch(LedgerProblem): pass
class RowMismatch(LedgerProblem): pass
class EventInvalid(LedgerProblem): pass
class SessionStateMismatch(LedgerProblem): pass


@dataclass
class Report:
    problems: list[LedgerProblem] = field(default_factory=list)
    seals: int = 0
    seals_valid: int = 0
    segments: int = 0
    segments_valid: int = 0
    events: int = 0
    events_valid: int = 0
    session_gaps: int = 0
    notes: list[str] = field(default_factory=list)
    """What verification could not establish without it being a problem (e.g. seals from before session-state maps)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return (f"{self.segments_valid:,}/{self.segments:,} segments valid, "
                f"{self.events_valid:,}/{self.events:,} events valid, {self.session_gaps:,} session gaps, "
                f"{self.seals_valid:,}/{self.seals:,} seals valid")


CLOCK_AHEAD_TOLERANCE_S = 5.0
"""How far an event's own timestamp may lie after the `sealed_at` of the seal that holds it before the verifier
names a skewed clock. The ledger seals an event only after it was recorded, on the ledger's clock, so a larger gap
means the recording proxy's clock ran ahead. Not a problem (signatures and chains are still checked, and order is
by seq, never by time), a note: the timestamps of those events are not to be trusted as wall-clock times."""

OnProblem = Callable[[LedgerProblem], None]
OnEvents = Callable[[int], None]


@dataclass(frozen=True)
class SealContext:
    """What a seal is checked against: the trusted keys and the (already read) seal before it."""

    subject: str
    keyring: Keyring
    previous: Seal | None
    witnesses: int = 1
    """Trusted witness cosignatures a rotation seal needs."""


# --- seal checks ---------------------------------------------------------------------------


def load_seal(path: Path, subject: str) -> Seal:
    try:
        return Seal.load(path)
    except MalformedSealError as exc:
        raise SealMalformed(subject, str(exc)) from None


def check_seal_place(seal: Seal, partition: int, number: int, subject: str) -> None:
    if (seal.partition, seal.number) != (partition, number):
        raise SealChainBroken(subject, f"says it is seal {seal.number} of partition {seal.partition}")


def check_seal_key(seal: Seal, ctx: SealContext) -> None:
    """After the first seal, the key is the chain's: the previous seal's, or the one its rotation handed over to."""
    if ctx.previous is not None and seal.record.get("key_id") != (expected := chain_key(ctx.previous.record)):
        raise SealUntrustedKey(ctx.subject, f"signed by key {seal.record.get('key_id')}, but the chain's key is "
                                            f"{expected}: a ledger key takes over only through a witnessed rotation seal")


def check_seal_signature(seal: Seal, ctx: SealContext) -> None:
    try:
        verify_seal_signature(seal, ctx.keyring)
    except UntrustedSealKeyError as exc:
        raise SealUntrustedKey(ctx.subject, str(exc)) from None
    except SealError as exc:
        raise SealBadSignature(ctx.subject, str(exc)) from None


def check_seal_link(seal: Seal, ctx: SealContext) -> None:
    """The seal names its predecessor's hash and signature; the first one says it is first."""
    stated, previous, subject = seal.record["previous"], ctx.previous, ctx.subject
    if previous is None:
        if stated != FIRST_SEAL:
            raise SealChainBroken(subject, "first seal of its partition does not say so (a predecessor is missing)")
    elif stated == FIRST_SEAL:
        raise SealChainBroken(subject, f"claims to be the first seal, but seal {previous.number} precedes it")
    elif stated != previous.link():
        raise SealChainBroken(subject, f"previous seal hash or signature doesn't match seal {previous.number}")


def check_seal_origin(seal: Seal, origin: str, subject: str) -> None:
    expected = partition_origin(origin, seal.partition)
    if seal.record["origin"] != expected:
        raise SealChainBroken(subject, f"origin {seal.record['origin']!r} is not {expected!r}")


def check_seal_ranges(seal: Seal, ctx: SealContext) -> None:
    """Leaves and Kafka offsets continue exactly where the previous seal ended."""
    leaves, kafka, previous, subject = seal.record["leaves"], seal.record["kafka"], ctx.previous, ctx.subject
    prev_size, prev_offset = (previous.tree_size, previous.next_offset) if previous else (0, None)
    if leaves["first"] != prev_size or seal.tree_size != leaves["first"] + leaves["count"]:
        raise SealRangeError(subject, f"leaves {leaves['first']}+{leaves['count']} and tree size {seal.tree_size} "
                                      f"do not continue the previous tree of {prev_size}")
    reset_from = kafka.get("offset_reset_from")
    if reset_from is not None and (reset_from != prev_offset or kafka["first_offset"] >= reset_from):
        raise SealRangeError(subject, f"says the broker's offsets went back from {reset_from} to "
                                      f"{kafka['first_offset']}, but the previous seal ended at {prev_offset}")
    if prev_offset is not None and kafka["first_offset"] != prev_offset and reset_from is None:
        raise SealRangeError(subject, f"Kafka offsets start at {kafka['first_offset']}, previous seal ended at {prev_offset}")
    if kafka["next_offset"] < kafka["first_offset"]:
        raise SealRangeError(subject, f"Kafka offsets {kafka['first_offset']}..{kafka['next_offset']} run backwards")
    if (seal.segment is None) != (leaves["count"] == 0):
        raise SealRangeError(subject, f"{leaves['count']} new leaves but segment {seal.segment}")


def check_checkpoint(seal: Seal, ctx: SealContext) -> None:
    """The checkpoint is signed by a trusted ledger key, for this partition, and states this seal's tree."""
    origin, subject = seal.record["origin"], ctx.subject
    verifiers = checkpoint_verifiers(ctx.keyring, origin)
    try:
        tree, _ = checkpoint.open_checkpoint(seal.checkpoint_note, verifiers, origin=origin)
    except checkpoint.NoteError as exc:
        raise CheckpointInvalid(subject, f"checkpoint: {exc}") from None
    if (tree.size, tree.root_hash) != (seal.tree_size, seal.root):
        raise CheckpointMismatch(subject, f"checkpoint states tree size {tree.size} root {tree.root_hash.hex()[:16]}…, "
                                          f"the seal says {seal.tree_size} root {seal.root.hex()[:16]}…")
    try:
        stated = sessionmap.parse_extensions(tree.extensions)
    except sessionmap.SessionMapError as exc:
        raise CheckpointInvalid(subject, str(exc)) from None
    if stated != seal.record.get("sessions"):
        raise CheckpointMismatch(subject, f"checkpoint states session-state map {stated}, the seal says "
                                          f"{seal.record.get('sessions')}")


def check_consistency(seal: Seal, ctx: SealContext) -> None:
    previous = ctx.previous
    old_size, old_root = (previous.tree_size, previous.root) if previous else (0, merkle.EMPTY_ROOT)
    try:
        merkle.verify_consistency(old_size, seal.tree_size, old_root, seal.root, seal.consistency_proof)
    except merkle.MerkleError as exc:
        raise ConsistencyProofInvalid(ctx.subject, f"consistency proof from the previous checkpoint: {exc}") from None


SEAL_CHECKS = (check_seal_key, check_seal_signature, check_seal_link, check_seal_ranges, check_checkpoint, check_consistency)


# --- segment checks ------------------------------------------------------------------------


def check_segment_hash(path: Path, segment: dict[str, Any], subject: str) -> None:
    if file_sha256(path).hex() != segment["sha256"]:
        raise SegmentHashMismatch(subject, "hash value doesn't match")


def load_rows(path: Path, subject: str) -> pa.Table:
    try:
        return read_segment(path)
    except (pa.ArrowException, OSError) as exc:
        raise SegmentUnreadable(subject, f"not a readable segment ({exc})") from None


def check_row_count(rows: pa.Table, seal: Seal, subject: str) -> None:  # a deleted or added row
    count = seal.record["leaves"]["count"]
    if rows.num_rows != count:
        raise SegmentRowCountMismatch(subject, f"{rows.num_rows} rows, the seal covers {count} events")


def check_leaf_indexes(rows: pa.Table, seal: Seal, subject: str) -> None:
    """The rows are exactly the sealed leaf range, each leaf once."""
    first, count = seal.record["leaves"]["first"], seal.record["leaves"]["count"]
    indexes = sorted(rows.column("leaf_index").to_pylist())
    if indexes != list(range(first, first + count)):
        raise SegmentLeafIndexMismatch(subject, f"leaf indexes are not {first}..{first + count - 1}, each once")


def check_row_order(rows: pa.Table, seal: Seal, subject: str) -> None:
    sessions, seqs = rows.column("session_id").to_pylist(), rows.column("seq").to_pylist()
    keys = list(zip(sessions, seqs))
    bad = next((i for i in range(1, len(keys)) if keys[i] < keys[i - 1]), None)
    if bad is not None:
        raise SegmentRowOrder(subject, f"rows are not sorted by (session_id, seq) at row {bad}")


def recompute_root(tree: merkle.CompactTree, ordered: pa.Table) -> None:
    for salt, event in zip(ordered.column("salt").to_pylist(), ordered.column("event").to_pylist()):
        tree.append(merkle.event_leaf_hash(salt, event))


def check_merkle_root(tree: merkle.CompactTree, seal: Seal, subject: str) -> None:
    if (tree.size, tree.root()) != (seal.tree_size, seal.root):
        raise MerkleRootMismatch(subject, f"Merkle root recomputed from the rows ({tree.root().hex()[:16]}…, "
                                          f"{tree.size} leaves) doesn't match the seal")


# --- event checks --------------------------------------------------------------------------


def check_row_matches_event(row: dict[str, Any], event, subject: str) -> None:
    """The indexed columns say what the signed bytes say (the rest is re-derivable and not trusted)."""
    if (row["session_id"], row["seq"], row["event_hash"]) != (event.session_id, event.seq, event.hash):
        raise RowMismatch(subject, "session_id, seq or event_hash column does not match the signed event")


def check_event(row: dict[str, Any], keyring: Keyring, chains: SessionChains, subject: str):
    """Signature by a proxy key valid at the event's time, then the session chain.

    On a chain failure the event is still taken as the session's new position,
    so one gap is one problem rather than one per later event.
    """
    try:
        event = decode(row["event"])
        check_key(event, row["session_id"].encode())
        check_signature(event, keyring)
    except Rejection as rejection:
        raise EventInvalid(subject, f"{rejection.reason}: {rejection.detail}") from None
    check_row_matches_event(row, event, subject)
    try:
        chains.check(event)
    except Rejection as rejection:
        if rejection.reason not in ("duplicate", "seq_conflict"):
            chains.accept(event)
        raise EventInvalid(subject, f"{rejection.reason}: {rejection.detail}") from None
    chains.accept(event)
    return event


# --- one partition -------------------------------------------------------------------------


class PartitionVerifier:
    """Walks one partition's seal chain and the segments it covers."""

    def __init__(self, root: Path, partition: int, keyring: Keyring, origin: str, report: Report,
                 on_problem: OnProblem, on_events: OnEvents):
        self.root, self.partition, self.keyring, self.origin = root, partition, keyring, origin
        self.report, self._on_problem, self.on_events = report, on_problem, on_events
        self.tree: merkle.CompactTree | None = merkle.CompactTree()
        self.chains = SessionChains()
        self.session_map: sessionmap.SessionMap | None = sessionmap.SessionMap()  # None once it cannot be recomputed
        self.ended: set[str] = set()
        self.touched: set[str] = set()
        self.unmapped_seals = 0
        self.clock_ahead: dict[str, list] = {}  # key id -> [events, largest lead in s, first session]
        self.clock_back: dict[str, int] = {}  # key id -> events stamped before the event before them in their session
        self.last_ts: dict[str, Any] = {}  # session id -> the timestamp of its latest event

    def problem(self, problem: LedgerProblem) -> None:
        self.report.problems.append(problem)
        self._on_problem(problem)

    def attempt(self, check: Callable[..., Any], *args: Any) -> bool:
        """Run one check; report its problem, if any, and let verification carry on."""
        try:
            check(*args)
            return True
        except LedgerProblem as problem:
            self.problem(problem)
            return False

    def run(self) -> None:
        seal_files = numbered_files(self.root / SEALS_DIR / f"p{self.partition}")
        sealed_segments: set[str] = set()
        previous: Seal | None = None
        for number in range(1, max(seal_files, default=0) + 1):
            subject = f"Seal {seal_relpath(self.partition, number)}"
            self.report.seals += 1
            if number not in seal_files:
                self.problem(SealMissing(subject, "file is missing"))
                continue
            seal = self.verify_seal(seal_files[number], number, SealContext(subject, self.keyring, previous))
            if seal is None:
                continue
            if seal.record.get("rotation"):
                self.verify_rotation(seal, subject)
            if (reset_from := seal.record["kafka"].get("offset_reset_from")) is not None:
                self.report.notes.append(
                    f"Partition p{self.partition}: seal {seal.number}: the broker's offsets went back from {reset_from} "
                    f"to {seal.record['kafka']['first_offset']} (its log was lost or recreated): what it had "
                    f"acknowledged from offset {reset_from} on and not delivered again is not in the ledger, and "
                    f"sessions with events among it show gaps")
            if seal.segment:
                sealed_segments.add(seal.segment["path"])
                self.verify_segment(seal)
            self.verify_session_map(seal, previous, subject)
            previous = seal
        self.find_unsealed_segments(sealed_segments)
        if self.unmapped_seals:
            self.report.notes.append(
                f"Partition p{self.partition}: {self.unmapped_seals} seal(s) from before session-state maps commit to no "
                f"session states; bundles anchored on them cannot prove a session's tail was not dropped")
        self.note_clock_skew()

    def note_clock_skew(self) -> None:
        """One note per proxy key whose events carry timestamps its seals prove wrong (see CLOCK_AHEAD_TOLERANCE_S)."""
        for key_id, (count, lead, session) in sorted(self.clock_ahead.items()):
            self.report.notes.append(
                f"Partition p{self.partition}: clock skew: {count} event(s) signed by {key_id} are stamped up to "
                f"{lead:.0f} s after the seal that holds them (first in session {session}): the recording proxy's "
                f"clock ran ahead; their order is their seq, their timestamps are not wall-clock times")
        for key_id, count in sorted(self.clock_back.items()):
            self.report.notes.append(
                f"Partition p{self.partition}: clock skew: {count} event(s) signed by {key_id} are stamped before "
                f"the event before them in their session: the recording proxy's clock went back; order is by seq")

    def verify_rotation(self, seal: Seal, subject: str) -> None:
        """A rotation seal: the new key signed the handover, and trusted witnesses cosigned its checkpoint. Only
        then do the seals after it verify under the new key."""
        from ledger.cosignatures import load as stored_cosignatures
        from ledger import witnessed as witnessed_checks
        try:
            new_key = check_rotation(seal.record)
        except RotationError as exc:
            self.problem(SealBadSignature(subject, str(exc)))
            self.keyring = Keyring([k for k in self.keyring if k.key_id != seal.record["rotation"].get("key_id")])
            return
        if seal.record["leaves"]["count"]:
            self.problem(SealRangeError(subject, "a rotation seal must seal no leaves"))
        note = witnessed_checks.with_lines(seal.checkpoint_note,
                                           stored_cosignatures(self.root, seal.partition, seal.number))
        try:
            witnessed = witnessed_checks.open_witnessed(note, self.keyring, seal.record["origin"])
            witnessed_checks.check_quorum(witnessed, 1, f"Rotation to key {new_key.key_id} at {subject}")
        except (witnessed_checks.WitnessedProblem, checkpoint.NoteError) as exc:
            self.problem(SealUntrustedKey(subject, f"rotation to key {new_key.key_id} is not witnessed ({exc}); "
                                                   f"the seals it signs are not trusted"))
            self.keyring = Keyring([k for k in self.keyring if k.key_id != new_key.key_id])  # even if trusted
            return
        self.keyring = with_key(self.keyring, new_key)

    def verify_session_map(self, seal: Seal, previous: Seal | None, subject: str) -> None:
        """The seal's `sessions` root is the map of every session's state recomputed from the events so far."""
        stated = seal.record.get("sessions")
        if stated is None:
            if previous is not None and previous.record.get("sessions") is not None:
                self.problem(SessionStateMismatch(subject, "has no session-state map, but the seal before it had one"))
            else:
                self.unmapped_seals += 1
            return
        if self.session_map is None:
            return
        for session_id in self.touched:
            position = self.chains.sessions[session_id]
            self.session_map.put(session_id, sessionmap.SessionState(position.next_seq - 1, position.last_hash,
                                                                     session_id in self.ended))
        self.touched.clear()
        root = self.session_map.root()
        if (stated.get("count"), stated.get("root")) != (self.session_map.count, root.hex()):
            self.problem(SessionStateMismatch(
                subject, f"session-state map {stated.get('count')} sessions root {str(stated.get('root'))[:16]}…, "
                         f"the events give {self.session_map.count} sessions root {root.hex()[:16]}…"))

    def verify_seal(self, path: Path, number: int, ctx: SealContext) -> Seal | None:
        """The seal, if it could be read as this partition's seal `number`; each failing check is reported."""
        try:
            seal = load_seal(path, ctx.subject)
            check_seal_place(seal, self.partition, number, ctx.subject)
            check_seal_origin(seal, self.origin, ctx.subject)
        except LedgerProblem as problem:
            self.problem(problem)
            return None
        results = [self.attempt(check, seal, ctx) for check in SEAL_CHECKS]
        self.report.seals_valid += all(results)
        self.report.events += seal.record["leaves"]["count"]
        return seal

    def verify_segment(self, seal: Seal) -> None:
        relpath = seal.segment["path"]
        subject, path = f"Segment {relpath}", self.root / relpath
        self.report.segments += 1
        problems_before = len(self.report.problems)
        if path.is_file():
            self.attempt(check_segment_hash, path, seal.segment, subject)  # carry on: the rows say what changed
            self.verify_rows(path, seal, relpath)
        else:
            self.problem(SegmentMissing(subject, "file is missing"))
            self.tree = None  # later roots cannot be recomputed without these leaves
            self.session_map = None
        self.report.segments_valid += len(self.report.problems) == problems_before
        self.on_events(seal.record["leaves"]["count"])

    def verify_rows(self, path: Path, seal: Seal, relpath: str) -> None:
        subject = f"Segment {relpath}"
        try:
            rows = load_rows(path, subject)
        except LedgerProblem as problem:
            self.problem(problem)
            self.tree = None
            return
        self.attempt(check_row_count, rows, seal, subject)
        self.attempt(check_row_order, rows, seal, subject)
        self.attempt(check_leaf_indexes, rows, seal, subject)
        ordered = rows.sort_by("leaf_index")
        if self.tree is not None:
            recompute_root(self.tree, ordered)
            if not self.attempt(check_merkle_root, self.tree, seal, subject):
                self.tree = None
        self.verify_events(ordered, relpath, parse_iso(seal.record["sealed_at"]))

    def verify_events(self, ordered: pa.Table, relpath: str, sealed_at: datetime) -> None:
        rows = ordered.select(["leaf_index", "session_id", "seq", "event_hash", "event"]).to_pylist()
        for row in rows:
            try:
                event = check_event(row, self.keyring, self.chains, f"Event {relpath} leaf {row['leaf_index']}")
                self.report.events_valid += 1
                self.touched.add(event.session_id)
                self.check_clock(event, sealed_at)
                if event.kind == "session_end":
                    self.ended.add(event.session_id)
                    self.last_ts.pop(event.session_id, None)
            except EventInvalid as problem:
                self.report.session_gaps += problem.message.startswith("seq_gap")
                self.problem(problem)
            except LedgerProblem as problem:
                self.problem(problem)

    def check_clock(self, event, sealed_at: datetime) -> None:
        """Counts an event stamped after its seal (beyond the tolerance) or before its session's previous event."""
        ts = event.ts
        lead = (ts - sealed_at).total_seconds()
        if lead > CLOCK_AHEAD_TOLERANCE_S:
            entry = self.clock_ahead.setdefault(event.key_id, [0, 0.0, event.session_id])
            entry[0] += 1
            entry[1] = max(entry[1], lead)
        previous = self.last_ts.get(event.session_id)
        if previous is not None and ts < previous:
            self.clock_back[event.key_id] = self.clock_back.get(event.key_id, 0) + 1
        self.last_ts[event.session_id] = ts

    def find_unsealed_segments(self, sealed: set[str]) -> None:
        directory = self.root / SEGMENTS_DIR / f"p{self.partition}"
        for path in sorted(directory.glob("*")) if directory.is_dir() else ():
            relpath = path.relative_to(self.root).as_posix()
            if relpath not in sealed:
                self.report.segments += 1
                self.problem(SegmentNotSealed(f"Segment {relpath}", "no seal covers this file"))


# --- the whole ledger ----------------------------------------------------------------------


def partitions(root: Path) -> list[int]:
    found: set[int] = set()
    for top in (SEALS_DIR, SEGMENTS_DIR):
        directory = root / top
        if directory.is_dir():
            found |= {int(m.group(1)) for p in directory.iterdir() if (m := _PARTITION_DIR.fullmatch(p.name))}
    return sorted(found)


def ledger_origin(root: Path, partition_numbers: list[int]) -> str | None:
    """The ledger origin the first readable seal states; every seal is then checked against it (and its signature)."""
    for p in partition_numbers:
        for _, path in sorted(numbered_files(root / SEALS_DIR / f"p{p}").items()):
            try:
                return Seal.load(path).record["origin"].rsplit("/", 1)[0]
            except (MalformedSealError, KeyError, AttributeError):
                continue
    return None


def sealed_event_count(root: Path) -> int:
    """Events the seals claim, for a progress bar's total (read before verifying, so not trusted)."""
    total = 0
    for path in (root / SEALS_DIR).glob("p*/*.json"):
        try:
            total += Seal.load(path).record["leaves"]["count"]
        except (MalformedSealError, KeyError, TypeError):
            pass
    return total


def verify_ledger(root: Path, keyring: Keyring, origin: str | None = None,
                  on_problem: OnProblem = lambda p: None, on_events: OnEvents = lambda n: None) -> Report:
    """Check everything in the ledger directory `root`; `origin` is the expected ledger origin, if known."""
    report = Report()
    numbers = partitions(root)
    origin = origin or ledger_origin(root, numbers) or ""
    for partition in numbers:
        PartitionVerifier(root, partition, keyring, origin, report, on_problem, on_events).run()
    return report
