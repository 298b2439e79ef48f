"""Known-answer, tamper and property tests for ledger.merkle.

Reference values are the RFC 6962 test vectors used by certificate-transparency
and transparency-dev/merkle (proof/verify_test.go): eight leaves, the root of
every prefix, and a few published inclusion and consistency proofs.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.merkle import (
    EMPTY_ROOT,
    CompactTree,
    CompactTreeError,
    ConsistencyProofError,
    InclusionProofError,
    MerkleError,
    MerkleLevels,
    consistency_proof,
    event_leaf,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root,
    verify_consistency,
    verify_inclusion,
)

LEAVES = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
HASHES = [leaf_hash(d) for d in LEAVES]

# PREFIX_ROOTS[n - 1] is the root of the tree of the first n leaves.
PREFIX_ROOTS = [
    bytes.fromhex(h)
    for h in [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ]
]


def _hashes(*hexes: str) -> list[bytes]:
    return [bytes.fromhex(h) for h in hexes]


# (index, size) -> published audit path.
REFERENCE_INCLUSION = {
    (0, 8): _hashes(
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ),
    (5, 8): _hashes(
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ),
    (2, 3): _hashes("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"),
    (1, 5): _hashes(
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ),
}

# (m, n) -> published consistency proof.
REFERENCE_CONSISTENCY = {
    (1, 8): _hashes(
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ),
    (6, 8): _hashes(
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ),
    (2, 5): _hashes(
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ),
    (6, 7): _hashes(
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ),
}

ALL_INCLUSIONS = [(i, n) for n in range(1, 9) for i in range(n)]
ALL_CONSISTENCIES = [(m, n) for n in range(1, 9) for m in range(1, n + 1)]
# Pairs with a non-empty proof, where tampering with the proof is meaningful.
PROPER_CONSISTENCIES = [(m, n) for m, n in ALL_CONSISTENCIES if m < n]


def _flip_bit(proof: list[bytes], position: int) -> list[bytes]:
    tampered = list(proof)
    tampered[position] = bytes([tampered[position][0] ^ 0x10]) + tampered[position][1:]
    return tampered


# Hashing ------------------------------------------------------------------------


def test_hashes_are_domain_separated_sha256() -> None:
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    assert node_hash(b"L" * 32, b"R" * 32) == hashlib.sha256(b"\x01" + b"L" * 32 + b"R" * 32).digest()


def test_empty_tree_root_is_hash_of_empty_string() -> None:
    assert root([]) == EMPTY_ROOT == bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


@pytest.mark.parametrize("n", range(1, 9))
def test_root_of_every_prefix_matches_reference(n: int) -> None:
    assert root(HASHES[:n]) == PREFIX_ROOTS[n - 1]


def test_root_rejects_hash_of_wrong_size() -> None:
    with pytest.raises(MerkleError, match="leaf hash 1 is 31 bytes, expected 32"):
        root([HASHES[0], HASHES[1][:31]])


def test_event_leaf_is_salt_then_event_digest() -> None:
    salt = bytes(range(32))
    assert event_leaf(salt, b"event") == salt + hashlib.sha256(b"event").digest()


def test_event_leaf_rejects_short_salt() -> None:
    with pytest.raises(MerkleError, match="salt is 16 bytes, expected 32"):
        event_leaf(b"\x00" * 16, b"event")


def test_different_salts_hide_equal_events() -> None:
    assert leaf_hash(event_leaf(b"\x01" * 32, b"SELECT 1")) != leaf_hash(event_leaf(b"\x02" * 32, b"SELECT 1"))


# Inclusion proofs -------------------------------------------------------------------


@pytest.mark.parametrize(("index", "size"), sorted(REFERENCE_INCLUSION))
def test_inclusion_proof_matches_reference(index: int, size: int) -> None:
    assert inclusion_proof(index, HASHES[:size]) == REFERENCE_INCLUSION[(index, size)]


@pytest.mark.parametrize(("index", "size"), ALL_INCLUSIONS)
def test_every_inclusion_proof_verifies(index: int, size: int) -> None:
    proof = inclusion_proof(index, HASHES[:size])
    verify_inclusion(HASHES[index], index, size, proof, PREFIX_ROOTS[size - 1])


@pytest.mark.parametrize(("index", "size"), ALL_INCLUSIONS)
def test_inclusion_rejects_every_flipped_proof_hash(index: int, size: int) -> None:
    proof = inclusion_proof(index, HASHES[:size])
    for position in range(len(proof)):
        with pytest.raises(InclusionProofError, match="recomputed root [0-9a-f]{64} does not match"):
            verify_inclusion(HASHES[index], index, size, _flip_bit(proof, position), PREFIX_ROOTS[size - 1])


@pytest.mark.parametrize(("index", "size"), ALL_INCLUSIONS)
def test_inclusion_rejects_wrong_leaf(index: int, size: int) -> None:
    proof = inclusion_proof(index, HASHES[:size])
    with pytest.raises(InclusionProofError, match="does not match"):
        verify_inclusion(leaf_hash(b"not in the tree"), index, size, proof, PREFIX_ROOTS[size - 1])


@pytest.mark.parametrize(("index", "size"), [(i, n) for i, n in ALL_INCLUSIONS if n > 1])
def test_inclusion_rejects_wrong_index(index: int, size: int) -> None:
    proof = inclusion_proof(index, HASHES[:size])
    for other in range(size):
        if other != index:
            with pytest.raises(InclusionProofError):
                verify_inclusion(HASHES[index], other, size, proof, PREFIX_ROOTS[size - 1])


@pytest.mark.parametrize(("index", "size"), ALL_INCLUSIONS)
def test_inclusion_rejects_wrong_tree_height(index: int, size: int) -> None:
    # Only sizes of another height must fail: the root alone does not bind the
    # size (see verify_inclusion), so e.g. leaf 0 of 5..8 shares one proof.
    proof = inclusion_proof(index, HASHES[:size])
    for other in {size * 2, size // 2} - {size}:
        with pytest.raises(InclusionProofError):
            verify_inclusion(HASHES[index], index, other, proof, PREFIX_ROOTS[size - 1])


def test_inclusion_rejects_truncated_proof_with_precise_message() -> None:
    proof = inclusion_proof(5, HASHES)
    with pytest.raises(InclusionProofError, match=r"^proof has 2 hashes, expected 3 for index 5 in a tree of 8$"):
        verify_inclusion(HASHES[5], 5, 8, proof[:2], PREFIX_ROOTS[7])


def test_inclusion_rejects_extended_proof() -> None:
    proof = inclusion_proof(5, HASHES)
    with pytest.raises(InclusionProofError, match="proof has 4 hashes, expected 3"):
        verify_inclusion(HASHES[5], 5, 8, [*proof, PREFIX_ROOTS[7]], PREFIX_ROOTS[7])


def test_inclusion_rejects_wrong_root_with_both_roots_in_message() -> None:
    proof = inclusion_proof(5, HASHES)
    expected = PREFIX_ROOTS[7].hex()
    wrong = PREFIX_ROOTS[6].hex()
    with pytest.raises(InclusionProofError, match=f"recomputed root {expected} does not match {wrong}"):
        verify_inclusion(HASHES[5], 5, 8, proof, PREFIX_ROOTS[6])


@pytest.mark.parametrize(("index", "size"), [(0, 0), (1, 1), (8, 8), (-1, 8)])
def test_inclusion_rejects_index_out_of_range(index: int, size: int) -> None:
    with pytest.raises(InclusionProofError, match=f"index {index} is out of range for a tree of {size}"):
        verify_inclusion(HASHES[0], index, size, [], EMPTY_ROOT)


def test_inclusion_rejects_short_proof_hash() -> None:
    proof = inclusion_proof(5, HASHES)
    proof[1] = proof[1][:20]
    with pytest.raises(InclusionProofError, match="proof hash 1 is 20 bytes, expected 32"):
        verify_inclusion(HASHES[5], 5, 8, proof, PREFIX_ROOTS[7])


def test_single_leaf_tree_has_empty_proof_and_leaf_as_root() -> None:
    assert inclusion_proof(0, HASHES[:1]) == []
    verify_inclusion(HASHES[0], 0, 1, [], HASHES[0])


def test_inclusion_proof_generation_rejects_index_out_of_range() -> None:
    with pytest.raises(MerkleError, match="index 3 is out of range for a tree of 3"):
        inclusion_proof(3, HASHES[:3])


def test_inclusion_trace_shows_each_step() -> None:
    lines: list[str] = []
    verify_inclusion(HASHES[0], 0, 2, [HASHES[1]], PREFIX_ROOTS[1], trace=lines.append)
    assert lines == [
        f"SHA256(0x01 | {HASHES[0].hex()} | {HASHES[1].hex()}) = {PREFIX_ROOTS[1].hex()}",
        f"recomputed root {PREFIX_ROOTS[1].hex()} matches",
    ]


def test_inclusion_trace_has_one_line_per_proof_hash() -> None:
    lines: list[str] = []
    proof = inclusion_proof(5, HASHES)
    verify_inclusion(HASHES[5], 5, 8, proof, PREFIX_ROOTS[7], trace=lines.append)
    assert len(lines) == len(proof) + 1
    assert lines[-2].endswith(f"= {PREFIX_ROOTS[7].hex()}")


# Consistency proofs ---------------------------------------------------------------


@pytest.mark.parametrize(("m", "n"), sorted(REFERENCE_CONSISTENCY))
def test_consistency_proof_matches_reference(m: int, n: int) -> None:
    assert consistency_proof(m, HASHES[:n]) == REFERENCE_CONSISTENCY[(m, n)]


@pytest.mark.parametrize(("m", "n"), ALL_CONSISTENCIES)
def test_every_consistency_proof_verifies(m: int, n: int) -> None:
    proof = consistency_proof(m, HASHES[:n])
    verify_consistency(m, n, PREFIX_ROOTS[m - 1], PREFIX_ROOTS[n - 1], proof)


@pytest.mark.parametrize(("m", "n"), PROPER_CONSISTENCIES)
def test_consistency_rejects_every_flipped_proof_hash(m: int, n: int) -> None:
    proof = consistency_proof(m, HASHES[:n])
    for position in range(len(proof)):
        with pytest.raises(ConsistencyProofError, match="recomputed (old|new) root [0-9a-f]{64} does not match"):
            verify_consistency(m, n, PREFIX_ROOTS[m - 1], PREFIX_ROOTS[n - 1], _flip_bit(proof, position))


@pytest.mark.parametrize(("m", "n"), PROPER_CONSISTENCIES)
def test_consistency_rejects_truncated_proof(m: int, n: int) -> None:
    proof = consistency_proof(m, HASHES[:n])
    with pytest.raises(ConsistencyProofError, match=f"proof has {len(proof) - 1} hashes, expected {len(proof)}"):
        verify_consistency(m, n, PREFIX_ROOTS[m - 1], PREFIX_ROOTS[n - 1], proof[:-1])


@pytest.mark.parametrize(("m", "n"), PROPER_CONSISTENCIES)
def test_consistency_rejects_any_other_old_size(m: int, n: int) -> None:
    proof = consistency_proof(m, HASHES[:n])
    for other in range(0, 17):
        if other != m:
            with pytest.raises(ConsistencyProofError):
                verify_consistency(other, n, PREFIX_ROOTS[m - 1], PREFIX_ROOTS[n - 1], proof)


@pytest.mark.parametrize(("m", "n"), PROPER_CONSISTENCIES)
def test_consistency_rejects_new_tree_of_wrong_height(m: int, n: int) -> None:
    proof = consistency_proof(m, HASHES[:n])
    for other in {n * 2, n // 2} - {n}:
        with pytest.raises(ConsistencyProofError):
            verify_consistency(m, other, PREFIX_ROOTS[m - 1], PREFIX_ROOTS[n - 1], proof)


@pytest.mark.parametrize(("m", "n"), PROPER_CONSISTENCIES)
def test_consistency_rejects_wrong_or_swapped_roots(m: int, n: int) -> None:
    proof = consistency_proof(m, HASHES[:n])
    old, new = PREFIX_ROOTS[m - 1], PREFIX_ROOTS[n - 1]
    wrong = leaf_hash(b"wrong root")
    for old_root, new_root in [(wrong, new), (old, wrong), (new, old)]:
        with pytest.raises(ConsistencyProofError, match="does not match"):
            verify_consistency(m, n, old_root, new_root, proof)


def test_consistency_message_names_the_failing_root() -> None:
    proof = consistency_proof(6, HASHES)
    wrong = leaf_hash(b"wrong root")
    message = f"recomputed new root {PREFIX_ROOTS[7].hex()} does not match {wrong.hex()}"
    with pytest.raises(ConsistencyProofError, match=message):
        verify_consistency(6, 8, PREFIX_ROOTS[5], wrong, proof)


def test_consistency_truncated_proof_message() -> None:
    with pytest.raises(
        ConsistencyProofError, match=r"^proof has 2 hashes, expected 3 for old size 6 and new size 8$"
    ):
        verify_consistency(6, 8, PREFIX_ROOTS[5], PREFIX_ROOTS[7], REFERENCE_CONSISTENCY[(6, 8)][:2])


def test_consistency_rejects_shrinking_tree() -> None:
    with pytest.raises(ConsistencyProofError, match="old size 5 is not between 0 and new size 4"):
        verify_consistency(5, 4, PREFIX_ROOTS[4], PREFIX_ROOTS[3], [])


def test_equal_sizes_need_equal_roots_and_empty_proof() -> None:
    verify_consistency(4, 4, PREFIX_ROOTS[3], PREFIX_ROOTS[3], [])
    with pytest.raises(ConsistencyProofError, match="trees of equal size 4 have different roots"):
        verify_consistency(4, 4, PREFIX_ROOTS[3], PREFIX_ROOTS[4], [])
    with pytest.raises(ConsistencyProofError, match="proof has 1 hashes, expected 0"):
        verify_consistency(4, 4, PREFIX_ROOTS[3], PREFIX_ROOTS[3], [EMPTY_ROOT])


def test_empty_tree_is_consistent_with_any_tree() -> None:
    assert consistency_proof(0, HASHES) == []
    verify_consistency(0, 8, EMPTY_ROOT, PREFIX_ROOTS[7], [])
    with pytest.raises(ConsistencyProofError, match="old root .* of an empty tree is not e3b0c442"):
        verify_consistency(0, 8, PREFIX_ROOTS[0], PREFIX_ROOTS[7], [])


def test_consistency_proof_generation_rejects_old_size_beyond_tree() -> None:
    with pytest.raises(MerkleError, match="old size 4 is out of range for a tree of 3"):
        consistency_proof(4, HASHES[:3])


def test_consistency_trace_labels_old_and_new_steps() -> None:
    lines: list[str] = []
    verify_consistency(6, 8, PREFIX_ROOTS[5], PREFIX_ROOTS[7], REFERENCE_CONSISTENCY[(6, 8)], trace=lines.append)
    assert all(line.startswith(("old: SHA256(0x01 | ", "new: SHA256(0x01 | ")) for line in lines[:-1])
    assert lines[-1] == f"recomputed old root {PREFIX_ROOTS[5].hex()} and new root {PREFIX_ROOTS[7].hex()} match"


# Many proofs over one tree --------------------------------------------------------


def test_merkle_levels_agree_with_the_leaf_list_functions():
    leaves = [leaf_hash(bytes([i])) for i in range(37)]
    levels = MerkleLevels(leaves)
    for size in range(1, 38):
        assert levels.root(size) == root(leaves[:size])
        for i in range(size):
            assert levels.inclusion_proof(i, size) == inclusion_proof(i, leaves[:size])
            verify_inclusion(leaves[i], i, size, levels.inclusion_proof(i, size), levels.root(size))
        for m in range(1, size + 1):
            assert levels.consistency_proof(m, size) == consistency_proof(m, leaves[:size])
            verify_consistency(m, size, levels.root(m), levels.root(size), levels.consistency_proof(m, size))


# Compact tree ---------------------------------------------------------------------


def test_compact_tree_tracks_every_reference_prefix() -> None:
    tree = CompactTree()
    assert (tree.size, tree.root()) == (0, EMPTY_ROOT)
    for n, h in enumerate(HASHES, 1):
        tree.append(h)
        assert (tree.size, tree.root()) == (n, PREFIX_ROOTS[n - 1])


def test_compact_tree_keeps_one_hash_per_set_bit_of_size() -> None:
    tree = CompactTree()
    for h in HASHES[:7]:
        tree.append(h)
    assert len(tree.to_bytes()) == 8 + 3 * 32


def test_compact_tree_rejects_bad_leaf_hash() -> None:
    with pytest.raises(MerkleError, match="leaf hash is 3 bytes, expected 32"):
        CompactTree().append(b"abc")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00" * 7, "compact tree is 7 bytes, shorter than its 8-byte size"),
        ((3).to_bytes(8, "big") + b"\x00" * 32, r"compact tree of size 3 needs 2 hashes \(72 bytes\), got 40 bytes"),
        ((0).to_bytes(8, "big") + b"\x00", r"compact tree of size 0 needs 0 hashes \(8 bytes\), got 9 bytes"),
    ],
)
def test_compact_tree_rejects_malformed_bytes(data: bytes, message: str) -> None:
    with pytest.raises(CompactTreeError, match=message):
        CompactTree.from_bytes(data)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(min_value=0, max_value=300), cut=st.integers(min_value=0, max_value=300))
def test_compact_tree_root_equals_full_root_and_survives_restore(size: int, cut: int) -> None:
    hashes = [leaf_hash(i.to_bytes(2, "big")) for i in range(size)]
    cut = min(cut, size)
    tree = CompactTree()
    for h in hashes[:cut]:
        tree.append(h)
    restored = CompactTree.from_bytes(tree.to_bytes())
    assert (restored.size, restored.root()) == (cut, root(hashes[:cut]))
    for h in hashes[cut:]:
        restored.append(h)
    assert (restored.size, restored.root()) == (size, root(hashes))
    assert CompactTree.from_bytes(restored.to_bytes()).root() == root(hashes)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_generated_proofs_verify_on_random_trees(data: st.DataObject) -> None:
    n = data.draw(st.integers(min_value=1, max_value=300), label="n")
    index = data.draw(st.integers(min_value=0, max_value=n - 1), label="index")
    m = data.draw(st.integers(min_value=1, max_value=n), label="m")
    hashes = [leaf_hash(i.to_bytes(2, "big")) for i in range(n)]
    full = root(hashes)
    verify_inclusion(hashes[index], index, n, inclusion_proof(index, hashes), full)
    verify_consistency(m, n, root(hashes[:m]), full, consistency_proof(m, hashes))
