"""Public keys mapped to identities (issue 14, point 2): `[[proxy.authorized_key]]` lets a machine that cannot run
an OIDC flow log in with its key, through the real OpenSSH client to a real sshd. The evidence says how the caller
was identified (issuer custody:ssh-authorized-key, the key's fingerprint), policy sees the mapped groups, and a
key for another user, an expired mapping and an unknown key are auth failures. No list: no key logins.
"""

from __future__ import annotations

import os
import subprocess
import time
import tomllib
import uuid

import asyncssh
import pytest

from ingest.settings import ConfigError, Table
from pg_fixtures import EventLog, messages, start_proxy
from proxy.settings import ProxySettings
from proxy.ssh import authorized_keys
from proxy.ssh.certificates import CERT_SUBSYSTEM
from proxy.ssh.settings import SSHSettings
from ssh_fixtures import Client, keygen, new_user, ssh_proxy_entry, sshd  # noqa: F401 (sshd: a fixture)

POLICY = '''
[[rule]]
name = "block-ci-deploys"
action = "block"
message = "CI may not deploy through Custody"
protocols = ["ssh"]
operations = ["command"]
text = '^echo deploy$'
groups = ["ci"]
'''


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """The runner's key (inline in the config), an expired mapping's (key_file) and a key nobody maps."""
    directory = tmp_path_factory.mktemp("keys")
    names = ("runner", "expired", "unknown")
    lines = {name: keygen(directory / name) for name in names}
    return {name: directory / name for name in names} | {f"{name}.pub": lines[name] for name in names}


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory, sshd, keys):
    directory = tmp_path_factory.mktemp("custody")
    (directory / "policies").mkdir()
    (directory / "policies" / "ssh.toml").write_text(POLICY)
    runner, old = f"ci-{uuid.uuid4().hex[:8]}", f"old-{uuid.uuid4().hex[:8]}"
    mapped = f'''user_ca_key_file = "keys/ssh_user_ca"

[[proxy.authorized_key]]
key = "{keys["runner.pub"]}"
username = "{runner}"
groups = ["ci", "build"]

[[proxy.authorized_key]]
key_file = "{keys["expired"]}.pub"
username = "{old}"
expires = "2020-01-01T00:00:00Z"
'''
    running = start_proxy(directory, broker, extra_proxies=ssh_proxy_entry(sshd, name="keys-ssh", extra=mapped)
                          + ssh_proxy_entry(sshd, name="plain-ssh"))
    running.events = EventLog.open(running)
    host_pub = (directory / "keys" / "ssh_host_ed25519.pub").read_text().strip()
    running.client = Client(tmp_path_factory.mktemp("client"), *running.address(1), host_pub)
    running.plain_client = Client(tmp_path_factory.mktemp("client2"), *running.address(2), host_pub)
    running.runner, running.old = runner, old
    yield running
    running.events.close()
    running.background.stop()


def session_of(proxy, user: str, timeout: float = 20.0):
    """The one complete session of SSH user `user`."""
    deadline = time.monotonic() + timeout
    while True:
        found = proxy.events.find(lambda s: s["protocol"] == "ssh" and s["attributes"].get("user") == user, 1)
        if len(found) == 1 or time.monotonic() > deadline:
            assert len(found) == 1, f"expected one session of {user}, got {len(found)}"
            return found[0]
        proxy.events.poll()


def refusal(events) -> dict:
    """The authentication denial of a refused session (what becomes an auth_failure violation)."""
    assert events[-1].body["reason"] == "auth_failed"
    decisions = [e.body for e in events if e.kind == "policy_decision"]
    assert len(decisions) == 1 and decisions[0]["rule"] == "authentication" and decisions[0]["action"] == "deny"
    return decisions[0]


def test_a_mapped_key_logs_in_as_its_identity_and_policy_sees_its_groups(proxy, keys):
    runner = proxy.runner
    result = proxy.client.ssh_with_key(runner, keys["runner"], "echo via-key; exit 3")
    assert result.returncode == 3, result.stderr
    assert result.stdout == b"via-key\n"
    start = session_of(proxy, runner)[0].body
    assert start["identity"] == {"subject": runner, "username": runner, "email": None, "groups": ["ci", "build"],
                                 "issuer": authorized_keys.ISSUER, "token_id": None}
    fingerprint = asyncssh.import_public_key(keys["runner.pub"]).get_fingerprint()
    assert start["attributes"]["auth_method"] == "publickey"
    assert start["attributes"]["key_fingerprint"] == fingerprint
    assert start["attributes"]["token_exp"] == "9999-12-31T23:59:59Z"  # no `expires`: the entry is the revocation

    # The rule names the group "ci": only the mapped groups can have matched it.
    blocked = proxy.client.ssh_with_key(runner, keys["runner"], "echo deploy")
    assert blocked.returncode == 126 and b"CI may not deploy" in blocked.stderr and blocked.stdout == b""
    person = new_user()
    allowed = proxy.client.ssh(person, proxy.token(person, ("dev",)), "echo deploy")
    assert allowed.returncode == 0 and allowed.stdout == b"deploy\n", allowed.stderr

    # A certificate of the proxy's CA would outlive the key's entry: a key-mapped session gets none.
    env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "DISPLAY")}
    asked = subprocess.run(["ssh", *proxy.client.certificate_options(keys["runner"]), "-p", str(proxy.client.port),
                            "-l", runner, "-s", proxy.client.host, CERT_SUBSYSTEM],
                           input=keys["runner.pub"].encode(), env=env, capture_output=True, timeout=60)
    assert asked.returncode == 1 and b"no certificate for a login with a key mapped" in asked.stderr, asked
    assert b"-cert-v01@openssh.com" not in asked.stdout


def test_another_user_an_expired_mapping_and_an_unknown_key_are_auth_failures(proxy, keys):
    other = new_user()
    assert proxy.client.ssh_with_key(other, keys["runner"], "echo no").returncode == 255
    denied = refusal(session_of(proxy, other))
    assert denied["reason"].startswith("user_mismatch") and proxy.runner in denied["reason"]

    assert proxy.client.ssh_with_key(proxy.old, keys["expired"], "echo no").returncode == 255
    assert refusal(session_of(proxy, proxy.old))["reason"].startswith("expired")

    stranger = new_user()
    result = proxy.client.ssh_with_key(stranger, keys["unknown"], "echo no")
    assert result.returncode == 255 and b"Permission denied" in result.stderr
    events = session_of(proxy, stranger)
    fingerprint = asyncssh.import_public_key(keys["unknown.pub"]).get_fingerprint()
    denied = refusal(events)
    assert denied["reason"].startswith("unknown_public_key") and fingerprint in denied["reason"]
    assert events[0].body["identity"] is None and events[0].body["attributes"]["key_fingerprints"] == fingerprint
    assert not [m for m in messages(events) if m["type"] in ("exec", "channel-open")]


def test_without_a_list_no_key_logs_in(proxy, keys):
    result = proxy.plain_client.ssh_with_key(proxy.runner, keys["runner"], "echo no")
    assert result.returncode == 255 and result.stdout == b""
    assert b"publickey" not in result.stderr  # not even offered as a method: closed by default


def ssh_settings(tmp_path, entries: str) -> SSHSettings:
    """An SSH listener's settings from a TOML [[proxy]] entry with `entries` appended."""
    for name in ("host", "upstream"):
        asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(tmp_path / name))
    target = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    text = f'''[[proxy]]
name = "s"
protocol = "ssh"
listen = "127.0.0.1:0"
upstream = "ssh://root@127.0.0.1:22"
upstream_key_file = "upstream"
upstream_host_key = "{target}"
host_key_file = "host"
{entries}'''
    raw = tomllib.loads(text)["proxy"][0]
    return SSHSettings.from_config(ProxySettings.from_table(Table(tmp_path / "custody.toml", "proxy.0", raw)))


def test_the_authorized_key_settings(tmp_path):
    key = asyncssh.generate_private_key("ssh-ed25519", comment="ci@runner-3")
    line = key.export_public_key().decode().strip()
    (tmp_path / "k.pub").write_text(line + "\n")
    assert ssh_settings(tmp_path, "").authorized_keys == {}
    settings = ssh_settings(tmp_path, f'''
[[proxy.authorized_key]]
key_file = "k.pub"
username = "ci"
groups = ["ci"]
expires = 2027-01-01T00:00:00Z
''')
    (entry,) = settings.authorized_keys.values()
    assert entry.username == "ci" and entry.groups == ("ci",)
    assert entry.expires.isoformat() == "2027-01-01T00:00:00+00:00"
    assert authorized_keys.describe(entry) == {"key_fingerprint": key.get_fingerprint(), "key_comment": "ci@runner-3"}
    for entries, complaint in (
            (f'key = "{line}"\nusername = "a"\n[[proxy.authorized_key]]\nkey = "{line}"\nusername = "b"',
             "already mapped to 'a'"),
            (f'key = "{line}"\nusername = "a"\ngroup = ["ci"]', "group: unknown key"),
            (f'key = "{line}"\nusername = "a"\nexpires = "2027-01-01T00:00:00"', "with an offset"),
            (f'key = "{line}"\nusername = "a"\nexpires = "soon"', "expected a date-time"),
            ('key = "ssh-ed25519 AAAA"\nusername = "a"', "not an OpenSSH public key"),
            ('username = "a"', "key: an OpenSSH public key line"),
            (f'key = "{line}"', "username: missing")):
        with pytest.raises(ConfigError, match=complaint):
            ssh_settings(tmp_path, "[[proxy.authorized_key]]\n" + entries)
