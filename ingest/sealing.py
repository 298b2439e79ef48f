"""`sealed_original`: the original bytes of what masking or redaction changed, readable by the custodian alone.

A session seals with a key pair of its own (`Sealer`): made on its first
seal, forgotten with the session. Each blob is a NaCl box from that
ephemeral key to the custodian's public key (X25519, XSalsa20-Poly1305; the
24-byte nonce is 16 random bytes drawn with the key, then a counter, so that
no nonce repeats under a key and a blob costs no system call):

    MAGIC (4) | ephemeral public key (32) | nonce (24) | MAC (16) | ciphertext

The proxy cannot open what it sealed once the session is over, and the
custodian's private key opens every blob (`open_sealed`). One libsodium
sealed box per blob (what the proxy wrote before) costs two X25519 scalar
multiplications, ~50 µs; a masked 100k-row result sealed one box per slice
of rows spent 16 % of the relay's time there. With the shared key computed
once per session a blob costs a few µs.

`open_sealed` still opens such sealed boxes (a blob that is not of this
format, or does not open as one), so evidence written before stays readable.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache

from nacl.bindings import crypto_box_beforenm, crypto_box_easy_afternm
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
        self._shared = b""  # the precomputed box key; made on the first seal (most sessions never seal)
        self._header = b""  # MAGIC and the ephemeral public key
        self._nonce_random = b""
        self._count = 0

    def seal(self, data: bytes) -> bytes:
        if not self._shared:
            ephemeral = PrivateKey.generate()
            self._shared = crypto_box_beforenm(bytes(self._custodian), bytes(ephemeral))
            self._header = MAGIC + bytes(ephemeral.public_key)
            self._nonce_random = os.urandom(16)
        self._count += 1
        nonce = self._nonce_random + self._count.to_bytes(8, "big")
        return b"".join((self._header, nonce, crypto_box_easy_afternm(data, nonce, self._shared)))


def open_sealed(blob: bytes, custodian: PrivateKey) -> bytes:
    """The original bytes of a blob (nacl.exceptions.CryptoError if it was not sealed to this key)."""
    return opener(custodian)(blob)


def opener(custodian: PrivateKey) -> Callable[[bytes], bytes]:
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
