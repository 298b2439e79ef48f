"""The witness: C2SP cosignature/v1 known answers, the add-checkpoint checks (fork, rollback, inconsistent
proof), crash-safe state across restarts, and the HTTP endpoint over real HTTP."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import urllib.error
import urllib.request

import nacl.signing
import pytest

from ledger import checkpoint, merkle, rotation, sessionmap
from ledger.witness import (SIZE_CONTENT_TYPE, BadRequest, Forbidden, Fork, Inconsistent, Rollback, SizeConflict,
                            UnknownOrigin, Witness, WitnessError, add_checkpoint_body, origin_hash, serve)

# --- known answers from c2sp.org/tlog-cosignature and c2sp.org/signed-note -------------------------

SPEC_CHECKPOINT = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
SPEC_COSIGNATURE = ("\u2014 witness.example.com/w1 jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrDJ"
                    "sX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA==")
SPEC_SIGNED_MESSAGE = (b"cosignature/v1\ntime 1679315147\nexample.com/behind-the-sofa\n20852163\n"
                       b"CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n")
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"


def test_spec_example_cosignature_parses_to_its_key_id_and_time():
    cosignature = checkpoint.Cosignature.parse_line(SPEC_COSIGNATURE)
    assert cosignature.name == "witness.example.com/w1"
    assert cosignature.key_id.hex() == "8d66cf3f"
    assert cosignature.timestamp == 1679315147
    assert len(cosignature.signature) == 64
    assert cosignature.line == SPEC_COSIGNATURE  # and it encodes back byte for byte


def test_signed_message_is_the_spec_example_byte_for_byte():
    assert checkpoint.cosigned_message(SPEC_CHECKPOINT, 1679315147) == SPEC_SIGNED_MESSAGE


def test_cosignature_key_ids_use_type_byte_4_and_checkpoint_key_ids_type_byte_1():
    verifier = checkpoint.Verifier.parse(SPEC_VKEY)
    assert verifier.key_id.hex() == "530d903a"  # the signed-note spec's example: type byte 0x01
    public_key = verifier.public_key
    expected = hashlib.sha256(b"example.com/foo\n\x04" + public_key).digest()[:4]
    assert checkpoint.cosignature_key_id("example.com/foo", public_key) == expected
    assert expected != verifier.key_id
    cosigner_vkey = checkpoint.CosignatureVerifier("example.com/foo", nacl.signing.VerifyKey(public_key)).vkey
    assert cosigner_vkey == f"example.com/foo+{expected.hex()}+" + base64.b64encode(b"\x04" + public_key).decode()
    assert checkpoint.CosignatureVerifier.parse(cosigner_vkey).key_id == expected
    with pytest.raises(checkpoint.MalformedKeyError):
        checkpoint.CosignatureVerifier.parse(SPEC_VKEY)  # a log key (0x01) is not a cosigner key


def test_cosignature_round_trip_and_forgery():
    cosigner = checkpoint.Cosigner("witness.test/w1", nacl.signing.SigningKey.generate())
    log_signer = checkpoint.Signer.from_key("log.test/p0", nacl.signing.SigningKey.generate())
    cp = checkpoint.Checkpoint("log.test/p0", 3, hashlib.sha256(b"x").digest())
    note = checkpoint.sign_checkpoint(cp, [log_signer])
    cosigned = checkpoint.add_signature_lines(note, [cosigner.cosign(cp.to_text(), 1_700_000_000).line])
    witnessed = checkpoint.open_cosignatures(cosigned, [cosigner.verifier])
    assert [(w.name, c.timestamp) for w, c in witnessed.cosignatures] == [("witness.test/w1", 1_700_000_000)]
    checkpoint.open_checkpoint(cosigned, [log_signer.verifier], origin="log.test/p0")  # log verifiers ignore it
    other = checkpoint.Checkpoint("log.test/p0", 4, hashlib.sha256(b"y").digest())
    forged = checkpoint.add_signature_lines(checkpoint.sign_checkpoint(other, [log_signer]),
                                            [cosigner.cosign(cp.to_text(), 1_700_000_000).line])
    with pytest.raises(checkpoint.InvalidSignatureError, match="invalid cosignature for witness witness.test/w1"):
        checkpoint.open_cosignatures(forged, [cosigner.verifier])


# --- a log to witness -------------------------------------------------------------------------------


class Log:
    """A Merkle tree under one origin and key, making signed checkpoints and proofs as a ledger does."""

    def __init__(self, origin: str = "custody.test/ledger/p0", key: nacl.signing.SigningKey | None = None):
        self.origin, self.key = origin, key or nacl.signing.SigningKey.generate()
        self.signer = checkpoint.Signer.from_key(origin, self.key)
        self.leaves: list[bytes] = []

    def grow(self, n: int) -> None:
        self.leaves += [merkle.leaf_hash(os.urandom(16)) for _ in range(n)]

    def note(self, size: int | None = None, extensions: tuple[str, ...] = (),
             signer: checkpoint.Signer | None = None) -> bytes:
        size = len(self.leaves) if size is None else size
        cp = checkpoint.Checkpoint(self.origin, size, merkle.MerkleLevels(self.leaves).root(size) if size
                                   else hashlib.sha256(b"").digest(), extensions)
        return checkpoint.sign_checkpoint(cp, [signer or self.signer])

    def proof(self, old: int, new: int | None = None) -> list[bytes]:
        new = len(self.leaves) if new is None else new
        return merkle.MerkleLevels(self.leaves).consistency_proof(old, new) if old else []


@pytest.fixture
def log() -> Log:
    return Log()


def make_witness(state, log: Log, **kwargs) -> Witness:
    keys = {log.origin: [log.signer.verifier]}
    seed = state / "seed"
    if not seed.exists():
        seed.parent.mkdir(parents=True, exist_ok=True)
        seed.write_bytes(os.urandom(32))
    cosigner = checkpoint.Cosigner("witness.test/w1", nacl.signing.SigningKey(seed.read_bytes()))
    return Witness(state / "state", cosigner, keys.get, **kwargs)


def test_witness_cosigns_a_growing_log_and_keeps_state(tmp_path, log):
    witness = make_witness(tmp_path, log)
    log.grow(5)
    first = witness.add(log.note(), 0, [])
    log.grow(7)
    second = witness.add(log.note(), 5, log.proof(5))
    assert second.timestamp >= first.timestamp
    latest = witness.latest(log.origin)
    assert (latest.size, latest.root) == (12, merkle.MerkleLevels(log.leaves).root(12))
    witnessed = checkpoint.open_cosignatures(latest.note, [witness.verifier])
    assert len(witnessed.cosignatures) == 1
    checkpoint.open_checkpoint(latest.note, [log.signer.verifier], origin=log.origin)


def test_rollback_is_refused_and_published(tmp_path, log):
    published = []
    witness = make_witness(tmp_path, log, on_violation=published.append)
    log.grow(10)
    witness.add(log.note(), 0, [])
    with pytest.raises(Rollback, match=r"rollback: custody.test/ledger/p0 presents tree size 6, smaller than size 10"):
        witness.add(log.note(6), 0, [])
    assert witness.latest(log.origin).size == 10  # nothing recorded
    assert [(v["category"], v["reason"], v["severity"]) for v in published] == [("log_misbehavior", "rollback", "critical")]
    assert (tmp_path / "state" / "violations.jsonl").read_text().count("rollback") >= 1


def test_fork_same_origin_and_key_is_refused(tmp_path, log):
    published = []
    witness = make_witness(tmp_path, log, on_violation=published.append)
    log.grow(8)
    witness.add(log.note(), 0, [])
    fork = Log(log.origin, log.key)  # a second tree of the same origin, signed by the same key
    fork.grow(8)
    with pytest.raises(Fork, match=r"fork: custody.test/ledger/p0 presents root .* at size 8, where root .* was cosigned"):
        witness.add(fork.note(), 8, [])
    fork.grow(4)
    with pytest.raises(Inconsistent, match=r"inconsistent: custody.test/ledger/p0 at size 12 is not an extension of "
                                           r"the tree of size 8"):
        witness.add(fork.note(), 8, fork.proof(8))
    assert [v["reason"] for v in published] == ["fork", "inconsistent"]


def sessions_line(fill: bytes, count: int = 3) -> str:
    return sessionmap.extension_line({"count": count, "root": (fill * 32).hex()})


def test_two_session_roots_for_one_tree_size_are_a_fork(tmp_path, log):
    """Idle seals repeat a tree size with the same session states; another session-map root at a cosigned size
    would let one tree prove two different session states (e.g. a session ended, and open)."""
    published = []
    witness = make_witness(tmp_path, log, on_violation=published.append)
    log.grow(5)
    witness.add(log.note(extensions=(sessions_line(b"a"),)), 0, [])
    witness.add(log.note(extensions=(sessions_line(b"a"),)), 5, [])  # an idle seal: the same states again
    with pytest.raises(Fork, match=r"fork: custody.test/ledger/p0 presents session-map root 6262626262626262… at tree "
                                   r"size 5, where session-map root 6161616161616161… was cosigned at \d+: two session "
                                   r"states for one tree"):
        witness.add(log.note(extensions=(sessions_line(b"b"),)), 5, [])
    assert [v["reason"] for v in published] == ["fork"]
    assert witness.latest(log.origin).checkpoint.extensions == (sessions_line(b"a"),)  # nothing recorded
    log.grow(2)
    witness.add(log.note(extensions=(sessions_line(b"b", 4),)), 5, log.proof(5))  # a larger tree: a new map


def test_the_witness_follows_a_key_rotation_itself(tmp_path, log):
    """Configured with the log's first key only, the witness takes the key a cosigned rotation checkpoint hands
    over to; from then on only that key opens a checkpoint of the origin (also after a restart)."""
    witness = make_witness(tmp_path, log)
    log.grow(4)
    witness.add(log.note(), 0, [])
    new_key = nacl.signing.SigningKey.generate()
    handover = rotation.extension_line({"key_id": "ledger-2+00", "public_key":
                                        base64.b64encode(bytes(new_key.verify_key)).decode()})
    witness.add(log.note(extensions=(handover,)), 4, [])  # the rotation seal's checkpoint, by the outgoing key
    old_signer, log.signer = log.signer, checkpoint.Signer.from_key(log.origin, new_key)
    log.grow(3)
    witness.add(log.note(), 4, log.proof(4))  # the new key, never configured: accepted
    log.grow(1)
    stranger = checkpoint.Signer.from_key(log.origin, nacl.signing.SigningKey.generate())
    for signer in (old_signer, stranger):  # the retired key, and a key nobody handed the log to
        with pytest.raises(Forbidden, match=rf"checkpoint of 'custody.test/ledger/p0' is not signed by key "
                                            rf"{log.signer.key_id.hex()}, the key a cosigned key rotation handed "
                                            rf"the log to"):
            witness.add(log.note(signer=signer), 7, log.proof(7))
    witness.close()
    again = make_witness(tmp_path, log)
    again.add(log.note(), 7, log.proof(7))
    assert again.latest(log.origin).size == 8


def test_inconsistent_proof_is_refused(tmp_path, log):
    witness = make_witness(tmp_path, log)
    log.grow(9)
    witness.add(log.note(), 0, [])
    log.grow(9)
    proof = log.proof(9)
    proof[0] = hashlib.sha256(b"tampered").digest()
    with pytest.raises(Inconsistent, match="is not an extension of the tree of size 9"):
        witness.add(log.note(), 9, proof)
    assert witness.latest(log.origin).size == 9
    witness.add(log.note(), 9, log.proof(9))  # the right proof is accepted after that
    assert witness.latest(log.origin).size == 18


def test_protocol_refusals(tmp_path, log):
    witness = make_witness(tmp_path, log)
    log.grow(4)
    with pytest.raises(UnknownOrigin):
        witness.add(Log("other.test/log").note(), 0, [])
    stranger = Log(log.origin)  # the right origin, an untrusted key
    stranger.grow(4)
    with pytest.raises(Forbidden, match="no signature from a trusted key"):
        witness.add(stranger.note(), 0, [])
    witness.add(log.note(), 0, [])
    log.grow(2)
    with pytest.raises(SizeConflict) as conflict:
        witness.add(log.note(), 3, log.proof(3))
    assert conflict.value.body == b"4\n" and conflict.value.status == 409
    with pytest.raises(BadRequest):
        witness.add(log.note(), 7, [])


def test_cross_origin_checkpoint_never_verifies_under_another_origin(tmp_path):
    key = nacl.signing.SigningKey.generate()  # two deployments that (wrongly) share a key
    ours, theirs = Log("custody.a/ledger/p0", key), Log("custody.b/ledger/p0", key)
    witness = make_witness(tmp_path, ours)
    theirs.grow(3)
    relabelled = theirs.note().replace(b"custody.b/ledger/p0", b"custody.a/ledger/p0")  # body and signature line
    with pytest.raises(Forbidden, match="no signature from a trusted key"):
        witness.add(relabelled, 0, [])  # the key ID hashes the origin in: relabelled, it names no key we trust
    with pytest.raises(Forbidden, match="no signature from a trusted key"):
        witness.add(theirs.note().replace(b"custody.b/ledger/p0\n", b"custody.a/ledger/p0\n", 1), 0, [])


def test_witness_restarted_mid_stream_carries_on(tmp_path, log):
    witness = make_witness(tmp_path, log)
    log.grow(3)
    witness.add(log.note(), 0, [])
    with pytest.raises(WitnessError, match="another witness process holds"):
        make_witness(tmp_path, log)
    witness.close()  # as a crash would: the flock goes with the process
    restarted = make_witness(tmp_path, log)
    assert restarted.latest(log.origin).size == 3
    log.grow(5)
    with pytest.raises(SizeConflict):  # a client that assumed the witness forgot
        restarted.add(log.note(), 0, [])
    restarted.add(log.note(), 3, log.proof(3))
    assert restarted.latest(log.origin).size == 8
    leftovers = [p.name for p in (tmp_path / "state" / "logs").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


# --- over HTTP --------------------------------------------------------------------------------------


@pytest.fixture
def http_witness(tmp_path, log):
    witness = make_witness(tmp_path, log)
    server = serve(witness, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield witness, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    witness.close()


def post(url: str, body: bytes) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url + "/add-checkpoint", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_add_checkpoint_over_http(http_witness, log):
    witness, url = http_witness
    log.grow(6)
    status, _, body = post(url, add_checkpoint_body(log.note(), 0, []))
    assert status == 200
    assert body.startswith("\u2014 witness.test/w1 ".encode()) and body.endswith(b"\n")
    cosigned = log.note() + body  # what the spec says a client may do with the response
    assert len(checkpoint.open_cosignatures(cosigned, [witness.verifier]).cosignatures) == 1

    log.grow(3)
    status, content_type, body = post(url, add_checkpoint_body(log.note(), 2, log.proof(2)))
    assert (status, content_type, body) == (409, SIZE_CONTENT_TYPE, b"6\n")
    status, _, _ = post(url, add_checkpoint_body(log.note(), 6, log.proof(6)))
    assert status == 200

    fork = Log(log.origin, log.key)
    fork.grow(9)
    status, _, body = post(url, add_checkpoint_body(fork.note(), 9, []))
    assert status == 422 and b"fork" in body
    status, _, body = post(url, add_checkpoint_body(log.note(4), 4, []))
    assert status == 409 and body == b"9\n"  # a rollback: the witness says what it cosigned
    assert [v["reason"] for v in witness.violations] == ["fork", "rollback"]
    assert post(url, b"garbage")[0] == 400
    assert post(url, add_checkpoint_body(Log("nobody.test/x").note(), 0, []))[0] == 404

    with urllib.request.urlopen(f"{url}/{origin_hash(log.origin)}/checkpoint", timeout=10) as response:
        served = response.read()
    assert served.startswith(f"{log.origin}\n9\n".encode())
    checkpoint.open_checkpoint(served, [log.signer.verifier], origin=log.origin)
    assert checkpoint.open_cosignatures(served, [witness.verifier]).cosignatures
