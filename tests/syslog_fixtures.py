"""Helpers for the syslog tests: Debian's rsyslogd on a free loopback port with a config of its own (TCP, TLS
with rsyslog-openssl, or UDP), writing each message it parsed as MSGID, APP-NAME, SD and MSG; the sink on a thread."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from kafka import KafkaAdminClient, TopicPartition

from ingest import syslog
from ingest.settings import KafkaSettings, SocSettings

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"


class Rsyslog:
    """rsyslogd with a config of its own: `tcp` (imtcp, octet counting), `tls` (imtcp with the OpenSSL stream
    driver, RFC 5425; `tls` is make_tls's files: the server certificate, and client certificates from the CA
    required) or `udp` (imudp, RFC 5426); every message written as MSGID, APP-NAME, SD, MSG. maxMessageSize is
    64k: rsyslog's 8k default truncates a document with a long statement."""

    def __init__(self, directory: Path, port: int, transport: str = "tcp", tls: dict | None = None):
        self.dir, self.port, self.out, self.transport = directory, port, directory / "received.log", transport
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "work").mkdir(exist_ok=True)
        extra = ""
        if transport == "udp":
            inputs = f'module(load="imudp")\ninput(type="imudp" address="127.0.0.1" port="{port}")'
        elif transport == "tls":
            extra = (f' DefaultNetstreamDriverCAFile="{tls["ca"]}" DefaultNetstreamDriverCertFile='
                     f'"{tls["server_cert"]}" DefaultNetstreamDriverKeyFile="{tls["server_key"]}"')
            inputs = ('module(load="imtcp" StreamDriver.Name="ossl" StreamDriver.Mode="1" '
                      'StreamDriver.AuthMode="x509/certvalid")\n'
                      f'input(type="imtcp" address="127.0.0.1" port="{port}")')
        else:
            inputs = f'module(load="imtcp")\ninput(type="imtcp" address="127.0.0.1" port="{port}")'
        (directory / "rsyslog.conf").write_text(f"""
global(workDirectory="{directory / 'work'}" maxMessageSize="64k"{extra})
{inputs}
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
        listening = ["ss", "-lun" if self.transport == "udp" else "-ltn", f"sport = :{self.port}"]
        while f":{self.port}" not in subprocess.run(listening, capture_output=True, text=True).stdout:
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


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


class RunningSink:
    """A SyslogSink on a thread of its own, stopped (its consumer closed) on exit."""

    def __init__(self, kafka_settings: KafkaSettings, soc: SocSettings, destination: syslog.Destination):
        self.sink = syslog.SyslogSink(kafka_settings, soc, destination, confirm_seconds=1.0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sink.run, args=(self.stop,), daemon=True)

    def __enter__(self) -> syslog.SyslogSink:
        self.thread.start()
        return self.sink

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(15)
        assert not self.thread.is_alive(), "the sink did not stop"


def uids(receiver: Rsyslog) -> list[str]:
    return [d["metadata"]["uid"] for *_, d in receiver.received()]


def wait_committed(settings: KafkaSettings, group: str, count: int, timeout: float = 30) -> None:
    """Until the group's committed offsets on custody.violations.ocsf add up to `count` (a topic of this test's own,
    from offset 0): what the sink confirmed is committed. Read with an admin client, not the sink's consumer,
    which belongs to the sink's thread."""
    admin = KafkaAdminClient(**settings.client_options())
    partitions = [TopicPartition(settings.topic("violations.ocsf"), p) for p in range(settings.partitions)]
    try:
        wait_for(lambda: sum(max(o.offset, 0) for o in admin.list_group_offsets({group: partitions})[group].values())
                 >= count, timeout,
                 f"{group}: {count} confirmed documents not committed")
    finally:
        admin.close()
