"""MySQL/MariaDB authentication plugins, client side: what the proxy answers when it logs in to a target.

* `mysql_native_password`: SHA1(password) XOR SHA1(scramble + SHA1(SHA1(password))).
* `caching_sha2_password` (MySQL 8's default): SHA256(password) XOR SHA256(SHA256(SHA256(password)) +
  scramble); when the server has no cached entry it asks for the full authentication (AuthMoreData 0x04):
  the password in clear over TLS, else RSA-OAEP-encrypted (password + NUL, XOR the scramble) to the
  server's public key, which the proxy requests (0x02).
* `client_ed25519` (MariaDB): an Ed25519 signature of the scramble, whose secret scalar is derived from
  SHA-512(password) as MariaDB's ref10 code does (not from a 32-byte seed, so not a plain Ed25519 key).
* `mysql_clear_password`: the password and a NUL (only over TLS).
"""

from __future__ import annotations

import hashlib

NATIVE = "mysql_native_password"
CACHING_SHA2 = "caching_sha2_password"
ED25519 = "client_ed25519"
CLEAR = "mysql_clear_password"
SUPPORTED = (NATIVE, CACHING_SHA2, ED25519, CLEAR)

# caching_sha2_password's AuthMoreData answers
FAST_AUTH_OK = 3
FULL_AUTH = 4
REQUEST_PUBLIC_KEY = b"\x02"


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def native_password(password: str, scramble: bytes) -> bytes:
    if not password:
        return b""
    stage1 = hashlib.sha1(password.encode()).digest()
    stage2 = hashlib.sha1(stage1).digest()
    return _xor(stage1, hashlib.sha1(scramble[:20] + stage2).digest())


def caching_sha2_password(password: str, scramble: bytes) -> bytes:
    if not password:
        return b""
    p1 = hashlib.sha256(password.encode()).digest()
    p2 = hashlib.sha256(p1).digest()
    return _xor(p1, hashlib.sha256(p2 + scramble[:20]).digest())


def caching_sha2_rsa(password: str, scramble: bytes, public_key_pem: bytes) -> bytes:
    """The full authentication over plaintext: password + NUL, XOR the scramble, RSA-OAEP (SHA-1) encrypted."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    clear = password.encode() + b"\x00"
    nonce = scramble[:20]
    xored = bytes(c ^ nonce[i % len(nonce)] for i, c in enumerate(clear))
    key = serialization.load_pem_public_key(public_key_pem)
    return key.encrypt(xored, padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None))  # type: ignore[union-attr]


def ed25519_password(password: str, scramble: bytes) -> bytes:
    """MariaDB client_ed25519: the 64-byte signature of the 32-byte scramble."""
    from nacl.bindings import (
        crypto_core_ed25519_scalar_add,
        crypto_core_ed25519_scalar_mul,
        crypto_core_ed25519_scalar_reduce,
        crypto_scalarmult_ed25519_base_noclamp,
    )

    message = scramble[:32]
    az = bytearray(hashlib.sha512(password.encode()).digest())
    az[0] &= 248
    az[31] &= 63
    az[31] |= 64
    secret = bytes(az[:32])
    public = crypto_scalarmult_ed25519_base_noclamp(crypto_core_ed25519_scalar_reduce(secret + b"\x00" * 32))
    nonce = crypto_core_ed25519_scalar_reduce(hashlib.sha512(bytes(az[32:]) + message).digest())
    r = crypto_scalarmult_ed25519_base_noclamp(nonce)
    hram = crypto_core_ed25519_scalar_reduce(hashlib.sha512(r + public + message).digest())
    s = crypto_core_ed25519_scalar_add(
        crypto_core_ed25519_scalar_mul(hram, crypto_core_ed25519_scalar_reduce(secret + b"\x00" * 32)), nonce)
    return r + s


def ed25519_public_key(password: str) -> bytes:
    """What MariaDB stores for a client_ed25519 user (base64 of this is `PASSWORD('...')` of auth_ed25519)."""
    from nacl.bindings import crypto_core_ed25519_scalar_reduce, crypto_scalarmult_ed25519_base_noclamp

    az = bytearray(hashlib.sha512(password.encode()).digest())
    az[0] &= 248
    az[31] &= 63
    az[31] |= 64
    return crypto_scalarmult_ed25519_base_noclamp(crypto_core_ed25519_scalar_reduce(bytes(az[:32]) + b"\x00" * 32))


def first_response(plugin: str, password: str, scramble: bytes, tls: bool) -> bytes | None:
    """The auth data for `plugin`; None: the plugin is not one the proxy speaks (or needs TLS it lacks)."""
    if plugin == NATIVE:
        return native_password(password, scramble)
    if plugin == CACHING_SHA2:
        return caching_sha2_password(password, scramble)
    if plugin == ED25519:
        return ed25519_password(password, scramble)
    if plugin == CLEAR:
        return password.encode() + b"\x00" if tls else None
    return None
