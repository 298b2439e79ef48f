"""A dev-only identity provider: one Ed25519 key on disk that mints OIDC-style tokens.

DEVELOPMENT ONLY. The signing key is an unencrypted file and whoever can read
it can be anyone to Custody. Production trusts a real IdP's JWKS and has no
`dev_signing_key`. This exists so that `custody init` gives a working local
setup (`custody token issue`) that goes through the very same `TokenVerifier`
as production: no bypass path to forget about.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from jwt.algorithms import OKPAlgorithm
from jwt.utils import base64url_encode

__all__ = ["create_dev_idp", "issue_token"]

# Marks dev tokens and keys wherever a kid is logged or recorded.
_KID_PREFIX = "dev-"


def create_dev_idp(key_path: str | os.PathLike[str], jwks_path: str | os.PathLike[str]) -> str:
    """Create the dev signing key (mode 0600) and its public JWKS; return the kid.

    Refuses to overwrite either file: replacing a key would silently invalidate
    every token issued so far, and the JWKS path might be a real IdP's.
    """
    key_path, jwks_path = Path(key_path), Path(jwks_path)
    if jwks_path.exists():
        raise FileExistsError(errno.EEXIST, "refusing to overwrite the JWKS", str(jwks_path))
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_new(key_path, pem, mode=0o600, what="dev IdP signing key")
    jwk = _public_jwk(private_key.public_key())
    jwks = json.dumps({"keys": [jwk]}, indent=2) + "\n"
    _write_new(jwks_path, jwks.encode(), mode=0o644, what="JWKS")
    return jwk["kid"]


def issue_token(
    key_path: str | os.PathLike[str],
    issuer: str,
    audience: str,
    subject: str,
    groups: Sequence[str],
    email: str | None = None,
    ttl: timedelta = timedelta(hours=1),
    extra_claims: Mapping[str, Any] | None = None,
) -> str:
    """Mint a token signed with the dev key.

    `extra_claims` are applied last and may override the defaults (e.g. `nbf`,
    `preferred_username`), which tests use to build tokens that must be refused.
    """
    if isinstance(groups, str):
        raise TypeError("groups must be a sequence of group names, not one string")
    private_key = _load_signing_key(Path(key_path))
    now = datetime.now(timezone.utc)
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "groups": list(groups),
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "jti": str(uuid.uuid4()),
    }
    if email is not None:
        claims["email"] = email
    claims.update(extra_claims or {})
    kid = _public_jwk(private_key.public_key())["kid"]
    return jwt.encode(claims, private_key, algorithm="EdDSA", headers={"kid": kid})


def _public_jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    """The JWK of a dev public key; its kid is the RFC 7638 thumbprint: the key determines it."""
    members = OKPAlgorithm.to_jwk(public_key, as_dict=True)
    required = {name: members[name] for name in ("crv", "kty", "x")}
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True).encode()
    thumbprint = base64url_encode(hashlib.sha256(canonical).digest()).decode()
    return {**required, "kid": _KID_PREFIX + thumbprint, "alg": "EdDSA", "use": "sig"}


def _load_signing_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError(f"{path} is not an Ed25519 private key")
    return key


def _write_new(path: Path, data: bytes, *, mode: int, what: str) -> None:
    """Write a file that must not exist yet (O_EXCL: no race, no following a planted symlink)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        message = f"refusing to overwrite the {what}"
        raise FileExistsError(errno.EEXIST, message, str(path)) from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # exactly `mode`, whatever the umask
        f.write(data)
