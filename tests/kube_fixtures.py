"""The Kubernetes proxy stack the kubectl tests share (test_kube_proxy, test_kubeconfig, test_kube_ledger,
test_kube_versions, test_ocsf_protocols): the Kubernetes API test stand-in (tests/kube_server.py) behind a
`protocol = "kubernetes"` proxy holding the upstream bearer token, and kubectl run as one subject with its own
kubeconfig and cache. One owner, so a change to how the proxy is configured or kubectl is run is made once.
"""

from __future__ import annotations

import base64
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

from kube_server import KubeServer
from pg_fixtures import make_tls, messages, start_proxy

KUBECTL = "/usr/bin/kubectl"  # 1.32: exec over WebSocket v5.channel.k8s.io
KUBECTL_SPDY = "/usr/lib/google-cloud-sdk/bin/kubectl.1.28"  # exec over SPDY/3.1
SDK = Path("/usr/lib/google-cloud-sdk/bin")
# Every kubectl on the machine, with the exec transport it speaks: SPDY/3.1 up to 1.29, WebSocket from 1.30.
KUBECTL_VERSIONS = [pytest.param(KUBECTL, "websocket", id="kubectl")] + [
    pytest.param(str(SDK / f"kubectl.1.{minor}"), "spdy/3.1" if minor < 30 else "websocket", id=f"kubectl-1.{minor}",
                 marks=pytest.mark.skipif(not (SDK / f"kubectl.1.{minor}").exists(), reason="not installed"))
    for minor in range(27, 34)]
UPSTREAM_TOKEN = "cluster-sa-" + uuid.uuid4().hex[:8]
DELETE_RULES = """
[[rule]]
name = "block-secret-deletes"
action = "block"
message = "deleting secrets is not allowed through Custody"
protocols = ["kubernetes"]
attributes = { verb = ["delete", "deletecollection"], resource = ["secrets"] }

[[rule]]
name = "hold-configmap-deletes"
action = "hold"
message = "deleting a configmap needs approval by dba"
protocols = ["kubernetes"]
attributes = { verb = ["delete"], resource = ["configmaps"] }
approvers = ["dba"]
"""


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def kube():
    with KubeServer(UPSTREAM_TOKEN) as server:
        yield server


def start_kube_proxy(directory: Path, broker, kube: KubeServer, tls: dict, rules: str = "",
                     hold_timeout_seconds: int | None = None):
    """A running Custody with one Kubernetes proxy `test-cluster` (listener 1) in front of `kube`; `rules` are
    appended to its default policy, which is then given the time the policy holder needs to see the change."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cluster.token").write_text(UPSTREAM_TOKEN + "\n")
    running = start_proxy(directory, broker, extra_proxies=f"""
[[proxy]]
name = "test-cluster"
protocol = "kubernetes"
listen = "127.0.0.1:0"
upstream = "{kube.url}"
upstream_bearer_file = "cluster.token"
tls_cert = "{tls['server_cert']}"
tls_key = "{tls['server_key']}"
policy = "policies/default.toml"
""")
    if rules or hold_timeout_seconds is not None:
        policy = directory / "policies" / "default.toml"
        text = policy.read_text()
        if hold_timeout_seconds is not None:
            text = text.replace("hold_timeout_seconds = 300", f"hold_timeout_seconds = {hold_timeout_seconds}")
        policy.write_text(text + rules)
        time.sleep(1.2)  # the policy holder looks at the file at most once a second
    return running


class Kubectl:
    """kubectl with its own kubeconfig (a dev token as the user's token) and cache, as one subject."""

    def __init__(self, proxy, tls, tmp_path: Path, groups=("dev",), token: str | None = None) -> None:
        self.subject = f"k-{uuid.uuid4().hex[:8]}@example.com"
        host, port = proxy.address(1)
        ca = base64.b64encode(Path(tls["ca"]).read_bytes()).decode()
        self.dir = tmp_path / self.subject
        self.dir.mkdir()
        token = token if token is not None else proxy.token(self.subject, groups)
        (self.dir / "config").write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: custody, cluster: {{server: "https://{host}:{port}", certificate-authority-data: "{ca}"}}}}]
users: [{{name: me, user: {{token: "{token}"}}}}]
contexts: [{{name: custody, context: {{cluster: custody, user: me, namespace: default}}}}]
current-context: custody
""")
        self.env = {**os.environ, "KUBECONFIG": str(self.dir / "config"), "HOME": str(self.dir)}

    def argv(self, *args: str, binary: str = KUBECTL) -> list[str]:
        """The command line, for a caller that runs it itself (Popen, a PTY, stdin)."""
        return [binary, "--cache-dir", str(self.dir / "cache"), *args]

    def __call__(self, *args: str, binary: str = KUBECTL, timeout: float = 60,
                 input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args, binary=binary), capture_output=True, text=True, env=self.env,
                              timeout=timeout, input=input)


def sessions(proxy, subject: str, at_least: int = 1,
             until: Callable[[list[dict]], bool] | None = None) -> list[list]:
    """The recorded sessions of `subject`, once there are `at_least` complete ones and `until` holds for their
    messages (or 20 s passed): kubectl's discovery requests are sessions of their own and may end first."""
    deadline = time.monotonic() + 20
    while True:
        found = proxy.events.find(lambda start: (start["identity"] or {}).get("subject") == subject, timeout=1)
        if len(found) >= at_least and (until is None or until(all_messages(found))) or time.monotonic() > deadline:
            return found
        proxy.events.poll(0.2)  # find() stops reading once one complete session matches


def all_messages(found: list[list], direction: str | None = None) -> list[dict]:
    return [m for events in found for m in messages(events, direction)]


def decisions(proxy, subject: str) -> list[tuple[str, str, str]]:
    """(action, rule, statement) of every policy decision recorded for `subject`."""
    return [(e.body["action"], e.body["rule"], e.body["statement"])
            for events in sessions(proxy, subject) for e in events if e.kind == "policy_decision"]
