"""Ledger key rotation as a signed, witnessed event in the seal chain.

A partition's seals are signed by one key at a time: seal 1's key (trusted by the auditor's keyring), then
whichever key a *rotation seal* hands over to. A rotation seal is an idle seal (no leaves, the same tree and
session states) signed by the outgoing key, whose record carries

    "rotation": {"key_id": <new key id>, "public_key": <base64 Ed25519 key>,
                 "signature": <base64: the new key's signature of the handover>}

(the handover = `custody-key-rotation-v1\\n` + canonical JSON of {origin, number, from, to}: the new key proves
it consents, so a key cannot be claimed by a log it does not sign for), and whose checkpoint states it in an
extension line `custody.key-rotation/v1 <new key id> <base64 key>`, so the witnesses that cosign the checkpoint
witness the rotation. Every later seal must be signed by the new key. A seal signed by any other key — even one
the auditor's keyring trusts as a ledger key — is refused: a ledger key takes over a chain only through its
witnessed rotation seal. A stolen old key cannot fork the chain with a rotation of its own without the fork
being refused by the witnesses.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from ingest.errors import CustodyError
from ingest.events import now_micros
from ingest.keys import Keyring, PrivateKey, TrustedKey, key_id_for
from ledger.durable import write_atomic

ROTATION_CONTEXT = b"custody-key-rotation-v1\n"
EXTENSION_PREFIX = "custody.key-rotation/v1"


class RotationError(CustodyError):
    """A rotation record that is malformed or whose new key did not sign the handover."""


def handover(origin: str, number: int, old_key_id: str, new_key_id: str) -> bytes:
    from ledger.seals import canonical_json
    return ROTATION_CONTEXT + canonical_json({"origin": origin, "number": number, "from": old_key_id, "to": new_key_id})


def rotation_field(origin: str, number: int, old_key: PrivateKey, new_key: PrivateKey) -> dict[str, Any]:
    return {"key_id": new_key.key_id,
            "public_key": base64.b64encode(bytes(new_key.signing_key.verify_key)).decode(),
            "signature": base64.b64encode(new_key.sign(handover(origin, number, old_key.key_id, new_key.key_id))).decode()}


def extension_line(rotation: dict[str, Any]) -> str:
    return f"{EXTENSION_PREFIX} {rotation['key_id']} {rotation['public_key']}"


def check_rotation(record: dict[str, Any]) -> TrustedKey:
    """The new key a rotation record hands over to, after checking that key signed the handover."""
    rotation = record["rotation"]
    try:
        public_key = base64.b64decode(rotation["public_key"], validate=True)
        verify_key = VerifyKey(public_key)
        verify_key.verify(handover(record["origin"], record["number"], record["key_id"], rotation["key_id"]),
                          base64.b64decode(rotation["signature"], validate=True))
    except (KeyError, TypeError, ValueError, BadSignatureError) as exc:
        raise RotationError(f"rotation to {rotation.get('key_id') if isinstance(rotation, dict) else rotation!r}: "
                            f"the new key's signature of the handover doesn't verify ({type(exc).__name__})") from None
    check_key_id(rotation["key_id"], public_key)
    return TrustedKey(rotation["key_id"], "ledger", public_key, comment="introduced by a rotation seal")


def check_key_id(key_id: str, public_key: bytes) -> None:
    """A key id is `name+` the key's own hash (`key_id_for`), as the keyring requires: a rotation naming one key's
    id with another public key is refused here, with the rotation named, not later as a keyring error."""
    name, plus, _ = key_id.partition("+")
    if not plus or key_id != key_id_for(name, public_key):
        raise RotationError(f"rotation to {key_id!r}: that key id is not the id of the public key it states "
                            f"(expected {key_id_for(name or 'ledger', public_key)!r})")


def with_key(keyring: Keyring, key: TrustedKey) -> Keyring:
    """The keyring plus a ledger key a verified rotation introduced (unless it already holds that key id: ids are
    bound to their keys, by `check_key_id` here and by the keyring itself)."""
    if any(k.key_id == key.key_id and k.role == "ledger" for k in keyring):
        return keyring
    return Keyring([*keyring, key])


def chain_key(record: dict[str, Any]) -> str:
    """The key the seal after this one must be signed by."""
    return record["rotation"]["key_id"] if record.get("rotation") else record["key_id"]


def rotate_partition(ledger_dir: Path, partition: int, origin: str, old_key: PrivateKey, new_key: PrivateKey):
    """Append a rotation seal to one partition (the ledger must not be running on it: the lock is taken)."""
    from ledger.seals import partition_name, seal_record, seal_relpath, sign_seal
    from ledger.sessionmap import seal_field
    from ledger.state import PartitionLock, prune_snapshots, recover, write_snapshot

    lock = PartitionLock(ledger_dir, partition)
    if not lock.acquire(blocking=False):
        raise RotationError(f"partition {partition} is held by a running ledger; stop it first")
    try:
        state = recover(ledger_dir, partition)
        last = state.last_seal
        if last is None:
            raise RotationError(f"partition {partition} has no seal yet: its first seal's key needs no rotation")
        if last.record["origin"] != f"{origin}/{partition_name(partition)}":
            raise RotationError(f"partition {partition}: its seals are of origin {last.record['origin']!r}, "
                                f"not of ledger {origin!r}")
        if chain_key(last.record) != old_key.key_id:
            raise RotationError(f"partition {partition}: the chain's key is {chain_key(last.record)}, not {old_key.key_id}")
        number = state.next_seal_number
        record = seal_record(
            origin=origin, partition=partition, number=number, key_id=old_key.key_id, sealed_at_us=now_micros(),
            previous=last, segment=None, first_leaf=state.tree.size, leaf_count=0, time_range=None,
            topic=last.record["kafka"]["topic"], first_offset=state.next_offset, next_offset=state.next_offset,
            quarantined=0, tree_size=state.tree.size, root=state.tree.root(), sessions=seal_field(state.session_map))
        record["rotation"] = rotation_field(record["origin"], number, old_key, new_key)
        seal = sign_seal(record, old_key, [])
        write_snapshot(ledger_dir, state, number)
        write_atomic(ledger_dir / seal_relpath(partition, number), seal.to_bytes())
        prune_snapshots(ledger_dir, state, number)  # not those of seals whose documents may be rendered again
        return seal
    finally:
        lock.release()
