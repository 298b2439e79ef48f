"""The session-state map: what every seal commits to about every session of its partition.

A seal's Merkle tree proves which events were sealed; it cannot prove that a
bundle holds *all* of a session's events. The session-state map closes that
gap: for each session the ledger has accepted events of, it maps the session
to its state — the last sealed seq, the SHA-256 of that event, and whether
that event was its SessionEnd — and every seal signs the map's root (the seal
record's `sessions` field and an extension line of its checkpoint, so the
witnesses cosign it too). A bundle carries, per session, the proof of its
state against the newest seal; an exporter who drops a session's tail cannot
make the proven state agree with the shorter chain it kept.

The map is a compact sparse Merkle tree (a binary Patricia trie) over 256-bit
keys, key = SHA-256(session id):

    T(S, d) = EMPTY                               S is empty
            = SHA-256(0x10 || key || state)        S has one entry (key, state)
            = SHA-256(0x11 || T(S0, d+1) || T(S1, d+1))   otherwise, split on key bit d

where bit 0 is the key's most significant bit, EMPTY is 32 zero bytes, and
`state` is 41 bytes: last seq (u64, big-endian) || last event hash (32) ||
ended (0x00 or 0x01). The tags 0x10/0x11 keep map hashes apart from the log
tree's 0x00/0x01. Each leaf commits to its whole key, so a single entry needs
no path of 256 nodes: the depth of a path is about log2(sessions), and so is
a proof. A proof lists the sibling hashes from the root down to where the
key's path ends; it ends at the key's leaf (membership: the state), at an
empty subtree or at another key's leaf (non-membership). There is exactly one
place a key can be, so no root proves two states for one session.

Pure functions and an in-memory trie, no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

EMPTY = bytes(32)
LEAF_TAG, NODE_TAG = b"\x10", b"\x11"
KEY_SIZE = 32
EXTENSION_PREFIX = "custody.sessions/v1"
"""A checkpoint extension line `custody.sessions/v1 <count> <base64 root>`: the map the witnesses cosign."""


class SessionMapError(ValueError):
    """A session-state proof or extension line is malformed or does not verify."""


def session_key(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


def _bit(key: bytes, depth: int) -> int:
    return (key[depth >> 3] >> (7 - (depth & 7))) & 1


@dataclass(frozen=True)
class SessionState:
    """A session as of a seal: its last sealed event (seq and hash) and whether that was its SessionEnd."""

    last_seq: int
    last_hash: bytes
    ended: bool

    def encode(self) -> bytes:
        return struct.pack(">Q", self.last_seq) + self.last_hash + (b"\x01" if self.ended else b"\x00")

    def to_json(self) -> dict:
        return {"last_seq": self.last_seq, "last_hash": self.last_hash.hex(), "ended": self.ended}

    @classmethod
    def from_json(cls, data: dict) -> "SessionState":
        try:
            last_hash = bytes.fromhex(data["last_hash"])
            if len(last_hash) != 32 or not isinstance(data["last_seq"], int) or not isinstance(data["ended"], bool):
                raise ValueError("last_seq, a 32-byte last_hash and ended are required")
            return cls(data["last_seq"], last_hash, data["ended"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SessionMapError(f"not a session state ({exc})") from None

    def describe(self) -> str:
        return f"{'ended' if self.ended else 'open'} at seq {self.last_seq}"


def leaf_hash(key: bytes, state: SessionState) -> bytes:
    return hashlib.sha256(LEAF_TAG + key + state.encode()).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_TAG + left + right).digest()


class _Leaf:
    __slots__ = ("key", "hash")

    def __init__(self, key: bytes, hash_: bytes):
        self.key, self.hash = key, hash_


class _Branch:
    __slots__ = ("left", "right", "hash")

    def __init__(self) -> None:
        self.left: _Node = None
        self.right: _Node = None
        self.hash: bytes | None = None


_Node = _Leaf | _Branch | None


@dataclass(frozen=True)
class StateProof:
    """Sibling hashes from the root down, and what the key's path ends at: its own state, another key's leaf
    (`other_key`, `other_hash`), or an empty subtree (all three None)."""

    siblings: tuple[bytes, ...]
    state: SessionState | None = None
    other_key: bytes | None = None
    other_hash: bytes | None = None

    def to_json(self) -> dict:
        document: dict = {"siblings": [h.hex() for h in self.siblings]}
        if self.state is not None:
            document["state"] = self.state.to_json()
        if self.other_key is not None:
            document["other"] = {"key": self.other_key.hex(), "hash": self.other_hash.hex()}
        return document

    @classmethod
    def from_json(cls, data: dict) -> "StateProof":
        try:
            siblings = tuple(bytes.fromhex(h) for h in data["siblings"])
            if any(len(h) != 32 for h in siblings) or len(siblings) > 8 * KEY_SIZE:
                raise ValueError("siblings must be at most 256 hashes of 32 bytes")
            state = SessionState.from_json(data["state"]) if "state" in data else None
            other = data.get("other")
            other_key = bytes.fromhex(other["key"]) if other else None
            other_hash = bytes.fromhex(other["hash"]) if other else None
        except (KeyError, TypeError, ValueError) as exc:
            raise SessionMapError(f"not a session-state proof ({exc})") from None
        return cls(siblings, state, other_key, other_hash)


class SessionMap:
    """The map as a trie: `put` is O(depth), `root()` rehashes only the paths changed since the last root."""

    def __init__(self) -> None:
        self._root: _Node = None
        self.states: dict[str, SessionState] = {}

    @property
    def count(self) -> int:
        return len(self.states)

    def put(self, session_id: str, state: SessionState) -> None:
        if self.states.get(session_id) == state:
            return
        self.states[session_id] = state
        key = session_key(session_id)
        self._root = self._put(self._root, key, leaf_hash(key, state), 0)

    def _put(self, node: _Node, key: bytes, hash_: bytes, depth: int) -> _Node:
        if node is None:
            return _Leaf(key, hash_)
        if isinstance(node, _Leaf):
            if node.key == key:
                node.hash = hash_
                return node
            return _split(node, _Leaf(key, hash_), depth)
        node.hash = None
        if _bit(key, depth):
            node.right = self._put(node.right, key, hash_, depth + 1)
        else:
            node.left = self._put(node.left, key, hash_, depth + 1)
        return node

    def root(self) -> bytes:
        return _hash(self._root)

    def prove(self, session_id: str) -> StateProof:
        key = session_key(session_id)
        self.root()  # every branch hashed
        siblings: list[bytes] = []
        node, depth = self._root, 0
        while isinstance(node, _Branch):
            if _bit(key, depth):
                siblings.append(_hash(node.left))
                node = node.right
            else:
                siblings.append(_hash(node.right))
                node = node.left
            depth += 1
        if node is None:
            return StateProof(tuple(siblings))
        if node.key == key:
            return StateProof(tuple(siblings), self.states[session_id])
        return StateProof(tuple(siblings), other_key=node.key, other_hash=node.hash)


def _split(a: _Leaf, b: _Leaf, depth: int) -> _Branch:
    branch = top = _Branch()
    while _bit(a.key, depth) == _bit(b.key, depth):
        below = _Branch()
        if _bit(a.key, depth):
            branch.right = below
        else:
            branch.left = below
        branch, depth = below, depth + 1
    if _bit(a.key, depth):
        branch.left, branch.right = b, a
    else:
        branch.left, branch.right = a, b
    return top


def _hash(node: _Node) -> bytes:
    if node is None:
        return EMPTY
    if node.hash is None:  # a branch changed since it was last hashed
        node.hash = node_hash(_hash(node.left), _hash(node.right))
    return node.hash


def build(states: Iterable[tuple[str, SessionState]]) -> SessionMap:
    """A map holding these sessions' states."""
    result = SessionMap()
    for session_id, state in states:
        result.put(session_id, state)
    return result


def verify_state(root: bytes, session_id: str, proof: StateProof) -> SessionState | None:
    """Check `proof` against `root` and return the session's proven state, or None if it is proven absent.

    Raises SessionMapError when the proof does not lead to `root`. O(depth) hashes, depth ≈ log2(sessions).
    """
    key = session_key(session_id)
    depth = len(proof.siblings)
    if proof.state is not None:
        if proof.other_key is not None:
            raise SessionMapError("a proof ends at the session's state or at another key, not both")
        current = leaf_hash(key, proof.state)
    elif proof.other_key is not None:
        if len(proof.other_key) != KEY_SIZE or proof.other_hash is None or len(proof.other_hash) != 32:
            raise SessionMapError("the other leaf needs a 32-byte key and hash")
        if proof.other_key == key:
            raise SessionMapError("the proof of absence ends at the session's own key")
        if any(_bit(proof.other_key, d) != _bit(key, d) for d in range(depth)):
            raise SessionMapError("the other leaf is not on the session's path")
        current = proof.other_hash
    else:
        current = EMPTY
    for d in range(depth - 1, -1, -1):
        sibling = proof.siblings[d]
        current = node_hash(sibling, current) if _bit(key, d) else node_hash(current, sibling)
    if current != root:
        raise SessionMapError(f"recomputed root {current.hex()[:16]}… does not match the sealed root {root.hex()[:16]}…")
    return proof.state


# Seals and checkpoints -----------------------------------------------------------


def seal_field(session_map: SessionMap) -> dict:
    """The seal record's `sessions` field."""
    return {"count": session_map.count, "root": session_map.root().hex()}


def extension_line(field: dict) -> str:
    return f"{EXTENSION_PREFIX} {field['count']} {base64.b64encode(bytes.fromhex(field['root'])).decode()}"


def parse_extensions(extensions: Sequence[str]) -> dict | None:
    """The `sessions` field a checkpoint's extension line states, or None if it has none (a seal from before
    session-state maps)."""
    lines = [line for line in extensions if line.split(" ", 1)[0] == EXTENSION_PREFIX]
    if not lines:
        return None
    if len(lines) > 1:
        raise SessionMapError(f"checkpoint has {len(lines)} {EXTENSION_PREFIX} lines")
    fields = lines[0].split(" ")
    try:
        if len(fields) != 3 or not fields[1].isdigit():
            raise ValueError("expected <count> <base64 root>")
        root = base64.b64decode(fields[2], validate=True)
        if len(root) != 32:
            raise ValueError("root is not 32 bytes")
    except ValueError as exc:
        raise SessionMapError(f"checkpoint extension {lines[0]!r}: {exc}") from None
    return {"count": int(fields[1]), "root": root.hex()}
