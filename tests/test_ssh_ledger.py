"""End to end: an interactive shell (a real PTY: keystrokes, a window change), an exec and an sftp put and get
through the SSH proxy, sealed by the real ledger; `custody activity` shows them with protocol ssh, `custody
replay` reads them, `--format asciicast` writes the terminal with its resizes (keystrokes only with --input),
and `--extract-file` rebuilds the transferred file from the ledger.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import html
import json
import os
import pty
import re
import struct
import subprocess
import termios
import time

import pytest
from click.testing import CliRunner
from PIL import Image

from custody.cli import cli, run
from ingest.keys import Keyring, load_key_file
from ledger.service import LedgerService
from ledger.settings import LedgerSettings
from pg_fixtures import EventLog, start_proxy
from ssh_fixtures import Client, keygen, new_user, ssh_proxy_entry, start_sshd
from test_query_html import chromium

BLOCK_RM_RF = '''
[[rule]]
name = "block-ssh-rm-rf"
action = "block"
message = "rm -rf through Custody is not allowed"
protocols = ["ssh"]
operations = ["command"]
text = '^rm -rf '
'''


def resize(fd: int, rows: int, columns: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def read_until(fd: int, needle: bytes, timeout: float = 20) -> bytes:
    seen, deadline = b"", time.monotonic() + timeout
    while needle not in seen:
        assert time.monotonic() < deadline, f"{needle!r} not seen in {seen[-500:]!r}"
        try:
            seen += os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.02)
    return seen


@pytest.fixture(scope="module")
def sealed(broker, tmp_path_factory):
    sshd = start_sshd(tmp_path_factory.mktemp("sshd"))
    directory = tmp_path_factory.mktemp("custody")
    impostor_key = keygen(tmp_path_factory.mktemp("impostor") / "key")  # a host key that is not the target's
    proxy = start_proxy(directory, broker, extra_proxies=ssh_proxy_entry(sshd, policy="policies/default.toml")
                        + ssh_proxy_entry(sshd, name="impostor-ssh", host_key=impostor_key,
                                          policy="policies/default.toml"))
    policy = directory / "policies" / "default.toml"
    policy.write_text(policy.read_text() + BLOCK_RM_RF)
    time.sleep(1.2)  # reloaded at most once a second
    events = EventLog.open(proxy)
    host_pub = (directory / "keys" / "ssh_host_ed25519.pub").read_text().strip()
    client = Client(tmp_path_factory.mktemp("client"), *proxy.address(1), host_pub)
    user, offender = new_user(), new_user()
    token = proxy.token(user, ("dev",))
    try:
        blocked = client.ssh(offender, proxy.token(offender, ("dev",)), "rm -rf /srv/data")
        assert blocked.returncode == 126 and b"rm -rf through Custody is not allowed" in blocked.stderr
        impostor = Client(tmp_path_factory.mktemp("client2"), *proxy.address(2), host_pub)
        refused = impostor.ssh(offender, proxy.token(offender, ("dev",)), "echo should-not-run")
        assert refused.returncode == 255 and b"should-not-run" not in refused.stdout
        ran = client.ssh(user, token, "echo exec-$((40+2))")
        assert ran.returncode == 0 and ran.stdout == b"exec-42\n", ran.stderr
        master, slave = pty.openpty()
        resize(slave, 30, 100)
        shell = subprocess.Popen(["ssh", *client.options(), "-tt", "-p", str(client.port), "-l", user, client.host],
                                 stdin=slave, stdout=slave, stderr=slave, env=client.env(token), start_new_session=True)
        os.close(slave)
        os.set_blocking(master, False)
        os.write(master, b"export PS1='cus''tody$ '\r")  # the prompt, not the local echo of this line
        read_until(master, b"custody$ ")
        resize(master, 40, 120)
        os.kill(shell.pid, 28)  # SIGWINCH: ssh sends window-change
        time.sleep(0.3)
        os.write(master, b"stty size; echo typed-secret-$((1+1))\r")
        read_until(master, b"typed-secret-2")
        os.write(master, b"exit 5\r")
        assert shell.wait(20) == 5
        os.close(master)
        transfer = sftp_put_and_get(client, proxy, tmp_path_factory.mktemp("files"))
        sessions = []
        deadline = time.monotonic() + 30
        while len(sessions) < 2:
            assert time.monotonic() < deadline
            sessions = events.find(lambda s: s["protocol"] == "ssh" and s["attributes"].get("user") == user)
            events.poll()
        keys = directory / "keys"
        settings = LedgerSettings(dir=directory / "ledger", origin="custody.test/ledger", segment_max_events=1000,
                                  segment_max_bytes=1 << 24, segment_max_seconds=0.3, idle_seal_seconds=3600)
        service = LedgerService(proxy.kafka, settings, load_key_file(keys / "ledger.key"),
                                Keyring.load(keys / "keyring.toml"), group_id=f"ssh-{user}")
        offended: list = []
        while len(offended) < 2:
            assert time.monotonic() < deadline
            offended = events.find(lambda s: s["protocol"] == "ssh" and s["attributes"].get("user") == offender)
            events.poll()
        [transferred] = events.find(lambda s: s["protocol"] == "ssh" and s["attributes"].get("user") == transfer.user)
        total = sum(len(s) for s in [*sessions, *offended, transferred])
        deadline = time.monotonic() + 60
        while service.sealed_leaves < total or any(w.opened_at is not None for w in service.writers.values()):
            assert time.monotonic() < deadline, "the ledger did not seal in time"
            service.step(0.1)
        service.close()
        sessions.sort(key=lambda s: s[0].ts)
        yield proxy, user, sessions, settings.dir, offender, dataclasses.replace(
            transfer, session=transferred[0].session_id)
    finally:
        events.close()
        proxy.background.stop()
        sshd.stop()


@dataclasses.dataclass(frozen=True)
class Transfer:
    """An sftp put of a file and its get back, by a user of its own (one session)."""

    user: str
    remote: str
    sha256: str
    size: int
    session: str = ""


def sftp_put_and_get(client: Client, proxy, directory) -> Transfer:
    user, local, back = new_user(), directory / "up.bin", directory / "down.bin"
    local.write_bytes(os.urandom(300_000))  # several 32 KiB writes and reads, several in flight
    remote = f"/tmp/custody-extract-{time.time_ns()}.bin"
    done = client.sftp(user, proxy.token(user, ("dev",)), f"put {local} {remote}\nget {remote} {back}\nrm {remote}\n")
    assert done.returncode == 0, done.stderr
    assert back.read_bytes() == local.read_bytes()
    return Transfer(user, remote, hashlib.sha256(local.read_bytes()).hexdigest(), local.stat().st_size)


def custody(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output + str(result.exception)
    return result.output


def test_activity_shows_the_ssh_operations(sealed):
    proxy, user, sessions, ledger, _, _ = sealed
    rows = json.loads(custody("activity", "--identity", user, "--protocol", "ssh", "--format", "json",
                              "--ledger", str(ledger), "--config", str(proxy.config.path)))
    assert [(r["protocol"], r["operation"], r["text"], r["outcome"]) for r in rows] == [
        ("ssh", "command", "echo exec-$((40+2))", "ok"), ("ssh", "command", "shell", None),
        # the lines typed in the shell, each decided at its Enter; the shell's exit status is its last line's
        ("ssh", "command", "export PS1='cus''tody$ '", None),
        ("ssh", "command", "stty size; echo typed-secret-$((1+1))", None), ("ssh", "command", "exit 5", "error")]


def test_replay_and_asciicast_of_the_shell(sealed, tmp_path):
    proxy, user, sessions, ledger, _, _ = sealed
    shell_id = sessions[1][0].session_id
    text = custody("replay", shell_id, "--ledger", str(ledger), "--config", str(proxy.config.path))
    assert text.startswith("VERIFIED") and "typed-secret-2" in text and "120x40" in text, text
    assert "pty-req: term=xterm, columns=100, rows=30" in text
    assert "exit-status: status=5" in text or "EXIT   5" in text, text
    cast = tmp_path / "s.cast"
    custody("replay", shell_id, "--format", "asciicast", "-o", str(cast), "--ledger", str(ledger),
            "--config", str(proxy.config.path))
    lines = [json.loads(line) for line in cast.read_text().splitlines()]
    header, frames = lines[0], lines[1:]
    assert (header["version"], header["width"], header["height"]) == (2, 100, 30)
    assert [f[2] for f in frames if f[1] == "r"] == ["120x40"]
    output = "".join(f[2] for f in frames if f[1] == "o")
    assert "40 120" in output and "typed-secret-2" in output
    assert not any(f[1] == "i" for f in frames)
    assert all(a[0] <= b[0] for a, b in zip(frames, frames[1:]))
    with_input = custody("replay", shell_id, "--format", "asciicast", "--input", "--ledger", str(ledger),
                         "--config", str(proxy.config.path))
    typed = "".join(json.loads(line)[2] for line in with_input.splitlines()[1:] if json.loads(line)[1] == "i")
    assert "echo typed-secret-$((1+1))" in typed


def test_the_html_replay_plays_the_terminal_with_no_script(sealed, tmp_path):
    proxy, user, sessions, ledger, _, _ = sealed
    page = tmp_path / "shell.html"
    custody("replay", sessions[1][0].session_id, "--format", "html", "-o", str(page), "--ledger", str(ledger),
            "--config", str(proxy.config.path))
    text = page.read_text()
    assert "<script" not in text and "default-src 'none'" in text
    frames = [(float(at), html.unescape(screen)) for at, screen in re.findall(
        r'<pre(?: class="last")? style="animation-delay:([0-9.]+)s"[^>]*>(.*?)</pre>', text, re.S)]
    assert len(frames) >= 3 and all(a[0] <= b[0] for a, b in zip(frames, frames[1:]))
    assert not any("\x1b" in screen for _, screen in frames)  # escape sequences are played, never shown
    last = frames[-1][1].splitlines()
    assert any(line.rstrip() == "40 120" for line in last) and "typed-secret-2" in last, last  # what the user saw
    assert any(line.startswith("custody$ ") for line in last) and not any("custody$" in s for _, s in frames[:1])
    # Chromium on virtual time (animations run on it only with every compositor stage before each draw): the
    # page shown at its start and after the session's length are other pictures, so the terminal plays.
    early, late = tmp_path / "early.png", tmp_path / "late.png"
    timed = ("--window-size=1200,1000", "--run-all-compositor-stages-before-draw")
    chromium(f"--screenshot={early}", *timed, "--virtual-time-budget=1", page.as_uri())
    chromium(f"--screenshot={late}", *timed, f"--virtual-time-budget={int(frames[-1][0] * 1000) + 3000}",
             page.as_uri())
    assert Image.open(early).convert("RGB").tobytes() != Image.open(late).convert("RGB").tobytes(), \
        "the terminal did not play in Chromium"


def test_a_blocked_command_and_a_refused_host_key_reach_violations_tail(sealed):
    proxy, _, _, ledger, offender, _ = sealed
    config = ("--config", str(proxy.config.path))
    deadline, mine = time.monotonic() + 30, []
    while len(mine) < 2:
        assert time.monotonic() < deadline, f"violations on the topic: {mine}"
        lines = custody("violations", "tail", "--format", "json", *config).splitlines()
        mine = [v for v in map(json.loads, lines) if (v.get("identity") or {}).get("subject") == offender]
    by_target = {v["target"]: v for v in mine}
    assert sorted(by_target) == ["impostor-ssh", "local-ssh"], mine
    blocked, refused = by_target["local-ssh"], by_target["impostor-ssh"]
    assert (blocked["category"], blocked["statement"]) == ("policy_block", "rm -rf /srv/data")
    assert (blocked["rule"], blocked["action"], blocked["detail"]) == (
        "block-ssh-rm-rf", "block", "rm -rf through Custody is not allowed")
    assert (refused["category"], refused["reason"]) == ("protocol_error", "host_key_not_verified")
    assert "pinned upstream_host_key" in refused["detail"]
    rows = json.loads(custody("activity", "--identity", offender, "--protocol", "ssh", "--format", "json",
                              "--ledger", str(ledger), *config))
    assert [(r["operation"], r["text"], r.get("policy_action")) for r in rows] == [
        ("command", "rm -rf /srv/data", "block")]


def test_the_uploaded_and_downloaded_file_is_extracted_from_the_ledger(sealed, tmp_path, capsys, monkeypatch):
    proxy, _, _, ledger, _, transfer = sealed
    where = ("--ledger", str(ledger), "--config", str(proxy.config.path))
    extract = ("replay", transfer.session, "--extract-file", transfer.remote, *where)
    for nth, mode, out in ((("--nth", "1"), "upload", tmp_path / "up.bin"), ((), "download", tmp_path / "down.bin")):
        assert run([*extract, *nth, "-o", str(out)]) == 0  # the put is the first transfer of the path, the get the last
        assert hashlib.sha256(out.read_bytes()).hexdigest() == transfer.sha256
        line = capsys.readouterr().out
        assert line == (f"MATCH {transfer.remote} ({mode}, {transfer.size} bytes, SHA-256 {transfer.sha256}) as "
                        f"recorded, written to {out}; session {transfer.session} verified\n")

    assert run(["replay", transfer.session, "--extract-file", "/etc/absent", "-o", str(tmp_path / "x"), *where]) == 2
    assert capsys.readouterr().err == (f"error: no SFTP transfer of '/etc/absent' in this session "
                                       f"(transferred: {transfer.remote})\n")
    assert run([*extract, "--nth", "3", "-o", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == f"error: --nth 3: {transfer.remote!r} was transferred 2 time(s) in this session\n"

    # Bytes that are not what the proxy hashed as they went through (one flipped here) are named, never a MATCH.
    from custody.commands import query as commands

    real = commands.extract_file

    def tampered(*args, **kwargs):
        verification, file = real(*args, **kwargs)
        return verification, dataclasses.replace(file, data=b"X" + file.data[1:])

    monkeypatch.setattr(commands, "extract_file", tampered)
    assert run([*extract, "-o", str(tmp_path / "bad.bin")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {transfer.remote} (download, {transfer.size} bytes) rebuilt from session "
                          f"{transfer.session} is not the recorded transfer: SHA-256 ") and err.count("\n") == 1
    assert f"!= recorded {transfer.sha256} (written to {tmp_path / 'bad.bin'} for inspection)" in err
