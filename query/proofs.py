"""Many Merkle proofs over one tree, fast: every level of the tree kept in memory.

`ledger.merkle` proves and verifies one proof at a time from the leaf list,
which costs O(n) per proof. A bundle needs a proof for each of up to millions
of events, so this keeps the perfect, aligned subtree hashes of every level
(level k holds the hashes of leaves [i·2^k, (i+1)·2^k)) and answers MTH of any
range that RFC 9162 recursion asks for in O(log n) node hashes. Proofs made
here are checked with `ledger.merkle.verify_*` in tests.
"""

from __future__ import annotations

from ledger.merkle import EMPTY_ROOT, node_hash


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleLevels:
    def __init__(self, leaf_hashes: list[bytes]):
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
        return self.mth(0, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """PATH(index, D[0:size])."""
        if not 0 <= index < size <= self.size:
            raise ValueError(f"no leaf {index} in a tree of {size} (of {self.size} known leaves)")
        proof: list[bytes] = []
        lo, hi = 0, size
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                proof.append(self.mth(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self.mth(lo, lo + k))
                lo = lo + k
        return proof[::-1]

    def consistency_proof(self, m: int, n: int) -> list[bytes]:
        """PROOF(m, D[0:n])."""
        if not 0 <= m <= n <= self.size:
            raise ValueError(f"no consistency proof from {m} to {n} (of {self.size} known leaves)")
        if m in (0, n):
            return []
        return self._subproof(m, 0, n, True)

    def _subproof(self, m: int, lo: int, hi: int, complete: bool) -> list[bytes]:
        if m == hi - lo:
            return [] if complete else [self.mth(lo, hi)]
        k = _split(hi - lo)
        if m <= k:
            return self._subproof(m, lo, lo + k, complete) + [self.mth(lo + k, hi)]
        return self._subproof(m - k, lo + k, hi, False) + [self.mth(lo, lo + k)]
