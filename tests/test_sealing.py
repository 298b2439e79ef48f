"""The `sealed_original` format (ingest.sealing): a session's boxes to the custodian key."""

from __future__ import annotations

import pytest
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, SealedBox

from ingest.sealing import MAGIC, Sealer, open_sealed, opener

CUSTODIAN = PrivateKey.generate()


def test_every_blob_of_a_session_opens_with_the_custodian_key_alone():
    sealer = Sealer(CUSTODIAN.public_key)
    originals = [b"", b"4111 1111 1111 1111", bytes(range(256)) * 300]
    blobs = [sealer.seal(data) for data in originals]
    assert [open_sealed(blob, CUSTODIAN) for blob in blobs] == originals
    other = PrivateKey.generate()
    for blob in blobs:
        with pytest.raises(CryptoError):
            open_sealed(blob, other)
    assert b"4111" not in blobs[1]


def test_a_session_keeps_one_ephemeral_key_and_never_repeats_a_nonce():
    first, second = Sealer(CUSTODIAN.public_key), Sealer(CUSTODIAN.public_key)
    blobs = [first.seal(b"same bytes") for _ in range(3)]
    key_of = {blob[len(MAGIC):len(MAGIC) + 32] for blob in blobs}
    nonces = {blob[len(MAGIC) + 32:len(MAGIC) + 56] for blob in blobs}
    assert len(key_of) == 1 and len(nonces) == 3 and len(set(blobs)) == 3
    assert all(blob.startswith(MAGIC) for blob in blobs)
    assert second.seal(b"same bytes")[len(MAGIC):len(MAGIC) + 32] not in key_of  # another session, another key


def test_a_changed_byte_anywhere_fails_to_open():
    blob = Sealer(CUSTODIAN.public_key).seal(b"original row")
    for position in range(len(blob)):
        altered = blob[:position] + bytes([blob[position] ^ 1]) + blob[position + 1:]
        with pytest.raises(CryptoError):
            open_sealed(altered, CUSTODIAN)


def test_sealed_boxes_written_before_the_session_format_still_open():
    legacy = SealedBox(CUSTODIAN.public_key).encrypt(b"from an older proxy")
    reveal = opener(CUSTODIAN)
    assert reveal(legacy) == b"from an older proxy"
    assert reveal(Sealer(CUSTODIAN.public_key).seal(b"new")) == b"new"


def test_a_blob_that_only_looks_like_the_format_is_refused():
    with pytest.raises(CryptoError):
        open_sealed(MAGIC + bytes(80), CUSTODIAN)
    with pytest.raises(CryptoError):
        open_sealed(MAGIC, CUSTODIAN)
