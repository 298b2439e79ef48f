"""`custody bundle verify`: check a sealed bundle offline, trusting only `--trust`.

Like `aws cloudtrail validate-logs`: every check runs, each problem is one line
naming what is wrong and where, then a summary. Each check is a small function
that appends to the report rather than stopping at the first problem, so an
auditor sees the whole extent of a tampering, not just its first symptom.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq

from ingest.avro import DecodeError
from ingest.events import SignedEvent, open_event
from ingest.keys import Keyring, KeyLookupError
from ingest.verify import Rejection, check_signature
from ledger import checkpoint, merkle
from ledger.seals import Seal, SealError, checkpoint_verifiers, verify_seal_signature
from query import dsse
from query.bundle import (CONSISTENCY, EVENTS, MANIFEST, PREDICATE_TYPE, STATEMENT_TYPE, TRANSFER_PREFIX,
                          TRANSFER_TYPE)


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    events_total: int = 0
    events_valid: int = 0
    checkpoints_total: int = 0
    checkpoints_valid: int = 0
    sessions_complete: int = 0
    sessions_open: int = 0
    manifest_signer: str | None = None
    predicate: dict[str, Any] = field(default_factory=dict)
    transfers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        signer = f"manifest signed by {self.manifest_signer}" if self.manifest_signer else "manifest NOT verified"
        case = f" (case {self.predicate.get('case')})" if self.predicate.get("case") else ""
        open_note = f" ({self.sessions_open} open at export)" if self.sessions_open else ""
        return (f"{self.events_valid:,}/{self.events_total:,} events valid, "
                f"{self.checkpoints_valid}/{self.checkpoints_total} checkpoints valid, "
                f"{self.sessions_complete} sessions complete{open_note}, {signer}{case}")


@dataclass
class Bundle:
    """What verification reads from the archive."""

    archive: zipfile.ZipFile
    names: list[str]
    manifest_bytes: bytes


def verify_bundle(path: Path, trust: Keyring, trace: Callable[[str], None] | None = None) -> Report:
    report = Report()
    bundle = _open(path, report)
    if bundle is None:
        return report
    with bundle.archive:
        statement = _check_manifest(bundle, trust, report)
        _check_files(bundle, statement, report)
        newest = _check_seals(bundle, trust, report)
        _check_consistency(bundle, newest, report)
        rows = _check_events(bundle, trust, newest, report, trace)
        _check_sessions(rows, report)
        _check_transfers(bundle, trust, report)
    return report


# --- the archive and its manifest -------------------------------------------------------------


def _open(path: Path, report: Report) -> Bundle | None:
    try:
        archive = zipfile.ZipFile(path)
        names = archive.namelist()
        bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        report.problems.append(f"Bundle {path} INVALID: truncated or not a bundle archive ({exc})")
        return None
    if bad:
        report.problems.append(f"Bundle {path} INVALID: member {bad} is corrupt (CRC mismatch)")
    if MANIFEST not in names:
        report.problems.append(f"Bundle {path} INVALID: no {MANIFEST}")
        return None
    return Bundle(archive, names, archive.read(MANIFEST))


def _check_manifest(bundle: Bundle, trust: Keyring, report: Report) -> dict[str, Any]:
    """The DSSE signature by a trusted exporter key, valid at the claimed export time; the Statement's shape."""
    try:
        envelope = json.loads(bundle.manifest_bytes)
        verified = dsse.verify(envelope, trust, "exporter", dsse.IN_TOTO_PAYLOAD_TYPE)
        statement = verified.json()
    except (ValueError, dsse.DsseError) as exc:
        report.problems.append(f"Manifest INVALID: {exc}")
        return _unverified_statement(bundle)
    if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != PREDICATE_TYPE:
        report.problems.append(f"Manifest INVALID: not a {PREDICATE_TYPE} in-toto Statement v1")
        return statement
    report.predicate = statement.get("predicate", {})
    try:
        trust.key_for(verified.key_id, datetime.fromisoformat(report.predicate["exported_at"].replace("Z", "+00:00")), "exporter")
    except (KeyError, ValueError) as exc:
        report.problems.append(f"Manifest INVALID: no usable exported_at ({exc})")
        return statement
    except KeyLookupError as exc:
        report.problems.append(f"Manifest INVALID: exporter key not valid at export time: {exc}")
        return statement
    report.manifest_signer = verified.key_id
    return statement


def _unverified_statement(bundle: Bundle) -> dict[str, Any]:
    """Still read the claims of a manifest that failed, so that the other checks can report too."""
    try:
        envelope = json.loads(bundle.manifest_bytes)
        return json.loads(base64.b64decode(envelope["payload"]))
    except Exception:  # noqa: BLE001 - anything unreadable simply means no claims to check against
        return {}


def _check_files(bundle: Bundle, statement: dict[str, Any], report: Report) -> None:
    """Every listed file is present with its hash; every present file is listed."""
    listed = {s.get("name"): s.get("digest", {}).get("sha256") for s in statement.get("subject", [])}
    for name, digest in sorted(listed.items()):
        if name not in bundle.names:
            report.problems.append(f"File {name} INVALID: listed in the manifest but missing from the bundle")
        elif hashlib.sha256(bundle.archive.read(name)).hexdigest() != digest:
            report.problems.append(f"File {name} INVALID: hash value doesn't match the manifest")
    for name in bundle.names:
        if name != MANIFEST and not name.startswith(TRANSFER_PREFIX) and name not in listed:
            report.problems.append(f"File {name} INVALID: not listed in the manifest")


# --- seals, checkpoints, consistency ----------------------------------------------------------


def _check_seals(bundle: Bundle, trust: Keyring, report: Report) -> dict[int, Seal]:
    """Each seal's signature and its checkpoint's; returns each partition's newest valid seal."""
    newest: dict[int, Seal] = {}
    for name in sorted(n for n in bundle.names if n.startswith("seals/")):
        report.checkpoints_total += 1
        seal = _valid_seal(name, bundle.archive.read(name), trust, report)
        if seal is None:
            continue
        report.checkpoints_valid += 1
        if seal.partition not in newest or seal.number > newest[seal.partition].number:
            newest[seal.partition] = seal
    return newest


def _valid_seal(name: str, data: bytes, trust: Keyring, report: Report) -> Seal | None:
    try:
        seal = Seal.from_bytes(data)
        verify_seal_signature(seal, trust)
    except SealError as exc:
        report.problems.append(f"Seal {name} INVALID: {exc}")
        return None
    origin = seal.record["origin"]
    try:
        cp, _ = checkpoint.open_checkpoint(seal.checkpoint_note, checkpoint_verifiers(trust, origin), origin=origin)
    except checkpoint.NoteError as exc:
        report.problems.append(f"Checkpoint of {name} INVALID: {exc}")
        return None
    if cp.size != seal.tree_size or cp.root_hash != seal.root:
        report.problems.append(f"Checkpoint of {name} INVALID: size/root differ from the seal's tree")
        return None
    return seal


def _check_consistency(bundle: Bundle, newest: dict[int, Seal], report: Report) -> None:
    """Each covering seal's tree is a prefix of the newest: the ledger only ever appended."""
    seals = {(s.partition, s.number): s for s in _all_seals(bundle)}
    try:
        entries = json.loads(bundle.archive.read(CONSISTENCY))
    except (KeyError, ValueError) as exc:
        report.problems.append(f"File {CONSISTENCY} INVALID: {exc}")
        return
    for entry in entries:
        where = f"Consistency proof p{entry.get('partition')} seal {entry.get('from_seal')} -> {entry.get('to_seal')}"
        old, new = seals.get((entry.get("partition"), entry.get("from_seal"))), seals.get((entry.get("partition"), entry.get("to_seal")))
        if old is None or new is None:
            report.problems.append(f"{where} INVALID: names a seal that is not in the bundle")
            continue
        try:
            merkle.verify_consistency(old.tree_size, new.tree_size, old.root, new.root,
                                      [bytes.fromhex(h) for h in entry["proof"]])
        except (merkle.MerkleError, ValueError, KeyError) as exc:
            report.problems.append(f"{where} INVALID: {exc}")


def _all_seals(bundle: Bundle) -> list[Seal]:
    seals = []
    for name in bundle.names:
        if name.startswith("seals/"):
            try:
                seals.append(Seal.from_bytes(bundle.archive.read(name)))
            except SealError:
                pass  # already reported by _check_seals
    return seals


# --- events and sessions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    index: int
    event: SignedEvent
    valid: bool


def _check_events(bundle: Bundle, trust: Keyring, newest: dict[int, Seal], report: Report,
                  trace: Callable[[str], None] | None) -> list[Row]:
    try:
        table = pq.read_table(io.BytesIO(bundle.archive.read(EVENTS)))
    except Exception as exc:  # noqa: BLE001 - any unreadable Parquet is one problem line
        report.problems.append(f"File {EVENTS} INVALID: not readable Parquet ({type(exc).__name__}: {exc})")
        return []
    columns = {name: table.column(name).to_pylist() for name in
               ("event", "salt", "partition", "leaf_index", "tree_size", "inclusion_proof", "session_id", "seq",
                "kind", "event_id", "event_hash")}
    rows = []
    report.events_total = table.num_rows
    for i in range(table.num_rows):
        row = {name: values[i] for name, values in columns.items()}
        event, problem = _check_event(row, trust, newest, trace)
        if problem:
            report.problems.append(f"Event {row['event_id']} (session {row['session_id']} seq {row['seq']}) INVALID: {problem}")
        else:
            report.events_valid += 1
        if event is not None:
            rows.append(Row(i, event, problem is None))
    return rows


def _check_event(row: dict[str, Any], trust: Keyring, newest: dict[int, Seal],
                 trace: Callable[[str], None] | None) -> tuple[SignedEvent | None, str | None]:
    try:
        event = open_event(row["event"])
    except DecodeError as exc:
        return None, f"signed bytes do not decode: {exc}"
    try:
        check_signature(event, trust)
    except Rejection as exc:
        return event, f"{exc.reason}: {exc.detail}"
    for column, actual in (("session_id", event.session_id), ("seq", event.seq), ("kind", event.kind),
                           ("event_id", event.event_id), ("event_hash", event.hash)):
        if row[column] != actual:
            return event, f"column {column} does not match the signed event"
    seal = newest.get(row["partition"])
    if seal is None:
        return event, f"no valid checkpoint for partition {row['partition']} in the bundle"
    if row["tree_size"] != seal.tree_size:
        return event, f"inclusion proof is for tree size {row['tree_size']}, the checkpoint has {seal.tree_size}"
    leaf = merkle.event_leaf_hash(row["salt"], row["event"])
    if trace:
        trace(f"event {row['event_id']}: leaf {row['leaf_index']} = SHA256(0x00 | salt | SHA256(event)) = {leaf.hex()}")
    try:
        merkle.verify_inclusion(leaf, row["leaf_index"], seal.tree_size, row["inclusion_proof"], seal.root, trace=trace)
    except merkle.MerkleError as exc:
        return event, f"inclusion proof fails: {exc}"
    return event, None


def _check_sessions(rows: list[Row], report: Report) -> None:
    """Each session whole and in order: seq 0..n, prev_hash links, SessionStart first, SessionEnd last (or declared open)."""
    declared = report.predicate.get("sessions", {})
    by_session: dict[str, list[Row]] = {}
    for row in rows:
        by_session.setdefault(row.event.session_id, []).append(row)
    for session_id, session in by_session.items():
        if session_id not in declared:
            report.problems.append(f"Session {session_id} INVALID: is not in the manifest's scope")
            continue
        problem = _session_problem(session)
        claimed = declared[session_id]
        is_open = session[-1].event.kind != "session_end"
        if problem is None and claimed.get("events") not in (None, len(session)):
            problem = f"manifest says {claimed['events']} events, the bundle has {len(session)}"
        if problem is None and is_open and not claimed.get("open", False):
            problem = "no SessionEnd, and the manifest does not declare the session open"
        if problem:
            report.problems.append(f"Session {session_id} INCOMPLETE: {problem}")
        elif is_open:
            report.sessions_open += 1
        else:
            report.sessions_complete += 1
    for session_id in declared:
        if session_id not in by_session:
            report.problems.append(f"Session {session_id} INCOMPLETE: in the manifest but no events in the bundle")


def _session_problem(session: list[Row]) -> str | None:
    seqs = [row.event.seq for row in session]
    for position, seq in enumerate(seqs):
        if seq != position:
            if position in seqs[position:]:
                return f"events out of order: seq {seq} stands where seq {position} belongs"
            if seq in seqs[:position]:
                return f"seq {seq} appears twice"
            return f"seq {position} is missing (chain gap before seq {seq})"
    for earlier, later in zip(session, session[1:]):
        if later.event.prev_hash != earlier.event.hash:
            return f"seq {later.event.seq} prev_hash does not link to seq {earlier.event.seq}"
    if session[0].event.prev_hash != bytes(32):
        return "seq 0 has a prev_hash"
    if session[0].event.kind != "session_start":
        return "does not begin with SessionStart"
    return None


# --- chain of custody ------------------------------------------------------------------------


def _check_transfers(bundle: Bundle, trust: Keyring, report: Report) -> None:
    previous = None
    manifest_sha = hashlib.sha256(bundle.manifest_bytes).hexdigest()
    for sequence, name in enumerate(sorted(n for n in bundle.names if n.startswith(TRANSFER_PREFIX)), start=1):
        data = bundle.archive.read(name)
        try:
            record = dsse.verify(json.loads(data), trust, "exporter", TRANSFER_TYPE).json()
        except (ValueError, dsse.DsseError) as exc:
            report.problems.append(f"Transfer {name} INVALID: {exc}")
            previous = data
            continue
        expected_previous = hashlib.sha256(previous).hexdigest() if previous else None
        if record.get("sequence") != sequence or record.get("manifest_sha256") != manifest_sha \
                or record.get("previous_sha256") != expected_previous:
            report.problems.append(f"Transfer {name} INVALID: does not link to the manifest and the transfer before it")
        report.transfers.append(record)
        previous = data
