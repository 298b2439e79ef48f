"""`custody ssh-login` (issue 14): a 1,500-byte token, too long for OpenSSH's password buffer, exchanged at the
proxy for a certificate of its own SSH CA; then the real `ssh` logs in with the key and that certificate alone,
with the token's identity. Certificates of the CA that are expired or for another user, other CAs' and a
proxy without a CA are refused.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest
from click.testing import CliRunner

from custody.cli import cli
from pg_fixtures import EventLog, messages, start_proxy
from proxy.identity import Identity
from proxy.ssh import certificates
from ssh_fixtures import Client, keygen, new_user, ssh_proxy_entry, sshd  # noqa: F401 (sshd: a fixture)

LONG_TOKEN = 1500


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory, sshd):
    directory = tmp_path_factory.mktemp("custody")
    policy = "policies/default.toml"
    running = start_proxy(directory, broker, extra_proxies=ssh_proxy_entry(
        sshd, name="ca-ssh", policy=policy, extra='user_ca_key_file = "keys/ssh_user_ca"\n')
        + ssh_proxy_entry(sshd, name="plain-ssh", policy=policy))
    running.events = EventLog.open(running)
    host_pub = (directory / "keys" / "ssh_host_ed25519.pub").read_text().strip()
    running.client = Client(tmp_path_factory.mktemp("client"), *running.address(1), host_pub)
    running.plain_client = Client(tmp_path_factory.mktemp("client2"), *running.address(2), host_pub)
    running.ca = asyncssh.read_private_key(str(directory / "keys" / "ssh_user_ca"))
    yield running
    running.events.close()
    running.background.stop()


def long_token(proxy, user: str, groups=("dev", "ops"), **extra) -> str:
    """A token of at least LONG_TOKEN bytes, as an enterprise IdP's RS256 token with many claims is."""
    token = proxy.token(user, groups, **extra)
    token = proxy.token(user, groups, padding="p" * max(0, LONG_TOKEN - len(token) + 8), **extra)
    assert len(token) >= LONG_TOKEN
    return token


def ssh_login(proxy, token: str, key: Path, index: int = 1) -> tuple[int, str]:
    host, port = proxy.address(index)
    result = CliRunner().invoke(cli, ["ssh-login", "--config", str(proxy.config.path), "--proxy",
                                      "ca-ssh" if index == 1 else "plain-ssh", "--address", f"{host}:{port}",
                                      "--key", str(key), "--token-env", "CUSTODY_TEST_TOKEN"],
                                env={"CUSTODY_TEST_TOKEN": token})
    return result.exit_code, result.output + (str(result.exception) if result.exit_code else "")


def sessions_of(proxy, user: str, count: int, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        found = proxy.events.find(lambda s: s["protocol"] == "ssh" and s["attributes"].get("user") == user, 1)
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) == count, f"expected {count} sessions of {user}, got {len(found)}"
            return found
        proxy.events.poll()


def refusal(events) -> str:
    decisions = [e.body for e in events if e.kind == "policy_decision"]
    assert events[-1].body["reason"] == "auth_failed"
    return decisions[-1]["reason"]


def test_a_long_token_becomes_a_certificate_and_plain_ssh_logs_in_with_it(proxy, tmp_path):
    user = new_user()
    token = long_token(proxy, user)
    # The reason for the command: OpenSSH cannot send this token as the password.
    direct = proxy.client.ssh(user, token, "true")
    assert direct.returncode == 255, direct

    key = tmp_path / "id_ed25519"  # missing: ssh-login makes it
    code, output = ssh_login(proxy, token, key)
    assert code == 0, output
    cert_file = tmp_path / "id_ed25519-cert.pub"
    shown = subprocess.run(["ssh-keygen", "-L", "-f", str(cert_file)], capture_output=True, text=True, check=True)
    assert "user certificate" in shown.stdout and f"Principals: \n                {user}" in shown.stdout, shown.stdout
    cert = asyncssh.read_certificate(str(cert_file))
    assert cert.principals == [user] and cert.signing_key.public_data == proxy.ca.public_data
    token_exp = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    fields = certificates.Fields.of(cert)
    assert abs(fields.valid_before - token_exp.timestamp()) < 120 and fields.valid_after <= time.time()
    assert "permit-pty" in shown.stdout and "permit-agent-forwarding" not in shown.stdout

    result = proxy.client.ssh_with_key(user, key, "echo via-certificate; exit 4")
    assert result.returncode == 4, result.stderr
    assert result.stdout == b"via-certificate\n"

    truncated, issuing, logging_in = sorted(sessions_of(proxy, user, 3), key=lambda events: events[-1].body["reason"]
                                            == "auth_failed" and -1 or events[0].body["attributes"]["auth_method"] == "publickey")
    assert refusal(truncated).startswith(("malformed", "bad_signature"))  # what OpenSSH sent was cut short
    assert issuing[0].body["attributes"]["auth_method"] == "password"
    issued = [m for m in messages(issuing, "server") if m["attributes"].get("certificate") == "issued"]
    assert len(issued) == 1 and issued[0]["data"] == cert_file.read_bytes()
    assert issued[0]["attributes"]["certificate_serial"] == str(fields.serial)
    start = logging_in[0].body
    assert start["attributes"]["auth_method"] == "publickey"
    assert start["attributes"]["certificate_serial"] == str(fields.serial)
    assert start["attributes"]["key_fingerprint"] == cert.key.get_fingerprint()
    assert start["identity"]["subject"] == user and start["identity"]["groups"] == ["dev", "ops"]
    assert start["identity"]["issuer"] == proxy.config.identity.issuer
    assert [m["text"] for m in messages(logging_in, "client") if m["type"] == "exec"] == ["echo via-certificate; exit 4"]
    assert logging_in[-1].body["reason"] != "auth_failed"


def test_certificates_of_the_ca_for_another_user_or_expired_are_refused_and_recorded(proxy, tmp_path):
    user, other = new_user(), new_user()
    key = tmp_path / "id_ed25519"
    code, output = ssh_login(proxy, long_token(proxy, user), key)
    assert code == 0, output
    result = proxy.client.ssh_with_key(other, key, "true")
    assert result.returncode == 255 and b"via" not in result.stdout
    assert refusal(sessions_of(proxy, other, 1)[0]).startswith("certificate_principal")

    late = new_user()
    expired_key = tmp_path / "expired"
    keygen(expired_key)
    identity = Identity(late, late, late, ("dba",), proxy.config.identity.issuer, None,
                        dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5))
    cert = proxy.ca.generate_user_certificate(
        asyncssh.read_public_key(str(expired_key) + ".pub"), certificates.key_id(identity), principals=[late],
        valid_after=int(time.time()) - 3600, valid_before=int(identity.expires_at.timestamp()))
    cert.write_certificate(str(expired_key) + "-cert.pub")
    result = proxy.client.ssh_with_key(late, expired_key, "true")
    assert result.returncode == 255
    assert refusal(sessions_of(proxy, late, 1)[0]).startswith("expired")


def test_another_cas_certificate_and_a_proxy_without_a_ca_are_refused(proxy, tmp_path):
    user = new_user()
    other_ca = tmp_path / "other_ca"
    keygen(other_ca)
    key = tmp_path / "id_ed25519"
    keygen(key)
    identity = Identity(user, user, user, ("dba",), proxy.config.identity.issuer, None,
                        dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    # A forged identity in a certificate OpenSSH's own ssh-keygen signs with a CA the proxy does not trust.
    subprocess.run(["ssh-keygen", "-q", "-s", str(other_ca), "-I", certificates.key_id(identity), "-n", user,
                    "-V", "-5m:+1h", str(key) + ".pub"], check=True)
    assert proxy.client.ssh_with_key(user, key, "true").returncode == 255

    token = long_token(proxy, user)
    code, output = ssh_login(proxy, token, tmp_path / "for-plain", index=2)
    assert code != 0 and "issues no SSH certificates" in output, output
    assert not (tmp_path / "for-plain-cert.pub").exists()
    code, output = ssh_login(proxy, token, key)
    assert code == 0, output
    assert proxy.plain_client.ssh_with_key(user, key, "true").returncode == 255  # no CA: no certificate login
    assert proxy.client.ssh_with_key(user, key, "true").returncode == 0


def test_the_certificate_functions_refuse_what_is_not_theirs():
    ca = asyncssh.generate_private_key("ssh-ed25519")
    user_key = asyncssh.generate_private_key("ssh-ed25519")
    now = dt.datetime.now(dt.timezone.utc)
    identity = Identity("s", "alice", None, ("a",), "https://idp", "j1", now + dt.timedelta(minutes=10))
    cert = certificates.issue(ca, user_key.export_public_key(), identity, now)
    back = certificates.check(ca, asyncssh.import_certificate(cert.export_certificate()), "alice")
    assert back == Identity("s", "alice", None, ("a",), "https://idp", "j1",
                            dt.datetime.fromtimestamp(int(identity.expires_at.timestamp()), dt.timezone.utc))
    with pytest.raises(certificates.CertificateRefused, match="certificate_principal"):
        certificates.check(ca, cert, "bob")
    with pytest.raises(certificates.CertificateRefused, match="unknown_ca"):
        certificates.check(asyncssh.generate_private_key("ssh-ed25519"), cert, "alice")
    for bad in (b"garbage", b"ssh-ed25519 " + b"A" * 20000, ca.export_public_key()):
        with pytest.raises(certificates.CertificateRefused, match="public_key"):
            certificates.issue(ca, bad, identity, now)
    with pytest.raises(certificates.CertificateRefused, match="expired"):
        certificates.issue(ca, user_key.export_public_key(), identity, now + dt.timedelta(hours=1))
    forged = ca.generate_user_certificate(user_key, '{"v":1,"username":"alice"}', principals=["alice"])
    with pytest.raises(certificates.CertificateRefused, match="certificate_invalid"):
        certificates.check(ca, forged, "alice")
