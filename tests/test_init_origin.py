"""Every `custody init` names its ledger uniquely in its checkpoints (it used to be custody.example/ledger/dev for all)."""

from __future__ import annotations

import re

from custody.config import load_config
from custody.init import initialise
from ingest.keys import load_key_file
from ledger.checkpoint import Checkpoint, Signer, open_checkpoint, sign_checkpoint
from ledger.seals import partition_origin


def test_two_deployments_have_different_checkpoint_origins_that_are_valid_c2sp_origins(tmp_path):
    configs = [load_config(initialise(tmp_path / name)) for name in ("one", "two")]
    origins = [c.ledger.origin for c in configs]
    assert origins[0] != origins[1]
    for config, origin in zip(configs, origins):
        ledger_key = load_key_file(config.keys.ledger_key)
        assert origin == f"custody.example/ledger/{ledger_key.key_id.rpartition('+')[2]}"  # says which key it is
        assert re.fullmatch(r"[a-z0-9.\-]+(/[a-z0-9.\-]+)+", origin)  # a schema-less URL: no spaces, no '+'
        name = partition_origin(origin, 0)
        note = sign_checkpoint(Checkpoint(name, 1, b"\x00" * 32), [Signer.from_key(name, ledger_key.signing_key)])
        opened, _ = open_checkpoint(note, [Signer.from_key(name, ledger_key.signing_key).verifier], origin=name)
        assert opened.origin == name
