"""`custody bundle verify`: check a sealed bundle offline, trusting only `--trust`.

Like `aws cloudtrail validate-logs`: every check runs, each problem is one line
naming what is wrong and where, then a summary. Each check is a small function
that appends to the report rather than stopping at the first problem, so an
auditor sees the whole extent of a tampering, not just its first symptom.

The per-event checks (decode, Ed25519 signature, columns, leaf hash and audit
path) run in this process and `jobs` - 1 spawned worker processes on chunks of rows, collected in
order, so the report is identical whatever `jobs` is. As with any spawned
multiprocessing, a script calling `verify_bundle(..., jobs>1)` needs the
`if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import multiprocessing
import zipfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc  # noqa: F401 - pa.ipc
import pyarrow.parquet as pq

from ingest.avro import DecodeError
from ingest.events import SignedEvent, datetime_to_micros, open_event, open_head
from ingest.keys import Keyring, KeyLookupError
from ingest.verify import Rejection, check_signature, signature_valid
from ledger import checkpoint, merkle, sessionmap
from ledger.rotation import RotationError, check_rotation, with_key
from ledger.seals import Seal, SealError, checkpoint_verifiers, verify_seal_signature
from query import dsse
from ledger import witnessed as witnessed_checks
from query.bundle_format import (CONSISTENCY, COSIGNATURES_PREFIX, EVENTS, MANIFEST, PREDICATE_TYPE, SESSION_STATES,
                                  STATEMENT_TYPE, TRANSFER_PREFIX, TRANSFER_TYPE)


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
    witnessed: list[str] = field(default_factory=list)
    """One line per partition: its newest checkpoint and who witnessed it when."""
    states_proven: int = 0
    """Sessions whose events agree with their state proven against the newest seal's session-state map."""
    notes: list[str] = field(default_factory=list)
    """What could not be established, without being a problem (e.g. a ledger from before session-state maps)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        signer = f"manifest signed by {self.manifest_signer}" if self.manifest_signer else "manifest NOT verified"
        case = f" (case {self.predicate.get('case')})" if self.predicate.get("case") else ""
        open_note = f" ({self.sessions_open} open at export)" if self.sessions_open else ""
        proven = f", {self.states_proven} session states proven" if self.states_proven else ""
        return (f"{self.events_valid:,}/{self.events_total:,} events valid, "
                f"{self.checkpoints_valid}/{self.checkpoints_total} checkpoints valid, "
                f"{self.sessions_complete} sessions complete{open_note}{proven}, {signer}{case}")


@dataclass
class Bundle:
    """What verification reads from the archive."""

    archive: zipfile.ZipFile
    names: list[str]
    manifest_bytes: bytes


def verify_bundle(path: Path, trust: Keyring, trace: Callable[[str], None] | None = None, *, jobs: int = 1,
                  progress: Callable[[int, int], None] | None = None, witnesses: int = 0,
                  checkpoints: Sequence[bytes] = ()) -> Report:
    """Check everything, each problem one report line. `jobs` > 1 checks the events in that many
    processes (the report is the same); `progress(done, total)` follows the events. `witnesses`: trusted
    witness cosignatures required on each partition's newest checkpoint; `checkpoints`: witnessed checkpoints
    the auditor obtained elsewhere, which the bundle must not be older than (staleness is never judged by the
    export time the exporter writes), nor disagree with at their tree size: the same root and the same session-map
    root (a re-signed seal whose map proves a session open, beside the witnessed one's, is a fork)."""
    report = Report()
    bundle = _open(path, report)
    if bundle is None:
        return report
    with bundle.archive:
        statement = _check_manifest(bundle, trust, report)
        _check_files(bundle, statement, report)
        keyrings = _check_key_history(bundle, trust, report, witnesses)
        newest = _check_seals(bundle, keyrings, report)
        _check_consistency(bundle, newest, report)
        _check_witnesses(bundle, keyrings, newest, report, witnesses, checkpoints, trust)
        sessions = _check_events(bundle, trust, newest, report, trace, jobs, progress)
        _check_sessions(sessions, report)
        _check_session_states(bundle, newest, sessions, report)
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


def _check_key_history(bundle: Bundle, trust: Keyring, report: Report, required: int) -> dict[int, Keyring]:
    """Per partition, the keys its seals may be signed by: seal 1's (trusted by `trust`), then each key a witnessed
    rotation seal hands over to (ledger/rotation.py). A seal signed by another key is refused, even one `trust`
    lists; a rotation's new key is trusted only through it. Returns per partition the keyring to check seals with."""
    by_partition: dict[int, list[tuple[str, Seal]]] = {}
    for name in sorted(n for n in bundle.names if n.startswith("seals/")):
        try:
            seal = Seal.from_bytes(bundle.archive.read(name))
            by_partition.setdefault(seal.partition, []).append((name, seal))
        except SealError:
            pass  # reported by _check_seals
    keyrings: dict[int, Keyring] = {}
    for partition, chain in sorted(by_partition.items()):
        chain.sort(key=lambda item: item[1].number)
        keyring = trust
        if chain[0][1].number != 1 and chain[-1][1].record.get("sessions") is not None:
            report.problems.append(f"Seals p{partition} INVALID: the bundle lacks seal 1, where the chain's key starts")
        current = chain[0][1].record.get("key_id")
        for name, seal in chain:
            if seal.record.get("key_id") != current:
                report.problems.append(f"Seal {name} INVALID: signed by key {seal.record.get('key_id')}, but the chain's "
                                       f"key is {current}: a ledger key takes over only through a witnessed rotation seal")
            if not seal.record.get("rotation"):
                continue
            new_id = seal.record["rotation"].get("key_id") if isinstance(seal.record["rotation"], dict) else None
            lines_name = f"{COSIGNATURES_PREFIX}p{partition}/{seal.number:06d}.sig"
            lines = bundle.archive.read(lines_name).decode().splitlines() if lines_name in bundle.names else []
            try:
                new_key = check_rotation(seal.record)
                verify_seal_signature(seal, keyring)
                witnessed = witnessed_checks.open_witnessed(witnessed_checks.with_lines(seal.checkpoint_note, lines),
                                                            keyring, seal.record["origin"])
                witnessed_checks.check_quorum(witnessed, max(required, 1), f"Rotation to key {new_id} at {name}")
            except (RotationError, SealError, witnessed_checks.WitnessedProblem, checkpoint.NoteError) as exc:
                report.problems.append(f"Seal {name} INVALID: rotation to key {new_id} not accepted ({exc}); the seals "
                                       f"it signs are not trusted")
                keyring = Keyring([k for k in keyring if k.key_id != new_id])
            else:
                keyring = with_key(keyring, new_key)
                report.witnessed.append(f"Rotation p{partition} seal {seal.number}: key {seal.record['key_id']} -> "
                                        f"{new_id}, witnessed {witnessed.describe()}")
            current = new_id
        keyrings[partition] = keyring
    return keyrings


def _check_seals(bundle: Bundle, keyrings: dict[int, Keyring], report: Report) -> dict[int, Seal]:
    """Each seal's signature and its checkpoint's; returns each partition's newest valid seal."""
    newest: dict[int, Seal] = {}
    for name in sorted(n for n in bundle.names if n.startswith("seals/")):
        report.checkpoints_total += 1
        data = bundle.archive.read(name)
        try:
            trust = keyrings.get(Seal.from_bytes(data).partition, Keyring([]))
        except SealError:
            trust = Keyring([])
        seal = _valid_seal(name, data, trust, report)
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


def _check_witnesses(bundle: Bundle, keyrings: dict[int, Keyring], newest: dict[int, Seal], report: Report,
                     required: int, checkpoints: Sequence[bytes], trust_all: Keyring) -> None:
    """Each partition's newest checkpoint cosigned by `required` trusted witnesses; no auditor's checkpoint newer, nor
    one of the same tree size with another root or another session-map root (the ledger key signed two histories, or
    two sets of session states for one history: a session proven open in the bundle the witnesses saw ended)."""
    for partition, seal in sorted(newest.items()):
        trust = keyrings[partition]
        subject = f"Checkpoint p{partition} (seal {seal.number}, tree size {seal.tree_size})"
        name = f"{COSIGNATURES_PREFIX}p{partition}/{seal.number:06d}.sig"
        lines = bundle.archive.read(name).decode().splitlines() if name in bundle.names else []
        try:
            witnessed = witnessed_checks.open_witnessed(witnessed_checks.with_lines(seal.checkpoint_note, lines), trust,
                                                        seal.record["origin"])
            report.witnessed.append(f"{subject} witnessed {witnessed.describe()}")
            witnessed_checks.check_quorum(witnessed, required, subject)
        except (witnessed_checks.WitnessedProblem, checkpoint.NoteError) as exc:
            report.problems.append(str(exc).replace("Checkpoint INVALID", f"{subject} INVALID"))
    roots = {}
    for s in _all_seals(bundle):
        roots.setdefault(s.partition, {})[s.tree_size] = s.root
    everything = Keyring(list({(k.key_id, k.role): k for keyring in [trust_all, *keyrings.values()]
                               for k in keyring}.values()))
    for number, note in enumerate(checkpoints, 1):
        try:
            witnessed = witnessed_checks.open_witnessed(note, everything)
            witnessed_checks.check_quorum(witnessed, max(required, 1), f"Given checkpoint #{number}")
        except witnessed_checks.WitnessedProblem as exc:
            report.problems.append(str(exc).replace("Checkpoint INVALID", f"Given checkpoint #{number} INVALID"))
            continue
        partition = witnessed.partition
        seal = newest.get(partition) if partition is not None else None
        if seal is None or seal.record["origin"] != witnessed.checkpoint.origin:
            continue  # another log's, or a partition the bundle has nothing of
        try:
            witnessed_checks.check_not_stale(witnessed, seal.tree_size, roots.get(partition, {}),
                                             f"Bundle partition p{partition}")
            witnessed_checks.check_same_sessions(witnessed, _signed_seals(bundle, partition, keyrings[partition]),
                                                 f"Bundle partition p{partition}")
        except witnessed_checks.WitnessedProblem as exc:
            report.problems.append(str(exc))


def _signed_seals(bundle: Bundle, partition: int, trust: Keyring) -> list[Seal]:
    """The partition's seals signed by a key of its chain: what the ledger's key stated, so a session-map root held
    against a witnessed checkpoint is the ledger's word (a seal whose signature fails is _check_seals' line, and not
    also a fork)."""
    signed = []
    for seal in _all_seals(bundle):
        if seal.partition == partition:
            try:
                verify_seal_signature(seal, trust)
            except SealError:
                continue
            signed.append(seal)
    return signed


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
#
# The per-event checks are the bulk of the work (an Ed25519 verify, an Avro decode, two SHA-256 and an
# audit path per event), so they run on chunks of rows, in worker processes when `jobs` > 1. A chunk
# travels as Arrow IPC bytes and comes back as one `ChunkResult`; chunks are taken in order, so the report
# is the same line for line whatever the number of jobs.
#
# Each event first goes the fast way (`EventChecks.passes`): the same checks with nothing to say, since
# it only answers whether all of them hold. An event it does not pass goes the exact way (`EventChecks.check`),
# which finds the check that fails and says so, or passes it after all: the report is the exact way's.

EVENT_COLUMNS = ("event", "salt", "partition", "leaf_index", "tree_size", "inclusion_proof", "session_id", "seq",
                 "kind", "event_id", "event_hash")
CHUNK_EVENTS = 2_000
"""Rows per unit of work: large enough that IPC and scheduling are noise, small enough to balance the cores."""
FACT_COLUMNS = ("session_id", "seq", "kind", "event_hash", "partition")
"""The columns that are an event's facts (`EventFacts` but its prev_hash) once it passed every check."""
HASH_SIZE = 32
HASH_TYPE = pa.binary(HASH_SIZE)


class EventInvalid(Exception):
    """One event fails one check; the message is the report's wording for it."""


class UndecodableEvent(EventInvalid):
    """The signed bytes are not a SignedEvent of a published schema."""


class BadEventSignature(EventInvalid):
    """The proxy's signature is missing from the keyring, out of its validity, or does not verify."""


class ColumnMismatch(EventInvalid):
    """A convenience column of the Parquet file says something other than the signed event."""


class NoCheckpoint(EventInvalid):
    """No valid checkpoint in the bundle covers the event's partition."""


class InclusionFails(EventInvalid):
    """The event's leaf is not in the checkpointed tree: wrong tree size or a failing audit path."""


class EventFacts(NamedTuple):
    """What the session checks need of a decoded event."""

    session_id: str
    seq: int
    kind: str
    prev_hash: bytes
    hash: bytes
    partition: int | None = None


class Anchor(NamedTuple):
    """A partition's tree as its newest valid seal commits to it."""

    tree_size: int
    root: bytes


class ChunkResult(NamedTuple):
    """A chunk's outcome in a few objects (not one per event): cheap to send back from a worker."""

    problems: list[tuple[int, str]]
    """(row within the chunk, report line) of each invalid event, in row order."""
    prev_hashes: bytes
    """Per row, 32 bytes: the prev_hash of each event that went the fast way (zeros for the others)."""
    exact: dict[int, EventFacts | None]
    """Row -> facts of each event that went the exact way, None if its bytes do not decode. Every other event
    passed every check, so its columns are its signed facts."""
    trace: list[str]
    """The proof steps, in order, when tracing."""


def _check_events(bundle: Bundle, trust: Keyring, newest: dict[int, Seal], report: Report,
                  trace: Callable[[str], None] | None, jobs: int,
                  progress: Callable[[int, int], None] | None) -> list[SessionEvents]:
    try:
        batches = _read_events(bundle.archive.read(EVENTS))
    except Exception as exc:  # noqa: BLE001 - any unreadable Parquet is one problem line
        report.problems.append(f"File {EVENTS} INVALID: not readable Parquet ({type(exc).__name__}: {exc})")
        return []
    table = pa.Table.from_batches(batches) if batches else pa.table({})
    report.events_total = table.num_rows
    checks = EventChecks(trust, {p: Anchor(s.tree_size, s.root) for p, s in newest.items()}, trace is not None)
    prev_hashes: list[bytes] = []
    exact: dict[int, EventFacts | None] = {}
    done = 0
    for batch, result in zip(batches, _run_chunks(checks, batches, jobs)):
        for line in result.trace:
            trace(line)
        report.problems += [line for _, line in result.problems]
        report.events_valid += batch.num_rows - len(result.problems)
        prev_hashes.append(result.prev_hashes)
        exact.update((done + offset, facts) for offset, facts in result.exact.items())
        done += batch.num_rows
        if progress:
            progress(done, table.num_rows)
    return _sessions(table, b"".join(prev_hashes), exact)


def _read_events(data: bytes) -> list[pa.RecordBatch]:
    """The events' columns in chunks of `CHUNK_EVENTS` rows, decoded one chunk at a time on one thread: a whole
    table of them at once, or on Arrow's threads, costs the parent process more CPU (measured: ~3-8 against
    ~2-3 µs an event), which on a machine of few cores is taken from the workers."""
    parquet = pq.ParquetFile(pa.py_buffer(data))
    missing = [name for name in EVENT_COLUMNS if name not in parquet.schema_arrow.names]
    if missing:  # the Parquet reader would leave them out without a word
        raise ValueError(f"no column {', '.join(missing)}")
    return list(parquet.iter_batches(CHUNK_EVENTS, columns=list(EVENT_COLUMNS), use_threads=False))


def _run_chunks(checks: "EventChecks", batches: list[pa.RecordBatch], jobs: int) -> Iterator[ChunkResult]:
    """Each batch's result, in batch order: in this process for jobs=1 (or one batch), else in this process and
    `jobs` - 1 workers. This process checks every `jobs`-th chunk itself while the workers check the others: a
    worker fewer to start (each spends ~0.5 s of CPU importing its modules, measured: ~10% of a 100k-event run's
    CPU on 2 cores) and those chunks never copied."""
    if jobs <= 1 or len(batches) <= 1:
        yield from map(checks.run, batches)
        return
    # spawn, not fork: a forked child would inherit Arrow's and the parent's threads mid-flight.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(jobs - 1, len(batches) - 1), mp_context=context,
                             initializer=_init_worker, initargs=(checks,)) as pool:
        ahead = 4 * jobs  # bounded read-ahead: the whole table is never copied into the queue at once
        queued = (batch if number % jobs == jobs - 1 else pool.submit(_run_worker_chunk, _to_ipc(batch))
                  for number, batch in enumerate(batches))
        pending = deque(itertools.islice(queued, ahead))
        while pending:
            item = pending.popleft()
            pending.extend(itertools.islice(queued, 1))  # the workers' next chunk is queued before this one is checked
            yield checks.run(item) if isinstance(item, pa.RecordBatch) else item.result()


def _to_ipc(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


_worker_checks: "EventChecks | None" = None


def _init_worker(checks: "EventChecks") -> None:
    global _worker_checks
    _worker_checks = checks


def _run_worker_chunk(data: bytes) -> ChunkResult:
    assert _worker_checks is not None, "worker not initialised"
    return _worker_checks.run(pa.ipc.open_stream(data).read_next_batch())


class ProxyKey(NamedTuple):
    """A trusted proxy key and the microseconds it may sign in (`Keyring.key_for`'s window, as integers)."""

    public_key: bytes
    first_us: int | float
    last_us: int | float


def _proxy_keys(trust: Keyring) -> dict[str, ProxyKey]:
    """The keys `Keyring.key_for(..., role="proxy")` answers with, by key id, looked up per event with one dict
    get and two integer comparisons instead of a datetime per event. A key with a validity bound that is not an
    aware datetime is left out: its events go the exact way."""
    keys = {}
    for key in trust:
        bounds = [key.not_before, key.not_after]
        if key.role == "proxy" and all(b is None or b.tzinfo is not None for b in bounds):
            keys[key.key_id] = ProxyKey(key.public_key,
                                        -math.inf if key.not_before is None else datetime_to_micros(key.not_before),
                                        math.inf if key.not_after is None else datetime_to_micros(key.not_after))
    return keys


ROW_COLUMNS = tuple(name for name in EVENT_COLUMNS if name != "inclusion_proof")
"""The columns `ChunkColumns` holds as lists, in the order of the rows `EventChecks.passes` takes."""


class ChunkColumns:
    """A chunk's columns as Python lists, read once per chunk; the audit paths as one bytes object of 32-byte
    hashes and each row's first and last hash (a list per row costs more than the checks of it)."""

    def __init__(self, batch: pa.RecordBatch):
        self.batch = batch
        self.values = {name: batch.column(name).to_pylist() for name in ROW_COLUMNS}
        proofs = batch.column("inclusion_proof")
        self.proofs: bytes | None = None
        self.proof_bounds: list[int] = []
        if pa.types.is_list(proofs.type) and proofs.type.value_type == HASH_TYPE and not proofs.null_count \
                and not proofs.values.null_count:
            offsets = proofs.offsets.to_pylist()
            hashes = proofs.flatten()
            self.proof_bounds = [offset - offsets[0] for offset in offsets]
            self.proofs = hashes.buffers()[1].slice(hashes.offset * HASH_SIZE, len(hashes) * HASH_SIZE).to_pybytes()

    def row(self, offset: int) -> dict[str, Any]:
        row = {name: values[offset] for name, values in self.values.items()}
        row["inclusion_proof"] = self.batch.column("inclusion_proof")[offset].as_py()
        return row


class ProvenPaths:
    """`merkle.verify_inclusion`'s answer (only whether it passes) for a chunk's events, sharing their paths.

    Where one event's audit path reaches a node that another's reached on its way to the root, in the same
    state of the walk (the same `fn`, `sn` and root) and with the same hashes left to take, the rest of the
    walk is the one already taken: it ends at the root. A chunk's events are neighbours in their tree, so that
    is few hashes a path instead of one a level (measured: 2.0 instead of 16 on a 100k-event export of a demo
    ledger). Only paths that reached the root are kept."""

    def __init__(self) -> None:
        self.nodes: dict[bytes, tuple[int, int, bytes, bytes, int, int]] = {}
        """A node's hash -> (fn, sn, root, proofs, where its hashes left start and end) after it."""

    def included(self, leaf: bytes, index: int, anchor: Anchor, proofs: bytes, first: int, last: int) -> bool:
        size, root = anchor
        if not 0 <= index < size or len(root) != HASH_SIZE:
            return False
        inner = (index ^ (size - 1)).bit_length()
        start, end = first * HASH_SIZE, last * HASH_SIZE
        if last - first != inner + (index >> inner).bit_count():
            return False
        nodes, path = self.nodes, []
        fn, sn, r = index, size - 1, leaf
        for at in range(start + HASH_SIZE, end + HASH_SIZE, HASH_SIZE):
            p = proofs[at - HASH_SIZE:at]
            if fn & 1 or fn == sn:
                r = sha256(b"\x01" + p + r).digest()
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
            else:
                r = sha256(b"\x01" + r + p).digest()
            fn, sn = fn >> 1, sn >> 1
            known = nodes.get(r)
            if known is not None and known[:3] == (fn, sn, root) and \
                    proofs[at:end] == known[3][known[4]:known[5]]:
                break
            path.append((r, fn, sn, at))
        else:
            if r != root:
                return False
        for r, fn, sn, at in path:
            nodes[r] = (fn, sn, root, proofs, at, end)
        return True


@dataclass(frozen=True)
class EventChecks:
    """The per-event checks with what they trust: picklable, so that each worker gets one copy."""

    trust: Keyring
    anchors: dict[int, Anchor]
    tracing: bool = False
    keys: dict[str, ProxyKey] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", _proxy_keys(self.trust))

    def run(self, batch: pa.RecordBatch) -> ChunkResult:
        columns = ChunkColumns(batch)
        result = ChunkResult([], bytearray(HASH_SIZE * batch.num_rows), {}, [])
        trace = result.trace.append if self.tracing else None
        paths = ProvenPaths()
        for offset, values in enumerate(zip(*columns.values.values())):
            prev_hash = None if self.tracing else self.passes(values, offset, columns, paths)
            if prev_hash is not None:
                result.prev_hashes[offset * HASH_SIZE:(offset + 1) * HASH_SIZE] = prev_hash
                continue
            row = columns.row(offset)
            result.exact[offset], problem = self.check(row, trace)
            if problem is not None:
                result.problems.append(
                    (offset, f"Event {row['event_id']} (session {row['session_id']} seq {row['seq']}) INVALID: {problem}"))
        return result._replace(prev_hashes=bytes(result.prev_hashes))

    def passes(self, values: tuple, offset: int, columns: ChunkColumns, paths: ProvenPaths) -> bytes | None:
        """The event's prev_hash if it passes every check of `check` (the fast way), else None. `values`: its
        row's `ROW_COLUMNS`."""
        value, salt, partition, leaf_index, tree_size, session_id, seq, kind, event_id, event_hash = values
        if value is None or salt is None or leaf_index is None:  # a null cell: the exact way names it
            return None
        try:
            event = open_head(value)
        except DecodeError:
            return None
        envelope = event.envelope
        key = self.keys.get(envelope.key_id)
        if key is None or not key.first_us <= envelope.ts <= key.last_us or not signature_valid(event, key.public_key):
            return None
        digest = sha256(value).digest()
        if (session_id != envelope.session_id or seq != envelope.seq or kind != envelope.kind
                or event_id != envelope.event_id or event_hash != digest):
            return None
        anchor = self.anchors.get(partition)
        if anchor is None or tree_size != anchor.tree_size or columns.proofs is None or len(salt) != merkle.SALT_SIZE:
            return None
        leaf = sha256(b"\x00" + salt + digest).digest()
        bounds = columns.proof_bounds
        if not paths.included(leaf, leaf_index, anchor, columns.proofs, bounds[offset], bounds[offset + 1]):
            return None
        return envelope.prev_hash

    def check(self, row: dict[str, Any], trace: Callable[[str], None] | None) -> tuple[EventFacts | None, str | None]:
        """The event's facts (None if undecodable) and what is wrong with it (None if nothing): the exact way."""
        try:
            event = _decoded(row)
        except UndecodableEvent as exc:
            return None, str(exc)
        facts = EventFacts(event.session_id, event.seq, event.kind, event.prev_hash, event.hash, row["partition"])
        try:
            _check_signature(event, self.trust)
            _check_columns(row, facts, event.event_id)
            _check_inclusion(row, self._anchor(row), trace)
        except EventInvalid as exc:
            return facts, str(exc)
        return facts, None

    def _anchor(self, row: dict[str, Any]) -> Anchor:
        anchor = self.anchors.get(row["partition"])
        if anchor is None:
            raise NoCheckpoint(f"no valid checkpoint for partition {row['partition']} in the bundle")
        return anchor


def _decoded(row: dict[str, Any]) -> SignedEvent:
    if not isinstance(row["event"], bytes):
        raise UndecodableEvent("the event column is empty (null)")
    try:
        return open_event(row["event"])
    except DecodeError as exc:
        raise UndecodableEvent(f"signed bytes do not decode: {exc}") from None


def _check_signature(event: SignedEvent, trust: Keyring) -> None:
    try:
        check_signature(event, trust)
    except Rejection as exc:
        raise BadEventSignature(f"{exc.reason}: {exc.detail}") from None


def _check_columns(row: dict[str, Any], facts: EventFacts, event_id: str) -> None:
    for column, actual in (("session_id", facts.session_id), ("seq", facts.seq), ("kind", facts.kind),
                           ("event_id", event_id), ("event_hash", facts.hash)):
        if row[column] != actual:
            raise ColumnMismatch(f"column {column} does not match the signed event")


def _size(value: Any) -> str:
    return "missing" if value is None else f"{len(value)} bytes"


def _check_inclusion(row: dict[str, Any], anchor: Anchor, trace: Callable[[str], None] | None) -> None:
    if row["tree_size"] != anchor.tree_size:
        raise InclusionFails(f"inclusion proof is for tree size {row['tree_size']}, the checkpoint has {anchor.tree_size}")
    if not isinstance(row["salt"], bytes) or len(row["salt"]) != merkle.SALT_SIZE:
        raise InclusionFails(f"salt is {_size(row['salt'])}, expected {merkle.SALT_SIZE} bytes")
    for column in ("leaf_index", "inclusion_proof"):
        if row[column] is None:
            raise InclusionFails(f"{column} is missing (null)")
    leaf = merkle.event_leaf_hash(row["salt"], row["event"])
    if trace:
        trace(f"event {row['event_id']}: leaf {row['leaf_index']} = SHA256(0x00 | salt | SHA256(event)) = {leaf.hex()}")
    try:
        merkle.verify_inclusion(leaf, row["leaf_index"], anchor.tree_size, row["inclusion_proof"], anchor.root, trace=trace)
    except merkle.MerkleError as exc:
        raise InclusionFails(f"inclusion proof fails: {exc}") from None


class SessionEvents(NamedTuple):
    """One session's events as the session checks need them."""

    session_id: str
    count: int
    final: EventFacts
    """Its last event in the bundle's order: a SessionEnd if the session ended."""
    newest: EventFacts
    """Its highest seq (of equal ones, the later): where its proven state must say it ends."""
    problem: str | None
    """What breaks its chain (`_session_problem`), None if it is whole and in order."""


def _sessions(table: pa.Table, prev_hashes: bytes, exact: dict[int, EventFacts | None]) -> list[SessionEvents]:
    """Every session with decodable events, in order of first appearance."""
    if not exact:
        whole = _whole_runs(table, prev_hashes)
        if whole is not None:
            return whole
    by_session: dict[str, list[EventFacts]] = {}
    for facts in _row_facts(table, prev_hashes, exact):
        by_session.setdefault(facts.session_id, []).append(facts)
    return [SessionEvents(session_id, len(events), events[-1], _newest(events), _session_problem(events))
            for session_id, events in by_session.items()]


def _row_facts(table: pa.Table, prev_hashes: bytes, exact: dict[int, EventFacts | None]) -> Iterator[EventFacts]:
    """Each decodable row's facts: the exact way's, else (the event passed every check) its columns'."""
    columns = [table.column(name).to_pylist() for name in FACT_COLUMNS]
    for index, (session_id, seq, kind, event_hash, partition) in enumerate(zip(*columns)):
        facts = exact[index] if index in exact else EventFacts(
            session_id, seq, kind, prev_hashes[index * HASH_SIZE:(index + 1) * HASH_SIZE], event_hash, partition)
        if facts is not None:
            yield facts


def _newest(events: list[EventFacts]) -> EventFacts:
    newest = events[0]
    for facts in events:
        if facts.seq >= newest.seq:
            newest = facts
    return newest


def _whole_runs(table: pa.Table, prev_hashes: bytes) -> list[SessionEvents] | None:
    """The sessions when every event passed every check (its columns are its facts) and each session is one run of
    rows, whole and in order (`_session_problem` finds nothing), found on whole columns; else None.

    The common case costs no Python object per event: the parent process checks every chain while the workers
    check the events, and what it spends is taken from the cores they run on."""
    rows = table.num_rows
    if rows == 0:
        return []
    session_ids = table.column("session_id").combine_chunks()
    seqs = table.column("seq").combine_chunks()
    if seqs.null_count:
        return None
    changes = pc.indices_nonzero(pc.not_equal(session_ids[1:], session_ids[:-1]))
    starts = np.concatenate(([0], _integers(changes) + 1))
    if len(starts) != pc.count_distinct(session_ids).as_py():
        return None  # a session in more than one run of rows
    lengths = np.diff(np.append(starts, rows))
    ends = starts + lengths - 1
    in_order = _integers(seqs) == np.arange(rows) - np.repeat(starts, lengths)
    prev = np.frombuffer(prev_hashes, np.uint8).reshape(rows, HASH_SIZE)
    linked = np.empty(rows, bool)
    linked[1:] = (prev[1:] == _hash_rows(table.column("event_hash"))[:-1]).all(axis=1)
    linked[starts] = ~prev[starts].any(axis=1)
    started = set(table.column("kind").take(_indices(starts)).to_pylist()) == {"session_start"}
    if not (in_order.all() and linked.all() and started):
        return None
    last = _row_facts(table.select(FACT_COLUMNS).take(_indices(ends)), bytes(prev[ends]), {})
    return [SessionEvents(facts.session_id, int(count), facts, facts, None) for count, facts in zip(lengths, last)]


def _integers(array: pa.Array) -> np.ndarray:
    """A null-free integer array as int64 numbers, read from its buffer: Arrow's to_numpy imports pandas (measured
    0.2-0.8 s of the parent's CPU a run, taken from the workers' cores)."""
    array = array.cast(pa.int64())
    return np.frombuffer(array.buffers()[1], np.int64)[array.offset:array.offset + len(array)]


def _indices(values: np.ndarray) -> pa.Array:
    """Row numbers as an Arrow array on their buffer (pa.array would import pandas, as to_numpy does)."""
    values = np.ascontiguousarray(values, np.int64)
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def _hash_rows(column: pa.ChunkedArray) -> np.ndarray:
    """A column of 32-byte hashes as a (rows, 32) byte matrix, without a Python object per row."""
    hashes = column.combine_chunks().cast(HASH_TYPE)
    data = np.frombuffer(hashes.buffers()[1], np.uint8)
    return data[hashes.offset * HASH_SIZE:(hashes.offset + len(hashes)) * HASH_SIZE].reshape(len(hashes), HASH_SIZE)


def _check_sessions(sessions: list[SessionEvents], report: Report) -> None:
    """Each session whole and in order: seq 0..n, prev_hash links, SessionStart first, SessionEnd last (or declared open)."""
    declared = report.predicate.get("sessions", {})
    for session in sessions:
        session_id = session.session_id
        if session_id not in declared:
            report.problems.append(f"Session {session_id} INVALID: is not in the manifest's scope")
            continue
        problem = session.problem
        claimed = declared[session_id]
        is_open = session.final.kind != "session_end"
        if problem is None and claimed.get("events") not in (None, session.count):
            problem = f"manifest says {claimed['events']} events, the bundle has {session.count}"
        if problem is None and is_open and not claimed.get("open", False):
            problem = "no SessionEnd, and the manifest does not declare the session open"
        if problem:
            report.problems.append(f"Session {session_id} INCOMPLETE: {problem}")
        elif is_open:
            report.sessions_open += 1
        else:
            report.sessions_complete += 1
    present = {session.session_id for session in sessions}
    for session_id in declared:
        if session_id not in present:
            report.problems.append(f"Session {session_id} INCOMPLETE: in the manifest but no events in the bundle")


def _session_problem(session: list[EventFacts]) -> str | None:
    seqs = [event.seq for event in session]
    for position, seq in enumerate(seqs):
        if seq != position:
            if position in seqs[position:]:
                return f"events out of order: seq {seq} stands where seq {position} belongs"
            if seq in seqs[:position]:
                return f"seq {seq} appears twice"
            return f"seq {position} is missing (chain gap before seq {seq})"
    for earlier, later in zip(session, session[1:]):
        if later.prev_hash != earlier.hash:
            return f"seq {later.seq} prev_hash does not link to seq {earlier.seq}"
    if session[0].prev_hash != bytes(32):
        return "seq 0 has a prev_hash"
    if session[0].kind != "session_start":
        return "does not begin with SessionStart"
    return None


# --- session states --------------------------------------------------------------------------
#
# A bundle's events prove themselves (signatures, chain, inclusion) but not that none were left out at the end:
# the exporter picks which rows go in. The newest seal of each partition signs, and its checkpoint's extension
# line states (so the witnesses cosign it), the root of the map of every session's state; each session's proof
# against that root names its real last seq and last event hash, which the bundle's events must end with.


def _session_map_roots(newest: dict[int, Seal], report: Report) -> dict[int, bytes | None]:
    """Per partition: the session-state root its newest checkpoint states, None for a seal from before the maps."""
    roots: dict[int, bytes | None] = {}
    for partition, seal in sorted(newest.items()):
        subject = f"Checkpoint p{partition} (seal {seal.number}, tree size {seal.tree_size})"
        try:
            text = checkpoint.Checkpoint.parse(seal.checkpoint_note.decode().split("\n\n", 1)[0] + "\n")
            stated = sessionmap.parse_extensions(text.extensions)
        except (checkpoint.NoteError, sessionmap.SessionMapError, UnicodeDecodeError) as exc:
            report.problems.append(f"{subject} INVALID: {exc}")
            continue
        if stated != seal.record.get("sessions"):
            report.problems.append(f"{subject} INVALID: its session-state line and the seal's sessions field differ")
            continue
        roots[partition] = bytes.fromhex(stated["root"]) if stated else None
        if stated is None:
            report.notes.append(f"{subject} is from before session-state maps: the bundle cannot prove that no "
                                f"session's last events were left out")
    return roots


def _read_state_proofs(bundle: Bundle, report: Report) -> dict[str, dict[str, Any]]:
    if SESSION_STATES not in bundle.names:
        return {}
    try:
        entries = json.loads(bundle.archive.read(SESSION_STATES))
        return {entry["session_id"]: entry for entry in entries}
    except (ValueError, TypeError, KeyError) as exc:
        report.problems.append(f"File {SESSION_STATES} INVALID: {exc}")
        return {}


def _check_session_states(bundle: Bundle, newest: dict[int, Seal], sessions: list[SessionEvents],
                          report: Report) -> None:
    """Each session's events end where its proven state says: same last seq and last event hash (so a SessionEnd
    the ledger sealed cannot be dropped and the session passed off as open)."""
    roots = _session_map_roots(newest, report)
    proofs = _read_state_proofs(bundle, report)
    for session_id, facts in sorted((session.session_id, session.newest) for session in sessions):
        root = roots.get(facts.partition)
        if facts.partition not in roots or root is None:
            continue  # no valid newest seal (reported), or one from before the maps (noted)
        seal = newest[facts.partition]
        where = f"the session-state map of p{facts.partition} seal {seal.number} (tree size {seal.tree_size})"
        entry = proofs.get(session_id)
        if entry is None:
            report.problems.append(f"Session {session_id} INCOMPLETE: no proof of its state against {where}, which "
                                   f"commits to every session's state")
            continue
        try:
            if (entry.get("partition"), entry.get("seal")) != (facts.partition, seal.number):
                raise sessionmap.SessionMapError(f"the proof is for p{entry.get('partition')} seal {entry.get('seal')}")
            proven = sessionmap.verify_state(root, session_id, sessionmap.StateProof.from_json(entry.get("proof")))
        except (sessionmap.SessionMapError, TypeError, AttributeError) as exc:
            report.problems.append(f"Session {session_id} INVALID: state proof against {where} fails: {exc}")
            continue
        if proven is None:
            report.problems.append(f"Session {session_id} INVALID: {where} proves the ledger sealed no event of it")
            continue
        ends = f"the bundle ends at seq {facts.seq}" + (" with its SessionEnd" if facts.kind == "session_end"
                                                         else " and declares it open at export"
                                                         if report.predicate.get("sessions", {}).get(session_id, {}).get("open")
                                                         else " without a SessionEnd")
        if proven.last_seq != facts.seq or proven.last_hash != facts.hash:
            missing = (f": seq {facts.seq + 1}..{proven.last_seq} left out"
                       f"{' (the SessionEnd among them)' if proven.ended else ''}" if proven.last_seq > facts.seq else "")
            report.problems.append(
                f"Session {session_id} INCOMPLETE: {where} proves it {proven.describe()} (last event "
                f"{proven.last_hash.hex()[:16]}…), {ends}{missing}")
            continue
        report.states_proven += 1


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
