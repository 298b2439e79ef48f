"""OCSF from real sessions of MySQL, HTTP, Kubernetes and SSH (issue 18; PostgreSQL is in test_ocsf.py): each
session goes through the real proxy to its real target (MariaDB, Debian's nginx, the Kubernetes API stand-in with
the real kubectl, OpenSSH's sshd with the real ssh client), is sealed by the real ledger with [soc] on, and every
document read back from custody.violations.ocsf / custody.activity.ocsf validates against the carried OCSF 1.8.0
schema; the class-specific fields are asserted; the syslog sink forwards every one of them to rsyslogd, which
parses each as it was."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pymysql
import pytest
from click.testing import CliRunner

from custody.commands.approvals import approvals_group, read_approvals

from ingest import syslog
from ingest.settings import SocSettings
from kube_fixtures import DELETE_RULES, KUBECTL, UPSTREAM_TOKEN, Kubectl, start_kube_proxy
from kube_server import KubeServer
from mysql_fixtures import make_target, proxy_entry
from nginx_server import Nginx
from ocsf_fixtures import read_topic, seal, validate
from pg_fixtures import EventLog, make_tls, start_proxy
from conftest import send_raw
from ssh_fixtures import Client, free_port, keygen, new_user, ssh_proxy_entry, start_sshd
from syslog_fixtures import RSYSLOGD, Rsyslog, RunningSink, uids, wait_for


def sealed_documents(proxy, tmp_path: Path, sessions: int) -> tuple[list[dict], list[dict]]:
    """Wait for `sessions` complete sessions, seal everything on the topic, read both OCSF topics back, validated."""
    events = proxy.events
    deadline = time.monotonic() + 30
    while len(found := events.find(lambda start: True, timeout=1)) < sessions:
        assert time.monotonic() < deadline, f"{len(found)} of {sessions} sessions ended"
    seal(proxy.kafka, proxy.directory / "keys", tmp_path / "ledger", sum(len(s) for s in found),
         f"ocsf-{uuid.uuid4().hex[:8]}")
    activity, findings = read_topic(proxy.kafka, "activity.ocsf"), read_topic(proxy.kafka, "violations.ocsf")
    for doc in activity + findings:
        validate(doc)
    uids = [d["metadata"]["uid"] for d in activity + findings]
    assert len(set(uids)) == len(uids), "ids are unique"
    through_rsyslog(proxy, tmp_path, activity + findings)
    return activity, findings


def through_rsyslog(proxy, tmp_path: Path, docs: list[dict]) -> None:
    """The syslog sink forwards both OCSF topics to rsyslogd (TCP): every document arrives parsed, as it was, with
    its class as MSGID and its id in the structured data."""
    if not Path(RSYSLOGD).exists():
        return
    port = free_port()
    receiver = Rsyslog(tmp_path / "rsyslog", port)
    receiver.start()
    soc = SocSettings(ocsf=True, activity=True, syslog=f"tcp://127.0.0.1:{port}", syslog_group=f"syslog-{port}")
    try:
        with RunningSink(proxy.kafka, soc, syslog.Destination.parse(soc.syslog)):
            wait_for(lambda: set(uids(receiver)) >= {d["metadata"]["uid"] for d in docs}, 30,
                     "not every document reached rsyslog")
    finally:
        receiver.stop()
    got = {doc["metadata"]["uid"]: (msgid, sd, doc) for msgid, _, sd, doc in receiver.received()}
    for doc in docs:
        msgid, sd, received = got[doc["metadata"]["uid"]]
        assert msgid == f"OCSF-{doc['class_uid']}" and f'id="{doc["metadata"]["uid"]}"' in sd and received == doc


def linked(doc: dict, subject: str | None = None) -> dict:
    """The link to the sealed evidence is complete; returns it."""
    link = doc["unmapped"]["custody"]
    assert link["session_id"] == doc["metadata"]["correlation_uid"] and link["event_id"]
    assert link["ledger"]["origin"] == "custody.test/ledger" and link["ledger"]["checkpoint_size"] >= 1
    if subject is not None:
        assert doc["actor"]["user"]["uid"] == subject
    return link


def failed_logons(findings: list[dict]) -> list[dict]:
    return [d for d in findings if d["class_uid"] == 3002 and d["status_id"] == 2]


def blocks(findings: list[dict]) -> list[dict]:
    return [d for d in findings if d["class_uid"] == 2004]


@pytest.fixture
def events_of():
    opened = []

    def open_(proxy):
        proxy.events = EventLog.open(proxy)
        opened.append(proxy)
        return proxy
    yield open_
    for proxy in opened:
        proxy.events.close()
        proxy.background.stop()


def test_mysql_session_in_ocsf(broker, tmp_path, events_of):
    target = make_target()
    try:
        with target.direct() as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE accounts (id INT PRIMARY KEY, owner VARCHAR(50))")
            cur.execute("INSERT INTO accounts VALUES (1, 'alice')")
        proxy = events_of(start_proxy(tmp_path / "custody", broker, extra_proxies=proxy_entry(target)))
        host, port = proxy.address(1)
        who = "eve@example.com"
        with pymysql.connect(host=host, port=port, user=who, password=proxy.token(who, groups=("dev",)),
                             database=target.database, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("SELECT owner FROM accounts WHERE id = 1")
            assert cur.fetchall() == (("alice",),)
            with pytest.raises(pymysql.MySQLError):
                cur.execute("DROP TABLE accounts")
        with pytest.raises(pymysql.MySQLError):
            pymysql.connect(host=host, port=port, user=who, password="not-a-token", database=target.database)
        activity, findings = sealed_documents(proxy, tmp_path, 2)
    finally:
        target.drop()

    logon = next(d for d in activity if d["class_uid"] == 3002)
    assert logon["status_id"] == 1 and logon["user"]["uid"] == who and logon["dst_endpoint"]["svc_name"] == "mysql"
    assert logon["user"]["account"]["name"] == who and logon["auth_protocol_id"] == 4
    statements = {d["query_info"]["query_string"]: d for d in activity if d["class_uid"] == 6005}
    select = statements["SELECT owner FROM accounts WHERE id = 1"]
    assert (select["activity_id"], select["status_id"], select["database"]["type"]) == (1, 1, "MySQL")
    assert select["database"]["name"] == target.database and select["table"] == {"name": "accounts"}
    assert select["src_endpoint"]["ip"] == "127.0.0.1"
    linked(select, who)
    drop = statements["DROP TABLE accounts"]
    assert (drop["activity_id"], drop["status_id"], drop["status_code"]) == (7, 2, "42000")  # SQLSTATE
    assert (drop["action_id"], drop["disposition_id"]) == (2, 2) and drop["table"] == {"name": "accounts"}
    assert drop["unmapped"]["custody"]["policy"]["action"] == "block"
    [block] = blocks(findings)
    assert block["evidences"][0]["data"]["statement"] == "DROP TABLE accounts"
    assert block["evidences"][0]["database"] == {"name": target.database, "type_id": 1, "type": "MySQL"}
    assert block["finding_info"]["related_events"][0]["uid"] == block["unmapped"]["custody"]["event_id"]
    [refused] = failed_logons(findings)
    assert refused["status_code"] and refused["user"]["name"] == who and refused["disposition"] == "Unauthorized"


POLICY_HTTP = """
[[rule]]
name = "block-http-admin-writes"
action = "block"
message = "writes under /admin/ are not allowed through Custody"
protocols = ["http"]
attributes = { method = ["POST", "PUT", "PATCH", "DELETE"] }
text = '^\\\\S+ /admin/'

[[rule]]
name = "hold-report-deletes"
action = "hold"
message = "deleting a report needs approval by dba"
protocols = ["http"]
attributes = { method = ["DELETE"] }
text = '^\\\\S+ /reports/'
approvers = ["dba"]
"""


def test_http_session_through_nginx_in_ocsf(broker, tmp_path, events_of):
    with Nginx(tmp_path / "nginx") as nginx:
        os.environ["CUSTODY_TEST_OCSF_UPSTREAM"] = "upstream-" + uuid.uuid4().hex[:8]
        proxy = events_of(start_proxy(tmp_path / "custody", broker, extra_proxies=f"""
[[proxy]]
name = "web"
protocol = "http"
listen = "127.0.0.1:0"
upstream = "{nginx.url}"
upstream_bearer_env = "CUSTODY_TEST_OCSF_UPSTREAM"
policy = "policies/default.toml"
"""))
        policy = proxy.directory / "policies" / "default.toml"
        policy.write_text(policy.read_text().replace("hold_timeout_seconds = 300", "hold_timeout_seconds = 2")
                          + POLICY_HTTP.replace("\\\\", "\\"))
        time.sleep(1.2)  # the policy holder looks at the file at most once a second
        host, port = proxy.address(1)
        who = "alice@example.com"

        def curl(path: str, *args: str, token: str | None = None) -> int:
            out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                                  f"Authorization: Bearer {token or proxy.token(who, ('dba',))}", *args,
                                  f"http://{host}:{port}{path}"], capture_output=True, text=True, timeout=30)
            return int(out.stdout)

        assert curl("/index.html?lang=en") == 200
        assert curl("/admin/users", "-X", "POST", "-d", "x=1") == 403
        assert curl("/index.html", token="not-a-token") == 401
        assert curl("/reports/q3", "-X", "DELETE") == 403  # held, nobody approves within 2 s: expired
        activity, findings = sealed_documents(proxy, tmp_path, 4)

    logon = next(d for d in activity if d["class_uid"] == 3002)
    assert logon["status_id"] == 1 and logon["dst_endpoint"] == {"name": "web", "svc_name": "http"}
    requests = [d for d in activity if d["class_uid"] == 4002]
    get = next(d for d in requests if d["http_request"]["url"].get("query_string") == "lang=en")
    assert (get["activity_id"], get["activity_name"], get["status_id"]) == (3, "Get", 1)
    assert get["http_request"]["url"]["path"] == "/index.html"
    assert get["http_request"]["url"]["query_string"] == "lang=en"
    assert get["http_response"]["code"] == 200 and get["http_status"] == 200
    linked(get, who)
    post = next(d for d in requests if d["http_request"]["http_method"] == "POST")
    assert (post["activity_id"], post["http_response"]["code"], post["disposition"]) == (6, 403, "Blocked")
    assert post["unmapped"]["custody"]["policy"]["rule"] == "block-http-admin-writes"
    block, = [d for d in blocks(findings) if "policy_block" in d["finding_info"]["types"]]
    assert block["finding_info"]["analytic"]["name"] == "block-http-admin-writes"
    assert block["evidences"][0]["http_request"]["http_method"] == "POST"
    assert block["evidences"][0]["http_request"]["url"]["path"] == "/admin/users"
    [refused] = failed_logons(findings)
    assert refused["status_code"] and refused["service"]["name"] == "web"
    expired, = [d for d in blocks(findings) if "approval_expired" in d["finding_info"]["types"]]
    assert expired["disposition"] == "Rejected" and expired["finding_info"]["analytic"]["uid"] == "hold-report-deletes"
    assert expired["evidences"][0]["http_request"] == {"http_method": "DELETE",
                                                       "url": {"path": "/reports/q3", "url_string": "/reports/q3"}}


def test_kubernetes_session_with_kubectl_in_ocsf(broker, tmp_path, events_of):
    if not Path(KUBECTL).exists():
        pytest.skip("kubectl is not installed")
    tls = make_tls(tmp_path)
    with KubeServer(UPSTREAM_TOKEN) as kube:
        proxy = events_of(start_kube_proxy(tmp_path / "custody", broker, kube, tls, DELETE_RULES))
        kubectl = Kubectl(proxy, tls, tmp_path)
        who = kubectl.subject

        assert kubectl("get", "pods", "web-1").returncode == 0
        assert kubectl("delete", "secret", "db-creds", "--wait=false").returncode != 0
        assert Kubectl(proxy, tls, tmp_path, token="not-a-token")("get", "pods").returncode != 0
        held: dict = {}
        thread = threading.Thread(target=lambda: held.update(run=kubectl("delete", "configmap", "app-config",
                                                                          "--wait=false")))
        thread.start()
        deadline = time.monotonic() + 20
        while not (pending := [r for r in read_approvals(proxy.config).pending()
                               if r.requester.get("subject") == who]):
            assert time.monotonic() < deadline, "no approval request"
            time.sleep(0.3)
        denied = CliRunner().invoke(approvals_group, ["deny", pending[0].request_id, "--reason", "not today",
                                                      "--token", proxy.token("bob@example.com", ("dba",)),
                                                      "--config", str(proxy.config.path)])
        assert denied.exit_code == 0, denied.output
        thread.join(30)
        assert held["run"].returncode != 0
        deadline = time.monotonic() + 20
        while not proxy.events.find(lambda s: s["identity"] is None, timeout=1):
            assert time.monotonic() < deadline, "no refused session"
        found = proxy.events.find(lambda s: True, timeout=1)
        activity, findings = sealed_documents(proxy, tmp_path, len(found))

    api = [d for d in activity if d["class_uid"] == 6003]
    get = next(d for d in api if d["unmapped"]["custody"]["kubernetes"].get("name") == "web-1"
               and d["unmapped"]["custody"]["kubernetes"]["verb"] == "get")
    assert (get["activity_id"], get["activity_name"], get["status_id"]) == (2, "Read", 1)
    assert get["resources"] == [{"type": "pods", "name": "web-1", "namespace": "default",
                                 "uid": "default/pods/web-1"}]
    assert get["http_request"]["http_method"] == "GET" and get["http_response"]["code"] == 200
    assert get["http_request"]["url"]["path"] == "/api/v1/namespaces/default/pods/web-1"
    assert get["dst_endpoint"] == {"name": "test-cluster", "svc_name": "kubernetes"}
    linked(get, who)
    delete = next(d for d in api if d["unmapped"]["custody"]["kubernetes"]["verb"] == "delete"
                  and d["unmapped"]["custody"]["kubernetes"]["resource"] == "secrets")
    assert (delete["activity_id"], delete["disposition"], delete["http_response"]["code"]) == (4, "Blocked", 403)
    assert delete["resources"][0]["type"] == "secrets" and delete["resources"][0]["name"] == "db-creds"
    block, = [d for d in blocks(findings) if "policy_block" in d["finding_info"]["types"]]
    assert block["finding_info"]["analytic"]["uid"] == "block-secret-deletes"
    assert block["evidences"][0]["http_request"]["url"]["path"] == "/api/v1/namespaces/default/secrets/db-creds"
    assert failed_logons(findings), "the bad token is an Authentication failure"
    rejected, = [d for d in blocks(findings) if "approval_denied" in d["finding_info"]["types"]]
    assert rejected["disposition"] == "Rejected" and rejected["finding_info"]["analytic"]["uid"] == "hold-configmap-deletes"
    assert rejected["evidences"][0]["http_request"]["url"]["path"] == "/api/v1/namespaces/default/configmaps/app-config"
    held_doc = next(d for d in api if d["unmapped"]["custody"]["kubernetes"].get("resource") == "configmaps")
    assert held_doc["disposition"] == "Rejected" and held_doc["unmapped"]["custody"]["policy"]["action"] == "deny"
    assert any(d["class_uid"] == 3002 and d["status_id"] == 1 and d["user"]["uid"] == who for d in activity)


def test_ssh_session_in_ocsf(broker, tmp_path, events_of):
    sshd = start_sshd(tmp_path / "sshd")
    try:
        impostor_key = keygen(tmp_path / "impostor-key")  # a host key that is not the target's
        proxy = events_of(start_proxy(tmp_path / "custody", broker,
                                      extra_proxies=ssh_proxy_entry(sshd, policy="policies/default.toml")
                                      + ssh_proxy_entry(sshd, name="impostor-ssh", host_key=impostor_key,
                                                        policy="policies/default.toml")))
        client = Client(tmp_path / "client", *proxy.address(1),
                        (proxy.directory / "keys" / "ssh_host_ed25519.pub").read_text().strip())
        who = new_user()
        ran = client.ssh(who, proxy.token(who, ("dev",)), "echo ocsf-$((40+2)); exit 3")
        assert ran.returncode == 3 and ran.stdout == b"ocsf-42\n", ran.stderr
        forward = client.ssh(who, proxy.token(who, ("dev",)), extra=("-W", f"127.0.0.1:{sshd.port}"))
        assert forward.returncode == 255
        refused = new_user()
        assert client.ssh(refused, "not-a-token", "true").returncode == 255
        impostor = Client(tmp_path / "client2", *proxy.address(2),
                          (proxy.directory / "keys" / "ssh_host_ed25519.pub").read_text().strip())
        assert impostor.ssh(who, proxy.token(who, ("dev",)), "echo should-not-run").returncode == 255
        found = proxy.events.find(lambda s: s["attributes"].get("user") == who, timeout=20)
        real = next(e for events in found for e in events if e.kind == "frames")
        tampered = bytearray(real.value)
        tampered[-1] ^= 1  # a recorded event altered on the topic: the ledger quarantines it
        send_raw(proxy.kafka, [(real.session_id.encode(), bytes(tampered)), (b"x", b"not an event at all")])
        activity, findings = sealed_documents(proxy, tmp_path, 4)
    finally:
        sshd.stop()

    ssh = [d for d in activity if d["class_uid"] == 4007]
    command = next(d for d in ssh if d["unmapped"]["custody"]["operation"] == "command"
                   and d["actor"]["process"]["cmd_line"].startswith("echo ocsf-"))
    assert command["actor"]["process"] == {"uid": command["metadata"]["uid"], "name": "echo",
                                           "cmd_line": "echo ocsf-$((40+2)); exit 3"}
    assert (command["activity_id"], command["status_id"], command["status_code"]) == (6, 2, "3")
    assert command["protocol_ver"] == "2.0" and command["auth_type"] in ("Password", "Keyboard Interactive")
    assert command["dst_endpoint"] == {"name": "local-ssh", "svc_name": "ssh"}
    assert command["unmapped"]["custody"]["channel"] is not None
    linked(command, who)
    forward_doc = next(d for d in ssh if d["unmapped"]["custody"]["operation"] == "forward")
    assert forward_doc["disposition"] == "Blocked" and forward_doc["actor"]["process"]["cmd_line"] == \
        f"127.0.0.1:{sshd.port}"
    block, = [d for d in blocks(findings) if "policy_block" in d["finding_info"]["types"]]
    assert block["finding_info"]["analytic"]["uid"] == "forwarding-closed-by-default"
    assert block["evidences"][0]["data"]["statement"] == f"127.0.0.1:{sshd.port}"
    [bad] = failed_logons(findings)
    assert bad["user"]["name"] == refused and bad["status_code"] == "malformed"
    logons = [d for d in activity if d["class_uid"] == 3002]
    assert len(logons) == 3 and all(d["user"]["uid"] == who and d["user"]["account"]["name"] == who for d in logons)
    host_key, = [d for d in blocks(findings) if "protocol_error" in d["finding_info"]["types"]]
    assert host_key["finding_info"]["analytic"]["name"] == "host_key_not_verified"
    assert host_key["disposition"] == "Error" and host_key["evidences"][0]["dst_endpoint"]["name"] == "impostor-ssh"
    quarantined = [d for d in blocks(findings) if "quarantine" in d["finding_info"]["types"]]
    assert len(quarantined) == 2 and {d["disposition"] for d in quarantined} == {"Quarantined"}
    named = next(d for d in quarantined if d["metadata"].get("correlation_uid"))
    assert named["finding_info"]["related_events"] == [{"uid": real.event_id}]
    assert all(d["unmapped"]["custody"]["source"].startswith(proxy.kafka.topic("events")) for d in quarantined)
