"""Seal format known answers, the extension consistency proof, and state snapshots round-tripping."""

from __future__ import annotations

import base64
import hashlib

from hypothesis import given, settings, strategies as st
from nacl.signing import SigningKey

from ingest.keys import Keyring, PrivateKey, TrustedKey, key_id_for
from ingest.verify import ChainPosition, SessionChains
from ledger import checkpoint, merkle
from ledger.seals import SEAL_CONTEXT, Seal, canonical_json, seal_record, sign_seal, verify_seal_signature
from ledger.state import PartitionState


def fixed_key() -> PrivateKey:
    signing_key = SigningKey(bytes(range(32)))
    return PrivateKey(key_id_for("ledger", bytes(signing_key.verify_key)), signing_key)


def test_canonical_json_known_answer():
    assert canonical_json({"b": 1, "a": [True, None, "é"], "c": {"z": "", "y": -2}}) == \
        '{"a":[true,null,"é"],"b":1,"c":{"y":-2,"z":""}}'.encode()


def first_record(key: PrivateKey) -> dict:
    tree = merkle.CompactTree()
    tree.append(merkle.leaf_hash(merkle.event_leaf(bytes(32), b"event")))
    return seal_record(origin="custody.test/ledger", partition=3, number=1, key_id=key.key_id,
                       sealed_at_us=1_767_225_600_000_000, previous=None,
                       segment={"path": "segments/p3/000001.parquet", "sha256": "ab" * 32, "bytes": 10},
                       first_leaf=0, leaf_count=1, time_range=(1_767_225_599_000_000, 1_767_225_599_500_000),
                       topic="custody.events", first_offset=0, next_offset=2, quarantined=1,
                       tree_size=tree.size, root=tree.root())


def test_seal_record_known_answer():
    """The signed bytes are exactly this text; a third party re-creates them with any JSON library."""
    key = fixed_key()
    record = first_record(key)
    root = merkle.leaf_hash(bytes(32) + hashlib.sha256(b"event").digest()).hex()
    assert canonical_json(record).decode() == (
        '{"events":{"accepted":1,"quarantined":1},'
        '"kafka":{"first_offset":0,"next_offset":2,"partition":3,"topic":"custody.events"},'
        f'"key_id":"{key.key_id}","leaves":{{"count":1,"first":0}},"number":1,'
        '"origin":"custody.test/ledger/p3","partition":3,"previous":{"first_seal":true},'
        '"sealed_at":"2026-01-01T00:00:00.000000Z",'
        f'"segment":{{"bytes":10,"path":"segments/p3/000001.parquet","sha256":"{"ab" * 32}"}},'
        '"time":{"first":"2025-12-31T23:59:59.000000Z","last":"2025-12-31T23:59:59.500000Z"},'
        f'"tree":{{"root":"{root}","size":1}},"version":1}}')
    seal = sign_seal(record, key, [])
    key.signing_key.verify_key.verify(SEAL_CONTEXT + canonical_json(record), seal.signature)
    root_b64 = base64.b64encode(bytes.fromhex(root)).decode()
    assert seal.checkpoint_note.decode().startswith(f"custody.test/ledger/p3\n1\n{root_b64}\n\n— custody.test/ledger/p3 ")
    keyring = Keyring([TrustedKey(key.key_id, "ledger", key.public_key)])
    verify_seal_signature(Seal.from_bytes(seal.to_bytes()), keyring)
    verifier = checkpoint.Verifier.from_key("custody.test/ledger/p3", key.signing_key.verify_key)
    checkpoint.open_checkpoint(seal.checkpoint_note, [verifier], origin="custody.test/ledger/p3")


def test_the_next_seal_links_its_predecessor():
    key = fixed_key()
    first = sign_seal(first_record(key), key, [])
    second = seal_record(origin="custody.test/ledger", partition=3, number=2, key_id=key.key_id,
                         sealed_at_us=1_767_225_700_000_000, previous=first, segment=None, first_leaf=1,
                         leaf_count=0, time_range=None, topic="custody.events", first_offset=2, next_offset=2,
                         quarantined=0, tree_size=1, root=first.root)
    assert second["previous"] == {"first_seal": False, "number": 1,
                                  "hash": hashlib.sha256(canonical_json(first.record)).hexdigest(),
                                  "signature": base64.b64encode(first.signature).decode()}


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 80), st.integers(0, 80))
def test_extension_proof_equals_the_full_tree_proof(old_size, added):
    leaves = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(old_size + added)]
    tree = merkle.CompactTree()
    for leaf in leaves[:old_size]:
        tree.append(leaf)
    proof = merkle.extension_proof(tree, leaves[old_size:])
    assert proof == merkle.consistency_proof(old_size, leaves)
    merkle.verify_consistency(old_size, len(leaves), merkle.root(leaves[:old_size]), merkle.root(leaves), proof)


def test_chain_positions_survive_a_snapshot():
    position = ChainPosition()
    for seq in range(5):
        position.advance(bytes([seq]) * 32, window=1024)
    restored = ChainPosition.from_json(position.to_json(window=3))
    assert (restored.next_seq, restored.last_hash) == (5, b"\x04" * 32)
    assert [restored.digest_of(s) for s in range(6)] == [None, None, b"\x02" * 8, b"\x03" * 8, b"\x04" * 8, None]


def test_partition_state_round_trips():
    key = fixed_key()
    seal = sign_seal(first_record(key), key, [])
    chains = SessionChains()
    chains.sessions["s1"] = ChainPosition(2, b"\x01" * 32, bytearray(b"\x01" * 8))
    tree = merkle.CompactTree()
    tree.append(merkle.leaf_hash(merkle.event_leaf(bytes(32), b"event")))
    state = PartitionState(3, None, tree, 2, chains, {"s1": ("alice", None, ["dba"], "iss", "a", "t", "postgres", None)})
    restored = PartitionState.from_bytes(state.to_bytes(1), seal)
    assert restored.tree.root() == tree.root() and restored.next_offset == 2 and restored.last_seal == seal
    assert restored.chains.sessions["s1"] == chains.sessions["s1"]
    assert restored.identities == state.identities
