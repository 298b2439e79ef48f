"""Caller identity from OIDC access tokens.

The protocol proxies accept a JWT where the protocol expects a password (as
cloud IAM database authentication does), so every session starts from an
identity the IdP vouched for rather than from a shared database login.

Only asymmetric algorithms can ever be allowed: the JWKS is public, so an HMAC
"key" taken from it would let anyone mint tokens. A token's `alg` is checked
against the allow-list before any key is looked at, and the key its `kid`
names must itself be of that algorithm's kind, so a token cannot talk the
verifier into using a key the way it was not meant to be used.

`TokenVerifier.verify` may fetch the JWKS over the network (blocking, bounded
by a timeout); asyncio callers should run it in a thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt

__all__ = [
    "DEFAULT_ALGORITHMS",
    "SUPPORTED_ALGORITHMS",
    "AuthenticationError",
    "Identity",
    "Reason",
    "TokenVerifier",
]

_LOG = logging.getLogger(__name__)

# The key type (kty) and curves (crv; None = no curve) that each allowable
# algorithm verifies with. Anything not in this table, notably "none" and the
# HS* family, can never be allowed.
_KEY_TYPES: dict[str, tuple[str, frozenset[str | None]]] = {
    "RS256": ("RSA", frozenset({None})),
    "RS384": ("RSA", frozenset({None})),
    "RS512": ("RSA", frozenset({None})),
    "PS256": ("RSA", frozenset({None})),
    "PS384": ("RSA", frozenset({None})),
    "PS512": ("RSA", frozenset({None})),
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
SUPPORTED_ALGORITHMS: frozenset[str] = frozenset(_KEY_TYPES)
DEFAULT_ALGORITHMS: tuple[str, ...] = ("RS256", "ES256", "EdDSA")

# A token arrives as a password from an unauthenticated client: bound the work
# it can cause before anything is verified.
MAX_TOKEN_CHARS = 16 * 1024
# A JWKS is a few keys; a bigger answer is a broken or hostile endpoint.
MAX_JWKS_BYTES = 1024 * 1024

_REQUIRED_CLAIMS = ["exp", "iss", "aud", "sub"]


class Reason(StrEnum):
    """Why a token was refused: stable codes for events, metrics and alerts."""

    MALFORMED = "malformed"
    ALG_NOT_ALLOWED = "alg_not_allowed"
    UNKNOWN_KID = "unknown_kid"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    MISSING_CLAIM = "missing_claim"
    JWKS_UNAVAILABLE = "jwks_unavailable"


class AuthenticationError(Exception):
    """A token was refused; `reason_code` is for machines, `message` for people."""

    def __init__(self, reason_code: Reason, message: str) -> None:
        super().__init__(f"{reason_code}: {message}")
        self.reason_code = reason_code
        self.message = message


@dataclass(frozen=True)
class Identity:
    """Who the caller is, as the verified token says.

    The first six fields are the Avro record `custody.Identity`
    (schemas/event.avsc); `expires_at` is kept beside them so that a proxy can
    end a session whose token has run out.
    """

    subject: str
    username: str
    email: str | None
    groups: tuple[str, ...]
    issuer: str
    token_id: str | None
    expires_at: datetime

    def to_avro(self) -> dict[str, Any]:
        """The Avro `Identity` record, ready for the event encoder."""
        return {
            "subject": self.subject,
            "username": self.username,
            "email": self.email,
            "groups": list(self.groups),
            "issuer": self.issuer,
            "token_id": self.token_id,
        }


class TokenVerifier:
    """Turns an OIDC access token into an `Identity`, or refuses it."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks: str | os.PathLike[str],
        username_claim: str = "sub",
        groups_claim: str = "groups",
        leeway: float = 30.0,
        algorithms: Iterable[str] = DEFAULT_ALGORITHMS,
        allow_insecure_http: bool = False,
        min_refresh_interval: float = 30.0,
        max_age: float = 900.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Configure; nothing is fetched until the first token arrives.

        `jwks` is a file path or an https URL (plain http only with
        `allow_insecure_http`, for loopback test IdPs). The JWKS is fetched
        again when a token names an unknown kid, at most once per
        `min_refresh_interval` seconds so that random kids cannot hammer the
        IdP, and when older than `max_age` seconds so that keys the IdP
        withdrew stop being trusted. `clock` (monotonic seconds) drives both.
        Raises ValueError on a configuration that could never verify safely.
        """
        if not issuer or not audience:
            raise ValueError("issuer and audience must both be non-empty")
        if leeway < 0:
            raise ValueError(f"leeway must not be negative, got {leeway}")
        self._issuer = issuer
        self._audience = audience
        self._username_claim = username_claim
        self._groups_claim = groups_claim
        self._leeway = leeway
        self._algorithms = _allow_list(algorithms)
        self._jwks = _JwksCache(
            _jwks_loader(jwks, allow_insecure_http=allow_insecure_http, timeout=timeout),
            min_refresh_interval=min_refresh_interval,
            max_age=max_age,
            clock=clock,
        )

    def verify(self, token: str) -> Identity:
        """The caller's identity; raises `AuthenticationError` on any doubt."""
        header = _unverified_header(token)
        alg = self._allowed_alg(header)
        kid = _header_kid(header)
        key = _bind_key(self._jwks.key(kid), kid, alg)
        claims = self._decode(token, key, kid)
        return self._identity(claims)

    def _allowed_alg(self, header: Mapping[str, Any]) -> str:
        """The header's alg, refused unless allowed: checked before any key is touched."""
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise AuthenticationError(Reason.MALFORMED, "token header has no alg")
        if alg not in self._algorithms:
            allowed = ", ".join(sorted(self._algorithms))
            raise AuthenticationError(
                Reason.ALG_NOT_ALLOWED,
                f"token alg {_quote(alg)} is not allowed (allowed: {allowed})",
            )
        return alg

    def _decode(self, token: str, key: jwt.PyJWK, kid: str) -> dict[str, Any]:
        """Signature, time, issuer, audience and required claims, each failure its own reason."""
        try:
            return jwt.decode(
                token,
                key=key,
                algorithms=[key.algorithm_name],
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options={"require": _REQUIRED_CLAIMS, "enforce_minimum_key_length": True},
            )
        except jwt.InvalidSignatureError as exc:
            raise AuthenticationError(
                Reason.BAD_SIGNATURE, f"token signature does not verify with key {_quote(kid)}"
            ) from exc
        except jwt.ExpiredSignatureError as exc:
            raise AuthenticationError(
                Reason.EXPIRED, f"token has expired (leeway {self._leeway:g} s)"
            ) from exc
        except jwt.ImmatureSignatureError as exc:
            raise AuthenticationError(
                Reason.NOT_YET_VALID,
                f"token is not valid yet: nbf or iat is in the future (leeway {self._leeway:g} s)",
            ) from exc
        except jwt.InvalidIssuerError as exc:
            raise AuthenticationError(
                Reason.WRONG_ISSUER, f"token was not issued by {_quote(self._issuer)}"
            ) from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthenticationError(
                Reason.WRONG_AUDIENCE, f"token is not meant for audience {_quote(self._audience)}"
            ) from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(
                Reason.MISSING_CLAIM, f"token lacks the required claim {_quote(exc.claim)}"
            ) from exc
        except jwt.InvalidKeyError as exc:
            raise AuthenticationError(
                Reason.JWKS_UNAVAILABLE, f"JWKS key {_quote(kid)} is unusable: {exc}"
            ) from exc
        except jwt.InvalidTokenError as exc:
            raise AuthenticationError(Reason.MALFORMED, f"token is malformed: {exc}") from exc

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        """Map verified claims to an Identity; the configured claims must be usable."""
        subject = _required_string(claims, "sub")
        return Identity(
            subject=subject,
            username=(
                subject
                if self._username_claim == "sub"
                else _required_string(claims, self._username_claim)
            ),
            email=_optional_string(claims, "email"),
            groups=_groups(claims, self._groups_claim),
            issuer=_required_string(claims, "iss"),
            token_id=_optional_string(claims, "jti"),
            expires_at=_expires_at(claims),
        )


class _JwksCache:
    """The IdP's verification keys by kid, re-read when stale or asked for an unknown kid.

    Every fetch attempt, successful or not, opens a `min_refresh_interval`
    window in which no other is made: a flood of tokens with random kids costs
    the IdP one request per window. A failed refresh keeps the previous keys,
    so that an IdP outage does not lock out every caller at once.
    """

    def __init__(
        self,
        load: Callable[[], bytes],
        *,
        min_refresh_interval: float,
        max_age: float,
        clock: Callable[[], float],
    ) -> None:
        self._load = load
        self._min_refresh_interval = min_refresh_interval
        self._max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, dict[str, Any]] | None = None
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._last_error: str | None = None

    def key(self, kid: str) -> dict[str, Any]:
        """The JWK named `kid`; raises unknown_kid, or jwks_unavailable if we cannot tell."""
        with self._lock:
            if self._keys is None or self._is_stale():
                self._try_refresh()
            if self._keys is not None and kid not in self._keys:
                self._try_refresh()
            if self._keys is None:
                raise AuthenticationError(
                    Reason.JWKS_UNAVAILABLE, f"no JWKS loaded yet: {self._last_error}"
                )
            jwk = self._keys.get(kid)
            if jwk is None and self._last_error is not None:
                raise AuthenticationError(
                    Reason.JWKS_UNAVAILABLE,
                    f"kid {_quote(kid)} is not in the cached JWKS and refreshing it failed: "
                    f"{self._last_error}",
                )
        if jwk is None:
            raise AuthenticationError(
                Reason.UNKNOWN_KID, f"no key with kid {_quote(kid)} in the JWKS"
            )
        return jwk

    def _is_stale(self) -> bool:
        return self._fetched_at is not None and self._clock() - self._fetched_at >= self._max_age

    def _try_refresh(self) -> None:
        """Fetch the JWKS unless the rate limit forbids it; on failure keep the old keys."""
        now = self._clock()
        if self._attempted_at is not None and now - self._attempted_at < self._min_refresh_interval:
            return
        self._attempted_at = now
        try:
            self._keys = _parse_jwks(self._load())
        except _JwksError as exc:
            self._last_error = str(exc)
            _LOG.warning("JWKS refresh failed, keeping the previous keys: %s", exc)
            return
        self._fetched_at = now
        self._last_error = None


class _JwksError(Exception):
    """The JWKS could not be read or does not parse."""


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect could move the fetch to another host or to plain http: never follow one."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _jwks_loader(
    source: str | os.PathLike[str], *, allow_insecure_http: bool, timeout: float
) -> Callable[[], bytes]:
    """A function that reads the JWKS from `source`; rejects sources that would be unsafe."""
    text = os.fspath(source)
    if "://" not in text:
        path = Path(text)
        return lambda: _read_file(path)
    scheme = urlsplit(text).scheme.lower()
    if scheme == "http" and not allow_insecure_http:
        raise ValueError(f"JWKS URL {text} is plain http; use https (or set allow_insecure_http)")
    if scheme not in ("https", "http"):
        raise ValueError(f"JWKS source {text} is neither a file path nor an https URL")
    return lambda: _fetch_url(text, timeout)


def _read_file(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_JWKS_BYTES + 1)
    except OSError as exc:
        raise _JwksError(f"cannot read JWKS file {path}: {exc.strerror or exc}") from exc
    return _bounded(data, str(path))


def _fetch_url(url: str, timeout: float) -> bytes:
    opener = urllib.request.build_opener(_RefuseRedirects())
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with opener.open(request, timeout=timeout) as response:
            data = response.read(MAX_JWKS_BYTES + 1)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _JwksError(f"cannot fetch JWKS from {url}: {exc}") from exc
    return _bounded(data, url)


def _bounded(data: bytes, where: str) -> bytes:
    if len(data) > MAX_JWKS_BYTES:
        raise _JwksError(f"JWKS at {where} is larger than {MAX_JWKS_BYTES} bytes")
    return data


def _parse_jwks(raw: bytes) -> dict[str, dict[str, Any]]:
    """The JWKS's verification keys by kid (a key without a kid cannot be selected: skipped)."""
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise _JwksError(f"JWKS is not JSON: {exc}") from exc
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise _JwksError('JWKS has no "keys" array')
    by_kid: dict[str, dict[str, Any]] = {}
    for jwk in keys:
        if not (isinstance(jwk, dict) and _is_verification_key(jwk)):
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str):
            continue
        if kid in by_kid:
            raise _JwksError(f"JWKS has two keys with kid {_quote(kid)}")
        by_kid[kid] = jwk
    return by_kid


def _is_verification_key(jwk: Mapping[str, Any]) -> bool:
    """Only public signature keys: an encryption key or leaked private material must not verify."""
    if jwk.get("use", "sig") != "sig":
        return False
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return False
    return "d" not in jwk and "k" not in jwk


def _allow_list(algorithms: Iterable[str]) -> frozenset[str]:
    allowed = frozenset(algorithms)
    if not allowed:
        raise ValueError("the algorithm allow-list is empty")
    unsupported = allowed - SUPPORTED_ALGORITHMS
    if unsupported:
        raise ValueError(
            f"algorithms {', '.join(sorted(unsupported))} cannot be allowed; "
            f"only asymmetric ones can: {', '.join(sorted(SUPPORTED_ALGORITHMS))}"
        )
    return allowed


def _unverified_header(token: str) -> dict[str, Any]:
    if not isinstance(token, str) or not token:
        raise AuthenticationError(Reason.MALFORMED, "no token given")
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthenticationError(
            Reason.MALFORMED, f"token is longer than {MAX_TOKEN_CHARS} characters"
        )
    try:
        return jwt.get_unverified_header(token)
    except jwt.InvalidTokenError as exc:
        raise AuthenticationError(
            Reason.MALFORMED, f"token is not a JWS compact JWT: {exc}"
        ) from exc


def _header_kid(header: Mapping[str, Any]) -> str:
    """The kid is required: guessing among keys would turn one key's weakness into all of them."""
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise AuthenticationError(Reason.MALFORMED, "token header has no kid")
    return kid


def _bind_key(jwk: Mapping[str, Any], kid: str, alg: str) -> jwt.PyJWK:
    """The JWK as a key for `alg`, refused unless the JWK itself is of that kind."""
    declared = jwk.get("alg")
    if declared is not None and declared != alg:
        raise AuthenticationError(
            Reason.ALG_NOT_ALLOWED,
            f"key {_quote(kid)} is for {_quote(declared)}, the token claims {alg}",
        )
    kty, curves = _KEY_TYPES[alg]
    if jwk.get("kty") != kty or jwk.get("crv") not in curves:
        raise AuthenticationError(
            Reason.ALG_NOT_ALLOWED,
            f"key {_quote(kid)} (kty {_quote(jwk.get('kty'))}, crv {_quote(jwk.get('crv'))}) "
            f"cannot verify {alg}",
        )
    try:
        return jwt.PyJWK(dict(jwk), algorithm=alg)
    except jwt.PyJWTError as exc:
        raise AuthenticationError(
            Reason.JWKS_UNAVAILABLE, f"JWKS key {_quote(kid)} is unusable: {exc}"
        ) from exc


def _required_string(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    if value is None or value == "":
        raise AuthenticationError(
            Reason.MISSING_CLAIM, f"token lacks the required claim {_quote(name)}"
        )
    if not isinstance(value, str):
        raise AuthenticationError(Reason.MALFORMED, f"token claim {_quote(name)} is not a string")
    return value


def _optional_string(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is not None and not isinstance(value, str):
        raise AuthenticationError(Reason.MALFORMED, f"token claim {_quote(name)} is not a string")
    return value


def _groups(claims: Mapping[str, Any], name: str) -> tuple[str, ...]:
    """No groups claim means no groups; anything but an array of strings is refused."""
    value = claims.get(name, [])
    if not isinstance(value, list) or not all(isinstance(group, str) for group in value):
        raise AuthenticationError(
            Reason.MALFORMED, f"token claim {_quote(name)} is not an array of strings"
        )
    return tuple(value)


def _expires_at(claims: Mapping[str, Any]) -> datetime:
    """PyJWT has checked that exp is an integer; it may still be beyond any calendar."""
    try:
        return datetime.fromtimestamp(int(claims["exp"]), tz=timezone.utc)
    except (OverflowError, ValueError, OSError) as exc:
        raise AuthenticationError(Reason.MALFORMED, f"token exp is out of range: {exc}") from exc


def _quote(value: object) -> str:
    """Attacker-chosen text in a one-line message: repr'd (no newlines) and cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
