"""The syslog sink (issue 18): OCSF documents from Kafka to Debian's rsyslog, started here on a free loopback
port with its own config, over TCP with octet counting; rsyslog stopped for 10 s loses nothing."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ingest import kafka, syslog
from ingest.settings import KafkaSettings, SocSettings
from ssh_fixtures import free_port

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
pytestmark = pytest.mark.skipif(not Path(RSYSLOGD).exists(), reason="rsyslog is not installed (apt-get install rsyslog)")


class Rsyslog:
    def __init__(self, directory: Path, port: int):
        self.dir, self.port, self.out = directory, port, directory / "received.log"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "work").mkdir(exist_ok=True)
        (directory / "rsyslog.conf").write_text(f"""
global(workDirectory="{directory / 'work'}")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="{port}")
template(name="fields" type="list") {{
  property(name="msgid") constant(value="\\t") property(name="app-name") constant(value="\\t")
  property(name="structured-data") constant(value="\\t") property(name="msg") constant(value="\\n")
}}
*.* action(type="omfile" file="{self.out}" template="fields")
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(self.dir / "rsyslog.conf"), "-i", str(self.dir / "pid")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while subprocess.run(["ss", "-ltn", f"sport = :{self.port}"], capture_output=True, text=True).stdout.count(
                "LISTEN") == 0:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            assert time.monotonic() < deadline, "rsyslogd did not listen"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
            self.proc = None

    def received(self) -> list[tuple[str, str, str, dict]]:
        if not self.out.exists():
            return []
        out = []
        for line in self.out.read_text().splitlines():
            msgid, app, sd, msg = line.split("\t", 3)
            out.append((msgid, app, sd, json.loads(msg)))
        return out


def finding(n: int) -> dict:
    return {"class_uid": 2004, "category_uid": 2, "activity_id": 1, "type_uid": 200401, "time": 1767225600000 + n,
            "severity_id": 3, "metadata": {"version": "1.8.0", "product": {"name": "Custody"}, "uid": f"v-{n}",
                                           "correlation_uid": f"s-{n % 3}"},
            "finding_info": {"uid": f"v-{n}", "title": "Blocked by policy: block-drop"}, "message": 'DROP "x"]'}


def publish(settings: KafkaSettings, docs: list[dict]) -> None:
    producer = kafka.producer(settings)
    for d in docs:
        producer.send(settings.topic("violations.ocsf"), key=d["metadata"]["correlation_uid"].encode(),
                      value=json.dumps(d).encode())
    producer.flush()
    producer.close()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_rfc5424_message_and_octet_counting():
    m = syslog.message(finding(1), hostname="h1", procid="7")
    assert m.startswith(b"<108>1 2026-01-01T00:00:00.001Z h1 custody 7 OCSF-2004 [custody@32473 id=\"v-1\" "
                        b"class_uid=\"2004\" session=\"s-1\" version=\"1.8.0\"] {")
    assert syslog.octet_counted(b"abc") == b"3 abc"
    own = syslog.message({"id": "q:1", "time": "2026-01-01T00:00:00Z", "severity": "critical", "session_id": None,
                          "category": "quarantine"}, hostname="h1", procid="7")
    assert own.startswith(b"<106>1 2026-01-01T00:00:00Z h1 custody 7 custody.violation [custody@32473 id=\"q:1\" "
                          b"category=\"quarantine\"]")


def test_rsyslog_receives_everything_across_a_10s_outage(kafka_settings, tmp_path):
    port = free_port()
    receiver = Rsyslog(tmp_path / "rsyslog", port)
    receiver.start()
    soc = SocSettings(ocsf=True, syslog=f"tcp://127.0.0.1:{port}", syslog_group=f"syslog-{port}")
    kafka.ensure_topics(kafka_settings, ("violations.ocsf",))
    publish(kafka_settings, [finding(n) for n in range(50)])
    sink = syslog.SyslogSink(kafka_settings, soc, syslog.Destination.parse(soc.syslog), confirm_seconds=1.0)
    stop = threading.Event()
    runner = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    runner.start()
    try:
        wait_for(lambda: len(receiver.received()) >= 50, 30, "rsyslog did not get the first 50")
        msgid, app, sd, doc = next(r for r in receiver.received() if r[3]["metadata"]["uid"] == "v-0")
        assert msgid == "OCSF-2004" and app == "custody" and 'id="v-0"' in sd and doc == finding(0)
        time.sleep(1.5)  # the first 50 confirmed and committed

        receiver.stop()
        publish(kafka_settings, [finding(n) for n in range(50, 120)])  # sealing goes on while the receiver is away
        time.sleep(10)
        receiver.start()
        wait_for(lambda: {d["metadata"]["uid"] for *_, d in receiver.received()} >= {f"v-{n}" for n in range(120)},
                 60, "documents were lost across the outage")
    finally:
        stop.set()
        runner.join(15)
        receiver.stop()
    ids = [d["metadata"]["uid"] for *_, d in receiver.received()]
    assert set(ids) == {f"v-{n}" for n in range(120)}, "nothing lost, nothing foreign (duplicates de-duplicate by id)"


def test_custody_violations_forward_and_tail_ocsf(kafka_settings, tmp_path):
    """The commands: `custody violations forward --syslog tcp://…` to rsyslog, `tail --format ocsf` prints them."""
    port = free_port()
    receiver = Rsyslog(tmp_path / "rsyslog", port)
    receiver.start()
    config = tmp_path / "custody.toml"
    config.write_text(f'[kafka]\nbootstrap = "{kafka_settings.bootstrap}"\ntopic_prefix = "{kafka_settings.topic_prefix}"\n'
                      f'[soc]\nocsf = true\nsyslog_group = "cli-{port}"\n')
    kafka.ensure_topics(kafka_settings, ("violations.ocsf",))
    publish(kafka_settings, [finding(n) for n in range(5)])
    import os
    import sys
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    tail = subprocess.run([sys.executable, "-m", "custody", "violations", "tail", "--format", "ocsf", "--config",
                           str(config)], capture_output=True, text=True, timeout=60, env=env)
    assert tail.returncode == 0, tail.stderr
    assert sorted(json.loads(line)["metadata"]["uid"] for line in tail.stdout.splitlines()) == [f"v-{n}" for n in range(5)]
    forward = subprocess.Popen([sys.executable, "-m", "custody", "violations", "forward", "--syslog",
                                f"tcp://127.0.0.1:{port}", "--config", str(config)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(receiver.received()) >= 5, 30, "forward did not deliver")
    finally:
        forward.send_signal(signal.SIGTERM)
        forward.wait(20)
        receiver.stop()
    assert {d["metadata"]["uid"] for *_, d in receiver.received()} == {f"v-{n}" for n in range(5)}
