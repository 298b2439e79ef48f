"""A dev-only identity provider: one Ed25519 key on disk that mints OIDC-style tokens.

DEVELOPMENT ONLY. The signing key is an unencrypted file and whoever can read
it can be anyone to Custody. Production trusts a real IdP's JWKS and has no
`dev_signing_key`. This exists so that `custody init` gives a working local
setup (`custody token issue`) that goes through the very same `TokenVerifier`
as production: no bypass path to forget about. `DevIdPServer` serves the same
key as an OpenID Provider over loopback HTTP (discovery, JWKS, device and
authorization code flows), so `custody login` is tested for real.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import http.server
import json
import os
import secrets
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from jwt.algorithms import OKPAlgorithm
from jwt.utils import base64url_encode

__all__ = ["DevIdPServer", "create_dev_idp", "issue_token"]

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


# --- the dev IdP over HTTP: discovery, JWKS, device and authorization code flows (tests, local dev) ---------


@dataclass
class _Grant:
    """Who a code or refresh token stands for."""

    client_id: str
    subject: str
    groups: tuple[str, ...]
    email: str | None
    scope: str


@dataclass
class _DeviceRequest:
    client_id: str
    scope: str
    user_code: str
    expires_at: float
    grant: _Grant | None = None
    denied: bool = False
    last_poll: float = 0.0


@dataclass
class _Code:
    grant: _Grant
    redirect_uri: str
    challenge: str
    expires_at: float


class DevIdPServer:
    """DEV/TEST ONLY: the dev identity provider as an OpenID Provider over HTTP on a loopback port.

    It serves discovery (`/.well-known/openid-configuration`, naming the dev
    `issuer`, so tokens verify with the proxy's `TokenVerifier` as configured
    by `custody init`), the JWKS of the dev key, the device authorization grant
    (RFC 8628; `approve(user_code, ...)` is the user typing the code in and
    signing in), the authorization code grant with PKCE S256 (RFC 7636; it
    approves at once as `login_as`, redirecting to the client's loopback
    `redirect_uri` with code and state) and refresh tokens (rotated: each one
    is good once). Public clients only (`client_ids`), no client secret.
    """

    def __init__(self, key_path: str | os.PathLike[str], issuer: str, audience: str, *,
                 client_ids: Sequence[str] = ("custody-cli",), access_ttl: timedelta = timedelta(hours=1),
                 refresh_ttl: timedelta = timedelta(days=1), device_interval: float = 1.0,
                 device_ttl: float = 600.0, login_as: tuple[str, Sequence[str]] | None = None,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.key_path, self.issuer, self.audience = Path(key_path), issuer, audience
        self.client_ids = frozenset(client_ids)
        self.access_ttl, self.refresh_ttl = access_ttl, refresh_ttl
        self.device_interval, self.device_ttl = device_interval, device_ttl
        self.login_as = login_as
        self.grants: dict[str, int] = {}  # grant_type -> tokens issued, for tests
        self._jwks = json.dumps({"keys": [_public_jwk(_load_signing_key(self.key_path).public_key())]}).encode()
        self._lock = threading.Lock()
        self._devices: dict[str, _DeviceRequest] = {}  # by device_code
        self._codes: dict[str, _Code] = {}
        self._refresh: dict[str, tuple[_Grant, float]] = {}
        handler = type("Handler", (_DevIdPHandler,), {"idp": self})
        self._server = http.server.ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="dev-idp", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def discovery_url(self) -> str:
        return self.url + "/.well-known/openid-configuration"

    def start(self) -> "DevIdPServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "DevIdPServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- test hooks -----------------------------------------------------------------------

    def pending_user_codes(self) -> list[str]:
        with self._lock:
            return [d.user_code for d in self._devices.values() if d.grant is None and not d.denied]

    def approve(self, user_code: str, subject: str, groups: Sequence[str] = (), email: str | None = None) -> None:
        """The user entered `user_code` and signed in as `subject`: the device's next poll gets tokens."""
        with self._lock:
            device = self._device_by_user_code(user_code)
            device.grant = _Grant(device.client_id, subject, tuple(groups), email, device.scope)

    def deny(self, user_code: str) -> None:
        with self._lock:
            self._device_by_user_code(user_code).denied = True

    def _device_by_user_code(self, user_code: str) -> _DeviceRequest:
        wanted = user_code.replace("-", "").upper()
        for device in self._devices.values():
            if device.user_code.replace("-", "") == wanted:
                return device
        raise KeyError(f"no pending device login with user code {user_code!r}")

    # --- endpoints (called from the handler's threads) ------------------------------------

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.url + "/authorize",
            "token_endpoint": self.url + "/token",
            "device_authorization_endpoint": self.url + "/device_authorization",
            "jwks_uri": self.url + "/jwks",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token", _DEVICE_GRANT],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["EdDSA"],
            "scopes_supported": ["openid", "offline_access", "email", "groups"],
        }

    def device_authorization(self, form: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("client_id") not in self.client_ids:
            return 401, {"error": "invalid_client", "error_description": "unknown client_id"}
        alphabet = "BCDFGHJKLMNPQRSTVWXZ"  # RFC 8628 §6.1: no vowels, no look-alikes
        letters = "".join(secrets.choice(alphabet) for _ in range(8))
        user_code, device_code = f"{letters[:4]}-{letters[4:]}", secrets.token_urlsafe(32)
        with self._lock:
            self._devices[device_code] = _DeviceRequest(form["client_id"], form.get("scope", ""), user_code,
                                                        time.monotonic() + self.device_ttl)
        return 200, {"device_code": device_code, "user_code": user_code,
                     "verification_uri": self.url + "/device",
                     "verification_uri_complete": f"{self.url}/device?user_code={user_code}",
                     "expires_in": int(self.device_ttl), "interval": self.device_interval}

    def authorize(self, query: Mapping[str, str]) -> tuple[int, dict[str, str]]:
        """(302, {"Location": ...}) back to the client, or (400, error) when there is nowhere safe to send it."""
        redirect_uri = query.get("redirect_uri", "")
        parts = urlsplit(redirect_uri)
        if (query.get("client_id") not in self.client_ids or parts.scheme != "http"
                or parts.hostname not in ("127.0.0.1", "localhost", "::1")):
            # RFC 6749 §4.1.2.1: an unknown client or redirect URI is never redirected to
            return 400, {"error": "invalid_request", "error_description": "unknown client or non-loopback redirect_uri"}

        def back(**params: str) -> tuple[int, dict[str, str]]:
            if "state" in query:
                params["state"] = query["state"]
            separator = "&" if parts.query else "?"
            return 302, {"Location": redirect_uri + separator + urlencode(params)}

        if query.get("response_type") != "code":
            return back(error="unsupported_response_type")
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return back(error="invalid_request", error_description="PKCE with S256 is required")
        if self.login_as is None:
            return back(error="access_denied", error_description="no dev user is signed in (login_as)")
        subject, groups = self.login_as
        code = secrets.token_urlsafe(32)
        grant = _Grant(query["client_id"], subject, tuple(groups), subject if "@" in subject else None,
                       query.get("scope", ""))
        with self._lock:
            self._codes[code] = _Code(grant, redirect_uri, query["code_challenge"], time.monotonic() + 60)
        return back(code=code)

    def token(self, form: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        client_id, grant_type = form.get("client_id"), form.get("grant_type")
        if client_id not in self.client_ids:
            return 401, {"error": "invalid_client", "error_description": "unknown client_id"}
        now = time.monotonic()
        with self._lock:
            if grant_type == _DEVICE_GRANT:
                device = self._devices.get(form.get("device_code", ""))
                if device is None or device.client_id != client_id:
                    return 400, {"error": "invalid_grant", "error_description": "unknown device_code"}
                if now > device.expires_at:
                    del self._devices[form["device_code"]]
                    return 400, {"error": "expired_token"}
                if device.denied:
                    del self._devices[form["device_code"]]
                    return 400, {"error": "access_denied"}
                if device.grant is None:
                    too_soon = now - device.last_poll < self.device_interval / 2
                    device.last_poll = now
                    return 400, {"error": "slow_down" if too_soon else "authorization_pending"}
                grant = device.grant
                del self._devices[form["device_code"]]  # a device code is redeemed once
            elif grant_type == "authorization_code":
                code = self._codes.pop(form.get("code", ""), None)
                if code is None or now > code.expires_at or code.grant.client_id != client_id:
                    return 400, {"error": "invalid_grant", "error_description": "unknown, used or expired code"}
                if form.get("redirect_uri") != code.redirect_uri:
                    return 400, {"error": "invalid_grant", "error_description": "redirect_uri does not match"}
                verifier = form.get("code_verifier", "")
                digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
                challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
                if not verifier or not hmac.compare_digest(challenge, code.challenge):
                    return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
                grant = code.grant
            elif grant_type == "refresh_token":
                entry = self._refresh.pop(form.get("refresh_token", ""), None)  # rotated: good once
                if entry is None or now > entry[1] or entry[0].client_id != client_id:
                    return 400, {"error": "invalid_grant", "error_description": "unknown, used or expired refresh token"}
                grant = entry[0]
            else:
                return 400, {"error": "unsupported_grant_type"}
            self.grants[grant_type] = self.grants.get(grant_type, 0) + 1
            refresh = None
            if "offline_access" in grant.scope.split() or grant_type == "refresh_token":
                refresh = secrets.token_urlsafe(32)
                self._refresh[refresh] = (grant, now + self.refresh_ttl.total_seconds())
        return 200, self._tokens(grant, refresh)

    def _tokens(self, grant: _Grant, refresh: str | None) -> dict[str, Any]:
        access = issue_token(self.key_path, self.issuer, self.audience, grant.subject, grant.groups,
                             email=grant.email, ttl=self.access_ttl)
        answer: dict[str, Any] = {"access_token": access, "token_type": "Bearer",
                                  "expires_in": int(self.access_ttl.total_seconds()), "scope": grant.scope}
        if "openid" in grant.scope.split():
            answer["id_token"] = issue_token(self.key_path, self.issuer, grant.client_id, grant.subject,
                                             grant.groups, email=grant.email, ttl=self.access_ttl)
        if refresh is not None:
            answer["refresh_token"] = refresh
        return answer


_DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class _DevIdPHandler(http.server.BaseHTTPRequestHandler):
    idp: DevIdPServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's names
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.path == "/.well-known/openid-configuration":
            self._json(200, self.idp.discovery())
        elif parts.path == "/jwks":
            self._send(200, self.idp._jwks, "application/json")
        elif parts.path == "/authorize":
            status, answer = self.idp.authorize(query)
            if status == 302:
                self.send_response(302)
                self.send_header("Location", answer["Location"])
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._json(status, answer)
        elif parts.path == "/device":
            page = b"dev IdP: a test approves the user code with DevIdPServer.approve(user_code, subject)\n"
            self._send(200, page, "text/plain; charset=utf-8")
        else:
            self._json(404, {"error": "not_found"})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        if length > 64 * 1024:
            self._json(413, {"error": "invalid_request"})
            return
        form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode("utf-8", "replace")).items()}
        path = urlsplit(self.path).path
        if path == "/token":
            self._json(*self.idp.token(form))
        elif path == "/device_authorization":
            self._json(*self.idp.device_authorization(form))
        else:
            self._json(404, {"error": "not_found"})

    def _json(self, status: int, answer: Mapping[str, Any]) -> None:
        self._send(status, json.dumps(answer).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass
