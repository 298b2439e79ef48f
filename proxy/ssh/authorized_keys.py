"""Public keys mapped to identities in the config: logins for machines that cannot run an OIDC flow.

A CI runner has a key pair, not a browser. A `[[proxy.authorized_key]]` of
an SSH listener names one OpenSSH public key and the identity it logs in as
(username, groups, an optional expiry). Nothing vouches for that identity but
the config, so the evidence says so: the session's identity has the issuer
`ISSUER` and no token id, and its attributes carry the key's fingerprint.
Revoking such a key is removing its entry (or its `expires`), so a key-mapped
session is never issued a `custody ssh-login` certificate that would outlive
it. Refusals reuse `certificates.CertificateRefused` and its reason codes, the
front end's one kind of public-key refusal.

Pure functions over asyncssh's key objects: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import asyncssh

from proxy.identity import Identity

from .certificates import CertificateRefused

ISSUER = "custody:ssh-authorized-key"
# An entry without `expires` never expires; the core times every identity, so it gets the end of time.
NO_EXPIRY = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)


@dataclass(frozen=True)
class AuthorizedKey:
    """One `[[proxy.authorized_key]]`: a plain OpenSSH public key and the identity its holder logs in as."""

    key: asyncssh.SSHKey
    username: str
    groups: tuple[str, ...]
    expires: datetime | None = None

    @property
    def fingerprint(self) -> str:
        return self.key.get_fingerprint()


def check(entry: AuthorizedKey, user: str, now: datetime) -> Identity:
    """The identity `entry` gives SSH user `user`, or CertificateRefused saying why (the codes tokens use)."""
    if entry.expires is not None and now >= entry.expires:
        raise CertificateRefused("expired", f"the authorized key {entry.fingerprint} expired at "
                                            f"{entry.expires.isoformat()}")
    if entry.username != user:
        raise CertificateRefused("user_mismatch", f"the key {entry.fingerprint} is mapped to {entry.username!r}, "
                                                  f"the user is {user!r}")
    return Identity(subject=entry.username, username=entry.username, email=None, groups=entry.groups,
                    issuer=ISSUER, token_id=None, expires_at=entry.expires or NO_EXPIRY)


def describe(entry: AuthorizedKey) -> dict[str, str]:
    """A mapped key's facts for events: which key proved the identity (the attribute a certificate login uses)."""
    comment = entry.key.get_comment()
    return {"key_fingerprint": entry.fingerprint, **({"key_comment": comment} if comment else {})}
