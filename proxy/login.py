"""`custody login` and `custody token`: OIDC tokens from the configured identity provider, cached and refreshed.

Two flows, as a command-line client does them:

* the device authorization grant (RFC 8628): the user opens a URL on any
  device and enters a code, while this process polls the token endpoint;
* the authorization code grant with PKCE (RFC 7636, RFC 8252 for native
  apps): a one-shot HTTP listener on a loopback port receives the redirect
  with the code, and the code is redeemed with the PKCE verifier only this
  process knows.

The token set is cached in one JSON file (mode 0600), keyed by issuer and
client id, and refreshed with its refresh token when the access token is
about to expire. The small pure functions (PKCE, request bodies, the cache
entries) are separate from the HTTP so that they are tested on their own;
the HTTP is urllib, form-encoded POSTs and JSON answers as OAuth 2.0 says.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import ipaddress
import json
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from ingest.errors import CustodyError
from ingest.settings import Table

__all__ = [
    "DEVICE_CODE_GRANT",
    "Discovery",
    "LoginError",
    "LoginSettings",
    "TokenCache",
    "TokenSet",
    "authorization_url",
    "code_flow",
    "current_credential",
    "current_token",
    "device_flow",
    "discover",
    "exec_credential",
    "pkce_challenge",
    "pkce_verifier",
]

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_SCOPES = ("openid", "offline_access")
DEFAULT_MIN_VALID = 30.0  # seconds an access token must still be valid to be printed without a refresh
HTTP_TIMEOUT = 10.0
MAX_RESPONSE_BYTES = 1 << 20
FLOWS = ("device", "code")
TOKEN_KINDS = ("access_token", "id_token")


class LoginError(CustodyError):
    """A login or refresh failed; the message says what the identity provider answered."""


# --- settings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoginSettings:
    """`[login]`: which identity provider and client `custody login` uses.

    `issuer` defaults to `[identity] issuer` (the tokens must verify there);
    `discovery_url` to `issuer` + `/.well-known/openid-configuration`.
    """

    issuer: str
    client_id: str
    scopes: tuple[str, ...]
    audience: str | None
    discovery_url: str
    token_cache: Path
    flow: str
    token: str
    redirect_port: int

    @property
    def cache_key(self) -> str:
        return cache_key(self.issuer, self.client_id)

    @classmethod
    def from_table(cls, t: Table, identity_issuer: str | None) -> "LoginSettings | None":
        if not t.raw:
            return None
        issuer = t.str("issuer", identity_issuer)
        if issuer is None:
            raise t.error("issuer", "missing (required without [identity] issuer)")
        scopes = t.raw.get("scopes", list(DEFAULT_SCOPES))
        if not isinstance(scopes, list) or not all(isinstance(s, str) and s and " " not in s for s in scopes):
            raise t.error("scopes", f"expected a list of scope names, got {scopes!r}")
        flow = t.str("flow", "device")
        if flow not in FLOWS:
            raise t.error("flow", f"expected one of {', '.join(FLOWS)}, got {flow!r}")
        token = t.str("token", "access_token")
        if token not in TOKEN_KINDS:
            raise t.error("token", f"expected one of {', '.join(TOKEN_KINDS)}, got {token!r}")
        discovery_url = t.str("discovery_url", issuer.rstrip("/") + "/.well-known/openid-configuration")
        try:
            _check_url(discovery_url)
        except LoginError as exc:
            raise t.error("discovery_url", str(exc)) from None
        port = t.int("redirect_port", 0)
        if port > 65535:
            raise t.error("redirect_port", f"expected a port number, got {port}")
        cache = t.path("token_cache", None)
        return cls(issuer=issuer, client_id=t.str("client_id"), scopes=tuple(scopes),
                   audience=t.str("audience", None), discovery_url=discovery_url,
                   token_cache=Path(cache) if cache is not None else default_cache_path(),
                   flow=flow, token=token, redirect_port=port)


def default_cache_path() -> Path:
    """$CUSTODY_TOKEN_CACHE, else $XDG_CACHE_HOME/custody/tokens.json, else ~/.cache/custody/tokens.json."""
    if os.environ.get("CUSTODY_TOKEN_CACHE"):
        return Path(os.environ["CUSTODY_TOKEN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "custody" / "tokens.json"


# --- pure functions: PKCE, request bodies, token sets ------------------------------------


def pkce_verifier() -> str:
    """A code verifier (RFC 7636 §4.1): 43 characters of the unreserved alphabet from 32 random bytes."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


def pkce_challenge(verifier: str) -> str:
    """The S256 code challenge: BASE64URL(SHA256(ASCII(verifier))) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _with_audience(body: dict[str, str], audience: str | None) -> dict[str, str]:
    if audience:
        body["audience"] = audience
    return body


def device_authorization_body(client_id: str, scopes: Sequence[str], audience: str | None = None) -> dict[str, str]:
    return _with_audience({"client_id": client_id, "scope": " ".join(scopes)}, audience)


def device_token_body(client_id: str, device_code: str) -> dict[str, str]:
    return {"grant_type": DEVICE_CODE_GRANT, "device_code": device_code, "client_id": client_id}


def authorization_url(endpoint: str, client_id: str, redirect_uri: str, scopes: Sequence[str], state: str,
                      challenge: str, audience: str | None = None) -> str:
    query = _with_audience({"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
                            "scope": " ".join(scopes), "state": state, "code_challenge": challenge,
                            "code_challenge_method": "S256"}, audience)
    return endpoint + ("&" if "?" in endpoint else "?") + urlencode(query)


def code_token_body(client_id: str, code: str, redirect_uri: str, verifier: str) -> dict[str, str]:
    return {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "client_id": client_id, "code_verifier": verifier}


def refresh_token_body(client_id: str, refresh_token: str, scopes: Sequence[str] = ()) -> dict[str, str]:
    body = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id}
    if scopes:
        body["scope"] = " ".join(scopes)
    return body


@dataclass(frozen=True)
class TokenSet:
    """What a token endpoint answered, with `expires_at` in Unix seconds (None: the IdP did not say)."""

    access_token: str
    expires_at: float | None
    refresh_token: str | None = None
    id_token: str | None = None
    scope: str | None = None

    @classmethod
    def from_response(cls, answer: Mapping[str, Any], now: float, previous: "TokenSet | None" = None) -> "TokenSet":
        """A token response (RFC 6749 §5.1); a refresh that returns no new refresh token keeps the old one."""
        access = answer.get("access_token")
        if not isinstance(access, str) or not access:
            raise LoginError("the token endpoint answered without an access_token")
        expires_in = answer.get("expires_in")
        expires_at = now + float(expires_in) if isinstance(expires_in, (int, float)) else _jwt_exp(access)
        refresh = answer.get("refresh_token") or (previous.refresh_token if previous else None)
        id_token = answer.get("id_token") or (previous.id_token if previous else None)
        return cls(access, expires_at, refresh, id_token, answer.get("scope"))

    def to_json(self) -> dict[str, Any]:
        return {"access_token": self.access_token, "expires_at": self.expires_at,
                "refresh_token": self.refresh_token, "id_token": self.id_token, "scope": self.scope}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TokenSet":
        return cls(str(data["access_token"]), data.get("expires_at"), data.get("refresh_token"),
                   data.get("id_token"), data.get("scope"))

    def token(self, kind: str = "access_token") -> str:
        """The token the proxies get: the access token, or the ID token (`[login] token = "id_token"`)."""
        if kind == "id_token":
            if not self.id_token:
                raise LoginError("the identity provider issued no id_token (is the openid scope asked for?)")
            return self.id_token
        return self.access_token

    def valid_for(self, seconds: float, now: float, kind: str = "access_token") -> bool:
        expires_at = self.expires_at if kind == "access_token" else _jwt_exp(self.id_token or "")
        return expires_at is None or expires_at - now > seconds


def _jwt_exp(token: str) -> float | None:
    """The `exp` of a JWT, read without verifying (for the cache's bookkeeping only; the proxy verifies)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, (int, float)) else None
    except (IndexError, ValueError, AttributeError):
        return None


def cache_key(issuer: str, client_id: str) -> str:
    return f"{issuer} {client_id}"


class TokenCache:
    """One JSON file of token sets by `issuer client_id`; written atomically with mode 0600 (its directory 0700)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise LoginError(f"token cache {self.path} is not valid JSON ({exc}); remove it and log in again") from None
        return data if isinstance(data, dict) else {}

    def get(self, key: str) -> TokenSet | None:
        entry = self._read().get(key)
        if not isinstance(entry, dict) or "access_token" not in entry:
            return None
        return TokenSet.from_json(entry)

    def put(self, key: str, tokens: TokenSet | None) -> None:
        """Store (or with None remove) one entry; the others stay."""
        data = self._read()
        if tokens is None:
            data.pop(key, None)
        else:
            data[key] = tokens.to_json()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                os.fchmod(f.fileno(), 0o600)  # whatever the umask
                json.dump(data, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise


# --- HTTP ------------------------------------------------------------------------------------


def _check_url(url: str) -> None:
    """https, or plain http to a loopback host only (a dev identity provider on this machine)."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and _is_loopback(parts.hostname or ""):
        return
    raise LoginError(f"{url}: the identity provider must be reached over https (plain http only on loopback)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _request(url: str, form: Mapping[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """GET (or POST `form`) and the JSON answer; OAuth errors come back as (status, their JSON)."""
    _check_url(url)
    data = urlencode(form).encode() if form is not None else None
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    opener = urllib.request.build_opener(_NoRedirects())
    try:
        with opener.open(request, timeout=HTTP_TIMEOUT) as response:
            status, body = response.status, response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(MAX_RESPONSE_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise LoginError(f"cannot reach {url}: {exc}") from None
    if len(body) > MAX_RESPONSE_BYTES:
        raise LoginError(f"{url}: answer larger than {MAX_RESPONSE_BYTES} bytes")
    try:
        answer = json.loads(body)
    except ValueError:
        raise LoginError(f"{url}: HTTP {status}, not JSON: {body[:200]!r}") from None
    if not isinstance(answer, dict):
        raise LoginError(f"{url}: HTTP {status}, expected a JSON object")
    return status, answer


def _oauth_error(what: str, status: int, answer: Mapping[str, Any]) -> LoginError:
    error = answer.get("error", f"HTTP {status}")
    description = answer.get("error_description")
    return LoginError(f"{what}: {error}" + (f" ({description})" if description else ""))


@dataclass(frozen=True)
class Discovery:
    """The endpoints of an OpenID Provider (OpenID Connect Discovery 1.0)."""

    issuer: str
    token_endpoint: str
    authorization_endpoint: str | None
    device_authorization_endpoint: str | None
    jwks_uri: str | None


def discover(settings: LoginSettings) -> Discovery:
    """Fetch the discovery document; its `issuer` must be the configured one (else: another IdP's keys)."""
    status, doc = _request(settings.discovery_url)
    if status != 200:
        raise _oauth_error(f"discovery at {settings.discovery_url}", status, doc)
    if doc.get("issuer") != settings.issuer:
        raise LoginError(f"{settings.discovery_url} names issuer {doc.get('issuer')!r}, "
                         f"not the configured {settings.issuer!r}")
    token_endpoint = doc.get("token_endpoint")
    if not isinstance(token_endpoint, str):
        raise LoginError(f"{settings.discovery_url} has no token_endpoint")
    return Discovery(settings.issuer, token_endpoint, doc.get("authorization_endpoint"),
                     doc.get("device_authorization_endpoint"), doc.get("jwks_uri"))


def _token_request(endpoint: str, body: Mapping[str, str], what: str, previous: TokenSet | None = None) -> TokenSet:
    status, answer = _request(endpoint, body)
    if status != 200:
        raise _oauth_error(what, status, answer)
    return TokenSet.from_response(answer, time.time(), previous)


@dataclass(frozen=True)
class DeviceCode:
    """A device authorization response (RFC 8628 §3.2): what to show the user, and what to poll with."""

    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: float
    interval: float


def device_flow(settings: LoginSettings, discovery: Discovery, show: Callable[[DeviceCode], None],
                sleep: Callable[[float], None] = time.sleep) -> TokenSet:
    """RFC 8628: get a user code, `show` it, poll until the user approved (or denied, or it expired)."""
    if not discovery.device_authorization_endpoint:
        raise LoginError(f"{settings.issuer} offers no device authorization endpoint; use --flow code")
    body = device_authorization_body(settings.client_id, settings.scopes, settings.audience)
    status, answer = _request(discovery.device_authorization_endpoint, body)
    if status != 200:
        raise _oauth_error("device authorization", status, answer)
    try:
        code = DeviceCode(str(answer["device_code"]), str(answer["user_code"]),
                          str(answer.get("verification_uri") or answer["verification_url"]),
                          answer.get("verification_uri_complete"), float(answer.get("expires_in", 600)),
                          float(answer.get("interval", 5)))
    except (KeyError, TypeError, ValueError) as exc:
        raise LoginError(f"device authorization answer lacks {exc}") from None
    show(code)
    interval, deadline = max(code.interval, 0.1), time.monotonic() + code.expires_in
    poll = device_token_body(settings.client_id, code.device_code)
    while time.monotonic() < deadline:
        sleep(interval)
        status, answer = _request(discovery.token_endpoint, poll)
        if status == 200:
            return TokenSet.from_response(answer, time.time())
        error = answer.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":  # RFC 8628 §3.5: five seconds more from now on
            interval += 5
            continue
        raise _oauth_error("device login", status, answer)
    raise LoginError("device login: the code expired before it was approved; run custody login again")


_CALLBACK_PAGE = (b"<!doctype html><meta charset=utf-8><title>custody login</title>"
                  b"<p>custody: %s. You can close this window.</p>")


def code_flow(settings: LoginSettings, discovery: Discovery, open_url: Callable[[str], None],
              timeout: float = 300.0) -> TokenSet:
    """Authorization code + PKCE with a loopback redirect (RFC 8252 §7.3): one request is awaited on 127.0.0.1."""
    if not discovery.authorization_endpoint:
        raise LoginError(f"{settings.issuer} offers no authorization endpoint; use --flow device")
    verifier, state = pkce_verifier(), secrets.token_urlsafe(16)
    result: dict[str, str] = {}
    done = threading.Event()

    class Callback(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            parts = urlsplit(self.path)
            if parts.path != "/callback":
                self.send_error(404)
                return
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            if query.get("state") != state:  # not the answer to our request (CSRF, a stale tab)
                self._answer(400, b"the login answer does not belong to this login")
                return
            result.update(query)
            self._answer(200, b"login failed" if "error" in query else b"logged in")
            done.set()

        def _answer(self, status: int, words: bytes) -> None:
            page = _CALLBACK_PAGE % words
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", settings.redirect_port), Callback)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        redirect_uri = f"http://127.0.0.1:{server.server_address[1]}/callback"
        open_url(authorization_url(discovery.authorization_endpoint, settings.client_id, redirect_uri,
                                   settings.scopes, state, pkce_challenge(verifier), settings.audience))
        if not done.wait(timeout):
            raise LoginError(f"no answer from the browser within {timeout:g} s; run custody login again")
    finally:
        server.shutdown()
        server.server_close()
    if "error" in result:
        raise _oauth_error("login", 400, result)
    if "code" not in result:
        raise LoginError("the identity provider redirected back without a code")
    body = code_token_body(settings.client_id, result["code"], redirect_uri, verifier)
    return _token_request(discovery.token_endpoint, body, "redeeming the authorization code")


def refresh(settings: LoginSettings, tokens: TokenSet, discovery: Discovery | None = None) -> TokenSet:
    if not tokens.refresh_token:
        raise LoginError("the cached token has expired and came without a refresh token; run custody login")
    discovery = discovery or discover(settings)
    body = refresh_token_body(settings.client_id, tokens.refresh_token)
    try:
        return _token_request(discovery.token_endpoint, body, "refreshing the token", previous=tokens)
    except LoginError as exc:
        raise LoginError(f"{exc}; run custody login again") from None


def current_token(settings: LoginSettings, min_valid: float = DEFAULT_MIN_VALID) -> str:
    """The cached token, refreshed first when it has less than `min_valid` seconds left (the cache is updated)."""
    return current_credential(settings, min_valid)[0]


def current_credential(settings: LoginSettings, min_valid: float = DEFAULT_MIN_VALID) -> tuple[str, float | None]:
    """`current_token` and when it expires (Unix seconds; None: the IdP did not say)."""
    cache = TokenCache(settings.token_cache)
    tokens = cache.get(settings.cache_key)
    if tokens is None:
        raise LoginError(f"not logged in to {settings.issuer} as client {settings.client_id} "
                         f"(no token in {settings.token_cache}): run custody login")
    if not tokens.valid_for(min_valid, time.time(), settings.token):
        tokens = refresh(settings, tokens)
        cache.put(settings.cache_key, tokens)
    token = tokens.token(settings.token)
    return token, tokens.expires_at if settings.token == "access_token" else _jwt_exp(token)


# --- kubectl's exec credential plugin ------------------------------------------------------------

EXEC_CREDENTIAL_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")


def exec_credential(token: str, expires_at: float | None, exec_info: str | None = None) -> dict[str, Any]:
    """The ExecCredential a `client.authentication.k8s.io` exec plugin prints for kubectl.

    `exec_info` is `$KUBERNETES_EXEC_INFO` (the ExecCredential kubectl passes in): its apiVersion is echoed
    when it is one this writes (v1 otherwise). `expirationTimestamp` (RFC 3339, UTC) tells kubectl when to
    run the plugin again; without it kubectl keeps the token for the life of the process.
    """
    version = EXEC_CREDENTIAL_VERSIONS[0]
    if exec_info:
        try:
            asked = json.loads(exec_info).get("apiVersion")
        except (ValueError, AttributeError):
            asked = None
        if asked in EXEC_CREDENTIAL_VERSIONS:
            version = asked
    status: dict[str, Any] = {"token": token}
    if expires_at is not None:
        status["expirationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(expires_at)))
    return {"apiVersion": version, "kind": "ExecCredential", "status": status}
