"""The session-state map (ledger/sessionmap.py): the trie's root equals the definition's, proofs of
membership and absence verify, and no proof passes for a state or a root it was not made for."""

import hashlib
import random

import pytest

from ledger import sessionmap
from ledger.sessionmap import EMPTY, SessionMap, SessionMapError, SessionState, StateProof, verify_state


def _state(i: int, ended: bool = False) -> SessionState:
    return SessionState(i, hashlib.sha256(str(i).encode()).digest(), ended)


def _reference_root(entries: dict[bytes, bytes], depth: int = 0) -> bytes:
    """T(S, d) exactly as the module docstring defines it, over {key: leaf hash}."""
    if not entries:
        return EMPTY
    if len(entries) == 1:
        return next(iter(entries.values()))
    left = {k: v for k, v in entries.items() if not sessionmap._bit(k, depth)}
    right = {k: v for k, v in entries.items() if sessionmap._bit(k, depth)}
    return sessionmap.node_hash(_reference_root(left, depth + 1), _reference_root(right, depth + 1))


def test_empty_map_root_is_zeros():
    assert SessionMap().root() == bytes(32)


def test_root_matches_the_definition_after_inserts_and_updates():
    rng = random.Random(7)
    m, entries = SessionMap(), {}
    for step in range(600):
        sid = f"session-{rng.randrange(200)}"
        state = _state(step, ended=rng.random() < 0.2)
        m.put(sid, state)
        key = sessionmap.session_key(sid)
        entries[key] = sessionmap.leaf_hash(key, state)
        if step % 97 == 0:
            assert m.root() == _reference_root(entries)
    assert m.root() == _reference_root(entries)
    assert m.count == len(entries)


def test_leaf_encoding_known_answer():
    state = SessionState(5, bytes(range(32)), True)
    assert state.encode() == b"\x00" * 7 + b"\x05" + bytes(range(32)) + b"\x01"
    key = hashlib.sha256(b"s").digest()
    assert sessionmap.leaf_hash(key, state) == hashlib.sha256(b"\x10" + key + state.encode()).digest()
    single = SessionMap()
    single.put("s", state)
    assert single.root() == sessionmap.leaf_hash(key, state)


def test_membership_and_absence_proofs():
    m = SessionMap()
    for i in range(1000):
        m.put(f"s{i}", _state(i, ended=i % 3 == 0))
    root = m.root()
    for i in (0, 1, 499, 999):
        proof = m.prove(f"s{i}")
        assert verify_state(root, f"s{i}", proof) == _state(i, ended=i % 3 == 0)
        assert len(proof.siblings) < 30  # about log2(1000), not 256
        again = StateProof.from_json(proof.to_json())
        assert verify_state(root, f"s{i}", again) == proof.state
    for absent in ("nope", "s1000", "s-1"):
        assert verify_state(root, absent, m.prove(absent)) is None


def test_forged_proofs_fail():
    m = SessionMap()
    for i in range(50):
        m.put(f"s{i}", _state(i, ended=True))
    root, proof = m.root(), m.prove("s7")
    truncated = StateProof(proof.siblings, SessionState(3, proof.state.last_hash, False))
    with pytest.raises(SessionMapError, match="does not match the sealed root"):
        verify_state(root, "s7", truncated)
    with pytest.raises(SessionMapError):
        verify_state(root, "s8", proof)  # another session's proof
    with pytest.raises(SessionMapError):
        verify_state(root, "s7", StateProof(proof.siblings[1:], proof.state))
    absent = m.prove("zzz")
    if absent.other_key is not None:  # an absence proof cannot be replayed for the key it ends at
        with pytest.raises(SessionMapError):
            verify_state(root, "s7", StateProof(absent.siblings))
    m.put("s7", _state(99, ended=True))
    with pytest.raises(SessionMapError):
        verify_state(m.root(), "s7", proof)  # a proof is for one root


def test_extension_line_round_trip():
    m = SessionMap()
    m.put("a", _state(1))
    field = sessionmap.seal_field(m)
    line = sessionmap.extension_line(field)
    assert line.startswith("custody.sessions/v1 1 ")
    assert sessionmap.parse_extensions(["other x", line]) == field
    assert sessionmap.parse_extensions([]) is None
    with pytest.raises(SessionMapError):
        sessionmap.parse_extensions(["custody.sessions/v1 x y"])
