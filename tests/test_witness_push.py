"""The ledger pushing its checkpoints to a remote witness over HTTP (C2SP add-checkpoint), against a real
`custody witness` process: cosignatures kept beside the seals, a witness that was down caught up from the
seal files, a restarted ledger resynchronised by the witness's 409."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import make_key
from ingest.keys import Keyring, TrustedKey, generate_key_file
from ingest.settings import KafkaSettings
from ledger import checkpoint, cosignatures
from ledger.seals import Seal
from ledger.service import LedgerService
from ledger.settings import LedgerSettings
from ledger.verify import verify_ledger
from ledger.witness import cosignature_verifiers
from ledger.witness_push import WitnessPusher
from nginx_server import free_port
from test_witness_feed import seal_all, send_session

ORIGIN = "custody.test/ledger/push"
ROOT = Path(__file__).resolve().parent.parent


class RemoteWitness:
    """`custody witness --no-feed` on its own port and state, as a witness on another host would run."""

    def __init__(self, root: Path, keyring_path: Path, key_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = root / "witness.toml"
        self.config.write_text(f'[keys]\nkeyring = "{keyring_path}"\n[ledger]\norigin = "{ORIGIN}"\n'
                               f'[witness]\nkey = "{key_path}"\nstate_dir = "{root / "witness-state"}"\n'
                               f'listen = "127.0.0.1:{self.port}"\n')
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "custody", "witness", "--no-feed", "--config",
                                         str(self.config)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, self.process.stderr.read()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "custody witness did not listen"
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def setup(broker, tmp_path):
    settings = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix=f"h{uuid.uuid4().hex[:8]}.",
                             embedded_listen=broker.bootstrap, partitions=1)
    proxy, ledger_key = make_key("proxy"), make_key("ledger")
    witness_key = generate_key_file(tmp_path / "witness-remote.key", "witness-remote")
    keyring = Keyring([TrustedKey(k.key_id, role, k.public_key) for k, role in
                       ((proxy, "proxy"), (ledger_key, "ledger"), (witness_key, "witness"))])
    keyring.save(tmp_path / "keyring.toml")
    remote = RemoteWitness(tmp_path, tmp_path / "keyring.toml", tmp_path / "witness-remote.key")
    remote.start()
    yield settings, proxy, ledger_key, keyring, remote, tmp_path
    remote.stop()


def test_the_ledger_pushes_every_seal_to_a_remote_witness_and_keeps_its_cosignatures(setup):
    settings, proxy, ledger_key, keyring, remote, tmp_path = setup
    ledger_dir = tmp_path / "ledger"
    ledger = LedgerSettings(dir=ledger_dir, origin=ORIGIN, segment_max_events=4, segment_max_bytes=1 << 24,
                            segment_max_seconds=0.2, idle_seal_seconds=3600, witnesses=(remote.url,))

    def run(events: int) -> LedgerService:
        service = LedgerService(settings, ledger, ledger_key, keyring, group_id=f"g{uuid.uuid4().hex[:6]}",
                                partitions=[0])
        seal_all(service, events)
        assert service.pusher.wait(30)
        return service

    def unwitnessed() -> list[int]:
        chain = [Seal.load(p) for p in sorted((ledger_dir / "seals" / "p0").glob("*.json"))]
        verifiers = cosignature_verifiers(keyring)
        missing = []
        for seal in chain:
            lines = cosignatures.load(ledger_dir, 0, seal.number)
            note = checkpoint.add_signature_lines(seal.checkpoint_note, lines)
            if len(checkpoint.open_cosignatures(note, verifiers).cosignatures) != 1:
                missing.append(seal.number)
        return missing

    events = send_session(settings, proxy, 2)
    service = run(events)
    events += send_session(settings, proxy, 2)
    seal_all(service, events)
    assert service.pusher.wait(30)
    assert service.pusher.failures == [] and service.pusher.stored >= 2
    assert unwitnessed() == []  # every seal, each cosignature valid under the witness key

    remote.stop()  # the witness is down while the ledger seals on: sealing does not wait for it
    for _ in range(2):
        events += send_session(settings, proxy, 2)
        seal_all(service, events)
    assert service.pusher.wait(30)
    assert len(unwitnessed()) == 2 and any("not delivered" in f for f in service.pusher.failures), service.pusher.failures
    remote.start()
    events += send_session(settings, proxy, 2)
    seal_all(service, events)
    deadline = time.monotonic() + 30
    while unwitnessed():  # caught up from the seal files, in order, each with its own proof
        assert time.monotonic() < deadline, (unwitnessed(), service.pusher.failures)
        time.sleep(0.2)
    service.close()

    service = run(events)  # a restarted ledger knows nothing of the witness: its 409 says where to go on
    events += send_session(settings, proxy, 2)
    seal_all(service, events)
    assert service.pusher.wait(30)
    deadline = time.monotonic() + 30
    while unwitnessed():
        assert time.monotonic() < deadline, (unwitnessed(), service.pusher.failures)
        time.sleep(0.2)
    assert not [f for f in service.pusher.failures if "refused" in f], service.pusher.failures
    service.close()
    assert verify_ledger(ledger_dir, keyring).problems == []

    wrong = WitnessPusher(ledger_dir, (f"{remote.url}/nowhere",))  # a refusal is said once, not retried
    last = Seal.load(sorted((ledger_dir / "seals" / "p0").glob("*.json"))[-1])
    for _ in range(2):
        wrong.submit(last)
        assert wrong.wait(30)
    wrong.close()
    assert wrong.failures == [f"witness {remote.url}/nowhere: p0 seal {last.number} refused (404): not found"]


def test_witness_urls_are_checked_in_the_config(tmp_path):
    from custody.config import ConfigError, load_config

    config = tmp_path / "custody.toml"
    config.write_text('[ledger]\n[[ledger.witness]]\nurl = "https://witness.example/"\n'
                      '[[ledger.witness]]\nurl = "http://127.0.0.1:9380"\n')
    assert load_config(str(config)).ledger.witnesses == ("https://witness.example/", "http://127.0.0.1:9380")
    config.write_text('[ledger]\n[[ledger.witness]]\nurl = "witness.example"\n')
    with pytest.raises(ConfigError, match=r"\[ledger\] witness: must be \[\[ledger.witness\]\] tables, each with url"):
        load_config(str(config))


def test_a_remote_witness_follows_a_key_rotation_pushed_over_http(setup):
    """The remote witness trusts the first ledger key only; the rotation seal reaches it over HTTP when the
    ledger restarts with the new key, and the new key's seals are cosigned from then on."""
    from ledger.rotation import rotate_partition

    settings, proxy, ledger_key, keyring, remote, tmp_path = setup
    ledger_dir, new_key = tmp_path / "ledger", make_key("ledger-2")
    ledger = LedgerSettings(dir=ledger_dir, origin=ORIGIN, segment_max_events=100, segment_max_bytes=1 << 24,
                            segment_max_seconds=0.2, idle_seal_seconds=3600, witnesses=(remote.url,))
    events = send_session(settings, proxy, 2)
    for key in (ledger_key, new_key):
        service = LedgerService(settings, ledger, key, keyring, group_id=f"g{uuid.uuid4().hex[:6]}", partitions=[0])
        seal_all(service, events)
        assert service.pusher.wait(30)
        service.close()
        if key is ledger_key:
            rotation = rotate_partition(ledger_dir, 0, ORIGIN, ledger_key, new_key)
            events += send_session(settings, proxy, 2)
    chain = [Seal.load(p) for p in sorted((ledger_dir / "seals" / "p0").glob("*.json"))]
    assert chain[-1].number > rotation.number and chain[-1].record["key_id"] == new_key.key_id
    for seal in chain:
        assert cosignatures.load(ledger_dir, 0, seal.number), f"seal {seal.number} not cosigned"
    verifiers = cosignature_verifiers(keyring)
    note = checkpoint.add_signature_lines(chain[-1].checkpoint_note, cosignatures.load(ledger_dir, 0, chain[-1].number))
    assert len(checkpoint.open_cosignatures(note, verifiers).cosignatures) == 1
    assert verify_ledger(ledger_dir, keyring).problems == []
