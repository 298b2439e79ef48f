"""Seals: the signed statement, after each segment, of what the ledger holds for one partition.

A seal record is canonical JSON (sorted keys, no spaces, UTF-8), signed with the
ledger's Ed25519 key (role `ledger` in the keyring) over
`SEAL_CONTEXT || canonical JSON`; the context keeps a seal signature from ever
being valid as anything else the same key signs. Each record names its
predecessor's hash and signature, so the seals of a partition are one chain,
and the first seal says explicitly that it is the first. Beside the record,
the seal file holds a C2SP checkpoint (signed note, origin
`<ledger origin>/p<partition>`, key name = that origin) and the RFC 9162
consistency proof from the previous checkpoint: anyone with the ledger's
public key can check both with off-the-shelf tools.

File `seals/p<partition>/<number>.json`:

    {"seal": {...record...}, "signature": "<base64>",
     "checkpoint": "<signed note>", "consistency_proof": ["<hex>", ...]}
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nacl.exceptions import BadSignatureError

from ingest.errors import CustodyError
from ingest.keys import Keyring, KeyLookupError, PrivateKey
from ledger import checkpoint, sessionmap

SEAL_VERSION = 1
SEAL_CONTEXT = b"custody-seal-v1\n"
SEALS_DIR, SEGMENTS_DIR = "seals", "segments"


class SealError(CustodyError):
    """A seal file that cannot be read or does not verify."""


class MalformedSealError(SealError):
    pass


class UntrustedSealKeyError(SealError):
    """The seal names a key that the keyring does not trust for ledger seals at that time."""


class SealSignatureError(SealError):
    pass


def canonical_json(value: Any) -> bytes:
    """One value, one encoding: what is signed and hashed. Seals hold only strings, ints, bools, null, lists, dicts."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def iso(micros: int) -> str:
    seconds, us = divmod(micros, 1_000_000)
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{us:06d}Z"


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def partition_name(partition: int) -> str:
    return f"p{partition}"


def seal_relpath(partition: int, number: int) -> str:
    return f"{SEALS_DIR}/{partition_name(partition)}/{number:06d}.json"


def segment_relpath(partition: int, number: int) -> str:
    """A segment is named after the seal that covers it (idle seals leave gaps in the numbering)."""
    return f"{SEGMENTS_DIR}/{partition_name(partition)}/{number:06d}.parquet"


def partition_origin(origin: str, partition: int) -> str:
    return f"{origin}/{partition_name(partition)}"


@dataclass(frozen=True)
class Seal:
    """A seal record, its signature, the checkpoint that ends it and the consistency proof leading to it."""

    record: dict[str, Any]
    signature: bytes
    checkpoint_note: bytes
    consistency_proof: tuple[bytes, ...]

    @property
    def number(self) -> int:
        return self.record["number"]

    @property
    def partition(self) -> int:
        return self.record["partition"]

    @property
    def tree_size(self) -> int:
        return self.record["tree"]["size"]

    @property
    def root(self) -> bytes:
        return bytes.fromhex(self.record["tree"]["root"])

    @property
    def next_offset(self) -> int:
        return self.record["kafka"]["next_offset"]

    @property
    def segment(self) -> dict[str, Any] | None:
        return self.record["segment"]

    @property
    def hash(self) -> bytes:
        """What the next seal names as its predecessor: SHA-256 of the canonical record."""
        return hashlib.sha256(canonical_json(self.record)).digest()

    def link(self) -> dict[str, Any]:
        """The `previous` field of the seal after this one."""
        return {"first_seal": False, "number": self.number, "hash": self.hash.hex(),
                "signature": base64.b64encode(self.signature).decode()}

    def to_bytes(self) -> bytes:
        document = {"seal": self.record, "signature": base64.b64encode(self.signature).decode(),
                    "checkpoint": self.checkpoint_note.decode(),
                    "consistency_proof": [h.hex() for h in self.consistency_proof]}
        return json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> "Seal":
        try:
            document = json.loads(data)
            record = document["seal"]
            if record.get("version") != SEAL_VERSION:
                raise ValueError(f"version {record.get('version')!r} is not {SEAL_VERSION}")
            return cls(record, base64.b64decode(document["signature"], validate=True),
                       document["checkpoint"].encode(),
                       tuple(bytes.fromhex(h) for h in document["consistency_proof"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MalformedSealError(f"not a seal file ({type(exc).__name__}: {exc})") from None

    @classmethod
    def load(cls, path: Path) -> "Seal":
        return cls.from_bytes(path.read_bytes())


FIRST_SEAL = {"first_seal": True}
"""The `previous` field of a partition's first seal: it says so, rather than leaving a gap to interpretation."""


def seal_record(*, origin: str, partition: int, number: int, key_id: str, sealed_at_us: int,
                previous: Seal | None, segment: dict[str, Any] | None, first_leaf: int, leaf_count: int,
                time_range: tuple[int, int] | None, topic: str, first_offset: int, next_offset: int,
                quarantined: int, tree_size: int, root: bytes, sessions: dict[str, Any] | None = None,
                offset_reset_from: int | None = None) -> dict[str, Any]:
    """The record to sign; `segment` is {path, sha256, bytes} or None for a seal with no new leaves; `sessions` is
    the session-state map's {count, root} (ledger/sessionmap.py), absent from seals made before it existed;
    `offset_reset_from` is where the previous seal's offsets ended when the broker's went back (its log was lost
    or recreated): the seal says so, under its signature, rather than leaving a gap to interpretation."""
    record = {
        "version": SEAL_VERSION,
        "origin": partition_origin(origin, partition),
        "partition": partition,
        "number": number,
        "key_id": key_id,
        "sealed_at": iso(sealed_at_us),
        "previous": previous.link() if previous else FIRST_SEAL,
        "segment": segment,
        "leaves": {"first": first_leaf, "count": leaf_count},
        "time": {"first": iso(time_range[0]), "last": iso(time_range[1])} if time_range else None,
        "kafka": {"topic": topic, "partition": partition, "first_offset": first_offset, "next_offset": next_offset,
                  **({"offset_reset_from": offset_reset_from} if offset_reset_from is not None else {})},
        "events": {"accepted": leaf_count, "quarantined": quarantined},
        "tree": {"size": tree_size, "root": root.hex()},
    }
    if sessions is not None:
        record["sessions"] = sessions
    return record


def sign_seal(record: dict[str, Any], key: PrivateKey, consistency_proof: list[bytes]) -> Seal:
    """Sign the record and end it with the checkpoint of its tree, signed by the same key."""
    signature = key.sign(SEAL_CONTEXT + canonical_json(record))
    extensions = (sessionmap.extension_line(record["sessions"]),) if "sessions" in record else ()
    if record.get("rotation"):  # ledger/rotation.py: the handover to the next key, for the witnesses to cosign
        from ledger.rotation import extension_line
        extensions += (extension_line(record["rotation"]),)
    tree = checkpoint.Checkpoint(record["origin"], record["tree"]["size"], bytes.fromhex(record["tree"]["root"]),
                                 extensions)
    signer = checkpoint.Signer.from_key(record["origin"], key.signing_key)
    return Seal(record, signature, checkpoint.sign_checkpoint(tree, [signer]), tuple(consistency_proof))


def verify_seal_signature(seal: Seal, keyring: Keyring) -> None:
    """The seal's key is a ledger key trusted at `sealed_at`, and its signature verifies."""
    key_id = seal.record.get("key_id", "")
    try:
        verify_key = keyring.key_for(key_id, parse_iso(seal.record["sealed_at"]), role="ledger")
    except KeyLookupError as exc:
        raise UntrustedSealKeyError(f"signed by untrusted key {key_id} ({exc.reason}: {exc})") from None
    try:
        verify_key.verify(SEAL_CONTEXT + canonical_json(seal.record), seal.signature)
    except (BadSignatureError, ValueError):
        raise SealSignatureError(f"signature by {key_id} doesn't verify") from None


def checkpoint_verifiers(keyring: Keyring, origin: str) -> list[checkpoint.Verifier]:
    """Every trusted ledger key, under the note key name `origin` (the partition's checkpoint origin)."""
    return [checkpoint.Verifier.from_key(origin, key.verify_key) for key in keyring if key.role == "ledger"]
