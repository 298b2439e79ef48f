from __future__ import annotations

import os
import stat
from datetime import datetime, timedelta, timezone

import pytest

from ingest.keys import (KeyFileError, Keyring, KeyLookupError, KeyringError, add_to_keyring,
                         generate_key_file, load_key_file)


def test_key_file_is_private_and_never_overwritten(tmp_path):
    path = tmp_path / "keys" / "proxy.key"
    key = generate_key_file(path, "proxy")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_key_file(path).key_id == key.key_id
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        generate_key_file(path, "proxy")
    assert load_key_file(path).public_key == key.public_key


def test_key_file_with_open_permissions_is_refused(tmp_path):
    path = tmp_path / "proxy.key"
    generate_key_file(path, "proxy")
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="too open"):
        load_key_file(path)


def test_rotation_and_revocation(tmp_path):
    ring_path = tmp_path / "keyring.toml"
    old = generate_key_file(tmp_path / "old.key", "proxy")
    new = generate_key_file(tmp_path / "new.key", "proxy")
    add_to_keyring(ring_path, old, "proxy")
    add_to_keyring(ring_path, new, "proxy")
    ring = Keyring.load(ring_path)
    assert len(ring) == 2
    now = datetime.now(timezone.utc)
    ring.revoke(old.key_id, now)
    ring.save(ring_path)
    ring = Keyring.load(ring_path)
    assert ring.key_for(old.key_id, now - timedelta(seconds=1), "proxy")  # signed before revocation: fine
    with pytest.raises(KeyLookupError) as revoked:
        ring.key_for(old.key_id, now + timedelta(seconds=1), "proxy")
    assert revoked.value.reason == "key_revoked"
    assert ring.key_for(new.key_id, now + timedelta(days=1), "proxy")
    with pytest.raises(KeyLookupError) as wrong_role:
        ring.key_for(new.key_id, now, "ledger")
    assert wrong_role.value.reason == "wrong_role"
    with pytest.raises(KeyLookupError) as unknown:
        ring.key_for("proxy+0000000000000000", now, "proxy")
    assert unknown.value.reason == "unknown_key"


def test_keyring_rejects_an_id_that_does_not_match_its_key(tmp_path):
    ring_path = tmp_path / "keyring.toml"
    key = generate_key_file(tmp_path / "a.key", "proxy")
    add_to_keyring(ring_path, key, "proxy")
    text = ring_path.read_text().replace(key.key_id, "proxy+ffffffffffffffff")
    ring_path.write_text(text)
    with pytest.raises(KeyringError, match="does not match its public key"):
        Keyring.load(ring_path)
