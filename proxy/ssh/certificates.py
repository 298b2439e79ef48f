"""OpenSSH user certificates from the proxy's own SSH CA: a verified OIDC token, exchanged for a key's certificate.

OpenSSH's client reads a password into a 1,024-byte buffer, and an RS256
access token with a few groups is longer; a certificate has no such limit.
`custody ssh-login` logs in once with the token (asyncssh as the client has no
such buffer) and asks for the subsystem `CERT_SUBSYSTEM` with the user's
public key; the front end answers with a certificate signed by the listener's
`user_ca_key_file`: the token's username claim as the only principal, valid
until the token expires, and the whole identity in the key id (JSON), so that
a later certificate login gives the session the same identity a token would,
with nothing looked up. Only the proxy holds the CA key; it trusts no other CA,
and without a CA configured no certificate is issued or accepted.

Pure functions over asyncssh's key objects: no I/O.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

import asyncssh
from asyncssh.public_key import CERT_TYPE_USER

from proxy.identity import Identity

CERT_SUBSYSTEM = "custody-certificate@custody"  # a vendor name (RFC 4250 §4.6.1): never relayed to the target
MAX_PUBLIC_KEY_BYTES = 16 * 1024  # one OpenSSH public key line; an RSA 16384-bit key is about 2.8 KiB
CLOCK_SKEW_SECONDS = 60  # valid from a minute ago: a client whose clock is a little behind can use it at once
KEY_ID_VERSION = 1


class CertificateRefused(Exception):
    """A request for, or a login with, a certificate that cannot be honoured; `code` is the reason code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


@dataclass(frozen=True)
class Fields:
    """What an OpenSSH certificate says that asyncssh keeps without public accessors (serial, key id, validity)."""

    serial: int
    key_id: str
    valid_after: int
    valid_before: int

    @classmethod
    def of(cls, cert: asyncssh.SSHCertificate) -> "Fields":
        # asyncssh decodes these fields but names them only privately; this is the one place that reads them.
        return cls(cert._serial, cert._key_id, cert._valid_after, cert._valid_before)  # noqa: SLF001


def issue(ca: asyncssh.SSHKey, public_key_line: bytes, identity: Identity, now: datetime) -> asyncssh.SSHCertificate:
    """The user certificate for `public_key_line`: principal = username, until the token's expiry."""
    if len(public_key_line) > MAX_PUBLIC_KEY_BYTES:
        raise CertificateRefused("public_key_too_large", f"more than {MAX_PUBLIC_KEY_BYTES} bytes")
    try:
        key = asyncssh.import_public_key(public_key_line.strip())
    except (asyncssh.KeyImportError, ValueError, UnicodeDecodeError) as exc:
        raise CertificateRefused("public_key_invalid", f"not an OpenSSH public key: {exc}") from None
    if key.public_data == ca.public_data:
        raise CertificateRefused("public_key_invalid", "that is the CA's own key")
    valid_before = int(identity.expires_at.timestamp())
    valid_after = int(now.timestamp()) - CLOCK_SKEW_SECONDS
    if valid_before <= int(now.timestamp()):
        raise CertificateRefused("expired", "the token has already expired")
    return ca.generate_user_certificate(
        key, key_id(identity), serial=secrets.randbits(63), principals=[identity.username],
        valid_after=valid_after, valid_before=valid_before,
        # X11: always refused; agent: decided by policy in the proxy (its auth-agent-req hook does not read this).
        permit_x11_forwarding=False, permit_agent_forwarding=False,
        permit_port_forwarding=True, permit_pty=True, permit_user_rc=False,  # forwarding: policy decides
        comment=f"custody {identity.username}")


def key_id(identity: Identity) -> str:
    """The identity as the certificate's key id: what the proxy reads back, and what sshd-style logs show."""
    return json.dumps({"v": KEY_ID_VERSION, **identity.to_avro()}, separators=(",", ":"), sort_keys=True)


def identity_of(cert: asyncssh.SSHCertificate) -> Identity:
    """The identity a certificate signed by the proxy's CA carries (its signature and validity checked already)."""
    try:
        fields = Fields.of(cert)
        claims = json.loads(fields.key_id)
        if not isinstance(claims, dict) or claims.get("v") != KEY_ID_VERSION:
            raise ValueError("not a Custody key id")
        groups = claims["groups"]
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ValueError("groups is not a list of strings")
        identity = Identity(subject=_text(claims, "subject"), username=_text(claims, "username"),
                            email=_text(claims, "email", True), groups=tuple(groups),
                            issuer=_text(claims, "issuer"), token_id=_text(claims, "token_id", True),
                            expires_at=datetime.fromtimestamp(fields.valid_before, timezone.utc))
    except (ValueError, KeyError, TypeError, OverflowError, OSError) as exc:
        raise CertificateRefused("certificate_invalid", f"its key id is not a Custody identity: {exc}") from None
    return identity


def check(ca: asyncssh.SSHKey, cert: asyncssh.SSHCertificate, user: str) -> Identity:
    """A presented certificate's identity for SSH user `user`, or CertificateRefused saying why.

    The signature was verified when asyncssh decoded it; this checks the CA,
    the type, the principal and the validity window, then reads the key id.
    """
    if cert.signing_key.public_data != ca.public_data:
        raise CertificateRefused("unknown_ca", "the certificate is not signed by this proxy's SSH CA")
    try:
        cert.validate(CERT_TYPE_USER, user)
    except ValueError as exc:
        text = str(exc)
        code = ("expired" if "expired" in text.lower() else "not_yet_valid" if "not yet" in text.lower()
                else "certificate_principal" if "principal" in text.lower() else "certificate_invalid")
        raise CertificateRefused(code, f"certificate: {text}") from None
    identity = identity_of(cert)
    if identity.username != user:
        raise CertificateRefused("user_mismatch", f"the certificate is for {identity.username!r}, the user is {user!r}")
    return identity


def describe(cert: asyncssh.SSHCertificate) -> dict[str, str]:
    """A certificate's facts for events: serial, the key's fingerprint, validity; never the key id's JSON twice."""
    fields = Fields.of(cert)
    return {"certificate_serial": str(fields.serial), "key_fingerprint": cert.key.get_fingerprint(),
            "ca_fingerprint": cert.signing_key.get_fingerprint(),
            "valid_before": datetime.fromtimestamp(fields.valid_before, timezone.utc).isoformat()}


def _text(claims: dict, name: str, optional: bool = False) -> str | None:
    value = claims.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} is not a non-empty string")
    return value
