"""Witnessed checkpoints in bundles and in `custody verify`: N-of-M witness policy, a stale bundle, a rolled-back
ledger (newest seals deleted), each caught with its own line. A real ledger on the real broker seals the events."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import make_key
from ingest.keys import Keyring, TrustedKey
from ingest.settings import KafkaSettings
from ledger import cosignatures
from ledger.seals import Seal
from ledger.service import LedgerService
from ledger.settings import LedgerSettings
from ledger.witness import Witness, cosigner_for, custody_log_keys
from ledger.witnessed import check_ledger
from query.bundle import Scope, export_bundle
from query.bundle_verify import verify_bundle
from test_witness_feed import seal_all, send_session

ORIGIN = "custody.test/ledger/witnessed"


class Deployment:
    def __init__(self, root: Path, settings: KafkaSettings):
        self.proxy, self.ledger_key, self.exporter = make_key("proxy"), make_key("ledger"), make_key("exporter")
        self.witness_key = make_key("witness")
        self.keyring = Keyring([TrustedKey(k.key_id, role, k.public_key) for k, role in
                                ((self.proxy, "proxy"), (self.ledger_key, "ledger"), (self.exporter, "exporter"),
                                 (self.witness_key, "witness"))])
        self.trust = root / "trust.toml"
        self.keyring.save(self.trust)
        self.root, self.settings, self.dir = root, settings, root / "ledger"
        ledger = LedgerSettings(dir=self.dir, origin=ORIGIN, segment_max_events=1000, segment_max_bytes=1 << 24,
                                segment_max_seconds=0.2, idle_seal_seconds=3600)
        self.service = LedgerService(settings, ledger, self.ledger_key, self.keyring, group_id=f"g{uuid.uuid4().hex[:6]}")
        self.witness = Witness(root / "witness", cosigner_for(self.witness_key), custody_log_keys(self.keyring, [ORIGIN]))
        self.events = 0

    def seal_session(self, statements: int) -> None:
        self.events += send_session(self.settings, self.proxy, statements)
        seal_all(self.service, self.events)

    def witness_all(self) -> None:
        for path in sorted((self.dir / "seals" / "p0").glob("*.json")):
            seal = Seal.load(path)
            cosignature = self.witness.add_seal(seal)
            if cosignature is not None:
                cosignatures.store(self.dir, 0, seal.number, cosignature.line)

    def latest_note(self) -> bytes:
        return self.witness.latest(f"{ORIGIN}/p0").note

    def export(self, out: Path) -> Path:
        export_bundle(self.dir, out, Scope(where="seq >= 0"), case="C-16", purpose="audit", recipient=None,
                      exporter_key=self.exporter, keyring=self.keyring, origin=ORIGIN)
        return out


@pytest.fixture(scope="module")
def deployment(broker, tmp_path_factory):
    settings = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix=f"v{uuid.uuid4().hex[:8]}.",
                             embedded_listen=broker.bootstrap, partitions=1)
    d = Deployment(tmp_path_factory.mktemp("witnessed"), settings)
    yield d
    d.service.close()
    d.witness.close()


def test_bundle_needs_n_witnesses_and_says_when_it_was_witnessed(deployment, tmp_path):
    deployment.seal_session(3)
    unwitnessed = deployment.export(tmp_path / "unwitnessed.custody")
    report = verify_bundle(unwitnessed, deployment.keyring, witnesses=1)
    assert report.problems == ["Checkpoint p0 (seal 1, tree size 5) NOT WITNESSED: 0 of 1 required trusted witness "
                               "cosignatures on tree size 5"]
    assert verify_bundle(unwitnessed, deployment.keyring).ok  # no policy, no requirement

    deployment.witness_all()
    witnessed = deployment.export(tmp_path / "witnessed.custody")
    report = verify_bundle(witnessed, deployment.keyring, witnesses=1)
    assert report.ok, report.problems
    assert len(report.witnessed) == 1
    assert report.witnessed[0].startswith("Checkpoint p0 (seal 1, tree size 5) witnessed by witness at 20")
    report = verify_bundle(witnessed, deployment.keyring, witnesses=2)  # 1 of M trusted is not 2
    assert report.problems == ["Checkpoint p0 (seal 1, tree size 5) NOT WITNESSED: 1 of 2 required trusted witness "
                               "cosignatures on tree size 5"]
    untrusting = Keyring([k for k in deployment.keyring if k.role != "witness"])
    assert "0 of 1 required" in verify_bundle(witnessed, untrusting, witnesses=1).problems[0]

    result = subprocess.run([sys.executable, "-m", "custody", "bundle", "verify", str(witnessed), "--trust",
                             str(deployment.trust), "--witnesses", "1", "--jobs", "1"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "witnessed by witness at" in result.stdout


def test_stale_bundle_is_caught_against_a_later_witnessed_checkpoint(deployment, tmp_path):
    deployment.seal_session(2)
    deployment.witness_all()
    old = deployment.export(tmp_path / "old.custody")
    old_size = deployment.witness.latest(f"{ORIGIN}/p0").size
    deployment.seal_session(2)  # later events, sealed and witnessed after the export
    deployment.witness_all()
    later = deployment.latest_note()
    later_size = deployment.witness.latest(f"{ORIGIN}/p0").size
    report = verify_bundle(old, deployment.keyring, witnesses=1, checkpoints=[later])
    assert len(report.problems) == 1
    assert report.problems[0].startswith(f"Bundle partition p0 STALE: the bundle's newest checkpoint has tree size "
                                         f"{old_size}, but tree size {later_size} was witnessed by witness at ")
    assert report.problems[0].endswith(": events sealed after it are not in the bundle")
    fresh = deployment.export(tmp_path / "fresh.custody")
    assert verify_bundle(fresh, deployment.keyring, witnesses=1, checkpoints=[later]).ok


def test_rollback_newest_seals_deleted_is_caught_by_verify_checkpoint(deployment, tmp_path):
    deployment.seal_session(2)
    deployment.witness_all()
    witnessed_note = tmp_path / "witnessed.checkpoint"
    witnessed_note.write_bytes(deployment.latest_note())
    copy = tmp_path / "ledger"
    shutil.copytree(deployment.dir, copy)
    assert check_ledger(copy, deployment.keyring, [witnessed_note.read_bytes()]) == []
    seals = sorted((copy / "seals" / "p0").glob("*.json"))
    newest = Seal.load(seals[-1])
    for path in seals[-2:]:  # the insider removes the newest seals (and their segments): still a consistent chain
        seal = Seal.load(path)
        path.unlink()
        if seal.segment:
            (copy / seal.segment["path"]).unlink()
    shorter = Seal.load(seals[-3])
    problems = check_ledger(copy, deployment.keyring, [witnessed_note.read_bytes()])
    assert len(problems) == 1
    assert problems[0].startswith(f"Partition p0 ROLLED BACK: the newest seal has tree size {shorter.tree_size}, "
                                  f"but tree size {newest.tree_size} was witnessed by witness at ")

    result = subprocess.run([sys.executable, "-m", "custody", "verify", "--ledger", str(copy), "--keyring",
                             str(deployment.trust), "--checkpoint", str(witnessed_note)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Partition p0 ROLLED BACK" in result.stdout
    plain = subprocess.run([sys.executable, "-m", "custody", "verify", "--ledger", str(copy), "--keyring",
                            str(deployment.trust)], capture_output=True, text=True)
    assert plain.returncode == 0, plain.stdout  # without the witnessed checkpoint, nothing can tell


def test_checkpoint_of_another_origin_or_key_is_refused(deployment, tmp_path):
    other = make_key("ledger")
    from ledger import checkpoint

    cp = checkpoint.Checkpoint(f"{ORIGIN}/p0", 10_000, b"\x01" * 32)
    forged = checkpoint.sign_checkpoint(cp, [checkpoint.Signer.from_key(f"{ORIGIN}/p0", other.signing_key)])
    problems = check_ledger(deployment.dir, deployment.keyring, [forged])
    assert problems == [f"Given checkpoint #1 INVALID: note has no signature from a trusted key (signed by "
                        f"{ORIGIN}/p0+{checkpoint.key_id(f'{ORIGIN}/p0', other.public_key).hex()})"]


def test_a_witnessed_session_map_root_other_than_the_sealed_one_is_a_fork(deployment):
    """An insider with the ledger key gets a witness to cosign the ledger's tree with other session states (say,
    a session still open): `custody verify --checkpoint` holds it against the seals' session-map root."""
    from ledger import checkpoint, sessionmap
    from ledger.witness import cosigner_for

    deployment.seal_session(1)
    deployment.witness_all()
    honest = deployment.witness.latest(f"{ORIGIN}/p0").checkpoint
    sealed = sessionmap.parse_extensions(honest.extensions)
    lie = sessionmap.extension_line({"count": sealed["count"], "root": "ab" * 32})
    cp = checkpoint.Checkpoint(honest.origin, honest.size, honest.root_hash,
                               tuple(lie if e.startswith(sessionmap.EXTENSION_PREFIX) else e for e in honest.extensions))
    note = checkpoint.sign_checkpoint(cp, [checkpoint.Signer.from_key(cp.origin, deployment.ledger_key.signing_key)])
    note = checkpoint.add_signature_lines(note, [cosigner_for(deployment.witness_key).cosign(cp.to_text(), 1_700_000_000).line])
    problems = check_ledger(deployment.dir, deployment.keyring, [note])
    assert len(problems) == 1 and problems[0].startswith(
        f"Partition p0 FORKED: at tree size {cp.size} seal "), problems
    assert (f"states session-map root {sealed['root'][:16]}… of {sealed['count']} sessions, the witnessed one is "
            f"abababababababab… of {sealed['count']} (by witness at 2023-11-14T22:13:20Z)") in problems[0]
    assert check_ledger(deployment.dir, deployment.keyring, [deployment.latest_note()]) == []


def test_a_bundle_stating_other_session_states_than_the_witnessed_checkpoint_is_a_fork(deployment, tmp_path):
    """The insider holds the ledger key and the exporter key: they drop a session's tail, declare it open, re-sign
    the newest seal (same tree, same root, a session map where the session is open at the kept seq) with the state
    proofs against it, leave out the witnesses' cosignatures (which do not verify on the new text) and re-sign the
    manifest. Every proof in the bundle holds; only the auditor's witnessed checkpoint of that tree size, whose
    session-map line the witness cosigned, tells: `custody bundle verify --checkpoint` names the fork."""
    import io
    import json
    import zipfile

    import pyarrow.parquet as pq

    from cli_inprocess import custody
    from ledger import sessionmap
    from ledger.seals import sign_seal
    from query.bundle_format import COSIGNATURES_PREFIX, EVENTS, SESSION_STATES
    from test_bundle_states import truncate

    deployment.seal_session(4)
    deployment.witness_all()
    honest = deployment.export(tmp_path / "honest.custody")
    witnessed = tmp_path / "witnessed.checkpoint"
    witnessed.write_bytes(deployment.latest_note())
    assert verify_bundle(honest, deployment.keyring, checkpoints=[witnessed.read_bytes()]).problems == []

    with zipfile.ZipFile(honest) as archive:
        newest = max(n for n in archive.namelist() if n.startswith("seals/p0/"))
        seal = Seal.from_bytes(archive.read(newest))
        entries = json.loads(archive.read(SESSION_STATES))
        rows = pq.read_table(io.BytesIO(archive.read(EVENTS))).to_pylist()
    states = {e["session_id"]: sessionmap.SessionState.from_json(e["proof"]["state"]) for e in entries}
    victim, keep = max(states, key=lambda sid: states[sid].last_seq), 3  # this test's session: 4 statements, ended
    kept = next(r for r in rows if r["session_id"] == victim and r["seq"] == keep - 1)
    states[victim] = sessionmap.SessionState(keep - 1, kept["event_hash"], False)
    session_map = sessionmap.build(states.items())
    record = dict(seal.record, sessions=sessionmap.seal_field(session_map))

    def forge(files):
        files[newest] = sign_seal(record, deployment.ledger_key, list(seal.consistency_proof)).to_bytes()
        files.pop(f"{COSIGNATURES_PREFIX}p0/{seal.number:06d}.sig")
        files[SESSION_STATES] = json.dumps([dict(e, proof=session_map.prove(e["session_id"]).to_json())
                                            for e in entries]).encode()
    forged = tmp_path / "forged.custody"
    shutil.copy(honest, forged)
    truncate(deployment, forged, victim, keep, forge=forge)

    report = verify_bundle(forged, deployment.keyring)
    assert report.problems == [] and report.sessions_open == 1, report.problems  # without it, nothing can tell
    report = verify_bundle(forged, deployment.keyring, checkpoints=[witnessed.read_bytes()])
    sealed, lie = seal.record["sessions"], record["sessions"]
    assert len(report.problems) == 1, report.problems
    line = report.problems[0]
    assert line.startswith(
        f"Bundle partition p0 FORKED: at tree size {seal.tree_size} seal {seal.number} states session-map root "
        f"{lie['root'][:16]}… of {lie['count']} sessions, the witnessed one is {sealed['root'][:16]}… of "
        f"{sealed['count']} (by witness at 20"), line
    assert line.endswith("Z)") and "\n" not in line
    ran = custody("bundle", "verify", str(forged), "--trust", str(deployment.trust), "--checkpoint", str(witnessed),
                  "--jobs", "1")
    assert ran.returncode == 1 and line in ran.stdout, ran.stdout + ran.stderr
    ran = custody("bundle", "verify", str(honest), "--trust", str(deployment.trust), "--checkpoint", str(witnessed),
                  "--jobs", "1")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "session-map root" in " ".join(custody("bundle", "verify", "--help").stdout.split())


def test_over_custody_seals_a_rotation_line_needs_the_seals_signed_handover(tmp_path):
    """The witness hands an origin over on the checkpoint's `custody.key-rotation/v1` line; on `custody.seals` it
    takes that line only as the seal's own rotation, whose handover the new key signed. A holder of the outgoing
    key who writes the line into a seal without a rotation (or names another key than the signed one) is refused
    and the origin stays with its key; the honest rotation seal is cosigned and hands over."""
    import base64

    import pytest

    from ledger import checkpoint, rotation
    from ledger.seals import seal_record, sign_seal
    from ledger.witness import BadRequest

    old, new, stranger = make_key("ledger"), make_key("ledger"), make_key("ledger")
    witness = Witness(tmp_path / "w", cosigner_for(make_key("witness")),
                      custody_log_keys(Keyring([TrustedKey(old.key_id, "ledger", old.public_key)]), ["o.test/l"]))
    origin, root = "o.test/l/p0", bytes(range(32))
    first = sign_seal(seal_record(origin="o.test/l", partition=0, number=1, key_id=old.key_id, sealed_at_us=1,
                                  previous=None, segment=None, first_leaf=0, leaf_count=1, time_range=None,
                                  topic="t", first_offset=0, next_offset=1, quarantined=0, tree_size=1, root=root),
                      old, [])
    assert witness.add_seal(first) is not None
    idle = dict(first.record, number=2, previous=first.link(), leaves={"first": 1, "count": 0})

    def with_line(record: dict, key) -> Seal:
        """The seal signed as is, its checkpoint (by the outgoing key) stating a handover to `key`."""
        seal = sign_seal(record, old, [])
        line = rotation.extension_line({"key_id": key.key_id, "public_key": base64.b64encode(key.public_key).decode()})
        cp = checkpoint.Checkpoint(origin, 1, root, (line,))
        return Seal(seal.record, seal.signature, checkpoint.sign_checkpoint(
            cp, [checkpoint.Signer.from_key(origin, old.signing_key)]), ())

    handed = dict(idle, rotation=rotation.rotation_field(origin, 2, old, new))
    for forged in (with_line(idle, stranger), with_line(handed, stranger)):
        with pytest.raises(BadRequest, match=r"^seal 2 of o.test/l/p0: its checkpoint's custody.key-rotation/v1 line "
                                             r"is not the rotation its record carries with the new key's signed "
                                             r"handover$"):
            witness.add_seal(forged)
        assert witness.latest(origin).log_key is None
    assert witness.add_seal(sign_seal(handed, old, [])) is not None
    assert witness.latest(origin).log_key == checkpoint.Verifier.from_key(origin, new.signing_key.verify_key).vkey
    witness.close()
