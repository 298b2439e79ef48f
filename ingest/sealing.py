"""`sealed_original`: the original bytes of what masking or redaction changed, readable by the custodian alone.

A session seals with a key pair of its own (`Sealer`): made on its first
seal, forgotten with the session. Each blob is a NaCl box from that
ephemeral key to the custodian's public key (X25519, XSalsa20-Poly1305,
a random 24-byte nonce):

    MAGIC (4) | ephemeral public key (32) | nonce (24) | MAC (16) | ciphertext

The proxy cannot open what it sealed once the session is over, and the
custodian's private key opens every blob (`open_sealed`). One libsodium
sealed box per blob (what the proxy wrote before) costs two X25519 scalar
multiplications, ~50 µs; a masked 100k-row result sealed one box per slice
of rows spent 16 % of the relay's time there. With the shared key computed
once per session a blob costs a few µs.

`open_sealed` still opens those sealed boxes (MAGIC, ephemeral key), so
evidence written before this format stays readable.
"""

from __future__ import annotations

from functools import lru_cache

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey, SealedBox

__all__ = ["MAGIC", "Sealer", "open_sealed", "opener"]

MAGIC = b"CSB1"  # custody session box, version 1
_KEY = 32
_HEADER = len(MAGIC) + _KEY


class Sealer:
    """One session's sealing to the custodian: its ephemeral key pair and the precomputed shared key."""

    def __init__(self, custodian: PublicKey) -> None:
        self._custodian = custodian
        self._box: Box | None = None
        self._prefix = b""

    def seal(self, data: bytes) -> bytes:
        if self._box is None:  # most sessions never seal: their key is never made
            ephemeral = PrivateKey.generate()
            self._box = Box(ephemeral, self._custodian)
            self._prefix = MAGIC + bytes(ephemeral.public_key)
        return self._prefix + self._box.encrypt(data)


def open_sealed(blob: bytes, custodian: PrivateKey) -> bytes:
    """The original bytes of a blob (nacl.exceptions.CryptoError if it was not sealed to this key)."""
    return opener(custodian)(blob)


def opener(custodian: PrivateKey):
    """`open_sealed` for many blobs: each session's shared key is computed once (replay opens one per record)."""
    legacy = SealedBox(custodian).decrypt

    @lru_cache(maxsize=256)
    def box(ephemeral: bytes) -> Box:
        return Box(custodian, PublicKey(ephemeral))

    def open_blob(blob: bytes) -> bytes:
        if blob.startswith(MAGIC) and len(blob) > _HEADER:
            try:
                return box(blob[len(MAGIC):_HEADER]).decrypt(blob[_HEADER:])
            except CryptoError:
                pass  # a sealed box whose ephemeral key happens to begin with MAGIC
        return legacy(blob)

    return open_blob
