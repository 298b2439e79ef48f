"""Sealed bundles: export the selected sessions as one file an auditor verifies offline (its layout:
query/bundle_format.py)."""

from __future__ import annotations

import atexit
import bisect
import getpass
import hashlib
import json
import shutil
import socket
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Iterable

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from ingest.errors import CustodyError
from ingest.keys import Keyring, PrivateKey
from ledger import merkle, sessionmap
from ledger.cosignatures import load as stored_cosignatures
from ledger.seals import SEALS_DIR, Seal
from ledger.segments import SCHEMA as SEGMENT_SCHEMA
from query import dsse
from query.views import MESSAGES_TYPE

from query.bundle_format import (
    CONSISTENCY, COSIGNATURES_PREFIX, EVENTS, KEYRING, MANIFEST, PREDICATE_TYPE, SESSION_STATES, STATEMENT_TYPE,
    TRANSFER_PREFIX, TRANSFER_TYPE)

BUNDLE_SCHEMA = SEGMENT_SCHEMA.append(pa.field("tree_size", pa.int64())).append(
    pa.field("inclusion_proof", pa.list_(pa.binary(32))))


class BundleError(CustodyError):
    pass


@dataclass(frozen=True)
class Scope:
    """What the exporter asked for; recorded verbatim in the manifest."""

    sessions: tuple[str, ...] = ()
    identity: str | None = None
    target: str | None = None
    since: str | None = None
    until: str | None = None
    where: str | None = None

    def predicate(self) -> tuple[str, list[Any]]:
        """A SQL predicate over segment rows and its parameters."""
        clauses, params = [], []
        if self.sessions:
            clauses.append(f"session_id IN ({', '.join('?' for _ in self.sessions)})")
            params.extend(self.sessions)
        for column, value in (("subject", self.identity), ("target", self.target)):
            if value:
                clauses.append(f"{column} = ?")
                params.append(value)
        if self.since:
            clauses.append("ts >= CAST(? AS TIMESTAMPTZ)")
            params.append(self.since)
        if self.until:
            clauses.append("ts < CAST(? AS TIMESTAMPTZ)")
            params.append(self.until)
        if self.where:
            clauses.append(f"({self.where})")
        if not clauses:
            raise BundleError("a bundle needs a scope: --session, --identity, --target, --since/--until or --where")
        return " AND ".join(clauses), params

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in {"sessions": list(self.sessions), "identity": self.identity, "target": self.target,
                                  "since": self.since, "until": self.until, "where": self.where}.items() if v}


# --- reading a ledger ------------------------------------------------------------------------


def load_seals(ledger_dir: Path) -> dict[int, list[Seal]]:
    """Every partition's seals in order."""
    seals: dict[int, list[Seal]] = {}
    for path in sorted((ledger_dir / SEALS_DIR).glob("p*/*.json")):
        seal = Seal.load(path)
        seals.setdefault(seal.partition, []).append(seal)
    for chain in seals.values():
        chain.sort(key=lambda s: s.number)
    if not seals:
        raise BundleError(f"{ledger_dir}: no seals (is this a ledger directory, and has the ledger sealed anything?)")
    return seals


def _segment_paths(ledger_dir: Path, chain: list[Seal]) -> list[Path]:
    return [ledger_dir / s.segment["path"] for s in chain if s.segment]


def _partition_leaves(ledger_dir: Path, chain: list[Seal]) -> tuple[merkle.MerkleLevels, sessionmap.SessionMap | None]:
    """Recompute every leaf hash of a partition from its sealed segments, in leaf order, and (when the newest seal
    has one) the session-state map it signs."""
    hashes: dict[int, bytes] = {}
    last: dict[str, tuple[int, bytes]] = {}
    ended: set[str] = set()
    columns = ("leaf_index", "salt", "event", "session_id", "seq", "event_hash", "kind")
    for path in _segment_paths(ledger_dir, chain):
        table = pq.read_table(path, columns=list(columns))
        for index, salt, event, session_id, seq, event_hash, kind in zip(*(table.column(c).to_pylist() for c in columns)):
            hashes[index] = merkle.event_leaf_hash(salt, event)
            if session_id not in last or seq > last[session_id][0]:
                last[session_id] = (seq, event_hash)
            if kind == "session_end":
                ended.add(session_id)
    leaves = [hashes[i] for i in range(len(hashes))]
    levels = merkle.MerkleLevels(leaves)
    newest = chain[-1]
    if levels.size != newest.tree_size or levels.root(levels.size) != newest.root:
        raise BundleError(f"partition {newest.partition}: segments do not reproduce the newest seal's tree "
                          f"(run `custody verify`)")
    stated = newest.record.get("sessions")
    if stated is None:
        return levels, None  # a seal from before session-state maps
    states = sessionmap.build((sid, sessionmap.SessionState(seq, h, sid in ended)) for sid, (seq, h) in last.items())
    if states.root().hex() != stated["root"]:
        raise BundleError(f"partition {newest.partition}: segments do not reproduce the newest seal's session-state "
                          f"map (run `custody verify`)")
    return levels, states


def _select(ledger_dir: Path, seals: dict[int, list[Seal]], scope: Scope) -> pa.Table:
    paths = [str(p) for chain in seals.values() for p in _segment_paths(ledger_dir, chain)]
    predicate, params = scope.predicate()
    con = duckdb.connect()
    # by name, cast to the current messages type: segments from before contract v2 lack its message fields
    con.execute(f"CREATE VIEW events AS SELECT * REPLACE (CAST(messages AS {MESSAGES_TYPE}) AS messages) "
                f"FROM read_parquet({paths!r}, union_by_name = true)")
    try:
        return con.sql(
            f"SELECT * FROM events WHERE session_id IN (SELECT DISTINCT session_id FROM events WHERE {predicate}) "
            "ORDER BY session_id, seq", params=params).to_arrow_table()
    except duckdb.Error as exc:
        raise BundleError(f"scope: {str(exc).splitlines()[0]}") from None


def _covering(chain: list[Seal], leaf_indexes: Iterable[int]) -> list[Seal]:
    """The seals whose leaf ranges hold these leaves, and the newest seal.

    Seals with leaves cover consecutive ranges, so each leaf's seal is found by
    bisecting the ranges' first leaves (not by scanning every seal per leaf).
    """
    with_leaves = [s for s in chain if s.record["leaves"]["count"]]
    firsts = [s.record["leaves"]["first"] for s in with_leaves]
    numbers = {with_leaves[bisect.bisect_right(firsts, i) - 1].number for i in set(leaf_indexes)}
    covering = [s for s in with_leaves if s.number in numbers]
    return covering if covering and covering[-1] is chain[-1] else covering + [chain[-1]]


# --- writing ---------------------------------------------------------------------------------


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _keyring_text(trusted: Keyring, key_ids: set[str]) -> str:
    return Keyring([k for k in trusted if k.key_id in key_ids]).dumps()


def _statement(files: dict[str, bytes], predicate: dict[str, Any]) -> bytes:
    return json.dumps({
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": hashlib.sha256(data).hexdigest()}}
                    for name, data in sorted(files.items())],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }, indent=1, sort_keys=True).encode()


def export_bundle(ledger_dir: Path, out: Path, scope: Scope, *, case: str, purpose: str, recipient: str | None,
                  exporter_key: PrivateKey, keyring: Keyring, origin: str, exporter: str | None = None,
                  progress: Callable[[str, int, int], None] = lambda *_: None) -> dict[str, Any]:
    """Write the bundle for `scope` to `out`; returns the chain-of-custody predicate."""
    seals = load_seals(ledger_dir)
    selected = _select(ledger_dir, seals, scope)
    if selected.num_rows == 0:
        raise BundleError("the scope matches no sealed event")
    partitions = sorted(set(selected.column("partition").to_pylist()))
    proofs_by_row: list[list[bytes]] = [[] for _ in range(selected.num_rows)]
    sizes_by_row = [0] * selected.num_rows
    files: dict[str, bytes] = {}
    consistency = []
    witnessed: dict[str, int] = {}
    states: list[dict[str, Any]] = []
    session_col = selected.column("session_id").to_pylist()
    part_col, leaf_col = selected.column("partition").to_pylist(), selected.column("leaf_index").to_pylist()
    for n, partition in enumerate(partitions):
        progress("proving", n, len(partitions))
        chain = seals[partition]
        levels, session_map = _partition_leaves(ledger_dir, chain)
        newest = chain[-1]
        rows = [i for i, p in enumerate(part_col) if p == partition]
        if session_map is not None:
            states += [{"session_id": sid, "partition": partition, "seal": newest.number,
                        "proof": session_map.prove(sid).to_json()} for sid in sorted({session_col[i] for i in rows})]
        for i in rows:
            proofs_by_row[i] = levels.inclusion_proof(leaf_col[i], newest.tree_size)
            sizes_by_row[i] = newest.tree_size
        lines = _cosignature_lines(ledger_dir, chain)
        if lines:
            files[f"{COSIGNATURES_PREFIX}p{partition}/{newest.number:06d}.sig"] = "".join(f"{l}\n" for l in lines).encode()
        witnessed[str(partition)] = len(lines)
        # seal 1 (where the chain's key starts) and every rotation seal (ledger/rotation.py) with its cosignatures:
        # the key history from a key the auditor trusts to the newest seal's key
        history = [s for s in chain if s.number == 1 or s.record.get("rotation")]
        for seal in history:
            lines = stored_cosignatures(ledger_dir, partition, seal.number)
            if seal.record.get("rotation") and lines and seal is not newest:
                files[f"{COSIGNATURES_PREFIX}p{partition}/{seal.number:06d}.sig"] = "".join(f"{l}\n" for l in lines).encode()
        covering = _covering(chain, (leaf_col[i] for i in rows))
        for seal in sorted({s.number: s for s in history + covering}.values(), key=lambda s: s.number):
            files[f"seals/p{partition}/{seal.number:06d}.json"] = seal.to_bytes()
            if seal is not newest:
                consistency.append({"partition": partition, "from_seal": seal.number, "to_seal": newest.number,
                                    "from_size": seal.tree_size, "to_size": newest.tree_size,
                                    "proof": [h.hex() for h in levels.consistency_proof(seal.tree_size, newest.tree_size)]})
    progress("proving", len(partitions), len(partitions))
    table = selected.append_column("tree_size", pa.array(sizes_by_row, pa.int64())).append_column(
        "inclusion_proof", pa.array(proofs_by_row, pa.list_(pa.binary(32))))
    files[EVENTS] = _parquet_bytes(table.cast(BUNDLE_SCHEMA))
    files[CONSISTENCY] = json.dumps(consistency, indent=1).encode()
    if states:
        files[SESSION_STATES] = json.dumps(states, indent=1).encode()
    key_ids = set(selected.column("key_id").to_pylist()) | {exporter_key.key_id} | {
        Seal.from_bytes(data).record["key_id"] for name, data in files.items() if name.startswith("seals/")}
    files[KEYRING] = _keyring_text(keyring, key_ids).encode()

    sessions = _session_summary(selected)
    predicate = {
        "case": case, "purpose": purpose, "recipient": recipient,
        "exporter": {"identity": exporter or f"{getpass.getuser()}@{socket.gethostname()}", "key_id": exporter_key.key_id},
        "exported_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        "scope": scope.to_json(),
        "counts": {"events": selected.num_rows, "sessions": len(sessions), "partitions": len(partitions)},
        "sessions": sessions,
        "ledger": {"origin": origin, "checkpoints": {str(p): seals[p][-1].tree_size for p in partitions},
                   "cosignatures": witnessed},
        "tool": {"name": "custody", "version": version("custody")},
    }
    manifest = dsse.sign(_statement(files, predicate), dsse.IN_TOTO_PAYLOAD_TYPE, exporter_key)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(MANIFEST, json.dumps(manifest, indent=1))
        for name, data in sorted(files.items()):
            archive.writestr(name, data)
    tmp.replace(out)
    return predicate


def _cosignature_lines(ledger_dir: Path, chain: list[Seal]) -> list[str]:
    """Witness cosignatures on the newest seal's checkpoint: those stored for it, and for earlier seals of the same
    tree (idle seals repeat the checkpoint text, which is what a cosignature signs)."""
    newest, lines = chain[-1], []
    for seal in reversed(chain):
        if seal.tree_size != newest.tree_size or seal.root != newest.root:
            break
        lines += [line for line in stored_cosignatures(ledger_dir, seal.partition, seal.number) if line not in lines]
    return lines


def _session_summary(selected: pa.Table) -> dict[str, dict[str, Any]]:
    """Per session: its event count and whether it had ended at export time."""
    summary: dict[str, dict[str, Any]] = {}
    for session_id, kind in zip(selected.column("session_id").to_pylist(), selected.column("kind").to_pylist()):
        entry = summary.setdefault(session_id, {"events": 0, "open": True})
        entry["events"] += 1
        if kind == "session_end":
            entry["open"] = False
    return summary


# --- transfers -------------------------------------------------------------------------------


def transfer(bundle: Path, *, to: str, reason: str, key: PrivateKey, by: str | None = None) -> dict[str, Any]:
    """Append a signed chain-of-custody transfer; earlier signatures stay valid (nothing is rewritten)."""
    with zipfile.ZipFile(bundle) as archive:
        names = archive.namelist()
        manifest = archive.read(MANIFEST)
        transfers = sorted(n for n in names if n.startswith(TRANSFER_PREFIX))
        previous = archive.read(transfers[-1]) if transfers else None
    record = {
        "sequence": len(transfers) + 1,
        "from": by or key.key_id,
        "to": to,
        "reason": reason,
        "at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        "signer": key.key_id,
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "previous_sha256": hashlib.sha256(previous).hexdigest() if previous else None,
    }
    envelope = dsse.sign(json.dumps(record, sort_keys=True).encode(), TRANSFER_TYPE, key)
    with zipfile.ZipFile(bundle, "a") as archive:
        archive.writestr(f"{TRANSFER_PREFIX}{record['sequence']:04d}.dsse.json", json.dumps(envelope, indent=1))
    return record


def open_bundle(bundle: Path) -> duckdb.DuckDBPyConnection:
    """The query views over a bundle's events and seals, for `custody sql/sessions/replay --bundle`.

    This reads; it does not verify (that is `custody bundle verify`). The files are
    extracted to a temporary directory that lives as long as the process.
    """
    from query.views import open_files

    directory = Path(tempfile.mkdtemp(prefix="custody-bundle-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    try:
        with zipfile.ZipFile(bundle) as archive:
            names = [n for n in archive.namelist() if n == EVENTS or (n.startswith("seals/") and n.endswith(".json"))]
            archive.extractall(directory, members=names)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"{bundle}: not a readable bundle ({exc}); run `custody bundle verify`") from None
    if EVENTS not in names:
        raise BundleError(f"{bundle}: no {EVENTS} in the bundle")
    seals = sorted(directory.glob("seals/p*/*.json"))
    return open_files([directory / EVENTS], seals)
