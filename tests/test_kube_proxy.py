"""The Kubernetes proxy with the real kubectl binaries against the Kubernetes API test stand-in
(tests/kube_server.py): discovery, get/list as Tables, masked Secrets, a blocked `delete secret`, a held
`delete` that a reviewer approves, a bad token, a watch recorded as it streams, and `get` + `exec` with every
kubectl on the machine (1.27-1.29 exec over SPDY/3.1, 1.30-1.33 over WebSocket v5.channel.k8s.io) recorded per
channel; `exec -i` and `attach -i` with stdin on both transports; `kubectl port-forward` over SPDY/3.1 (1.28) and
SPDY tunnelled in WebSocket (1.32), its streams recorded per port and each pod:port under policy (a refused port
resets only its own streams; the tunnel's other ports go on).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import threading
import time

import pexpect
import pytest
from click.testing import CliRunner

from custody.commands.approvals import approvals_group, read_approvals
from kube_fixtures import (DELETE_RULES, KUBECTL, KUBECTL_SPDY, KUBECTL_VERSIONS, UPSTREAM_TOKEN, Kubectl,
                           all_messages, decisions, kube, sessions, start_kube_proxy, tls)  # noqa: F401 (kube, tls)
from pg_fixtures import EventLog, messages

POLICY_RULES = DELETE_RULES + """
[[rule]]
name = "no-forward-to-9999"
action = "block"
message = "port 9999 is not to be forwarded"
protocols = ["kubernetes"]
operations = ["forward"]
objects = ["*:9999"]
"""


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory, kube, tls):
    running = start_kube_proxy(tmp_path_factory.mktemp("custody"), broker, kube, tls, POLICY_RULES,
                               hold_timeout_seconds=20)
    running.events = EventLog.open(running)
    yield running
    running.events.close()
    running.background.stop()


def test_get_and_list_with_kubectl_decoded_into_verbs_and_the_credential_injected(proxy, kube, tls, tmp_path):
    kubectl = Kubectl(proxy, tls, tmp_path)
    got = kubectl("get", "pods")
    assert got.returncode == 0, got.stderr
    assert got.stdout.split("\n")[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert "web-1" in got.stdout and "Running" in got.stdout
    # The target saw only the proxy's credential, never the client's token.
    assert {auth for _, _, auth in kube.requests} == {f"Bearer {UPSTREAM_TOKEN}"}

    found = sessions(proxy, kubectl.subject)
    assert all(events[0].body["protocol"] == "kubernetes" for events in found)
    requests = [m for m in all_messages(found, "client") if m["type"] == "Request"]
    listing = next(m for m in requests if m["text"].startswith("GET /api/v1/namespaces/default/pods"))
    attributes = listing["attributes"]
    assert (attributes["verb"], attributes["resource"], attributes["namespace"], attributes["version"]) == (
        "list", "pods", "default", "v1")
    assert attributes["kubectl_command"] == "kubectl get" and listing["objects"] == ["pods"]
    assert any(m["text"].startswith("GET /api?") or m["text"].startswith("GET /api/v1") for m in requests)


def test_secret_data_is_masked_base64_inside(proxy, tls, tmp_path):
    kubectl = Kubectl(proxy, tls, tmp_path)
    got = kubectl("get", "secret", "db-creds", "-o", "json")
    assert got.returncode == 0, got.stderr
    data = {k: base64.b64decode(v).decode() for k, v in json.loads(got.stdout)["data"].items()}
    assert data["password"] == "[MASKED:column]" and "ops.lead" not in data["contact"]
    assert data["note"] == "rotated monthly"
    dba = Kubectl(proxy, tls, tmp_path, groups=("dba",))
    clear = json.loads(dba("get", "secret", "db-creds", "-o", "json").stdout)["data"]
    assert base64.b64decode(clear["password"]) == b"hunter2-secret"


def test_delete_secret_is_blocked_with_a_status_and_never_reaches_the_cluster(proxy, kube, tls, tmp_path):
    kubectl = Kubectl(proxy, tls, tmp_path)
    got = kubectl("delete", "secret", "db-creds", "--wait=false")
    assert got.returncode != 0
    assert "Error from server (Forbidden)" in got.stderr and "deleting secrets is not allowed" in got.stderr
    assert not any(method == "DELETE" for method, _, _ in kube.requests)
    assert "db-creds" in kube.objects["secrets"]
    assert decisions(proxy, kubectl.subject) == [("block", "block-secret-deletes", "DELETE /api/v1/namespaces/default/secrets/db-creds")]


def test_held_delete_runs_once_a_dba_approves(proxy, kube, tls, tmp_path):
    kubectl = Kubectl(proxy, tls, tmp_path)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run=kubectl("delete", "configmap", "app-config",
                                                                        "--wait=false")))
    thread.start()
    deadline = time.monotonic() + 20
    request = None
    while request is None:
        assert time.monotonic() < deadline, "no approval request"
        pending = read_approvals(proxy.config).pending()
        request = next((r for r in pending if r.requester.get("subject") == kubectl.subject), None)
        time.sleep(0.3)
    assert request.statement == "DELETE /api/v1/namespaces/default/configmaps/app-config"
    assert "app-config" in kube.objects["configmaps"]  # still held
    approved = CliRunner().invoke(approvals_group, ["approve", request.request_id, "--reason", "CHG-7",
                                        "--token", proxy.token("bob@example.com", ("dba",)),
                                        "--config", str(proxy.config.path)])
    assert approved.exit_code == 0, approved.output
    thread.join(30)
    assert result["run"].returncode == 0, result["run"].stderr
    assert 'configmap "app-config" deleted' in result["run"].stdout
    assert "app-config" not in kube.objects["configmaps"]


def test_a_bad_token_is_401(proxy, tls, tmp_path):
    kubectl = Kubectl(proxy, tls, tmp_path, token="not-a-token")
    got = kubectl("get", "pods")
    assert got.returncode != 0 and ("Unauthorized" in got.stderr or "credentials" in got.stderr)


def test_watch_events_are_recorded_as_they_stream(proxy, tls, tmp_path):
    kubectl = Kubectl(proxy, tls, tmp_path)
    watch = subprocess.Popen(kubectl.argv("get", "pods", "-w", "--output-watch-events"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=kubectl.env)
    time.sleep(3)
    proxy.flush()
    # The watch is still open, and its events are already in the evidence.
    deadline, streamed = time.monotonic() + 15, []
    while not streamed and time.monotonic() < deadline:
        proxy.events.poll(0.5)
        streamed = [m for events in proxy.events.sessions.values()
                    if events and events[0].kind == "session_start"
                    and (events[0].body["identity"] or {}).get("subject") == kubectl.subject
                    for m in messages(events, "server") if m["type"] == "Data" and b'"MODIFIED"' in m["data"]]
    assert watch.poll() is None  # still watching
    watch.terminate()
    out, _ = watch.communicate(10)
    assert "MODIFIED" in out and "web-1" in out
    assert streamed, "the watch's events were not recorded while it was open"


@pytest.mark.parametrize("binary,transport", KUBECTL_VERSIONS)
def test_get_and_exec_with_every_kubectl_recorded_per_channel(proxy, kube, tls, tmp_path, binary, transport):
    kubectl = Kubectl(proxy, tls, tmp_path)
    listed = kubectl("get", "pod", "web-1", "-o", "name", binary=binary)
    assert (listed.returncode, listed.stdout) == (0, "pod/web-1\n"), listed.stderr
    got = kubectl("exec", "web-1", "--", "echo", "hi", binary=binary)
    assert got.returncode == 0, got.stderr
    assert got.stdout == "hi\n"
    assert kube.execs[-1]["transport"] == transport and kube.execs[-1]["command"] == ["echo", "hi"]

    found = sessions(proxy, kubectl.subject, at_least=2,
                     until=lambda records: any(m.get("operation") == "command" for m in records))
    records = all_messages(found)
    command = next(m for m in records if m.get("operation") == "command")
    assert command["text"] == "echo hi" and command["attributes"]["verb"] == "exec"
    assert command["attributes"]["name"] == "web-1" and command["objects"] == ["pods/web-1/exec"]
    stdout = b"".join(m["data"] for m in records if m.get("channel") == "1" and m["type"].endswith(("binary", "data")))
    assert stdout == b"hi\n"
    status = next(m for m in records if m.get("channel") == "3" and m["data"])
    assert json.loads(status["data"])["status"] == "Success" and status["outcome"] == "ok"

    # a failed command: kubectl's exit status, and the recorded outcome the error channel's Status gives
    failed = kubectl("exec", "web-1", "--", "sh", "-c", "exit 3", binary=binary)
    assert failed.returncode == 3, failed.stderr
    found = sessions(proxy, kubectl.subject, at_least=3, until=lambda records: any(
        m.get("channel") == "3" and m.get("outcome") == "error" for m in records))
    exit_3 = next(m for m in all_messages(found) if m.get("channel") == "3" and m.get("outcome") == "error")
    assert exit_3["error_code"] == "3" and "exit status 3" in exit_3["error_message"]


BOTH = pytest.mark.parametrize("binary,transport", [(KUBECTL, "websocket"), (KUBECTL_SPDY, "spdy/3.1")],
                               ids=["kubectl-1.32-websocket", "kubectl-1.28-spdy"])


@BOTH
@pytest.mark.parametrize("verb", ["exec", "attach"])
def test_stdin_of_exec_and_attach_is_relayed_and_recorded_on_channel_0(proxy, kube, tls, tmp_path, binary,
                                                                       transport, verb):
    kubectl = Kubectl(proxy, tls, tmp_path)
    args = ["exec", "-i", "web-1", "--", "cat"] if verb == "exec" else ["attach", "-i", "web-1"]
    got = kubectl(*args, binary=binary, input="line one\nline two\n")
    assert got.returncode == 0, got.stderr
    assert got.stdout.endswith("line one\nline two\n")
    run = kube.execs[-1]
    assert (run["kind"], run["transport"], run["stdin"]) == (verb, transport, b"line one\nline two\n")

    def opening(records: list[dict]) -> list[dict]:
        return [m for m in records if m["type"] == "Request"
                and f"/{verb}?" in (m["attributes"] or {}).get("request", m["text"])]

    records = all_messages(sessions(proxy, kubectl.subject, at_least=2, until=opening))
    opened, = opening(records)
    assert opened["attributes"]["verb"] == verb
    stdin = b"".join(m["data"] for m in records if m.get("channel") == "0" and m["type"] != "Request")
    stdout = b"".join(m["data"] for m in records if m.get("channel") == "1")
    assert stdin.rstrip(b"\x04") == b"line one\nline two\n" and stdout == b"line one\nline two\n"


class PortForward:
    """`kubectl port-forward pod/web-1 :PORT...` running; `locals[PORT]` is the local port it listens on for
    PORT, `local` the first one's."""

    def __init__(self, kubectl: Kubectl, binary: str, *ports: int) -> None:
        self.process = subprocess.Popen(kubectl.argv("port-forward", "pod/web-1", *(f":{p}" for p in ports),
                                                     binary=binary),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=kubectl.env)
        self.locals: dict[int, int] = {}
        while len(self.locals) < len(ports):
            line = self.process.stdout.readline()
            found = re.search(r"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)", line)
            assert line, self.process.stderr.read() if self.process.poll() is not None else "no output"
            if found:
                self.locals[int(found.group(2))] = int(found.group(1))
        self.local = self.locals[ports[0]]

    def exchange(self, payload: bytes, expect: int, port: int | None = None) -> bytes:
        with socket.create_connection(("127.0.0.1", self.locals[port] if port else self.local), timeout=10) as conn:
            conn.sendall(payload)
            got = b""
            while len(got) < expect:
                try:
                    chunk = conn.recv(65536)
                except ConnectionResetError:  # kubectl drops the local connection when its stream fails
                    break
                if not chunk:
                    break
                got += chunk
            return got

    def stop(self) -> tuple[str, str]:
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.communicate(10)


@pytest.mark.parametrize("binary,transport", [(KUBECTL, "websocket/spdy"), (KUBECTL_SPDY, "spdy/3.1")],
                         ids=["kubectl-1.32-spdy-in-websocket", "kubectl-1.28-spdy"])
def test_port_forward_is_relayed_and_its_streams_recorded_per_port(proxy, kube, tls, tmp_path, binary, transport):
    kubectl = Kubectl(proxy, tls, tmp_path)
    forward = PortForward(kubectl, binary, 8080)
    try:
        assert forward.exchange(b"GET / HTTP/1.0\r\n\r\n", 23) == b"echo:GET / HTTP/1.0\r\n\r\n"
        assert forward.exchange(b"second", 11) == b"echo:second"  # a second connection, a second stream pair
    finally:
        forward.stop()
    run = next(r for r in reversed(kube.execs) if r["kind"] == "portforward")
    assert run["transport"] == transport and run["forwarded"] == {"8080": b"GET / HTTP/1.0\r\n\r\nsecond"}

    found = sessions(proxy, kubectl.subject, until=lambda records: any(
        m["type"] == "Request" and "/portforward" in m["text"] for m in records))
    records = all_messages(found)
    opened = next(m for m in records if m["type"] == "Request" and "/portforward" in m["text"])
    assert opened["operation"] == "forward" and opened["attributes"]["verb"] == "portforward"
    sent = b"".join(m["data"] for m in all_messages(found, "client") if m.get("channel") == "8080/data")
    answered = b"".join(m["data"] for m in all_messages(found, "server") if m.get("channel") == "8080/data")
    assert sent == b"GET / HTTP/1.0\r\n\r\nsecond" and answered == b"echo:GET / HTTP/1.0\r\n\r\necho:second"
    if transport == "websocket/spdy":
        assert all((m.get("attributes") or {}).get("transport") == "websocket"
                   for m in records if m["type"].startswith("spdy."))


@pytest.mark.parametrize("binary", [KUBECTL, KUBECTL_SPDY], ids=["kubectl-1.32", "kubectl-1.28"])
def test_a_blocked_port_is_refused_and_the_tunnels_other_port_goes_on(proxy, kube, tls, tmp_path, binary):
    """One kubectl, one tunnel, two ports: the refused port's stream is reset (it never reaches the pod),
    the other port is forwarded before and after it, and kubectl keeps running."""
    kubectl = Kubectl(proxy, tls, tmp_path)
    forward = PortForward(kubectl, binary, 8080, 9999)
    try:
        assert forward.exchange(b"before", 11, port=8080) == b"echo:before"
        assert forward.exchange(b"let me in", 14, port=9999) == b""
        assert forward.exchange(b"after", 10, port=8080) == b"echo:after"
        assert forward.exchange(b"again", 10, port=9999) == b""  # still refused, without a second decision
        assert forward.process.poll() is None, "kubectl port-forward ended"
    finally:
        _, stderr = forward.stop()
    run = next(r for r in reversed(kube.execs) if r["kind"] == "portforward")
    assert run["forwarded"] == {"8080": b"beforeafter"}  # 9999 never reached the pod

    def custody_resets(messages: list[dict]) -> list[dict]:
        return [m for m in messages if m["type"] == "spdy.rst_stream" and (m["attributes"] or {}).get("by") == "custody"]
    # the tunnel's session, not only kubectl's discovery sessions (which may be read first)
    found = sessions(proxy, kubectl.subject, until=lambda messages: len(custody_resets(messages)) >= 2)
    assert [(e.body["action"], e.body["rule"], e.body["statement"]) for events in found for e in events
            if e.kind == "policy_decision"] == [("block", "no-forward-to-9999", "web-1:9999")]
    resets = custody_resets(all_messages(found, "server"))
    # Each local connection to 9999: kubectl's error stream reset by Custody, its data stream never opened.
    assert [m["channel"] for m in resets] == ["9999/error", "9999/error"], resets
    assert "Stream reset" in stderr


def test_a_created_secrets_values_are_redacted_in_the_evidence_and_sealed(proxy, kube, tls, tmp_path):
    kubectl = Kubectl(proxy, tls, tmp_path)
    manifest = tmp_path / "secret.json"
    manifest.write_text(json.dumps({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "api-key"},
                                    "data": {"key": base64.b64encode(b"s3cr3t-v4lue-xyz").decode(),
                                             "owner": base64.b64encode(b"ops").decode()}}))
    got = kubectl("create", "--validate=false", "-f", str(manifest))  # JSON (create secret generic sends protobuf: redacted whole)
    assert got.returncode == 0, got.stderr
    created = next(o for o in kube.created if o["metadata"]["name"] == "api-key")
    assert base64.b64decode(created["data"]["key"]) == b"s3cr3t-v4lue-xyz"  # the target got it as sent
    found = sessions(proxy, kubectl.subject)
    sent = [m for m in all_messages(found, "client") if m["type"] == "Data" and m["data"]]
    body = next(m for m in sent if b"api-key" in m["data"])
    encoded = base64.b64encode(b"s3cr3t-v4lue-xyz")
    assert not any(encoded in m["data"] or b"s3cr3t" in m["data"] for m in sent)
    assert json.loads(body["data"])["data"] == {"key": "[REDACTED:secret]", "owner": "[REDACTED:secret]"}
    assert body["attributes"]["redacted"] == "secret" and body["sealed_original"]
    assert encoded not in body["sealed_original"]  # sealed to the custodian, not in clear


def exec_in_a_terminal(kubectl: Kubectl, binary: str = KUBECTL, rows: int = 24, columns: int = 80) -> bytes:
    """`kubectl exec -it web-1 -- sh` on a real PTY: a line typed, its answer awaited, `exit`; the terminal's
    output after the first prompt."""
    child = pexpect.spawn(binary, kubectl.argv("exec", "-it", "web-1", "--", "sh", binary=binary)[1:],
                          env=kubectl.env, dimensions=(rows, columns), timeout=30)
    try:
        child.expect_exact("$ ")
        child.send("echo from-a-tty\r")
        child.expect_exact("from-a-tty\r\n$ ")
        child.send("exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    return child.before


@BOTH
def test_exec_in_a_terminal_is_relayed_and_recorded_with_its_resize(proxy, kube, tls, tmp_path, binary, transport):
    kubectl = Kubectl(proxy, tls, tmp_path)
    exec_in_a_terminal(kubectl, binary)
    run = kube.execs[-1]
    assert (run["transport"], run["query"]["tty"], run["stdin"]) == (transport, ["true"], b"echo from-a-tty\rexit\r")
    assert {"Width": 80, "Height": 24} in run["resize"]

    records = all_messages(sessions(proxy, kubectl.subject, at_least=2,
                                    until=lambda records: any(m.get("operation") == "command" for m in records)))
    by_channel = {channel: b"".join(m["data"] for m in records if m.get("channel") == channel and m["data"])
                  for channel in ("0", "1", "4")}
    assert by_channel["0"] == b"echo from-a-tty\rexit\r"
    assert by_channel["1"] == b"$ echo from-a-tty\r\nfrom-a-tty\r\n$ exit\r\n"
    assert b'"Width":80' in by_channel["4"].replace(b" ", b"")


def test_a_protobuf_secret_is_refused_where_it_must_be_masked_and_relayed_whole_where_not(proxy, tls, tmp_path):
    """`Accept: application/vnd.kubernetes.protobuf`: Custody has no protobuf decoder, so for a subject whose
    Secrets are masked the response is a 502 Status, recorded sealed and never relayed (or, when the client takes
    JSON too, as client-go's typed clients do, JSON is asked for and masked); a subject with no masks gets the
    protobuf whole, recorded whole; each request decoded into its verb and resource from the URL."""
    host, port = proxy.address(1)

    def get(groups: tuple[str, ...],
            accept: str = "application/vnd.kubernetes.protobuf") -> tuple[str, int, str, bytes]:
        subject = f"pb-{groups[0]}-{time.monotonic_ns()}@example.com"
        out = tmp_path / f"{subject}.body"
        done = subprocess.run(["curl", "-sS", "--cacert", str(tls["ca"]), "-o", str(out),
                               "-w", "%{http_code} %{content_type}",
                               "-H", f"Authorization: Bearer {proxy.token(subject, groups)}",
                               "-H", f"Accept: {accept}",
                               f"https://{host}:{port}/api/v1/namespaces/default/secrets/db-creds"],
                              capture_output=True, text=True, timeout=30)
        code, content_type = done.stdout.split(" ", 1)
        return subject, int(code), content_type, out.read_bytes()

    masked_subject, code, content_type, body = get(("dev",))
    assert (code, content_type) == (502, "application/json"), body
    status = json.loads(body)
    assert status["kind"] == "Status" and "cannot be read" in status["message"]
    records = all_messages(sessions(proxy, masked_subject))
    request = next(m for m in records if m["type"] == "Request")
    assert (request["attributes"]["verb"], request["attributes"]["resource"], request["attributes"]["name"]) == (
        "get", "secrets", "db-creds")
    target_said = [m for m in records if m["type"] == "Data" and (m["attributes"] or {}).get("unrelayed")]
    assert target_said and all(m["data"] == b"" and m["sealed_original"] for m in target_said)
    assert not any(b"hunter2" in (m["data"] or b"") for m in records)

    # As client-go asks (protobuf, or JSON): where it must mask, the target is asked for JSON, and it is masked.
    _, code, content_type, body = get(("dev",), "application/vnd.kubernetes.protobuf, application/json")
    assert (code, content_type) == (200, "application/json")
    assert base64.b64decode(json.loads(body)["data"]["password"]) == b"[MASKED:column]"

    clear_subject, code, content_type, body = get(("dba",))
    assert (code, content_type) == (200, "application/vnd.kubernetes.protobuf")
    assert body.startswith(b"k8s\x00") and b"hunter2-secret" in body
    answered = all_messages(sessions(proxy, clear_subject), "server")
    assert any(m["type"] == "Data" and m["data"] == body for m in answered)  # recorded whole, as relayed
