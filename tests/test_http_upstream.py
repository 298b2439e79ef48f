"""The HTTP proxy's upstream credentials and TLS against real nginx: Basic from a file and from the
environment (nginx's /echo shows the Authorization it received: the proxy's Basic credential, never the
client's bearer token), mTLS to an nginx with `ssl_verify_client on` against a test CA (works with
`upstream_client_cert`/`_key`, nginx refuses the same request from a proxy without them), and an https
upstream verified with `upstream_ca` (another CA: refused with the reason recorded, nothing sent in clear).
Clients: curl, http.client and aiohttp. Then the settings: which credential and TLS combinations are refused.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import os
import ssl
import subprocess
import uuid
from pathlib import Path

import aiohttp
import pytest

from ingest.settings import ConfigError, Table
from nginx_server import Nginx
from pg_fixtures import EventLog, make_tls, messages, start_proxy
from proxy.http.settings import HttpSettings
from proxy.settings import ProxySettings

BASIC_FILE = "file-user:" + uuid.uuid4().hex[:12]
BASIC_ENV = "env-user:" + uuid.uuid4().hex[:12]
BASIC_FILE_PROXY, BASIC_ENV_PROXY, MTLS, NO_CERT, WRONG_CA, MTLS_BASIC, WRONG_HOST, VERIFY_CA = range(1, 9)


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    """Same CA name, another key: what a target signed by someone else looks like."""
    return make_tls(tmp_path_factory.mktemp("other-tls"))["ca"]


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    with Nginx(tmp_path_factory.mktemp("nginx")) as server:
        yield server


@pytest.fixture(scope="module")
def nginx_mtls(tmp_path_factory, tls):
    with Nginx(tmp_path_factory.mktemp("nginx-mtls"), tls=tls, client_ca=tls["ca"]) as server:
        yield server


def _entry(name: str, upstream: str, **keys: str) -> str:
    lines = [f'[[proxy]]\nname = "{name}"\nprotocol = "http"\nlisten = "127.0.0.1:0"\nupstream = "{upstream}"']
    lines += [f'{key} = "{value}"' for key, value in keys.items()]
    return "\n" + "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory, nginx, nginx_mtls, tls, other_ca):
    directory = tmp_path_factory.mktemp("custody")
    basic = directory / "upstream.basic"
    basic.write_text(BASIC_FILE + "\n")
    basic.chmod(0o600)
    os.environ["CUSTODY_TEST_UPSTREAM_BASIC"] = BASIC_ENV
    cert = {"upstream_client_cert": tls["client_cert"], "upstream_client_key": tls["client_key"]}
    entries = "".join([
        _entry("basic-file", nginx.url, upstream_basic_file=basic),
        _entry("basic-env", nginx.url, upstream_basic_env="CUSTODY_TEST_UPSTREAM_BASIC"),
        _entry("mtls", nginx_mtls.url, upstream_ca=tls["ca"], **cert),
        _entry("no-cert", nginx_mtls.url, upstream_ca=tls["ca"]),
        _entry("wrong-ca", nginx_mtls.url, upstream_ca=other_ca, **cert),
        _entry("mtls-basic", nginx_mtls.url, upstream_ca=tls["ca"], upstream_basic_env="CUSTODY_TEST_UPSTREAM_BASIC",
               **cert),
        # the certificate names 127.0.0.1 only
        _entry("wrong-host", f"https://localhost:{nginx_mtls.port}", upstream_ca=tls["ca"], **cert),
        _entry("verify-ca", f"https://localhost:{nginx_mtls.port}", upstream_ca=tls["ca"], upstream_tls="verify-ca",
               **cert),
    ])
    running = start_proxy(directory, broker, extra_proxies=entries)
    running.events = EventLog.open(running)
    yield running
    running.events.close()
    running.background.stop()


def agent(prefix: str) -> str:
    """A unique User-Agent: how a test finds its session among the events."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def session(proxy, user_agent: str):
    found = proxy.events.find(lambda start: start["client_application"] == user_agent)
    assert len(found) == 1, f"expected one session of {user_agent}, got {len(found)}"
    return found[0]


def relayed(events, direction: str) -> bytes:
    return b"".join(m["data"] for m in messages(events, direction))


def basic(credential: str) -> str:
    return "Basic " + base64.b64encode(credential.encode()).decode()


def test_basic_from_a_file_reaches_nginx_and_the_clients_token_does_not(proxy):
    host, port = proxy.address(BASIC_FILE_PROXY)
    token, user_agent = proxy.token(), agent("curl-basic")
    out = subprocess.run(["curl", "-sS", "-A", user_agent, "-H", f"Authorization: Bearer {token}",
                          f"http://{host}:{port}/echo"], capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["authorization"] == basic(BASIC_FILE)  # the file's trailing newline is not in it
    events = session(proxy, user_agent)
    assert events[0].body["attributes"]["upstream_credential"] == "basic"
    client_side = relayed(events, "client")
    assert token[:20].encode() not in client_side and b"[REDACTED]" in client_side
    assert basic(BASIC_FILE).encode() not in client_side  # the request record is what the client sent


def test_basic_from_the_environment_with_http_client(proxy):
    host, port = proxy.address(BASIC_ENV_PROXY)
    token, user_agent = proxy.token(), agent("httpclient-basic")
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        for _ in range(2):  # keep-alive: the credential is injected into every request
            connection.request("GET", "/echo", headers={"Authorization": f"Bearer {token}", "User-Agent": user_agent})
            answer = connection.getresponse()
            seen = json.loads(answer.read())
            assert answer.status == 200 and seen["authorization"] == basic(BASIC_ENV)
            assert token not in json.dumps(seen)
    finally:
        connection.close()
    events = session(proxy, user_agent)
    assert events[0].body["attributes"]["upstream_credential"] == "basic"
    assert [m["text"] for m in messages(events, "client") if m["type"] == "Request"] == ["GET /echo"] * 2
    assert basic(BASIC_ENV).encode() not in relayed(events, "client")


def fetch(proxy, index: int, user_agent: str, path: str = "/index.html") -> tuple[int, str]:
    """aiohttp through the proxy: (status, body)."""
    host, port = proxy.address(index)

    async def run() -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {proxy.token()}", "User-Agent": user_agent}
        async with aiohttp.ClientSession(headers=headers) as client:
            async with client.get(f"http://{host}:{port}{path}") as answer:
                return answer.status, await answer.text()
    return asyncio.run(run())


def test_mtls_with_the_client_certificate_succeeds_verified_with_upstream_ca(proxy, tls, nginx_mtls):
    # nginx itself refuses a client without the certificate (checked directly, so the next assertions mean something)
    direct = ssl.create_default_context(cafile=tls["ca"])
    connection = http.client.HTTPSConnection("127.0.0.1", nginx_mtls.port, context=direct, timeout=10)
    connection.request("GET", "/index.html")
    assert connection.getresponse().status == 400
    connection.close()

    user_agent = agent("aiohttp-mtls")
    assert fetch(proxy, MTLS, user_agent) == (200, "<h1>hello from nginx</h1>\n")
    start = session(proxy, user_agent)[0].body
    assert start["upstream"] == nginx_mtls.url and start["attributes"]["upstream_credential"] == "client_cert"
    assert start["attributes"]["upstream_tls"].startswith("TLSv1.")
    assert start["attributes"]["upstream_cert_sha256"] == server_cert_sha256(tls)


def test_basic_over_mtls_presents_both_and_the_events_name_both(proxy):
    user_agent = agent("aiohttp-mtls-basic")
    status, body = fetch(proxy, MTLS_BASIC, user_agent, "/echo")
    assert status == 200 and json.loads(body)["authorization"] == basic(BASIC_ENV)
    start = session(proxy, user_agent)[0].body
    assert start["attributes"]["upstream_credential"] == "basic+client_cert"


def test_without_the_client_certificate_nginx_refuses(proxy, tls):
    user_agent = agent("aiohttp-no-cert")
    status, body = fetch(proxy, NO_CERT, user_agent)
    assert status == 400 and "No required SSL certificate was sent" in body
    start = session(proxy, user_agent)[0].body
    assert start["attributes"]["upstream_credential"] == "none"
    assert start["attributes"]["upstream_cert_sha256"] == server_cert_sha256(tls)  # TLS itself was verified


def test_verify_ca_does_not_check_the_host_name(proxy, tls):
    user_agent = agent("aiohttp-verify-ca")
    assert fetch(proxy, VERIFY_CA, user_agent) == (200, "<h1>hello from nginx</h1>\n")
    assert session(proxy, user_agent)[0].body["attributes"]["upstream_cert_sha256"] == server_cert_sha256(tls)


@pytest.mark.parametrize("index, reason", [
    (WRONG_CA, "certificate verify failed"),  # same CA name, another key: "certificate signature failure"
    (WRONG_HOST, "Hostname mismatch"),
], ids=["wrong-ca", "wrong-host"])
def test_an_unverified_upstream_is_refused_with_the_reason_and_nothing_is_sent(proxy, nginx_mtls, index, reason):
    before = (nginx_mtls.dir / "access.log").read_text()
    user_agent = agent("aiohttp-unverified")
    status, body = fetch(proxy, index, user_agent, "/echo")
    problem = json.loads(body)
    assert status == 502 and reason in problem["detail"] and "is unavailable" in problem["detail"]
    events = session(proxy, user_agent)
    start, end = events[0].body, events[-1].body
    assert start["identity"]["subject"] == "alice@example.com"  # who tried, though the target was refused
    assert "upstream_tls" not in start["attributes"] and end["reason"] == "upstream_unavailable"
    answer = b"".join(m["data"] for m in messages(events, "server") if m["attributes"].get("origin") == "proxy")
    assert reason.encode() in answer  # the reason, in the evidence as the client got it
    assert (nginx_mtls.dir / "access.log").read_text() == before  # not one request reached nginx, in clear or not


def server_cert_sha256(tls) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(tls["server_cert"].read_text())).hexdigest()


def _settings(**raw: str) -> HttpSettings:
    entry = {"name": "web", "protocol": "http", "listen": "127.0.0.1:0", **raw}
    table = Table(Path("/etc/custody/custody.toml"), "proxy.1", entry)
    return HttpSettings.from_config(ProxySettings.from_table(table))


def test_upstream_credential_and_tls_settings(tls, monkeypatch):
    monkeypatch.setenv("CUSTODY_TEST_BASIC", "u:p")
    monkeypatch.setenv("CUSTODY_TEST_TOKEN", "tok")
    cert = {"upstream_client_cert": str(tls["client_cert"]), "upstream_client_key": str(tls["client_key"])}
    basic_env = _settings(upstream="http://127.0.0.1:1", upstream_basic_env="CUSTODY_TEST_BASIC")
    assert (basic_env.authorization, basic_env.credential, basic_env.upstream_tls.mode) == (
        b"Basic " + base64.b64encode(b"u:p"), "basic", "disable")
    mtls = _settings(upstream="https://127.0.0.1:1", upstream_ca=str(tls["ca"]), **cert)
    assert (mtls.authorization, mtls.credential, mtls.upstream_tls.mode) == (None, "client_cert", "verify-full")
    both = _settings(upstream="https://127.0.0.1:1", upstream_ca=str(tls["ca"]),
                     upstream_bearer_env="CUSTODY_TEST_TOKEN", **cert)
    assert (both.authorization, both.credential) == (b"Bearer tok", "bearer+client_cert")  # the events name both
    assert _settings(upstream="https://127.0.0.1:1").credential == "none"
    for raw, message in [
        ({"upstream_basic_env": "CUSTODY_TEST_TOKEN"}, "upstream_basic: expected user:password"),
        ({"upstream_basic_env": "CUSTODY_TEST_BASIC", "upstream_bearer_env": "CUSTODY_TEST_TOKEN"},
         "upstream_bearer: set upstream_bearer_* or upstream_basic_*, not both"),
        (cert, 'upstream_client_cert: has no effect with upstream_tls = "disable"'),  # mTLS needs https
        ({"upstream_tls": "verify-full"}, "upstream_tls: needs an https:// upstream"),
        ({"upstream": "http://user:secret@127.0.0.1:1"}, "upstream: credentials are never inline"),
        ({"upstream": "https://127.0.0.1:1", "upstream_tls": "disable"},  # would send the credential in clear
         'upstream_tls: cannot be "disable" with an https:// upstream'),
        ({"upstream": "https://127.0.0.1:1", "upstream_client_key": str(tls["client_key"])},
         "upstream_client_key: needs upstream_client_cert"),
    ]:
        with pytest.raises(ConfigError) as error:
            _settings(**{"upstream": "http://127.0.0.1:1", **raw})
        assert message in str(error.value), error.value
