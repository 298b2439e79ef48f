"""`custody kubeconfig` and `custody token --format exec-credential` with the real kubectl binaries.

A kubeconfig written by `custody kubeconfig` names the Kubernetes proxy's https listener (its certificate
verified by kubectl) and a `client.authentication.k8s.io/v1` exec plugin that runs `custody token`; the token
is the one `custody login` cached from the dev identity provider's device flow (`proxy.devidp.DevIdPServer`,
driven as in tests/test_login.py). kubectl 1.32 and 1.28 run `get pods` through the proxy against the
Kubernetes API test stand-in (tests/kube_server.py); no token is in the kubeconfig.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from custody.config import load_config
from kube_fixtures import KUBECTL, KUBECTL_SPDY, UPSTREAM_TOKEN, kube, sessions, start_kube_proxy, tls  # noqa: F401
from pg_fixtures import EventLog, make_tls
from proxy.http.kubeconfig import kubeconfig, to_yaml
from proxy.login import TokenCache, exec_credential
from test_login import add_login, dev_idp, device_login

KUBECTLS = pytest.mark.parametrize("binary", [KUBECTL, KUBECTL_SPDY], ids=["kubectl-1.32", "kubectl-1.28"])


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory, kube, tls):
    running = start_kube_proxy(tmp_path_factory.mktemp("custody"), broker, kube, tls)
    running.events = EventLog.open(running)
    yield running
    running.events.close()
    running.background.stop()


@pytest.fixture
def login(proxy, tmp_path):
    """A [login] in a copy of the proxy's config, against a dev IdP signing with the proxy's dev key."""
    config = proxy.directory / f"custody-{uuid.uuid4().hex[:6]}.toml"
    config.write_text(proxy.config.path.read_text())
    idp = dev_idp(config)
    add_login(config, idp, tmp_path / "cache" / "tokens.json")
    yield config, idp
    idp.stop()


def custody(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "custody", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def write_kubeconfig(proxy, config: Path, path: Path, *extra: str) -> Path:
    host, port = proxy.address(1)
    done = custody("kubeconfig", "--server", f"https://{host}:{port}", "--namespace", "default",
                   "-o", str(path), "--config", str(config), *extra)
    assert done.returncode == 0, done.stderr
    return path


def kubectl(binary: str, kubeconfig_path: Path, *args: str) -> subprocess.CompletedProcess:
    home = kubeconfig_path.parent / f"home-{uuid.uuid4().hex[:6]}"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    env.pop("KUBECONFIG", None)
    return subprocess.run([binary, "--kubeconfig", str(kubeconfig_path), "--cache-dir", str(home / "cache"), *args],
                          capture_output=True, text=True, env=env, timeout=60)


# --- the documents ------------------------------------------------------------------------------


def test_exec_credential_document():
    credential = exec_credential("tok", 1767225600.9)
    assert credential == {"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                          "status": {"token": "tok", "expirationTimestamp": "2026-01-01T00:00:00Z"}}
    older = exec_credential("tok", None, json.dumps({"apiVersion": "client.authentication.k8s.io/v1beta1",
                                                     "kind": "ExecCredential", "spec": {"interactive": False}}))
    assert older == {"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential",
                     "status": {"token": "tok"}}
    assert exec_credential("t", None, "not json")["apiVersion"].endswith("/v1")


def test_kubeconfig_yaml_is_what_kubectl_reads(tmp_path):
    """kubectl's own parser reads the YAML back as the document (kubectl config view -o json)."""
    document = kubeconfig("c", "https://127.0.0.1:6443", "/opt/custody bin/custody",
                          ["token", "--format", "exec-credential", "--config", '/a "b"/custody.toml'],
                          b"-----BEGIN CERTIFICATE-----\n", "prod")
    path = tmp_path / "k"
    path.write_text(to_yaml(document))
    viewed = subprocess.run([KUBECTL, "config", "view", "--raw", "-o", "json", "--kubeconfig", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert viewed.returncode == 0, viewed.stderr
    seen = json.loads(viewed.stdout)
    assert seen["clusters"][0]["cluster"] == document["clusters"][0]["cluster"]
    assert seen["users"][0]["user"]["exec"] | {"env": None} == document["users"][0]["user"]["exec"] | {"env": None}
    assert seen["contexts"] == document["contexts"] and seen["current-context"] == "c"


# --- with kubectl, through the proxy ------------------------------------------------------------


@KUBECTLS
def test_kubectl_get_pods_with_the_cached_login_token(proxy, kube, login, tmp_path, binary):
    config, idp = login
    path = write_kubeconfig(proxy, config, tmp_path / "kubeconfig")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    assert "token:" not in text and "exec-credential" in text and str(config.resolve()) in text
    subject = f"kc-{uuid.uuid4().hex[:8]}@example.com"

    before = kubectl(binary, path, "get", "pods")
    assert before.returncode != 0 and "custody login" in before.stderr  # the plugin's own word, through kubectl

    device_login(config, idp, subject, ["dev"])
    printed = custody("token", "--format", "exec-credential", "--config", str(config))
    assert printed.returncode == 0, printed.stderr
    credential = json.loads(printed.stdout)
    assert credential["kind"] == "ExecCredential" and credential["apiVersion"] == "client.authentication.k8s.io/v1"
    claims = json.loads(base64.urlsafe_b64decode(credential["status"]["token"].split(".")[1] + "=="))
    assert credential["status"]["expirationTimestamp"] == time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                         time.gmtime(claims["exp"]))

    got = kubectl(binary, path, "get", "pods")
    assert got.returncode == 0, got.stderr
    assert "web-1" in got.stdout and "Running" in got.stdout
    found = sessions(proxy, subject)
    assert found and all(events[0].body["protocol"] == "kubernetes" for events in found)
    assert found[0][0].body["identity"]["issuer"] == proxy.config.identity.issuer
    assert {auth for _, _, auth in kube.requests} == {f"Bearer {UPSTREAM_TOKEN}"}  # never the client's token


def test_the_plugin_refreshes_an_expiring_token_between_kubectl_runs(proxy, login, tmp_path):
    config, idp = login
    idp.access_ttl = timedelta(seconds=45)  # custody token refreshes below 30 s left
    path = write_kubeconfig(proxy, config, tmp_path / "kubeconfig")
    subject = f"kr-{uuid.uuid4().hex[:8]}@example.com"
    device_login(config, idp, subject, ["dev"])
    assert kubectl(KUBECTL, path, "get", "pods").returncode == 0
    assert "refresh_token" not in idp.grants
    cached = TokenCache(tmp_path / "cache" / "tokens.json").get(load_config(config).login.cache_key)
    time.sleep(max(0.0, cached.expires_at - 30 - time.time()) + 1)
    got = kubectl(KUBECTL, path, "get", "pods")
    assert got.returncode == 0, got.stderr
    assert idp.grants["refresh_token"] == 1
    deadline, token_ids = time.monotonic() + 20, set()
    while len(token_ids) < 2 and time.monotonic() < deadline:  # the second run came with the refreshed token
        proxy.events.poll(0.5)  # (EventLog.find stops polling once a complete session matches)
        token_ids = {events[0].body["identity"]["token_id"] for events in proxy.events.sessions.values()
                     if events and events[0].kind == "session_start"
                     and (events[0].body["identity"] or {}).get("subject") == subject}
    assert len(token_ids) == 2


def test_the_certificate_is_verified(proxy, login, tls, tmp_path):
    """The default pins the proxy's tls_cert; --certificate-authority embeds a CA; another CA is refused."""
    config, idp = login
    subject = f"kt-{uuid.uuid4().hex[:8]}@example.com"
    device_login(config, idp, subject, ["dev"])
    with_ca = write_kubeconfig(proxy, config, tmp_path / "with-ca", "--certificate-authority", str(tls["ca"]))
    assert kubectl(KUBECTL, with_ca, "get", "pods").returncode == 0
    (tmp_path / "other").mkdir()
    other = make_tls(tmp_path / "other")
    wrong = write_kubeconfig(proxy, config, tmp_path / "wrong-ca", "--certificate-authority", str(other["ca"]))
    refused = kubectl(KUBECTL, wrong, "get", "pods")
    assert refused.returncode != 0 and "x509" in refused.stderr
    assert "web-1" not in refused.stdout


def test_kubeconfig_refuses_what_kubectl_could_not_use(proxy, login, tmp_path):
    config, _ = login
    text = config.read_text()
    no_server = custody("kubeconfig", "--config", str(config))
    assert no_server.returncode == 2 and "--server" in no_server.stderr  # listen port 0
    missing = custody("kubeconfig", "--proxy", "nope", "--config", str(config))
    assert missing.returncode == 2 and "test-cluster" in missing.stderr
    plain = custody("kubeconfig", "--server", "http://127.0.0.1:1", "--config", str(config))
    assert plain.returncode == 2 and "https" in plain.stderr
    without_tls = config.with_name(f"no-tls-{uuid.uuid4().hex[:6]}.toml")
    without_tls.write_text("\n".join(line for line in text.splitlines() if not line.startswith("tls_")) + "\n")
    refused = custody("kubeconfig", "--server", "https://127.0.0.1:1", "--config", str(without_tls))
    assert refused.returncode == 2 and "tls_cert" in refused.stderr
    printed = custody("kubeconfig", "--server", "https://proxy.example:443", "--system-roots", "--config", str(config))
    assert printed.returncode == 0, printed.stderr
    assert "certificate-authority-data" not in printed.stdout and '"https://proxy.example:443"' in printed.stdout
