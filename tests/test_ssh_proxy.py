"""The SSH proxy with the real OpenSSH clients (ssh, sftp, scp) and a real sshd started by the test: what
the client did works as direct, and the events say exactly what was done, both ways, per channel.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from custody.cli import cli
from pg_fixtures import EventLog, messages, start_proxy
from ssh_fixtures import Client, new_user, ssh_proxy_entry, sshd, start_sshd  # noqa: F401 (sshd: a fixture)

SSH_POLICY = '''
hold_timeout_seconds = 30

[[rule]]
name = "block-rm-rf-root"
action = "block"
message = "rm -rf of / is not allowed through Custody"
protocols = ["ssh"]
operations = ["command"]
text = '^rm -(rf|fr|r -f|f -r) /+$'

[[rule]]
name = "hold-shutdown"
action = "hold"
message = "shutdown-like commands need approval by dba"
protocols = ["ssh"]
operations = ["command"]
text = '^touch /tmp/custody-held-'
approvers = ["dba"]

[[rule]]
name = "block-marker-lines"
action = "block"
message = "custody-blocked markers are not allowed through Custody"
protocols = ["ssh"]
operations = ["command"]
text = '^touch /tmp/custody-blocked-'

[[rule]]
name = "block-upload-to-etc"
action = "block"
message = "uploads to /etc are not allowed through Custody"
protocols = ["ssh"]
operations = ["transfer"]
objects = ["/etc/*"]
attributes = { direction = ["upload"] }

[[mask]]
name = "mask-terminal-for-contractors"
detectors = ["email", "credit_card"]
groups = ["contractor"]
'''


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory, sshd):
    directory = tmp_path_factory.mktemp("custody")
    (directory / "policies").mkdir()
    (directory / "policies" / "ssh.toml").write_text(SSH_POLICY)
    wrong = start_sshd(tmp_path_factory.mktemp("other-sshd"))  # only for a host key that is not the target's
    wrong.stop()
    running = start_proxy(directory, broker, extra_proxies=ssh_proxy_entry(sshd) + ssh_proxy_entry(
        sshd, name="impostor-ssh", host_key=wrong.host_key_pub))
    running.events = EventLog.open(running)
    host_pub = (directory / "keys" / "ssh_host_ed25519.pub").read_text().strip()
    running.client = Client(tmp_path_factory.mktemp("client"), *running.address(1), host_pub)
    running.impostor_client = Client(tmp_path_factory.mktemp("client2"), *running.address(2), host_pub)
    yield running
    running.events.close()
    running.background.stop()


def session_of(proxy, user: str, timeout: float = 20.0):
    found = proxy.events.find(lambda start: start["protocol"] == "ssh" and start["attributes"].get("user") == user,
                              timeout)
    assert len(found) == 1, (f"expected one SSH session of {user}, got {len(found)}: " + repr(
        [[(e.kind, e.body.get("attributes") or e.body.get("reason")) for e in events]
                                      for events in proxy.events.sessions.values()][-3:]))
    events = found[0]
    assert [e.seq for e in events] == list(range(len(events)))
    return events


def channel_bytes(events, kind: str, direction: str, stderr: bool = False) -> bytes:
    return b"".join(m["data"] for m in messages(events, direction)
                    if m["type"] == kind and (m["attributes"].get("stream") == "stderr") == stderr)


def test_exec_output_stdin_and_exit_status_are_relayed_and_recorded(proxy):
    user = new_user()
    token = proxy.token(user, ("dev",))
    result = proxy.client.ssh(user, token, "cat; echo out-$((6*7)); echo err >&2; exit 3", input=b"from-stdin\n")
    assert result.returncode == 3, result.stderr
    assert result.stdout == b"from-stdin\nout-42\n"
    assert result.stderr == b"err\n"

    events = session_of(proxy, user)
    start = events[0].body
    assert start["identity"]["subject"] == user and start["target"] == "local-ssh"
    assert start["upstream"].endswith(f"127.0.0.1:{proxy.config.proxies[1].table.raw['upstream'].rsplit(':', 1)[1]}")
    assert start["attributes"]["upstream_host_key"].startswith("SHA256:")
    assert start["client_application"].startswith("SSH-2.0-OpenSSH")
    execs = [m for m in messages(events, "client") if m["type"] == "exec"]
    assert [(m["operation"], m["text"]) for m in execs] == [("command", "cat; echo out-$((6*7)); echo err >&2; exit 3")]
    channel = execs[0]["channel"]
    assert all(m["channel"] == channel for m in messages(events) if m["type"] in ("data", "eof", "exit-status"))
    assert channel_bytes(events, "data", "client") == b"from-stdin\n"
    assert channel_bytes(events, "data", "server") == b"from-stdin\nout-42\n"
    assert channel_bytes(events, "data", "server", stderr=True) == b"err\n"
    exit_status = next(m for m in messages(events, "server") if m["type"] == "exit-status")
    assert (exit_status["attributes"]["status"], exit_status["outcome"], exit_status["error_code"]) == ("3", "error", "3")
    login = next(m for m in messages(events, "client") if m["type"] == "userauth-request")
    assert login["data"] == b"" and login["attributes"]["redacted"] == "token"
    assert not any(token.encode()[:40] in e.value for e in events)
    assert events[-1].body["reason"] == "client_disconnect"


def test_blocked_command_gets_the_reason_on_stderr_and_exit_126(proxy):
    user = new_user()
    result = proxy.client.ssh(user, proxy.token(user, ("dev",)), "sudo", "'rm'", '"-rf"', "/")
    assert result.returncode == 126
    assert b"custody: rm -rf of / is not allowed through Custody" in result.stderr
    events = session_of(proxy, user)
    decisions = [e.body for e in events if e.kind == "policy_decision"]
    assert [(d["rule"], d["action"]) for d in decisions] == [("block-rm-rf-root", "block")]
    assert decisions[0]["statement"] == "sudo 'rm' \"-rf\" /"
    exit_status = next(m for m in messages(events, "server") if m["type"] == "exit-status")
    assert exit_status["attributes"] == {"status": "126", "origin": "proxy"} and exit_status["outcome"] == "error"


def test_held_command_runs_once_a_reviewer_approves(proxy, tmp_path):
    user, marker = new_user(), f"/tmp/custody-held-{time.time_ns()}"
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=proxy.client.ssh(
        user, proxy.token(user, ("dev",)), f"touch {marker} && echo done")))
    thread.start()
    deadline = time.monotonic() + 20
    request_id = None
    while request_id is None:
        assert time.monotonic() < deadline, "no hold"
        proxy.events.poll(0.2)
        for events in proxy.events.sessions.values():
            if events[0].kind == "session_start" and events[0].body["attributes"].get("user") == user:
                request_id = next((e.body["request_id"] for e in events if e.kind == "policy_decision"), None)
    runner = CliRunner()
    approved = runner.invoke(cli, ["approvals", "approve", request_id, "--reason", "CHG-7", "--token",
                                   proxy.token("bob@example.com", ("dba",)), "--config", str(proxy.config.path)])
    assert approved.exit_code == 0, approved.output
    thread.join(40)
    result = outcome["result"]
    assert result.returncode == 0 and result.stdout == b"done\n", result.stderr
    assert b"waiting for approval, request " + request_id.encode() in result.stderr
    events = session_of(proxy, user)
    assert [(e.body["action"], e.body["rule"]) for e in events if e.kind == "policy_decision"] == [
        ("hold", "hold-shutdown"), ("approve", "hold-shutdown")]


def test_lines_typed_in_an_interactive_shell_are_decided_at_their_enter(proxy):
    user, tag = new_user(), time.time_ns()
    blocked, typed, held = (Path(f"/tmp/custody-{kind}-{tag}") for kind in ("blocked", "typed", "held"))
    term = proxy.client.terminal(user, proxy.token(user, ("dev",)))
    try:
        term.send(b"PS1='P''> '; echo rea''dy\r")  # quoted apart: the terminal's echo of the line is not the output
        term.expect(b"ready")
        term.expect(b"P> ")
        # Typed by a person, with a typo erased: the line the shell runs is the one decided.
        term.send(f"touch {str(blocked)[:-2]}X\x7f{str(blocked)[-2:]}\r".encode())
        term.expect(b"custody: custody-blocked markers are not allowed through Custody")
        term.expect(b"P> ")
        term.send(f"touch {typed}; echo made-$((6*7))\r".encode())  # sent whole, as an agent does
        term.expect(b"made-42")
        held_notice = term.expect(b"--reason", timeout=5) if term.send(f"touch {held}\r".encode()) is None else b""
        request_id = re.search(rb"request (\S+) ", held_notice).group(1).decode()
        assert not held.exists()
        approved = CliRunner().invoke(cli, ["approvals", "approve", request_id, "--reason", "CHG-8", "--token",
                                            proxy.token("bob@example.com", ("dba",)), "--config", str(proxy.config.path)])
        assert approved.exit_code == 0, approved.output
        term.expect(b"P> ")
        # A secret typed at a password prompt is not a command: not decided, its text not kept.
        term.send(b"read -s -p 'Pass''word: ' pw; echo got-${#pw}\r")
        term.expect(b"Password: ")
        secret = f"s3cret-{tag}"
        term.send(secret.encode() + b"\r")
        term.expect(f"got-{len(secret)}".encode())
        term.send(b"exit\r")
        assert term.close() == 0
        assert not blocked.exists() and typed.exists() and held.exists()
    finally:
        for path in (blocked, typed, held):
            path.unlink(missing_ok=True)

    events = session_of(proxy, user)
    lines = [m for m in messages(events, "client") if m["type"] == "line"]
    assert [(m["text"], m["attributes"]["input"]) for m in lines] == [
        ("PS1='P''> '; echo rea''dy", "typed"), (f"touch {blocked}", "typed"),
        (f"touch {typed}; echo made-$((6*7))", "typed"), (f"touch {held}", "typed"),
        ("read -s -p 'Pass''word: ' pw; echo got-${#pw}", "typed"), (None, "secret"), ("exit", "typed")]
    assert all(m["operation"] == "command" for m in lines if m["text"]) and lines[5]["data"] == b""
    assert not any(secret.encode() in m["data"] for m in messages(events) if m["type"] == "line")
    assert [(e.body["rule"], e.body["action"]) for e in events if e.kind == "policy_decision"] == [
        ("block-marker-lines", "block"), ("hold-shutdown", "hold"), ("hold-shutdown", "approve")]
    wiped = [m for m in messages(events, "client") if m["type"] == "data" and m["attributes"].get("origin") == "proxy"]
    assert [m["data"] for m in wiped] == [b"\x05\x15\r"]


def test_a_terminal_shows_detected_values_masked_with_its_escape_sequences_intact(proxy):
    import base64

    from nacl.public import PrivateKey

    from ingest.sealing import open_sealed

    user = new_user()
    token = proxy.token(user, ("contractor",))
    command = r"printf '\033[1mcard 4111 1111 1111 1111\033[0m \033]0;title\007mail alice@example.com\n'"
    shown = proxy.client.ssh(user, token, command, extra=("-tt",))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == b"\x1b[1mcard **** **** **** 1111\x1b[0m \x1b]0;title\x07mail a***@example.com\r\n"
    other = new_user()
    plain = proxy.client.ssh(other, proxy.token(other, ("contractor",)), command)  # no PTY: a byte stream
    # (scp -O, tar, rsync), relayed as it is
    assert b"4111 1111 1111 1111" in plain.stdout and b"alice@example.com" in plain.stdout

    events = session_of(proxy, user, 20)
    masked = [m for m in messages(events, "server") if m["type"] == "data" and "masked" in m["attributes"]]
    assert [m["attributes"]["masked"] for m in masked] == ["credit_card,email"]
    assert masked[0]["data"] == shown.stdout  # the evidence holds what the client saw
    custodian = PrivateKey(base64.b64decode((proxy.directory / "keys" / "custodian.key").read_text()))
    assert b"4111 1111 1111 1111" in open_sealed(masked[0]["sealed_original"], custodian)


def test_bad_token_and_wrong_user_are_refused(proxy):
    user = new_user()
    result = proxy.client.ssh(user, "not-a-token", "true")
    assert result.returncode == 255
    other = new_user()
    wrong = proxy.client.ssh(other, proxy.token(new_user(), ("dev",)), "true")
    assert wrong.returncode == 255
    for who, reason in ((user, "malformed"), (other, "user_mismatch")):
        events = session_of(proxy, who)
        assert events[0].body["identity"] is None
        denial = next(e.body for e in events if e.kind == "policy_decision")
        assert (denial["rule"], denial["action"]) == ("authentication", "deny")
        assert events[-1].body["reason"] == "auth_failed", denial
    denial = next(e.body for e in session_of(proxy, other) if e.kind == "policy_decision")
    assert denial["reason"].startswith("user_mismatch")


def test_a_target_whose_host_key_is_not_the_pinned_one_is_refused(proxy):
    user = new_user()
    result = proxy.impostor_client.ssh(user, proxy.token(user, ("dev",)), "echo should-not-run")
    assert result.returncode == 255 and b"should-not-run" not in result.stdout
    events = session_of(proxy, user)
    error = next(e.body for e in events if e.kind == "protocol_error")
    assert error["code"] == "host_key_not_verified" and "pinned upstream_host_key" in error["message"]
    assert events[-1].body["reason"] == "upstream_unavailable"


def test_sftp_put_and_get_keep_the_file_bytes_and_hashes_in_the_evidence(proxy, tmp_path):
    user = new_user()
    payload = bytes(range(256)) * 1200 + b"tail"  # 307,204 bytes: several 32 KiB SFTP writes and reads
    local, back, remote = tmp_path / "up.bin", tmp_path / "down.bin", f"/tmp/custody-sftp-{time.time_ns()}.bin"
    local.write_bytes(payload)
    result = proxy.client.sftp(user, proxy.token(user, ("dev",)),
                               f"put {local} {remote}\nget {remote} {back}\nrm {remote}\nput {local} /etc/custody-x\n")
    assert result.returncode != 0, result  # the last command was refused
    assert back.exists(), result
    assert back.read_bytes() == payload
    assert b"Permission denied" in result.stderr or b"permission denied" in result.stderr.lower()

    events = session_of(proxy, user)
    digest = hashlib.sha256(payload).hexdigest()
    client, server = messages(events, "client"), messages(events, "server")
    assert any(m["type"] == "subsystem" and m["attributes"]["subsystem"] == "sftp" for m in client)
    written = b"".join(m["data"][m["data"].index(b"\0\0\0") :] for m in client if m["type"] == "sftp:write")
    assert payload[:4096] in written  # the uploaded bytes are in the recorded packets
    closes = [m["attributes"] for m in server if m["attributes"].get("sha256")]
    assert [(c["path"], c["direction"], c["size"], c["sha256"], c["complete"]) for c in closes] == [
        (remote, "upload", str(len(payload)), digest, "true"), (remote, "download", str(len(payload)), digest, "true")]
    transfers = [(m["text"], m["objects"]) for m in client if m["operation"] == "transfer"]
    assert transfers == [(f"sftp upload {remote}", [remote]), (f"sftp download {remote}", [remote]),
                         (f"sftp remove {remote}", [remote]), ("sftp upload /etc/custody-x", ["/etc/custody-x"])]
    decisions = [(e.body["rule"], e.body["action"]) for e in events if e.kind == "policy_decision"]
    assert decisions == [("block-upload-to-etc", "block")]
    denied = [m for m in server if m["type"] == "sftp:status" and m["attributes"].get("origin") == "proxy"]
    assert len(denied) == 1 and denied[0]["error_code"] == "permission_denied"


def test_scp_over_sftp_and_legacy_scp_are_transfers_with_their_bytes(proxy, tmp_path):
    user = new_user()
    token = proxy.token(user, ("dev",))
    payload = b"scp payload\n" * 5000
    local, back, remote = tmp_path / "a.txt", tmp_path / "b.txt", f"/tmp/custody-scp-{time.time_ns()}.txt"
    local.write_bytes(payload)
    up = proxy.client.scp(user, token, str(local), proxy.client.target(remote))  # the default: SFTP underneath
    assert up.returncode == 0, up.stderr
    down = proxy.client.scp(user, token, "-O", proxy.client.target(remote), str(back))  # legacy: exec scp -f
    assert down.returncode == 0, down.stderr
    assert back.read_bytes() == payload
    refused = proxy.client.scp(user, token, "-O", str(local), proxy.client.target("/etc/custody-scp"))
    assert refused.returncode != 0 and b"uploads to /etc are not allowed" in refused.stderr

    deadline = time.monotonic() + 20
    while True:
        sessions = proxy.events.find(lambda s: s["protocol"] == "ssh" and s["attributes"].get("user") == user)
        if len(sessions) == 3 or time.monotonic() > deadline:
            break
        proxy.events.poll()
    assert len(sessions) == 3, [[e.kind for e in events] for events in sessions]
    sessions.sort(key=lambda events: events[0].ts)
    first, legacy, blocked = sessions
    digest = hashlib.sha256(payload).hexdigest()
    assert [m["attributes"]["sha256"] for m in messages(first, "server") if m["attributes"].get("sha256")] == [digest]
    execs = [m for m in messages(legacy, "client") if m["type"] == "exec"]
    assert [(m["operation"], m["text"], m["objects"]) for m in execs] == [("transfer", f"scp -f {remote}", [remote])]
    assert payload in channel_bytes(legacy, "data", "server")
    assert [(e.body["rule"], e.body["action"]) for e in blocked if e.kind == "policy_decision"] == [
        ("block-upload-to-etc", "block")]


def test_port_forwarding_is_refused_unless_a_rule_allows_it(proxy, sshd):
    user = new_user()
    result = proxy.client.ssh(user, proxy.token(user, ("dev",)), extra=("-W", f"127.0.0.1:{sshd.port}"))
    assert result.returncode == 255 and b"stdio forwarding failed" in result.stderr, result.stderr
    events = session_of(proxy, user)
    opened = next(m for m in messages(events, "client") if m["type"] == "direct-tcpip")
    assert (opened["operation"], opened["text"]) == ("forward", f"127.0.0.1:{sshd.port}")
    assert [(e.body["rule"], e.body["action"]) for e in events if e.kind == "policy_decision"] == [
        ("forwarding-closed-by-default", "block")]
