"""`custody login` / `custody token` against the dev identity provider over real HTTP.

The dev IdP (`proxy.devidp.DevIdPServer`) serves discovery, JWKS, the device authorization grant and the
authorization code grant with PKCE on a loopback port, signing with the key `custody init` wrote, so its
tokens verify with the proxy's own `TokenVerifier`. The CLI runs as a real process; the code flow's
"browser" is a `$BROWSER` script that follows the IdP's redirect to the CLI's loopback listener.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from custody.config import load_config
from custody.init import initialise
from pg_fixtures import EventLog, new_app, start_proxy
from proxy.devidp import DevIdPServer
from proxy.login import (
    LoginError,
    TokenCache,
    TokenSet,
    authorization_url,
    cache_key,
    code_token_body,
    current_token,
    device_flow,
    discover,
    pkce_challenge,
    pkce_verifier,
)
from proxy.server import token_verifier

CLIENT_ID = "custody-cli"


def add_login(config: Path, idp: DevIdPServer, cache: Path, **extra: str) -> None:
    lines = ["", "[login]", f'client_id = "{CLIENT_ID}"', f'discovery_url = "{idp.discovery_url}"',
             f'token_cache = "{cache}"'] + [f"{k} = {v}" for k, v in extra.items()]
    config.write_text(config.read_text() + "\n".join(lines) + "\n")


def dev_idp(config: Path, **options) -> DevIdPServer:
    identity = load_config(config).identity
    return DevIdPServer(identity.dev_signing_key, identity.issuer, identity.audience, **options).start()


@pytest.fixture
def setup(tmp_path):
    config = initialise(tmp_path / "custody", proxy_port=0)
    idp = dev_idp(config, login_as=("carol@example.com", ["dba"]))
    cache = tmp_path / "cache" / "custody" / "tokens.json"
    add_login(config, idp, cache)
    yield config, idp, cache
    idp.stop()


def custody(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "custody", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, **kwargs)


def device_login(config: Path, idp: DevIdPServer, subject: str, groups: list[str]) -> None:
    """`custody login --flow device` as a process; the test is the user who enters the code it shows."""
    process = subprocess.Popen([sys.executable, "-m", "custody", "login", "--flow", "device", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        match = re.search(r"open (\S+) and enter the code (\S+)", line)
        assert match, line
        assert match.group(1).startswith(idp.url)
        idp.approve(match.group(2), subject, groups, email=subject)
        _, rest = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, rest
    assert "logged in" in rest


def verify(config: Path, token: str):
    return token_verifier(load_config(config)).verify(token)


# --- pure parts ------------------------------------------------------------------------------


def test_pkce_s256_is_unpadded_base64url_of_sha256():
    import base64
    import hashlib

    verifier = "dBjftJeZ4CVP-mJ92K1rHIiwHUWQk1MUpHUsG5hMvsU"
    expected = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).decode().rstrip("=")
    assert pkce_challenge(verifier) == expected and len(expected) == 43
    verifier = pkce_verifier()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", verifier) and pkce_verifier() != verifier


def test_cache_is_0600_in_a_0700_directory_and_keyed_by_issuer_and_client(tmp_path):
    cache = TokenCache(tmp_path / "c" / "tokens.json")
    cache.put(cache_key("https://a/", "x"), TokenSet("A", 1.0, "rA"))
    cache.put(cache_key("https://b/", "x"), TokenSet("B", 2.0))
    assert stat.S_IMODE(os.stat(cache.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cache.path.parent).st_mode) == 0o700
    assert cache.get(cache_key("https://a/", "x")).refresh_token == "rA"
    assert cache.get(cache_key("https://b/", "x")).access_token == "B"
    cache.put(cache_key("https://a/", "x"), None)
    assert cache.get(cache_key("https://a/", "x")) is None and cache.get(cache_key("https://b/", "x")) is not None
    assert [p.name for p in cache.path.parent.iterdir()] == ["tokens.json"]  # no temporary left behind


def test_discovery_must_name_the_configured_issuer(setup, tmp_path):
    config, idp, cache = setup
    settings = load_config(config).login
    assert discover(settings).token_endpoint == idp.url + "/token"
    wrong = DevIdPServer(load_config(config).identity.dev_signing_key, "https://other.invalid/", "custody").start()
    try:
        with pytest.raises(LoginError, match="names issuer 'https://other.invalid/'"):
            discover(type(settings)(**{**settings.__dict__, "discovery_url": wrong.discovery_url}))
    finally:
        wrong.stop()


# --- both flows end to end ------------------------------------------------------------------


def test_device_flow_then_custody_token(setup):
    config, idp, cache = setup
    device_login(config, idp, "alice@example.com", ["dba", "oncall"])
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o600
    printed = custody("token", "--min-valid", "0", "--config", str(config))
    assert printed.returncode == 0, printed.stderr
    identity = verify(config, printed.stdout.strip())
    assert (identity.subject, identity.groups, identity.email) == ("alice@example.com", ("dba", "oncall"),
                                                                 "alice@example.com")
    assert idp.grants == {"urn:ietf:params:oauth:grant-type:device_code": 1}
    entry = json.loads(cache.read_text())[cache_key(identity.issuer, CLIENT_ID)]
    assert entry["refresh_token"] and entry["id_token"]


def test_device_flow_denied_and_pending(setup):
    config, idp, _ = setup
    settings = load_config(config).login
    shown = []

    def deny_when_shown(code):
        shown.append(code)
        idp.deny(code.user_code)

    with pytest.raises(LoginError, match="access_denied"):
        device_flow(settings, discover(settings), deny_when_shown)
    assert shown and shown[0].interval == 1.0


def test_code_flow_with_a_browser(setup, tmp_path):
    """$BROWSER is what `webbrowser` opens: a script that follows the IdP's redirect to the loopback listener."""
    config, idp, cache = setup
    browser = tmp_path / "browser.py"
    browser.write_text("import sys, urllib.request\nurllib.request.urlopen(sys.argv[1], timeout=10).read()\n")
    done = custody("login", "--flow", "code", "--config", str(config),
                   env={"BROWSER": f"{sys.executable} {browser} %s", "DISPLAY": ""})
    assert done.returncode == 0, done.stderr
    printed = custody("token", "--min-valid", "0", "--config", str(config))
    identity = verify(config, printed.stdout.strip())
    assert (identity.subject, identity.groups) == ("carol@example.com", ("dba",))
    assert idp.grants == {"authorization_code": 1}


def test_code_flow_no_browser_prints_the_url(setup):
    config, idp, _ = setup
    process = subprocess.Popen([sys.executable, "-m", "custody", "login", "--flow", "code", "--no-browser",
                                "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        process.stderr.readline()
        url = process.stderr.readline().strip()
        assert url.startswith(idp.url + "/authorize?")
        query = parse_qs(urlsplit(url).query)
        assert query["code_challenge_method"] == ["S256"] and query["client_id"] == [CLIENT_ID]
        assert query["redirect_uri"][0].startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=10) as page:  # the user's browser
            assert b"logged in" in page.read()
        _, rest = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, rest


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _authorize(idp: DevIdPServer, challenge: str, redirect_uri: str = "http://127.0.0.1:9/callback") -> str:
    url = authorization_url(idp.url + "/authorize", CLIENT_ID, redirect_uri, ["openid"], "s1", challenge)
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.build_opener(_NoRedirect()).open(url, timeout=10)
    location = answer.value.headers["Location"]
    query = parse_qs(urlsplit(location).query)
    assert location.startswith(redirect_uri) and query["state"] == ["s1"]
    return query["code"][0]


def _redeem(idp: DevIdPServer, code: str, verifier: str, redirect_uri: str = "http://127.0.0.1:9/callback"):
    body = urlencode(code_token_body(CLIENT_ID, code, redirect_uri, verifier)).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(idp.url + "/token", data=body), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_wrong_pkce_verifier_is_refused(setup):
    config, idp, _ = setup
    verifier = pkce_verifier()
    code = _authorize(idp, pkce_challenge(verifier))
    status, answer = _redeem(idp, code, pkce_verifier())
    assert (status, answer["error"]) == (400, "invalid_grant") and "PKCE" in answer["error_description"]
    assert _redeem(idp, code, verifier)[0] == 400  # a code is good once, even after a failed try
    status, answer = _redeem(idp, code := _authorize(idp, pkce_challenge(verifier)), "")
    assert status == 400 and "PKCE" in answer["error_description"]
    code = _authorize(idp, pkce_challenge(verifier))
    status, answer = _redeem(idp, code, verifier)
    assert status == 200 and verify(config, answer["access_token"]).subject == "carol@example.com"


def test_an_expired_cached_token_is_refreshed(setup):
    config, idp, cache = setup
    idp.access_ttl = timedelta(seconds=6)
    device_login(config, idp, "alice@example.com", ["dba"])
    settings = load_config(config).login
    first = current_token(settings, min_valid=0)
    cached = TokenCache(cache).get(settings.cache_key)
    old_refresh = cached.refresh_token
    assert current_token(settings, min_valid=0) == first  # still valid: no refresh
    assert "refresh_token" not in idp.grants
    time.sleep(max(0.0, cached.expires_at - time.time()) + 0.2)
    printed = custody("token", "--min-valid", "0", "--config", str(config))
    assert printed.returncode == 0, printed.stderr
    second = printed.stdout.strip()
    assert second != first and idp.grants["refresh_token"] == 1
    assert verify(config, second).subject == "alice@example.com"
    entry = TokenCache(cache).get(settings.cache_key)
    assert entry.access_token == second and entry.refresh_token != old_refresh  # rotated
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o600
    # the rotated-out refresh token is good no more; a failed refresh says to log in again
    TokenCache(cache).put(settings.cache_key, TokenSet(second, time.time() - 1, old_refresh))
    failed = custody("token", "--config", str(config))
    assert failed.returncode != 0 and "invalid_grant" in failed.stderr and "custody login" in failed.stderr


def test_custody_token_without_login(setup):
    config, _, _ = setup
    failed = custody("token", "--config", str(config))
    assert failed.returncode == 2 and "run custody login" in failed.stderr


# --- through a real proxy -----------------------------------------------------------------------


def test_psql_through_the_proxy_with_custody_token(broker, tmp_path):
    running = start_proxy(tmp_path / "custody", broker)
    running.events = EventLog.open(running)
    config = running.config.path
    idp = dev_idp(config)
    try:
        add_login(config, idp, tmp_path / "tokens.json")
        device_login(config, idp, "alice@example.com", ["dba"])
        host, port = running.address()
        app = new_app("login")
        script = (f'PGPASSWORD=$({sys.executable} -m custody token --config {config}) '
                  f'psql "host={host} port={port} user=alice@example.com dbname=postgres sslmode=disable '
                  f'application_name={app}" -tAc "SELECT 40 + 2"')
        done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "42"
        start = running.events.session(app)[0].body
        assert start["identity"]["subject"] == "alice@example.com"
        assert start["identity"]["issuer"] == running.config.identity.issuer
    finally:
        idp.stop()
        running.events.close()
        running.background.stop()
