"""Witnessed checkpoints: what a ledger or a bundle must agree with once a witness has cosigned it.

Offline checks cannot see the removal of a partition's newest seals: the
shorter chain is still consistent. A checkpoint cosigned by witnesses the
auditor trusts can: the ledger (or bundle) must hold a tree at least that
large, with the same root at that size. Each check is a small function raising
a typed `WitnessedProblem` whose line says exactly what is wrong.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from ingest.errors import CustodyError
from ingest.keys import Keyring
from ledger import checkpoint


class WitnessedProblem(CustodyError):
    """A checkpoint check failed; the message is the report line."""


class WitnessedNoteInvalid(WitnessedProblem):
    """The checkpoint file is not a checkpoint signed by a trusted ledger key, or a cosignature is forged."""


class TooFewWitnesses(WitnessedProblem):
    """Fewer trusted witnesses cosigned than the policy requires."""


class RolledBack(WitnessedProblem):
    """The ledger holds a smaller tree than one that was witnessed: its newest seals were removed."""


class Stale(WitnessedProblem):
    """A bundle's checkpoint is older than one witnessed later: events sealed since are not in it."""


class Forked(WitnessedProblem):
    """At a witnessed size the ledger's root is another: two histories of one log."""


def utc(timestamp: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def witness_verifiers(keyring: Keyring) -> list[checkpoint.CosignatureVerifier]:
    """The keyring's `witness` keys, each named by its key name (the key id before `+`)."""
    return [checkpoint.CosignatureVerifier(k.key_id.split("+")[0], k.verify_key) for k in keyring if k.role == "witness"]


@dataclass(frozen=True)
class Witnessed:
    """A checkpoint signed by a trusted ledger key, with the valid cosignatures of trusted witnesses."""

    checkpoint: checkpoint.Checkpoint
    cosignatures: tuple[tuple[checkpoint.CosignatureVerifier, checkpoint.Cosignature], ...]

    @property
    def partition(self) -> int | None:
        tail = self.checkpoint.origin.rpartition("/p")[2]
        return int(tail) if tail.isdigit() else None

    def describe(self) -> str:
        if not self.cosignatures:
            return "by no trusted witness"
        return ", ".join(f"by {w.name} at {utc(c.timestamp)}" for w, c in self.cosignatures)

    @property
    def newest_time(self) -> int | None:
        return max((c.timestamp for _, c in self.cosignatures), default=None)


def open_witnessed(note: bytes, keyring: Keyring, origin: str | None = None) -> Witnessed:
    """Verify `note`'s log signature (a trusted ledger key under its origin) and its trusted cosignatures."""
    try:
        text_origin = note.decode().split("\n", 1)[0]
        expected = origin or text_origin
        verifiers = [checkpoint.Verifier.from_key(expected, k.verify_key) for k in keyring if k.role == "ledger"]
        cp, _ = checkpoint.open_checkpoint(note, verifiers, origin=expected)
        cosigned = checkpoint.open_cosignatures(note, witness_verifiers(keyring))
    except (UnicodeDecodeError, checkpoint.NoteError) as exc:
        raise WitnessedNoteInvalid(f"Checkpoint INVALID: {exc}") from None
    return Witnessed(cp, cosigned.cosignatures)


def check_quorum(witnessed: Witnessed, required: int, subject: str) -> None:
    if len(witnessed.cosignatures) < required:
        raise TooFewWitnesses(f"{subject} NOT WITNESSED: {len(witnessed.cosignatures)} of {required} required trusted "
                              f"witness cosignatures on tree size {witnessed.checkpoint.size}")


def check_not_rolled_back(witnessed: Witnessed, newest_size: int, roots: dict[int, bytes], subject: str) -> None:
    """The ledger's newest tree is at least the witnessed one, and has the witnessed root at that size
    (`roots`: tree size -> root of every seal the ledger has)."""
    cp = witnessed.checkpoint
    if cp.size > newest_size:
        raise RolledBack(f"{subject} ROLLED BACK: the newest seal has tree size {newest_size}, but tree size "
                         f"{cp.size} was witnessed {witnessed.describe()}")
    check_same_root(witnessed, roots, subject)


def check_same_root(witnessed: Witnessed, roots: dict[int, bytes], subject: str) -> None:
    cp = witnessed.checkpoint
    root = roots.get(cp.size)
    if root is None:
        raise Forked(f"{subject} FORKED: no seal has tree size {cp.size}, which was witnessed {witnessed.describe()}")
    if root != cp.root_hash:
        raise Forked(f"{subject} FORKED: at tree size {cp.size} the root is {root.hex()[:16]}…, the witnessed "
                     f"root is {cp.root_hash.hex()[:16]}… ({witnessed.describe()})")


def check_same_sessions(witnessed: Witnessed, seals: Sequence, subject: str) -> None:
    """At the witnessed size, the ledger's seals state the witnessed session-map root: one tree, one set of
    session states (else a session could be proven ended to one party and open to another)."""
    from ledger import sessionmap

    cp = witnessed.checkpoint
    try:
        stated = sessionmap.parse_extensions(cp.extensions)
    except sessionmap.SessionMapError as exc:
        raise WitnessedNoteInvalid(f"Checkpoint INVALID: {exc}") from None
    for seal in seals:
        sealed = seal.record.get("sessions")
        if stated is not None and sealed is not None and seal.tree_size == cp.size and sealed != stated:
            raise Forked(f"{subject} FORKED: at tree size {cp.size} seal {seal.number} states session-map root "
                         f"{sealed['root'][:16]}… of {sealed['count']} sessions, the witnessed one is "
                         f"{stated['root'][:16]}… of {stated['count']} ({witnessed.describe()})")


def check_not_stale(witnessed: Witnessed, bundle_size: int, bundle_roots: dict[int, bytes], subject: str) -> None:
    """A bundle's newest checkpoint is not older than a witnessed one the auditor holds."""
    cp = witnessed.checkpoint
    if cp.size > bundle_size:
        raise Stale(f"{subject} STALE: the bundle's newest checkpoint has tree size {bundle_size}, but tree size "
                    f"{cp.size} was witnessed {witnessed.describe()}: events sealed after it are not in the bundle")
    if cp.size in bundle_roots:
        check_same_root(witnessed, bundle_roots, subject)


def with_lines(note: bytes, lines: Sequence[str]) -> bytes:
    return checkpoint.add_signature_lines(note, lines)


def check_ledger(root, keyring: Keyring, notes: Sequence[bytes], required: int = 1) -> list[str]:
    """Problem lines for a ledger directory against witnessed checkpoints obtained elsewhere (`custody verify
    --checkpoint`): each must be signed by a trusted ledger key, cosigned by `required` trusted witnesses, and
    the ledger must still hold its tree (rollback) with the same root (fork)."""
    from pathlib import Path

    from ledger.seals import SEALS_DIR, Seal, partition_name

    from ledger.rotation import RotationError, check_rotation, with_key

    def partition_seals(partition: int) -> list:
        return [Seal.load(p) for p in sorted((Path(root) / SEALS_DIR / partition_name(partition)).glob("*.json"))]

    lines = []
    for number, note in enumerate(notes, 1):
        try:
            trusted = keyring  # plus the keys the partition's rotation seals hand over to (whether each rotation
            tail = note.split(b"\n", 1)[0].rpartition(b"/p")[2]  # was witnessed is verify_ledger's to judge)
            for seal in partition_seals(int(tail)) if tail.isdigit() else []:
                if seal.record.get("rotation"):
                    try:
                        trusted = with_key(trusted, check_rotation(seal.record))
                    except RotationError:
                        pass
            witnessed = open_witnessed(note, trusted)
            check_quorum(witnessed, required, f"Given checkpoint #{number}")
            partition = witnessed.partition
            if partition is None:
                raise WitnessedNoteInvalid(f"Given checkpoint #{number} INVALID: origin {witnessed.checkpoint.origin!r} "
                                           "names no partition")
            seals = [s for s in partition_seals(partition) if s.record["origin"] == witnessed.checkpoint.origin]
            newest = max(seals, key=lambda s: s.number, default=None)
            check_not_rolled_back(witnessed, newest.tree_size if newest else 0, {s.tree_size: s.root for s in seals},
                                  f"Partition p{partition}")
            check_same_sessions(witnessed, seals, f"Partition p{partition}")
        except WitnessedProblem as exc:
            lines.append(str(exc).replace("Checkpoint INVALID", f"Given checkpoint #{number} INVALID"))
    return lines
