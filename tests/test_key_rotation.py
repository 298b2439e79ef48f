"""Ledger key rotation as a signed, witnessed event (issue 16, item 4): a rotated key continues the same seal
chain, and its seals verify only through the witnessed rotation seal — not because a keyring lists the key."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import make_key
from ingest.keys import Keyring, TrustedKey, generate_key_file
from ingest.settings import KafkaSettings
from ledger import checkpoint, cosignatures
from ledger.seals import Seal, sign_seal
from ledger.service import LedgerConfigError, LedgerService
from ledger.settings import LedgerSettings
from ledger.verify import verify_ledger
from ledger.witness import Forbidden, Witness, cosigner_for, custody_log_keys
from query.bundle import Scope, export_bundle
from query.bundle_verify import verify_bundle
from test_witness_feed import seal_all, send_session

ORIGIN = "custody.test/ledger/rotation"
ROOT = Path(__file__).resolve().parent.parent


def custody(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "custody", *args], cwd=ROOT, capture_output=True, text=True)


class Rotated:
    """A real ledger sealed by key A, rotated to key B by `custody ledger rotate-key` (witnessed by a witness
    configured with key A only), then sealing on with B."""

    def __init__(self, root: Path, settings: KafkaSettings):
        self.proxy, self.exporter, self.witness_key = make_key("proxy"), make_key("exporter"), make_key("witness")
        self.old_path, self.new_path = root / "keys" / "ledger.key", root / "keys" / "ledger-2.key"
        self.old, self.new = generate_key_file(self.old_path, "ledger"), generate_key_file(self.new_path, "ledger-2")
        self.keyring = Keyring([TrustedKey(k.key_id, role, k.public_key) for k, role in
                                ((self.proxy, "proxy"), (self.old, "ledger"), (self.new, "ledger"),
                                 (self.exporter, "exporter"), (self.witness_key, "witness"))])
        self.trust = root / "trust.toml"
        self.keyring.save(self.trust)
        self.settings, self.dir = settings, root / "ledger"
        self.ledger = LedgerSettings(dir=self.dir, origin=ORIGIN, segment_max_events=1000, segment_max_bytes=1 << 24,
                                     segment_max_seconds=0.2, idle_seal_seconds=3600)
        self.config = root / "custody.toml"
        self.config.write_text(f"""
[kafka]
bootstrap = "{settings.bootstrap}"
topic_prefix = "{settings.topic_prefix}"
partitions = 1
[keys]
ledger_key = "{self.old_path}"
keyring = "{self.trust}"
[ledger]
dir = "{self.dir}"
origin = "{ORIGIN}"
""")
        only_old = Keyring([k for k in self.keyring if k.key_id != self.new.key_id])
        self.witness = Witness(root / "witness", cosigner_for(self.witness_key), custody_log_keys(only_old, [ORIGIN]))
        events = send_session(settings, self.proxy, 3)
        service = self.service(self.old)
        seal_all(service, events)
        self.refused_running = custody("ledger", "rotate-key", str(self.new_path), "--config", str(self.config))
        service.close()
        with pytest.raises(LedgerConfigError, match="hand it over with a witnessed rotation seal"):
            self.service(self.new)  # the new key alone does not take the chain over
        self.witness_all()
        self.rotate = custody("ledger", "rotate-key", str(self.new_path), "--config", str(self.config))
        assert self.rotate.returncode == 0, self.rotate.stdout + self.rotate.stderr
        self.rotation = seals(self.dir)[-1]
        self.again = custody("ledger", "rotate-key", str(self.new_path), "--config", str(self.config))
        self.witness_all()
        events += send_session(settings, self.proxy, 2)
        service = self.service(self.new)
        seal_all(service, events)
        service.close()
        self.witness_all()

    def service(self, key) -> LedgerService:
        return LedgerService(self.settings, self.ledger, key, self.keyring, group_id=f"g{uuid.uuid4().hex[:6]}",
                             partitions=[0])

    def witness_all(self) -> None:
        for path in sorted((self.dir / "seals" / "p0").glob("*.json")):
            seal = Seal.load(path)
            cosignature = self.witness.add_seal(seal)
            if cosignature is not None:
                cosignatures.store(self.dir, 0, seal.number, cosignature.line)


@pytest.fixture(scope="module")
def rotated(broker, tmp_path_factory):
    settings = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix=f"r{uuid.uuid4().hex[:8]}.",
                             embedded_listen=broker.bootstrap, partitions=1)
    r = Rotated(tmp_path_factory.mktemp("rotated"), settings)
    yield r
    r.witness.close()


def seals(directory: Path) -> list[Seal]:
    return [Seal.load(p) for p in sorted((directory / "seals" / "p0").glob("*.json"))]


def test_rotate_key_command_says_what_it_did_and_refuses_a_running_ledger_in_one_line(rotated):
    number = rotated.rotation.number
    assert rotated.rotate.stdout.splitlines() == [
        f"p0: seal {number} hands the chain from {rotated.old.key_id} to {rotated.new.key_id} at tree size "
        f"{rotated.rotation.tree_size}",
        f'next: set [keys] ledger_key = "{rotated.new_path}" and start the ledger: it publishes the rotation seals, '
        f"and the witnesses cosign them"]
    assert rotated.again.returncode == 0 and rotated.again.stdout.splitlines()[0] == \
        f"p0: already handed to {rotated.new.key_id} (seal {number})"  # an interrupted rotation is finished
    assert (rotated.refused_running.returncode, rotated.refused_running.stderr) == (
        2, "error: partition 0 is held by a running ledger; stop it first\n")
    # the configured key is no longer the chain's: one line, nothing written
    stranger = rotated.config.parent / "keys" / "ledger-3.key"
    if not stranger.exists():
        generate_key_file(stranger, "ledger-3")
    before = sorted((rotated.dir / "seals" / "p0").iterdir())
    result = custody("ledger", "rotate-key", str(stranger), "--config", str(rotated.config))
    assert (result.returncode, result.stderr) == (2, f"error: partition 0: the chain's key is {rotated.new.key_id}, "
                                                     f"not {rotated.old.key_id}\n")
    assert custody("ledger", "rotate-key", str(stranger), "--config", str(rotated.config), "--partition", "5"
                   ).stderr == f"error: partition 5 has no seal in {rotated.dir}: nothing to rotate\n"
    assert sorted((rotated.dir / "seals" / "p0").iterdir()) == before


def test_the_rotation_seal_is_signed_by_the_old_key_and_states_the_new_one_for_the_witnesses(rotated):
    chain = seals(rotated.dir)
    rotation = rotated.rotation
    assert rotation.record["key_id"] == rotated.old.key_id and rotation.record["rotation"]["key_id"] == rotated.new.key_id
    assert f"custody.key-rotation/v1 {rotated.new.key_id} " in rotation.checkpoint_note.decode()
    assert cosignatures.load(rotated.dir, 0, rotation.number)  # witnessed
    after = [s for s in chain if s.number > rotation.number]
    assert after and all(s.record["key_id"] == rotated.new.key_id for s in after)
    assert all(s.record["key_id"] == rotated.old.key_id for s in chain if s.number <= rotation.number)


def test_custody_verify_follows_the_witnessed_rotation(rotated, tmp_path):
    result = subprocess.run([sys.executable, "-m", "custody", "verify", "--ledger", str(rotated.dir),
                             "--keyring", str(rotated.trust)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # the auditor trusts only the original key: the new one is trusted through its rotation
    only_old = Keyring([k for k in rotated.keyring if k.key_id != rotated.new.key_id])
    assert verify_ledger(rotated.dir, only_old).problems == []
    # ... also for a witnessed checkpoint the auditor fetched from the witness (signed by the new key)
    trust, fetched = tmp_path / "only-old.toml", tmp_path / "witnessed.checkpoint"
    only_old.save(trust)
    fetched.write_bytes(rotated.witness.latest(f"{ORIGIN}/p0").note)
    result = subprocess.run([sys.executable, "-m", "custody", "verify", "--ledger", str(rotated.dir),
                             "--keyring", str(trust), "--checkpoint", str(fetched)], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_unwitnessed_rotation_does_not_hand_the_chain_over(rotated, tmp_path):
    copy = tmp_path / "ledger"
    shutil.copytree(rotated.dir, copy)
    for path in (copy / "cosignatures" / "p0").glob(f"{rotated.rotation.number:06d}.*.sig"):
        path.unlink()
    lines = [p.line for p in verify_ledger(copy, rotated.keyring).problems]
    subject = f"Seal seals/p0/{rotated.rotation.number:06d}.json"
    assert any(l.startswith(f"{subject} INVALID: rotation to key {rotated.new.key_id} is not witnessed") for l in lines), lines
    # the new key is in the keyring, yet its seals are refused
    assert any(f"{rotated.rotation.number + 1:06d}.json INVALID: signed by untrusted key {rotated.new.key_id}" in l
               for l in lines), lines


def test_a_trusted_key_that_signs_without_a_rotation_is_refused(rotated, tmp_path):
    """The same ledger, but the chain passes to key B with no rotation seal (its record re-signed by B as an
    ordinary idle seal): B is in the keyring, and still refused."""
    copy = tmp_path / "ledger"
    shutil.copytree(rotated.dir, copy)
    path = copy / "seals" / "p0" / f"{rotated.rotation.number:06d}.json"
    record = {k: v for k, v in rotated.rotation.record.items() if k != "rotation"}
    record["key_id"] = rotated.new.key_id
    forged = sign_seal(record, rotated.new, list(rotated.rotation.consistency_proof))
    path.write_bytes(forged.to_bytes())
    lines = [p.line for p in verify_ledger(copy, rotated.keyring).problems]
    assert any(f"signed by key {rotated.new.key_id}, but the chain's key is {rotated.old.key_id}: a ledger key takes "
               f"over only through a witnessed rotation seal" in l for l in lines), lines


def test_bundles_of_a_rotated_ledger_carry_the_rotation_and_verify(rotated, tmp_path):
    out = tmp_path / "rotated.custody"
    export_bundle(rotated.dir, out, Scope(where="seq >= 0"), case="C-16", purpose="audit", recipient=None,
                  exporter_key=rotated.exporter, keyring=rotated.keyring, origin=ORIGIN)
    only_old = Keyring([k for k in rotated.keyring if k.key_id != rotated.new.key_id])
    report = verify_bundle(out, only_old, witnesses=1)
    assert report.problems == [], report.problems
    assert report.states_proven == 2
    trust = tmp_path / "only-old.toml"
    only_old.save(trust)
    result = custody("bundle", "verify", str(out), "--trust", str(trust), "--witnesses", "1")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_witness_follows_the_rotation_without_being_reconfigured(rotated):
    """The witness was configured with the old key only: it cosigned the new key's seals because it cosigned the
    rotation, and it refuses a checkpoint of the origin signed by a key nothing handed the log to."""
    after = [s for s in seals(rotated.dir) if s.number > rotated.rotation.number]
    assert after and all(cosignatures.load(rotated.dir, 0, s.number) for s in after)
    latest = rotated.witness.latest(f"{ORIGIN}/p0")
    assert latest.seal_number == after[-1].number
    stranger = checkpoint.Signer.from_key(f"{ORIGIN}/p0", make_key("ledger").signing_key)
    with pytest.raises(Forbidden, match="is not signed by key .*, the key a cosigned key rotation handed the log to"):
        rotated.witness.add(checkpoint.sign_checkpoint(latest.checkpoint, [stranger]), latest.size, [])
    assert rotated.witness.latest(f"{ORIGIN}/p0") == latest


def test_a_rotation_must_name_its_key_by_that_keys_own_id():
    """Key ids are `name+` a hash of the key: a rotation stating a known id with another public key is refused."""
    import base64

    import pytest

    from conftest import make_key
    from ingest.keys import Keyring, TrustedKey
    from ledger.rotation import RotationError, check_rotation, handover, rotation_field, with_key

    old, new, known = make_key("ledger"), make_key("ledger"), make_key("ledger")
    record = {"origin": "o.test/l/p0", "number": 2, "key_id": old.key_id,
              "rotation": rotation_field("o.test/l/p0", 2, old, new)}
    introduced = check_rotation(record)
    assert introduced.key_id == new.key_id
    assert [k.key_id for k in with_key(Keyring([]), introduced)] == [new.key_id]

    # the new key signs a handover to `known`'s id while stating its own public key
    lying = dict(record, rotation={"key_id": known.key_id, "public_key": base64.b64encode(new.public_key).decode(),
                                   "signature": base64.b64encode(new.sign(handover(
                                       "o.test/l/p0", 2, old.key_id, known.key_id))).decode()})
    with pytest.raises(RotationError, match=r"that key id is not the id of the public key it states"):
        check_rotation(lying)
