"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and an incremental tree.

Pure functions over 32-byte SHA-256 hashes, no I/O. The ledger appends one
leaf per accepted event to a `CompactTree` (it keeps only the perfect-subtree
roots, so memory is O(log n) however long the log grows); the query side
generates inclusion and consistency proofs from the stored leaf hashes (with
`MerkleLevels` when a bundle needs millions of them); an auditor re-checks them with `verify_inclusion` and `verify_consistency`,
which follow RFC 9162 §2.1.3.2 and §2.1.4.2 step by step so that a
`--verbose` CLI can print every hash it computes.

Domain separation (0x00 for leaves, 0x01 for interior nodes) is what stops a
second-preimage attack that passes an interior node off as a leaf.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

HASH_SIZE = 32
SALT_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
"""MTH({}): the root of the empty tree is the hash of the empty string."""

Trace = Callable[[str], None]
"""Receives one line of text per verification step, e.g. for `--verbose`."""


class MerkleError(ValueError):
    """A Merkle input or proof is invalid."""


class InclusionProofError(MerkleError):
    """An inclusion proof does not prove the leaf is in the tree."""


class ConsistencyProofError(MerkleError):
    """A consistency proof does not prove the new tree extends the old one."""


class CompactTreeError(MerkleError):
    """Serialized compact-tree bytes are malformed."""


# Hashing ---------------------------------------------------------------------


def leaf_hash(data: bytes) -> bytes:
    """Return SHA-256(0x00 || data), the RFC 6962 hash of a leaf."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return SHA-256(0x01 || left || right), the RFC 6962 interior node hash."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def event_leaf(salt: bytes, event_bytes: bytes) -> bytes:
    """Return the leaf data committing to one event: salt || SHA-256(event_bytes).

    Why the salt: an inclusion proof for one event contains the hashes of its
    neighbours. Were a leaf just the hash of the event, anyone holding a proof
    could confirm a guess of a neighbouring event (a short SQL statement, a
    user name) by hashing candidates. A fresh 32-byte random salt per event,
    disclosed only together with that event, makes the neighbours' hashes
    useless to such a dictionary attack.

    Why the digest rather than the raw bytes: the leaf has a fixed size
    (64 bytes), and disclosing (salt, digest) proves the event's bytes
    without the tree ever holding them.
    """
    if len(salt) != SALT_SIZE:
        raise MerkleError(f"salt is {len(salt)} bytes, expected {SALT_SIZE}")
    return salt + hashlib.sha256(event_bytes).digest()


def event_leaf_hash(salt: bytes, event_bytes: bytes) -> bytes:
    """The Merkle leaf hash of one event: what the ledger appends and every verifier recomputes."""
    return leaf_hash(event_leaf(salt, event_bytes))


def event_leaf_hashes(salts: bytes, event_digests: Sequence[bytes]) -> list[bytes]:
    """`event_leaf_hash` of many events at once, from their SHA-256 digests (already taken for the session
    chain) and their salts concatenated (SALT_SIZE bytes each, in order)."""
    if len(salts) != SALT_SIZE * len(event_digests):
        raise MerkleError(f"{len(salts)} bytes of salt for {len(event_digests)} events, expected {SALT_SIZE} each")
    sha256, view = hashlib.sha256, memoryview(salts)
    return [sha256(b"\x00" + view[i * SALT_SIZE:(i + 1) * SALT_SIZE] + digest).digest()
            for i, digest in enumerate(event_digests)]


def _check_hash(value: bytes, what: str, error: type[MerkleError]) -> None:
    if len(value) != HASH_SIZE:
        raise error(f"{what} is {len(value)} bytes, expected {HASH_SIZE}")


def _check_hashes(hashes: Sequence[bytes], what: str) -> None:
    for i, value in enumerate(hashes):
        _check_hash(value, f"{what} {i}", MerkleError)


def _split(n: int) -> int:
    """Return k, the largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


# Tree head and proof generation (RFC 9162 §2.1.1, §2.1.3.1, §2.1.4.1) --------


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """Return MTH(D[n]), the Merkle tree hash over the given leaf hashes."""
    _check_hashes(leaf_hashes, "leaf hash")
    return _mth(leaf_hashes)


def _mth(hashes: Sequence[bytes]) -> bytes:
    n = len(hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return hashes[0]
    k = _split(n)
    return node_hash(_mth(hashes[:k]), _mth(hashes[k:]))


MTH = Callable[[int, int], bytes]
"""MTH(D[lo:hi]) of a range of one tree: how a proof generator gets the subtree hashes it needs."""


def _range_path(index: int, lo: int, hi: int, mth: MTH) -> list[bytes]:
    """PATH(index - lo, D[lo:hi]), each sibling subtree hashed by `mth`."""
    path: list[bytes] = []
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            path.append(mth(lo + k, hi))
            hi = lo + k
        else:
            path.append(mth(lo, lo + k))
            lo += k
    return path[::-1]


def _range_subproof(m: int, lo: int, hi: int, complete: bool, mth: MTH) -> list[bytes]:
    """SUBPROOF(m, D[lo:hi], b); `complete` is b: D[lo:lo+m] is a subtree the verifier knows."""
    if m == hi - lo:
        return [] if complete else [mth(lo, hi)]
    k = _split(hi - lo)
    if m <= k:
        return _range_subproof(m, lo, lo + k, complete, mth) + [mth(lo + k, hi)]
    return _range_subproof(m - k, lo + k, hi, False, mth) + [mth(lo, lo + k)]


def _slice_mth(hashes: Sequence[bytes]) -> MTH:
    return lambda lo, hi: _mth(hashes[lo:hi])


def inclusion_proof(index: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """Return PATH(index, D[n]): the audit path proving leaf `index` is in the tree."""
    _check_hashes(leaf_hashes, "leaf hash")
    if not 0 <= index < len(leaf_hashes):
        raise MerkleError(f"index {index} is out of range for a tree of {len(leaf_hashes)}")
    return _range_path(index, 0, len(leaf_hashes), _slice_mth(leaf_hashes))


def consistency_proof(m: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """Return PROOF(m, D[n]): proof that the first m leaves form a prefix of the tree.

    Empty when m == n (the trees are the same) or m == 0 (every tree extends
    the empty tree).
    """
    _check_hashes(leaf_hashes, "leaf hash")
    n = len(leaf_hashes)
    if not 0 <= m <= n:
        raise MerkleError(f"old size {m} is out of range for a tree of {n}")
    if m == 0:
        return []
    return _range_subproof(m, 0, n, True, _slice_mth(leaf_hashes))


class MerkleLevels:
    """Every level of one tree in memory, for many proofs over it (a bundle proves each of millions of events).

    `inclusion_proof` and `consistency_proof` above rehash O(n) leaves per
    proof. Level k here holds the perfect, aligned subtree hashes of leaves
    [i·2^k, (i+1)·2^k), so MTH of any range the RFC 9162 recursion asks for
    costs O(log n) node hashes, for the tree of every size up to `size`.
    """

    def __init__(self, leaf_hashes: list[bytes]):
        _check_hashes(leaf_hashes, "leaf hash")
        self.levels: list[list[bytes]] = [leaf_hashes]
        while len(self.levels[-1]) > 1:
            below = self.levels[-1]
            self.levels.append([node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)])

    @property
    def size(self) -> int:
        return len(self.levels[0])

    def mth(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi]) for the ranges RFC 9162 recursion produces."""
        width = hi - lo
        if width == 0:
            return EMPTY_ROOT
        level = width.bit_length() - 1
        if width == 1 << level and lo % width == 0:
            return self.levels[level][lo >> level]
        k = _split(width)
        return node_hash(self.mth(lo, lo + k), self.mth(lo + k, hi))

    def root(self, size: int) -> bytes:
        """MTH(D[0:size]): the root of the tree when it had `size` leaves."""
        return self.mth(0, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """PATH(index, D[0:size])."""
        if not 0 <= index < size <= self.size:
            raise MerkleError(f"no leaf {index} in a tree of {size} (of {self.size} known leaves)")
        return _range_path(index, 0, size, self.mth)

    def consistency_proof(self, m: int, n: int) -> list[bytes]:
        """PROOF(m, D[0:n])."""
        if not 0 <= m <= n <= self.size:
            raise MerkleError(f"no consistency proof from {m} to {n} (of {self.size} known leaves)")
        if m in (0, n):
            return []
        return _range_subproof(m, 0, n, True, self.mth)


# Proof verification (RFC 9162 §2.1.3.2, §2.1.4.2) ----------------------------


def _traced_node_hash(left: bytes, right: bytes, trace: Trace | None, label: str = "") -> bytes:
    parent = node_hash(left, right)
    if trace is not None:
        trace(f"{label}SHA256(0x01 | {left.hex()} | {right.hex()}) = {parent.hex()}")
    return parent


def _inclusion_proof_length(index: int, size: int) -> int:
    """Number of hashes in the audit path for `index` in a tree of `size`.

    `inner` counts levels below the point where the paths to `index` and to
    the last leaf diverge (each contributes a sibling); above it, a sibling
    exists only where `index` is a right child (the set bits, or "border").
    """
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def _consistency_proof_length(m: int, n: int) -> int:
    """Number of hashes in PROOF(m, D[n]) for 0 < m < n.

    It is the audit path for leaf m-1 without the levels inside the largest
    complete subtree ending at m (shared by both trees), plus that subtree's
    root unless it is the whole old tree (m a power of two).
    """
    shift = (m & -m).bit_length() - 1
    seeded = 0 if m == 1 << shift else 1
    return seeded + _inclusion_proof_length(m - 1, n) - shift


def _check_proof(proof: Sequence[bytes], expected: int, where: str, error: type[MerkleError]) -> None:
    if len(proof) != expected:
        raise error(f"proof has {len(proof)} hashes, expected {expected} for {where}")
    for i, value in enumerate(proof):
        if len(value) != HASH_SIZE:  # the message is built only for a bad hash: this runs per event
            _check_hash(value, f"proof hash {i}", error)


def verify_inclusion(
    leaf_hash: bytes,
    index: int,
    tree_size: int,
    proof: Sequence[bytes],
    root: bytes,
    *,
    trace: Trace | None = None,
) -> None:
    """Check that `leaf_hash` is leaf `index` of the tree of `tree_size` with `root`.

    Raises InclusionProofError saying what is wrong; returns None on success.
    The proof length is checked up front against the tree shape, which gives a
    precise message and subsumes the RFC's in-loop `sn == 0` checks.

    The root does not commit to the size by itself: a proof for a leaf left of
    the tree's last perfect subtree also verifies for other sizes of the same
    height. Take `tree_size` and `root` together from a signed checkpoint.
    """
    if not 0 <= index < tree_size:
        raise InclusionProofError(f"index {index} is out of range for a tree of {tree_size}")
    _check_hash(leaf_hash, "leaf hash", InclusionProofError)
    _check_hash(root, "root", InclusionProofError)
    where = f"index {index} in a tree of {tree_size}"
    _check_proof(proof, _inclusion_proof_length(index, tree_size), where, InclusionProofError)

    parent = node_hash if trace is None else (lambda left, right: _traced_node_hash(left, right, trace))
    fn, sn, r = index, tree_size - 1, leaf_hash
    for p in proof:
        if fn & 1 or fn == sn:
            r = parent(p, r)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = parent(r, p)
        fn, sn = fn >> 1, sn >> 1
    if r != root:
        raise InclusionProofError(f"recomputed root {r.hex()} does not match {root.hex()} ({where})")
    if trace is not None:
        trace(f"recomputed root {r.hex()} matches")


def verify_consistency(
    m: int,
    n: int,
    old_root: bytes,
    new_root: bytes,
    proof: Sequence[bytes],
    *,
    trace: Trace | None = None,
) -> None:
    """Check that the tree of size m with `old_root` is a prefix of size n with `new_root`.

    Raises ConsistencyProofError saying what is wrong; returns None on success.
    For m == n the proof must be empty and the roots equal; for m == 0 the
    proof must be empty and `old_root` the empty-tree root. As with inclusion,
    take each size and root together from a signed checkpoint.
    """
    if not 0 <= m <= n:
        raise ConsistencyProofError(f"old size {m} is not between 0 and new size {n}")
    _check_hash(old_root, "old root", ConsistencyProofError)
    _check_hash(new_root, "new root", ConsistencyProofError)
    if m == 0 or m == n:
        _verify_trivial_consistency(m, n, old_root, new_root, proof)
        return
    where = f"old size {m} and new size {n}"
    _check_proof(proof, _consistency_proof_length(m, n), where, ConsistencyProofError)

    path = list(proof)
    if m & (m - 1) == 0:
        path.insert(0, old_root)
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if fn & 1 or fn == sn:
            fr = _traced_node_hash(c, fr, trace, "old: ")
            sr = _traced_node_hash(c, sr, trace, "new: ")
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = _traced_node_hash(sr, c, trace, "new: ")
        fn, sn = fn >> 1, sn >> 1
    if fr != old_root:
        raise ConsistencyProofError(f"recomputed old root {fr.hex()} does not match {old_root.hex()} ({where})")
    if sr != new_root:
        raise ConsistencyProofError(f"recomputed new root {sr.hex()} does not match {new_root.hex()} ({where})")
    if trace is not None:
        trace(f"recomputed old root {fr.hex()} and new root {sr.hex()} match")


def _verify_trivial_consistency(m: int, n: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> None:
    if proof:
        raise ConsistencyProofError(f"proof has {len(proof)} hashes, expected 0 for old size {m} and new size {n}")
    if m == 0 and old_root != EMPTY_ROOT:
        raise ConsistencyProofError(f"old root {old_root.hex()} of an empty tree is not {EMPTY_ROOT.hex()}")
    if m == n and old_root != new_root:
        raise ConsistencyProofError(
            f"trees of equal size {n} have different roots {old_root.hex()} and {new_root.hex()}"
        )


# Incremental tree --------------------------------------------------------------


class CompactTree:
    """An append-only Merkle tree that keeps only its perfect-subtree roots.

    A tree of size n is the concatenation of perfect subtrees, one per set bit
    of n, largest first (the "compact range" or "frontier"). Appending a leaf
    merges equal-sized subtrees like a binary counter carries, so `append` is
    O(log n) and memory is O(log n); `root()` folds the subtrees right to left,
    which is exactly MTH because RFC 6962 splits at the largest power of two.
    """

    _SIZE_BYTES = 8

    def __init__(self) -> None:
        self._size = 0
        self._nodes: list[bytes] = []

    @property
    def size(self) -> int:
        """Number of leaves appended so far."""
        return self._size

    def append(self, leaf_hash: bytes) -> None:
        """Append one leaf hash (already hashed with `leaf_hash`)."""
        _check_hash(leaf_hash, "leaf hash", MerkleError)
        node, carry = leaf_hash, self._size
        while carry & 1:
            node = node_hash(self._nodes.pop(), node)
            carry >>= 1
        self._nodes.append(node)
        self._size += 1

    def extend(self, leaf_hashes: Sequence[bytes]) -> None:
        """Append many leaf hashes, in order."""
        _check_hashes(leaf_hashes, "leaf hash")
        nodes, size, sha256 = self._nodes, self._size, hashlib.sha256
        for node in leaf_hashes:
            carry = size
            while carry & 1:
                node = sha256(b"\x01" + nodes.pop() + node).digest()
                carry >>= 1
            nodes.append(node)
            size += 1
        self._size = size

    def root(self) -> bytes:
        """Return the Merkle tree hash of all leaves appended so far."""
        if not self._nodes:
            return EMPTY_ROOT
        result = self._nodes[-1]
        for node in reversed(self._nodes[:-1]):
            result = node_hash(node, result)
        return result

    def to_bytes(self) -> bytes:
        """Serialize as an 8-byte big-endian size followed by the subtree roots."""
        return self._size.to_bytes(self._SIZE_BYTES, "big") + b"".join(self._nodes)

    @classmethod
    def from_bytes(cls, data: bytes) -> CompactTree:
        """Restore a tree saved by `to_bytes`, rejecting any length mismatch."""
        if len(data) < cls._SIZE_BYTES:
            raise CompactTreeError(f"compact tree is {len(data)} bytes, shorter than its {cls._SIZE_BYTES}-byte size")
        size = int.from_bytes(data[: cls._SIZE_BYTES], "big")
        count = size.bit_count()
        expected = cls._SIZE_BYTES + count * HASH_SIZE
        if len(data) != expected:
            raise CompactTreeError(
                f"compact tree of size {size} needs {count} hashes ({expected} bytes), got {len(data)} bytes"
            )
        tree = cls()
        tree._size = size
        tree._nodes = [
            data[offset : offset + HASH_SIZE] for offset in range(cls._SIZE_BYTES, expected, HASH_SIZE)
        ]
        return tree


def extension_proof(old: CompactTree, appended: Sequence[bytes]) -> list[bytes]:
    """Return PROOF(m, D[m+k]) from the old tree's compact range and the k leaf hashes appended to it.

    The ledger keeps only a CompactTree, not every leaf hash, yet must store a
    consistency proof with each seal. That suffices: every node of the proof
    lies wholly left of m, where it is one of the old tree's perfect-subtree
    roots (the left siblings on the path to leaf m-1), or wholly right of m,
    where it is a hash over appended leaves only.
    """
    _check_hashes(appended, "leaf hash")
    m, n = old.size, old.size + len(appended)
    if m == 0 or m == n:
        return []
    known: dict[tuple[int, int], bytes] = {}
    start = 0
    for node, bit in zip(old._nodes, (b for b in reversed(range(m.bit_length())) if m >> b & 1)):
        known[(start, start + (1 << bit))] = node
        start += 1 << bit

    def mth(lo: int, hi: int) -> bytes:
        return _mth(appended[lo - m : hi - m]) if lo >= m else known[(lo, hi)]

    return _range_subproof(m, 0, n, True, mth)
