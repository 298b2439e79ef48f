"""The HTTP proxy with real components: Debian's nginx as the target, curl and aiohttp as clients,
the dev broker; every request and response recorded (read back verified from Kafka), the upstream
credential injected and the client's token never forwarded, JSON masked, blocks as 403, smuggling
shapes refused with 400, a ProtocolError event and SessionEnd(protocol_error).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import time
import uuid

import aiohttp
import pytest

from nginx_server import CONFIG_JSON, Nginx
from pg_fixtures import EventLog, messages, start_proxy
from ingest.sealing import open_sealed

UPSTREAM_TOKEN = "upstream-secret-" + uuid.uuid4().hex[:8]
MAX_BODY = 2048
DBA, DEV = ("alice@example.com", ("dba",)), ("eve@example.com", ("dev",))
POLICY_RULES = """
[[rule]]
name = "block-http-admin-writes"
action = "block"
message = "writes under /admin/ are not allowed through Custody"
protocols = ["http"]
attributes = { method = ["POST", "PUT", "PATCH", "DELETE"] }
text = '^\\S+ /admin/'
"""


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    directory = tmp_path_factory.mktemp("nginx")
    with Nginx(directory) as server:
        (directory / "www" / "big.json").write_text(json.dumps({"rows": [{"email": f"user{i}@example.org"}
                                                                          for i in range(200)]}))
        yield server


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory, nginx):
    os.environ["CUSTODY_TEST_UPSTREAM_TOKEN"] = UPSTREAM_TOKEN
    extra = f"""
[[proxy]]
name = "web"
protocol = "http"
listen = "127.0.0.1:0"
upstream = "{nginx.url}"
upstream_bearer_env = "CUSTODY_TEST_UPSTREAM_TOKEN"
max_body_bytes = {MAX_BODY}
policy = "policies/default.toml"
"""
    directory = tmp_path_factory.mktemp("custody")
    running = start_proxy(directory, broker, extra_proxies=extra)
    policy = directory / "policies" / "default.toml"
    policy.write_text(policy.read_text() + POLICY_RULES)
    running.events = EventLog.open(running)
    time.sleep(1.1)  # the policy file is looked at again at most once a second (PolicyHolder.check_interval)
    yield running
    running.events.close()
    running.background.stop()


def url(proxy, path: str) -> str:
    host, port = proxy.address(1)
    return f"http://{host}:{port}{path}"


def curl(proxy, *args: str, who=DBA, token: str | None = None, agent: str | None = None) -> tuple[int, bytes, str]:
    """curl through the proxy; (status of the last response, body, user agent = how a test finds its session)."""
    agent = agent or f"curl-t-{uuid.uuid4().hex[:10]}"
    token = token if token is not None else proxy.token(who[0], who[1])
    header = ["-H", f"Authorization: Bearer {token}"] if token else []
    out = subprocess.run(["curl", "-sS", "-A", agent, *header, "-w", "\n%{http_code}", *args],
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    body, _, status = out.stdout.rpartition(b"\n")
    return int(status), body, agent


def session(proxy, agent: str):
    found = proxy.events.find(lambda start: start["client_application"] == agent)
    assert len(found) == 1, f"expected one session of {agent}, got {len(found)}"
    return found[0]


def records(events, kind: str | None = None, direction: str | None = None) -> list[dict]:
    return [m for m in messages(events, direction) if kind is None or m["type"] == kind]


def test_get_through_nginx_is_recorded_with_the_token_redacted_and_the_upstream_credential_injected(proxy, nginx):
    status, body, agent = curl(proxy, url(proxy, "/index.html"))
    assert (status, body) == (200, b"<h1>hello from nginx</h1>\n")
    status, echo, _ = curl(proxy, url(proxy, "/echo"))
    assert status == 200
    seen = json.loads(echo)
    assert seen["authorization"] == f"Bearer {UPSTREAM_TOKEN}"  # what reached nginx: the proxy's credential

    events = session(proxy, agent)
    start = events[0].body
    assert start["protocol"] == "http" and start["identity"]["subject"] == DBA[0]
    assert start["upstream"] == nginx.url and start["attributes"]["upstream_credential"] == "bearer"
    requests = records(events, "Request")
    assert [r["text"] for r in requests] == ["GET /index.html"]  # the second curl is its own connection
    request = requests[0]
    assert request["operation"] == "request" and request["attributes"]["redacted"] == "authorization"
    assert b"[REDACTED]" in request["data"] and proxy.token(*DBA)[:20].encode() not in request["data"]
    assert UPSTREAM_TOKEN.encode() not in b"".join(m["data"] for m in messages(events, "client"))
    response = records(events, "Response")[0]
    assert (response["attributes"]["status"], response["outcome"]) == ("200", "ok")
    assert b"".join(m["data"] for m in records(events, "Data", "server")) == b"<h1>hello from nginx</h1>\n"
    assert events[-1].body["reason"] in ("client_disconnect", "client_terminate")


def test_keep_alive_pipelining_chunked_and_large_bodies(proxy, nginx):
    agent = f"curl-t-{uuid.uuid4().hex[:10]}"
    out = subprocess.run(["curl", "-sS", "-A", agent, "-H", f"Authorization: Bearer {proxy.token(*DBA)}",
                          url(proxy, "/index.html"), url(proxy, "/chunked/page.html"), url(proxy, "/big.bin"),
                          "-o", "/dev/null", "-o", "/dev/null", "-o", os.devnull, "-w", "%{http_code} "],
                         capture_output=True, timeout=30)
    assert out.stdout.split() == [b"200", b"200", b"200"], out.stderr
    events = session(proxy, agent)  # one connection, three requests
    assert [r["text"] for r in records(events, "Request")] == ["GET /index.html", "GET /chunked/page.html",
                                                               "GET /big.bin"]
    server_data = b"".join(m["data"] for m in records(events, "Data", "server"))
    big = (nginx.dir / "www" / "big.bin").read_bytes()
    assert server_data.endswith(big)  # every relayed byte is in the evidence

    # Pipelining: two requests in one write; the answers come back in order on the same connection.
    host, port = proxy.address(1)
    token = proxy.token(*DBA)
    agent = f"raw-{uuid.uuid4().hex[:8]}"
    request = (f"GET /index.html HTTP/1.1\r\nHost: x\r\nUser-Agent: {agent}\r\nAuthorization: Bearer {token}\r\n\r\n"
               f"GET /api/user HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
    with socket.create_connection((host, port), 10) as sock:
        sock.sendall(request.encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.count(b"HTTP/1.1 200 OK") == 2 and answer.index(b"hello from nginx") < answer.index(b'"id":1')

    # aiohttp: a streamed 1 MiB upload and a download with the same session, keep-alive.
    async def run() -> tuple[str, str]:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as client:
            async with client.post(url(proxy, "/upload"), data=b"u" * (1 << 20)) as answer:
                uploaded = await answer.text()
            async with client.get(url(proxy, "/big.bin")) as answer:
                digest = hashlib.sha256(await answer.read()).hexdigest()
        return uploaded, digest
    uploaded, digest = asyncio.run(run())
    assert uploaded == "got 1048576 bytes" and digest == hashlib.sha256(big).hexdigest()

    # Expect: 100-continue (curl sends it for large bodies and waits for the 100).
    status, body, _ = curl(proxy, "-H", "Expect: 100-continue", "--data-binary", "@" + str(nginx.dir / "www" / "big.bin"),
                           url(proxy, "/upload"))
    assert (status, body) == (200, f"got {3 << 20} bytes".encode())


def test_tokens_are_checked_on_every_request(proxy):
    status, body, agent = curl(proxy, url(proxy, "/index.html"), token="")
    assert status == 401 and json.loads(body)["detail"].startswith("custody: missing_token")
    status, body, _ = curl(proxy, url(proxy, "/index.html"), token="not-a-jwt")
    assert status == 401 and json.loads(body)["status"] == 401
    events = session(proxy, agent)
    assert events[0].body["identity"] is None
    denial = [e.body for e in events if e.kind == "policy_decision"][0]
    assert (denial["rule"], denial["action"]) == ("authentication", "deny")
    assert events[-1].body["reason"] == "auth_failed"

    # Another subject's token on a connection bound to alice: 401, and the connection ends.
    host, port = proxy.address(1)
    agent = f"raw-{uuid.uuid4().hex[:8]}"
    with socket.create_connection((host, port), 10) as sock:
        sock.sendall(f"GET /index.html HTTP/1.1\r\nHost: x\r\nUser-Agent: {agent}\r\n"
                     f"Authorization: Bearer {proxy.token(*DBA)}\r\n\r\n".encode())
        first = b""
        while b"</h1>" not in first:
            first += sock.recv(65536)
        sock.sendall(f"GET /index.html HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {proxy.token(*DEV)}\r\n\r\n".encode())
        second = b""
        while chunk := sock.recv(65536):
            second += chunk
    assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 401")
    assert b"subject_mismatch" in second


def test_json_masking_column_rules_and_the_body_limit(proxy):
    status, body, agent = curl(proxy, url(proxy, "/api/user"), who=DEV)
    user = json.loads(body)
    assert status == 200 and user["name"] == "Ada" and user["note"] == "nothing secret"
    assert "ada.lovelace" not in user["email"] and "4111 1111 1111 1111" not in user["card"]
    status, body, _ = curl(proxy, url(proxy, "/api/config"), who=DEV)
    assert json.loads(body) == {**json.loads(CONFIG_JSON), "password": "[MASKED:column]"}
    status, body, _ = curl(proxy, url(proxy, "/api/user"), who=DBA)
    assert b"ada.lovelace@example.org" in body  # dba is exempt

    events = session(proxy, agent)
    (data,) = records(events, "Data", "server")
    assert b"ada.lovelace" not in data["data"] and data["attributes"]["masked"]
    key = proxy.directory / "keys" / "custodian.key"
    from nacl.public import PrivateKey
    import base64
    original = open_sealed(data["sealed_original"], PrivateKey(base64.b64decode(key.read_text())))
    assert b"ada.lovelace@example.org" in original

    # Larger than max_body_bytes and it must be masked: 502, never relayed unmasked.
    status, body, agent = curl(proxy, url(proxy, "/big.json"), who=DEV)
    assert status == 502 and b"max_body_bytes" in body and b"@example.org" not in body
    events = session(proxy, agent)
    unrelayed = [m for m in records(events, "Data", "server") if m["attributes"].get("unrelayed")]
    assert unrelayed and unrelayed[0]["data"] == b"" and unrelayed[0]["sealed_original"]
    # Not maskable (binary): relayed whatever its size.
    status, _, _ = curl(proxy, url(proxy, "/big.bin"), "-o", os.devnull, who=DEV)
    assert status == 200


def test_block_is_a_403_problem_and_never_reaches_nginx(proxy, nginx):
    status, body, agent = curl(proxy, "-X", "DELETE", url(proxy, "/admin/users/7"), who=DEV)
    problem = json.loads(body)
    assert status == 403 and problem["rule"] == "block-http-admin-writes" and problem["status"] == 403
    assert "/admin/users/7" not in (nginx.dir / "access.log").read_text()
    events = session(proxy, agent)
    decision = [e.body for e in events if e.kind == "policy_decision"][0]
    assert (decision["action"], decision["rule"], decision["statement"]) == (
        "block", "block-http-admin-writes", "DELETE /admin/users/7")
    status, _, _ = curl(proxy, url(proxy, "/admin/users/7"), who=DEV)  # GET is not a write
    assert status == 404


@pytest.mark.parametrize("request_bytes", [
    b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
    b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5x\r\n\r\nhello",
    b"GET /index.html HTTP/1.1\nHost: x\n\n",
    b"GET /index.html HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
    b"GET /index.html HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
], ids=["cl-te", "duplicate-cl", "duplicate-equal-cl", "cl-list", "non-numeric-cl", "bare-lf", "obs-fold",
        "oversized-head"])
def test_request_smuggling_shapes_get_400_and_never_reach_nginx(proxy, nginx, request_bytes):
    host, port = proxy.address(1)
    marker = uuid.uuid4().hex[:8]
    token = proxy.token(*DBA)
    request_bytes = request_bytes.replace(b"Host: x", f"Host: x\r\nAuthorization: Bearer {token}\r\nX-M: {marker}".encode()
                                          if b"\r\n" in request_bytes[:40] else
                                          f"Host: x\nAuthorization: Bearer {token}\nX-M: {marker}".encode())
    before = (nginx.dir / "access.log").read_text().count("\n")
    with socket.create_connection((host, port), 10) as sock:
        source = "%s:%d" % sock.getsockname()  # finds the session: the head is refused before its User-Agent
        sock.sendall(request_bytes)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert (nginx.dir / "access.log").read_text().count("\n") == before
    found = proxy.events.find(lambda start: start["source_address"] == source)
    assert len(found) == 1, f"expected one session from {source}, got {len(found)}"
    events = found[0]
    (error,) = [e.body for e in events if e.kind == "protocol_error"]
    assert error["code"] == "400" and error["message"] and error["sample"]
    assert events[-1].kind == "session_end" and events[-1].body["reason"] == "protocol_error"
    # Other connections are unaffected.
    status, _, _ = curl(proxy, url(proxy, "/index.html"))
    assert status == 200


def test_a_response_that_ends_before_its_request_body_does_not_stall_the_connection(proxy):
    """nginx's `return` answers once it has the head; the body comes after the response has ended. The next
    request on that keep-alive connection must still be relayed (it once hung: the exchange only moved on when
    the response ended last). Found by tests/system."""
    host, port = proxy.address(1)
    token = proxy.token(*DBA)
    head = (f"POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 10\r\n"
            f"User-Agent: early-{uuid.uuid4().hex[:8]}\r\n\r\n").encode()
    with socket.create_connection((host, port), 10) as sock:
        sock.sendall(head)
        first = b""
        while b"got 10 bytes" not in first:
            chunk = sock.recv(65536)
            assert chunk, first
            first += chunk
        assert first.startswith(b"HTTP/1.1 200"), first
        sock.sendall(b"0123456789" + f"GET /index.html HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
                     .encode())
        second = b""
        while b"hello from nginx" not in second:
            chunk = sock.recv(65536)
            assert chunk, second
            second += chunk
        assert second.startswith(b"HTTP/1.1 200"), second




def raw_request(proxy, request: str) -> bytes:
    """One request on its own connection (Connection: close), written as given: shapes curl would normalise."""
    host, port = proxy.address(1)
    with socket.create_connection((host, port), 10) as sock:
        sock.sendall(request.encode())
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    return answer


@pytest.mark.parametrize("target", ["http://127.0.0.1/admin/users/7", "//admin/users/7", "/%61dmin/users/7",
                                    "/admin%2Fusers/7"], ids=["absolute-form", "double-slash", "encoded", "encoded-slash"])
def test_a_block_is_not_evaded_by_another_spelling_of_the_path(proxy, nginx, target):
    """nginx routes each of these to /admin/users/7; the policy must see that path too (they once reached nginx)."""
    agent = f"raw-{uuid.uuid4().hex[:8]}"
    answer = raw_request(proxy, f"DELETE {target} HTTP/1.1\r\nHost: x\r\nUser-Agent: {agent}\r\n"
                                f"Authorization: Bearer {proxy.token(*DEV)}\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert "DELETE /admin/users/7" not in (nginx.dir / "access.log").read_text()
    assert f"DELETE {target}" not in (nginx.dir / "access.log").read_text()
    events = session(proxy, agent)
    decision = [e.body for e in events if e.kind == "policy_decision"][0]
    assert (decision["action"], decision["statement"]) == ("block", "DELETE /admin/users/7")
    (request,) = records(events, "Request")
    assert request["data"].startswith(f"DELETE {target} HTTP/1.1".encode())  # the evidence: what the client sent


def test_absolute_form_is_relayed_as_origin_form_and_dot_segments_are_refused(proxy, nginx):
    token = proxy.token(*DBA)
    answer = raw_request(proxy, f"GET http://elsewhere.example/index.html HTTP/1.1\r\nHost: x\r\n"
                                f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello from nginx</h1>\n")
    assert "GET /index.html HTTP/1.1" in (nginx.dir / "access.log").read_text().splitlines()[-1]
    for target in ("/x/../admin/users/7", "/x/%2e%2e/admin/users/7", "/./index.html"):
        before = (nginx.dir / "access.log").read_text()
        answer = raw_request(proxy, f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400") and b"dot segment" in answer, answer[:300]
        assert (nginx.dir / "access.log").read_text() == before
