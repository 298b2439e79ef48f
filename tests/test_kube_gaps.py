"""The Kubernetes proxy's less trodden paths, with the real kubectl against the Kubernetes API test stand-in
(tests/kube_server.py): Secrets masked inside a `SecretList` and inside `watch` events as for one Secret (the
originals sealed, holding the real values); a policy on namespace and subresource (exec into `prod` blocked,
attach into `prod` held until approved, exec into `default` untouched); and exec on the WebSocket
`v4.channel.k8s.io` subprotocol, which kubectl 1.30+ falls back to when the cluster does not offer v5.
"""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time

import pytest
from click.testing import CliRunner
from nacl.public import PrivateKey

from custody.commands.approvals import approvals_group, read_approvals
from kube_fixtures import (KUBECTL, KUBECTL_SPDY, UPSTREAM_TOKEN, Kubectl, all_messages, decisions, sessions,
                           start_kube_proxy, tls)  # noqa: F401 (tls)
from kube_server import KubeServer
from pg_fixtures import EventLog
from ingest.sealing import open_sealed

NAMESPACE_RULES = """
[[rule]]
name = "block-exec-in-prod"
action = "block"
message = "exec into pods in prod is not allowed"
protocols = ["kubernetes"]
attributes = { subresource = ["exec"], namespace = ["prod"] }

[[rule]]
name = "hold-attach-in-prod"
action = "hold"
message = "attaching to a pod in prod needs approval by dba"
protocols = ["kubernetes"]
attributes = { subresource = ["attach"], namespace = ["prod"] }
approvers = ["dba"]
"""


def _running(broker, tmp_path_factory, kube: KubeServer, tls, rules: str = ""):
    running = start_kube_proxy(tmp_path_factory.mktemp("custody"), broker, kube, tls, rules,
                               hold_timeout_seconds=20 if rules else None)
    running.events = EventLog.open(running)
    return running


@pytest.fixture(scope="module")
def kube():
    with KubeServer(UPSTREAM_TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory, kube, tls):
    running = _running(broker, tmp_path_factory, kube, tls, NAMESPACE_RULES)
    yield running
    running.events.close()
    running.background.stop()


@pytest.fixture(scope="module")
def kube_v4():
    """A cluster whose exec offers only `v4.channel.k8s.io`, as API servers before 1.30 did."""
    with KubeServer(UPSTREAM_TOKEN, ws_protocols=("v4.channel.k8s.io",)) as server:
        yield server


@pytest.fixture(scope="module")
def proxy_v4(broker, tmp_path_factory, kube_v4, tls):
    running = _running(broker, tmp_path_factory, kube_v4, tls)
    yield running
    running.events.close()
    running.background.stop()


def _decisions(proxy, subject: str, count: int) -> list[tuple[str, str, str]]:
    """The policy decisions recorded for `subject`, once there are `count` (or 20 s passed): each attempt of a
    kubectl command is a session of its own, and the last may not be complete when the first is."""
    deadline = time.monotonic() + 20
    found = decisions(proxy, subject)
    while len(found) < count and time.monotonic() < deadline:
        proxy.events.poll(0.5)
        found = decisions(proxy, subject)
    return found


def _custodian(proxy) -> PrivateKey:
    return PrivateKey(base64.b64decode((proxy.directory / "keys" / "custodian.key").read_text()))


def _secret_data(secret: dict) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}


def _assert_masked(data: dict[str, str]) -> None:
    """As for one Secret (test_kube_proxy): the password by its key, the e-mail by the detectors, the rest whole."""
    assert data["password"] == "[MASKED:column]" and "ops.lead" not in data["contact"]
    assert data["note"] == "rotated monthly"


def _sealed_originals(proxy, subject: str, until) -> bytes:
    """Every sealed original of the server's Data records for `subject`, opened with the custodian's key."""
    records = all_messages(sessions(proxy, subject, until=until), "server")
    return b"".join(open_sealed(m["sealed_original"], _custodian(proxy))
                    for m in records if m["type"] == "Data" and m.get("sealed_original"))


def test_secrets_in_a_secret_list_are_masked_and_sealed(proxy, tls, tmp_path):
    kubectl = Kubectl(proxy, tls, tmp_path)
    got = kubectl("get", "secrets", "-o", "json")
    assert got.returncode == 0, got.stderr
    listed = {item["metadata"]["name"]: item for item in json.loads(got.stdout)["items"]}
    _assert_masked(_secret_data(listed["db-creds"]))
    assert _secret_data(listed["old-token"]) == {"token": "abc"}

    def masked_list(records: list[dict]) -> bool:
        return any(m["type"] == "Data" and b"SecretList" in (m["data"] or b"") for m in records)

    records = all_messages(sessions(proxy, kubectl.subject, until=masked_list), "server")
    shown = b"".join(m["data"] or b"" for m in records if m["type"] == "Data")
    assert base64.b64encode(b"hunter2-secret") not in shown and b"hunter2" not in shown
    assert base64.b64encode(b"hunter2-secret") in _sealed_originals(proxy, kubectl.subject, masked_list)

    dba = Kubectl(proxy, tls, tmp_path, groups=("dba",))
    clear = {item["metadata"]["name"]: item for item in json.loads(dba("get", "secrets", "-o", "json").stdout)["items"]}
    assert _secret_data(clear["db-creds"])["password"] == "hunter2-secret"


def test_secrets_in_watch_events_are_masked_and_sealed(proxy, tls, tmp_path):
    kubectl = Kubectl(proxy, tls, tmp_path)
    watch = subprocess.Popen(kubectl.argv("get", "secrets", "--watch", "-o", "json", "--output-watch-events"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=kubectl.env)
    time.sleep(3)
    watch.terminate()
    out, err = watch.communicate(10)
    decoder, events, at = json.JSONDecoder(), [], 0
    while out[at:].strip():  # kubectl prints one indented JSON document per event
        event, at = decoder.raw_decode(out, at + len(out[at:]) - len(out[at:].lstrip()))
        events.append(event)
    by_type = {(e["type"], e["object"]["metadata"]["name"]): e["object"] for e in events}
    assert ("MODIFIED", "db-creds") in by_type, (out, err)  # the watch's own event, not the initial list
    for (_, name), secret in by_type.items():
        if name == "db-creds":
            _assert_masked(_secret_data(secret))

    def modified(records: list[dict]) -> bool:
        return any(m["type"] == "Data" and b'"MODIFIED"' in (m["data"] or b"") for m in records)

    records = all_messages(sessions(proxy, kubectl.subject, until=modified), "server")
    streamed = [m for m in records if m["type"] == "Data" and b'"MODIFIED"' in (m["data"] or b"")]
    # The target cut that event in two inside its data: it was held until its line was whole, then masked.
    assert len(streamed) == 1 and streamed[0]["data"].startswith(b'{"type":"MODIFIED"')
    assert streamed[0]["data"].endswith(b"}\n") and streamed[0]["sealed_original"] and streamed[0]["attributes"]["masked"]
    assert not any(b"hunter2" in (m["data"] or b"") or base64.b64encode(b"hunter2-secret") in (m["data"] or b"")
                   for m in records)
    originals = _sealed_originals(proxy, kubectl.subject, modified)
    assert b'"MODIFIED"' in originals and base64.b64encode(b"hunter2-secret") in originals


@pytest.mark.parametrize("binary", [KUBECTL, KUBECTL_SPDY], ids=["kubectl-1.32-websocket", "kubectl-1.28-spdy"])
def test_exec_is_blocked_in_prod_and_passes_in_default(proxy, kube, tls, tmp_path, binary):
    kubectl = Kubectl(proxy, tls, tmp_path)
    blocked = kubectl("exec", "-n", "prod", "api-1", "--", "echo", "hi", binary=binary)
    assert blocked.returncode != 0 and "exec into pods in prod is not allowed" in blocked.stderr, blocked.stderr
    assert not any(run["pod"] == "api-1" for run in kube.execs)
    assert "Error from server (Forbidden)" in blocked.stderr
    # kubectl 1.32 tries WebSocket, then (refused) falls back to SPDY: each attempt is blocked on its own.
    attempts = 2 if binary == KUBECTL else 1
    assert _decisions(proxy, kubectl.subject, attempts) == [("block", "block-exec-in-prod", "echo hi")] * attempts

    passed = kubectl("exec", "web-1", "--", "echo", "hi", binary=binary)
    assert (passed.returncode, passed.stdout) == (0, "hi\n"), passed.stderr
    assert kube.execs[-1]["pod"] == "web-1"
    # default's exec met no rule of prod's
    assert _decisions(proxy, kubectl.subject, attempts) == [("block", "block-exec-in-prod", "echo hi")] * attempts


def test_attach_in_prod_is_held_until_a_dba_approves(proxy, kube, tls, tmp_path):
    kubectl = Kubectl(proxy, tls, tmp_path)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run=kubectl("attach", "-i", "-n", "prod", "api-1",
                                                                        input="held line\n")))
    thread.start()
    deadline, request = time.monotonic() + 20, None
    while request is None:
        assert time.monotonic() < deadline, "no approval request"
        pending = read_approvals(proxy.config).pending()
        request = next((r for r in pending if r.requester.get("subject") == kubectl.subject), None)
        time.sleep(0.3)
    assert "/namespaces/prod/pods/api-1/attach" in request.statement
    assert not any(run["pod"] == "api-1" for run in kube.execs)  # still held
    approved = CliRunner().invoke(approvals_group, ["approve", request.request_id, "--reason", "CHG-9",
                                                    "--token", proxy.token("bob@example.com", ("dba",)),
                                                    "--config", str(proxy.config.path)])
    assert approved.exit_code == 0, approved.output
    thread.join(30)
    assert result["run"].returncode == 0, result["run"].stderr
    assert result["run"].stdout.endswith("held line\n")
    run = kube.execs[-1]
    assert (run["pod"], run["kind"], run["stdin"]) == ("api-1", "attach", b"held line\n")


def _exec_stdout_stderr_and_exit_status(proxy, kube: KubeServer, tls, tmp_path) -> dict:
    """`sh -c 'echo to-out; echo to-err >&2; exit 4'` with kubectl 1.32: relayed (kubectl's own stdout, stderr
    and exit status) and recorded per channel (1, 2, and 3's outcome); the cluster's record of the exec."""
    kubectl = Kubectl(proxy, tls, tmp_path)
    got = kubectl("exec", "web-1", "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 4")
    assert (got.returncode, got.stdout, got.stderr) == (4, "to-out\n", "to-err\ncommand terminated with exit code 4\n")

    def status(records: list[dict]) -> bool:
        return any(m.get("channel") == "3" and m.get("outcome") for m in records)

    records = all_messages(sessions(proxy, kubectl.subject, at_least=2, until=status))
    by_channel = {channel: b"".join(m["data"] for m in records if m.get("channel") == channel and m["data"]
                                    and m["type"] != "Request")
                  for channel in ("1", "2")}
    assert by_channel == {"1": b"to-out\n", "2": b"to-err\n"}
    exit_4 = next(m for m in records if m.get("channel") == "3" and m.get("outcome"))
    assert (exit_4["outcome"], exit_4["error_code"]) == ("error", "4") and "exit status 4" in exit_4["error_message"]
    command = next(m for m in records if m.get("operation") == "command")
    assert command["attributes"]["verb"] == "exec"
    return kube.execs[-1]


def test_exec_on_websocket_v5_relays_and_records_stdout_stderr_and_exit_status(proxy, kube, tls, tmp_path):
    run = _exec_stdout_stderr_and_exit_status(proxy, kube, tls, tmp_path)
    assert (run["transport"], run["protocol"]) == ("websocket", "v5.channel.k8s.io")


def test_without_v5_kubectl_falls_back_to_spdy_v4_and_the_exec_is_relayed_and_recorded(proxy_v4, kube_v4, tls,
                                                                                         tmp_path):
    """kubectl 1.30-1.33 offer `v5.channel.k8s.io` alone on WebSocket (client-go's WebSocket executor: v5 only, for
    version skew), so a cluster without v5 is met over SPDY/3.1 with `v4.channel.k8s.io`, through the proxy: the
    WebSocket attempt, then the fallback."""
    run = _exec_stdout_stderr_and_exit_status(proxy_v4, kube_v4, tls, tmp_path)
    attempt = kube_v4.execs[-2]
    assert (attempt["transport"], attempt["offered"], attempt["protocol"]) == ("websocket", ["v5.channel.k8s.io"], None)
    assert (run["transport"], run["protocol"]) == ("spdy/3.1", "v4.channel.k8s.io")
