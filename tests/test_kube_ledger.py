"""End to end through the ledger: kubectl through the Kubernetes proxy (tests/kube_server.py behind it), sealed
by the real ledger. A blocked `kubectl delete secret` is in `custody violations tail` and in `custody activity
--protocol kubernetes` beside the exec; `custody replay` of the exec reads as a terminal (stdin, stdout, the
status by channel) and `--format asciicast` writes it for asciinema (stdin only with --input).
"""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from custody.cli import cli
from ingest.keys import Keyring, load_key_file
from ledger.service import LedgerService
from ledger.settings import LedgerSettings
from kube_fixtures import UPSTREAM_TOKEN, Kubectl, start_kube_proxy
from kube_server import KubeServer
from pg_fixtures import EventLog, make_tls
from test_kube_proxy import POLICY_RULES, exec_in_a_terminal


@pytest.fixture(scope="module")
def sealed(broker, tmp_path_factory):
    tls = make_tls(tmp_path_factory.mktemp("tls"))
    directory = tmp_path_factory.mktemp("custody")
    with KubeServer(UPSTREAM_TOKEN) as kube:
        proxy = start_kube_proxy(directory, broker, kube, tls, POLICY_RULES)
        events = EventLog.open(proxy)
        try:
            kubectl = Kubectl(proxy, tls, tmp_path_factory.mktemp("kubectl"))
            ran = kubectl("exec", "-i", "web-1", "--", "cat", input="typed-in\n")
            assert ran.returncode == 0 and ran.stdout == "typed-in\n", ran.stderr
            exec_in_a_terminal(kubectl, rows=30, columns=100)
            blocked = kubectl("delete", "secret", "db-creds", "--wait=false")
            assert blocked.returncode != 0 and "Forbidden" in blocked.stderr
            found, deadline = [], time.monotonic() + 30
            while len(found) < 4 or not any(e.kind == "session_end" for s in found for e in s[-1:]):
                assert time.monotonic() < deadline, "the sessions did not end"
                found = events.find(lambda s: (s["identity"] or {}).get("subject") == kubectl.subject, timeout=1)
                events.poll()
            time.sleep(1)
            events.poll()
            found = events.find(lambda s: (s["identity"] or {}).get("subject") == kubectl.subject, timeout=1)
            keys = directory / "keys"
            settings = LedgerSettings(dir=directory / "ledger", origin="custody.test/ledger", segment_max_events=1000,
                                      segment_max_bytes=1 << 24, segment_max_seconds=0.3, idle_seal_seconds=3600)
            service = LedgerService(proxy.kafka, settings, load_key_file(keys / "ledger.key"),
                                    Keyring.load(keys / "keyring.toml"), group_id=f"kube-{kubectl.subject}")
            total = sum(len(s) for s in found)
            deadline = time.monotonic() + 60
            while service.sealed_leaves < total or any(w.opened_at is not None for w in service.writers.values()):
                assert time.monotonic() < deadline, "the ledger did not seal in time"
                service.step(0.1)
            service.close()
            yield proxy, kubectl.subject, found, settings.dir
        finally:
            events.close()
            proxy.background.stop()


def custody(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output + str(result.exception)
    return result.output


def test_a_blocked_delete_secret_is_a_violation_and_in_activity(sealed):
    proxy, subject, _, ledger = sealed
    config = ("--config", str(proxy.config.path))
    deadline, mine = time.monotonic() + 30, []
    while not mine:
        assert time.monotonic() < deadline, "no violation on the topic"
        lines = custody("violations", "tail", "--format", "json", *config).splitlines()
        mine = [v for v in map(json.loads, lines) if (v.get("identity") or {}).get("subject") == subject]
    assert [(v["category"], v["statement"]) for v in mine] == [
        ("policy_block", "DELETE /api/v1/namespaces/default/secrets/db-creds")]
    assert mine[0]["target"] == "test-cluster"
    rows = json.loads(custody("activity", "--identity", subject, "--protocol", "kubernetes", "--format", "json",
                              "--ledger", str(ledger), *config))
    shown = [(r["protocol"], r["operation"], r["text"], r.get("policy_action")) for r in rows]
    assert ("kubernetes", "command", "cat", None) in shown
    assert ("kubernetes", "request", "DELETE /api/v1/namespaces/default/secrets/db-creds", "block") in shown


def test_replay_of_an_exec_reads_as_a_terminal_and_as_asciicast(sealed, tmp_path):
    proxy, subject, found, ledger = sealed
    config = ("--ledger", str(ledger), "--config", str(proxy.config.path))
    exec_id = next(s[0].session_id for s in found
                   if any(e.kind == "frames" and any(m.get("operation") == "command" and m.get("text") == "cat"
                                                     for m in e.body["messages"]) for e in s))
    text = custody("replay", exec_id, *config)
    assert text.startswith("VERIFIED"), text
    lines = text.splitlines()
    assert any("INPUT" in line for line in lines) and any("OUTPUT" in line for line in lines), text
    assert any("STATUS" in line and "Success" in line for line in lines), text
    assert "typed-in" in text
    cast = tmp_path / "exec.cast"
    custody("replay", exec_id, "--format", "asciicast", "-o", str(cast), *config)
    header, *frames = [json.loads(line) for line in cast.read_text().splitlines()]
    assert (header["version"], header["command"]) == (2, "cat")
    assert "default/web-1" in header["title"]
    assert "".join(f[2] for f in frames if f[1] == "o") == "typed-in\n"
    assert not any(f[1] == "i" for f in frames)
    typed = custody("replay", exec_id, "--format", "asciicast", "--input", *config)
    assert "".join(json.loads(line)[2] for line in typed.splitlines()[1:] if json.loads(line)[1] == "i") == "typed-in\n"


def test_an_exec_in_a_terminal_replays_as_that_terminal(sealed, tmp_path):
    """`kubectl exec -it` on a 100x30 PTY: the asciicast has the recorded size, the shell's output with its
    echo as the user saw it, and what was typed only with --input."""
    proxy, _, found, ledger = sealed
    config = ("--ledger", str(ledger), "--config", str(proxy.config.path))
    tty_id = next(s[0].session_id for s in found
                  if any(e.kind == "frames" and any(m.get("operation") == "command" and m.get("text") == "sh"
                                                    for m in e.body["messages"]) for e in s))
    assert custody("replay", tty_id, *config).startswith("VERIFIED")
    header, *frames = [json.loads(line) for line in custody("replay", tty_id, "--format", "asciicast",
                                                             *config).splitlines()]
    assert (header["width"], header["height"], header["command"]) == (100, 30, "sh")
    assert "".join(f[2] for f in frames if f[1] == "o") == "$ echo from-a-tty\r\nfrom-a-tty\r\n$ exit\r\n"
    assert not any(f[1] == "i" for f in frames)
    typed = [json.loads(line) for line in custody("replay", tty_id, "--format", "asciicast", "--input",
                                                  *config).splitlines()[1:]]
    assert "".join(f[2] for f in typed if f[1] == "i") == "echo from-a-tty\rexit\r"
