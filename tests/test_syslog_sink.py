"""The syslog sink (issue 18): OCSF documents from Kafka to Debian's rsyslog, started here on a free loopback
port with its own config, over TCP with octet counting, TLS (RFC 5425, a test CA, client certificates required)
and UDP (RFC 5426). Delivery is at least once, never blocking the ledger: rsyslog stopped for 10 s loses nothing,
a receiver down when the sink starts gets everything once it is up, and a restarted sink resumes after what it had
confirmed (not sent again). Order is not promised (three partitions); de-duplicate on the id."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ingest import kafka, syslog
from ingest.settings import KafkaSettings, SocSettings
from ssh_fixtures import free_port
from syslog_fixtures import RSYSLOGD, Rsyslog, RunningSink, uids, wait_committed, wait_for

pytestmark = pytest.mark.skipif(not Path(RSYSLOGD).exists(), reason="rsyslog is not installed (apt-get install rsyslog)")


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


def receiving(kafka_settings: KafkaSettings, tmp_path: Path, group: str, documents: int, transport: str = "tcp",
              tls: dict | None = None, start: bool = True) -> tuple[Rsyslog, SocSettings]:
    """rsyslogd on a free loopback port (started unless `start` is False), [soc] settings whose sink forwards to it
    as a group of this test's own, and `documents` findings already on custody.violations.ocsf."""
    port = free_port()
    receiver = Rsyslog(tmp_path / "rsyslog", port, transport, tls)
    if start:
        receiver.start()
    soc = SocSettings(ocsf=True, syslog=f"{transport}://127.0.0.1:{port}", syslog_group=f"{group}-{port}")
    kafka.ensure_topics(kafka_settings, ("violations.ocsf",))
    publish(kafka_settings, [finding(n) for n in range(documents)])
    return receiver, soc


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
    receiver, soc = receiving(kafka_settings, tmp_path, "syslog", 50)
    sink = syslog.SyslogSink(kafka_settings, soc, syslog.Destination.parse(soc.syslog), confirm_seconds=1.0)
    stop = threading.Event()
    runner = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    runner.start()
    try:
        wait_for(lambda: len(receiver.received()) >= 50, 30, "rsyslog did not get the first 50")
        msgid, app, sd, doc = next(r for r in receiver.received() if r[3]["metadata"]["uid"] == "v-0")
        assert msgid == "OCSF-2004" and app == "custody" and 'id="v-0"' in sd and doc == finding(0)
        wait_committed(kafka_settings, soc.syslog_group, 50)  # the first 50 confirmed and committed

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


def test_tls_rfc5425_to_rsyslog_with_a_test_ca_and_a_client_certificate(kafka_settings, tmp_path):
    """rsyslogd's imtcp with the OpenSSL stream driver (rsyslog-openssl) requires a client certificate from the
    test CA; the sink checks rsyslogd's certificate against the same CA and presents its own."""
    from pg_fixtures import make_tls
    if not any(Path("/usr/lib").glob("*/rsyslog/lmnsd_ossl.so")):
        pytest.skip("rsyslog-openssl is not installed")
    tls = make_tls((tmp_path / "ca").mkdir() or tmp_path / "ca")
    receiver, soc = receiving(kafka_settings, tmp_path, "tls", 30, "tls", tls)
    destination = syslog.Destination.parse(soc.syslog, tls["ca"], tls["client_cert"], tls["client_key"])
    try:
        other = make_tls((tmp_path / "other").mkdir() or tmp_path / "other")  # a CA rsyslogd's certificate is not of
        with pytest.raises(ssl.SSLCertVerificationError):
            syslog.Connection(syslog.Destination.parse(soc.syslog, other["ca"], tls["client_cert"], tls["client_key"]))
        anonymous = syslog.Connection(syslog.Destination.parse(soc.syslog, tls["ca"]))  # no client certificate
        try:
            anonymous.send([syslog.message(finding(999))])
        except OSError:
            pass  # refused in the handshake or right after it
        anonymous.close()
        with RunningSink(kafka_settings, soc, destination):
            wait_for(lambda: len(receiver.received()) >= 30, 30, "rsyslog did not get the 30 over TLS")
            wait_committed(kafka_settings, soc.syslog_group, 30)  # confirmed and committed
            receiver.stop()  # an outage over TLS: the sink sees the connection go and resends once it is back
            publish(kafka_settings, [finding(n) for n in range(30, 50)])
            time.sleep(3)
            receiver.start()
            wait_for(lambda: set(uids(receiver)) >= {f"v-{n}" for n in range(50)}, 60, "lost across the TLS outage")
    finally:
        receiver.stop()
    assert set(uids(receiver)) == {f"v-{n}" for n in range(50)}, "not v-999: it had no client certificate"
    msgid, app, sd, doc = next(r for r in receiver.received() if r[3]["metadata"]["uid"] == "v-7")
    assert msgid == "OCSF-2004" and app == "custody" and 'id="v-7"' in sd and doc == finding(7)


def test_udp_rfc5426_to_rsyslog(kafka_settings, tmp_path):
    """One message per datagram; rsyslogd's imudp parses each (no delivery guarantee on UDP: none lost here)."""
    receiver, soc = receiving(kafka_settings, tmp_path, "udp", 30, "udp")
    try:
        with RunningSink(kafka_settings, soc, syslog.Destination.parse(soc.syslog)):
            wait_for(lambda: len(receiver.received()) >= 30, 30, "rsyslog did not get the 30 datagrams")
    finally:
        receiver.stop()
    assert sorted(uids(receiver)) == sorted(f"v-{n}" for n in range(30))
    msgid, app, sd, doc = next(r for r in receiver.received() if r[3]["metadata"]["uid"] == "v-3")
    assert msgid == "OCSF-2004" and 'session="s-0"' in sd and doc == finding(3)


def test_a_receiver_down_when_the_sink_starts_gets_everything_once_it_is_up(kafka_settings, tmp_path):
    receiver, soc = receiving(kafka_settings, tmp_path, "down", 40, start=False)
    try:
        with RunningSink(kafka_settings, soc, syslog.Destination.parse(soc.syslog)) as sink:
            time.sleep(3)  # retrying with backoff, nothing sent, nothing committed
            assert sink.sent == 0
            receiver.start()
            wait_for(lambda: len(receiver.received()) >= 40, 30, "nothing arrived once the receiver was up")
    finally:
        receiver.stop()
    assert sorted(uids(receiver)) == sorted(f"v-{n}" for n in range(40))


def test_a_restarted_sink_resumes_after_what_it_confirmed(kafka_settings, tmp_path):
    """The committed offset is where a new sink of the same group starts: what was confirmed is not sent again,
    what came while no sink ran is sent."""
    receiver, soc = receiving(kafka_settings, tmp_path, "again", 20)
    destination = syslog.Destination.parse(soc.syslog)
    try:
        with RunningSink(kafka_settings, soc, destination):
            wait_for(lambda: len(receiver.received()) >= 20, 30, "the first 20 did not arrive")
            wait_committed(kafka_settings, soc.syslog_group, 20)  # confirmed (1 s) and committed
        publish(kafka_settings, [finding(n) for n in range(20, 45)])  # no sink running
        with RunningSink(kafka_settings, soc, destination):
            wait_for(lambda: len(receiver.received()) >= 45, 30, "what came while no sink ran did not arrive")
            time.sleep(1.5)
    finally:
        receiver.stop()
    assert sorted(uids(receiver)) == sorted(f"v-{n}" for n in range(45)), "each exactly once"


def test_custody_up_runs_the_sink_when_soc_syslog_is_set(tmp_path):
    """`custody up` with `[soc] syslog = "tcp://…"` starts `custody violations forward` beside the ledger: a real
    psql-protocol session through the stack's proxy arrives at rsyslogd as OCSF (its logon and its statement);
    SIGTERM stops the whole stack, the sink with it, within the bound."""
    import os
    import sys

    import psycopg

    from custody.init import initialise
    from custody.up import stop_bound
    from ingest.broker import free_port as broker_port

    port, proxy_port, kafka_port = free_port(), broker_port(), broker_port()
    receiver = Rsyslog(tmp_path / "rsyslog", port)
    receiver.start()
    config = initialise(tmp_path / "deployment", proxy_port=proxy_port, broker_port=kafka_port)
    config.write_text(config.read_text() + f'\n[soc]\nocsf = true\nactivity = true\nsyslog = "tcp://127.0.0.1:{port}"\n')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    log = tmp_path / "up.log"
    up = subprocess.Popen([sys.executable, "-m", "custody", "up", "--config", str(config)], stdout=log.open("wb"),
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        def listening() -> bool:
            assert up.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", proxy_port), 0.2).close()
                return True
            except OSError:
                return False
        wait_for(listening, 60, "custody up did not listen")
        token = subprocess.run([sys.executable, "-m", "custody", "token", "issue", "--sub", "alice@example.com",
                                "--groups", "dba", "--config", str(config)], capture_output=True, text=True, env=env,
                               check=True).stdout.strip()
        with psycopg.connect(host="127.0.0.1", port=proxy_port, user="alice@example.com", dbname="postgres",
                             password=token, sslmode="disable", application_name="up-syslog") as conn:
            conn.execute("SELECT 42")
        wait_for(lambda: any(d.get("query_info", {}).get("query_string") == "SELECT 42"
                             for *_, d in receiver.received()), 60, f"nothing forwarded:\n{log.read_text()}")
        assert "syslog |" in log.read_text() and "forwarding" in log.read_text()
        got = {(msgid, d["actor"]["user"]["uid"]) for msgid, _, _, d in receiver.received()
               if d.get("actor", {}).get("user", {}).get("uid")}
        assert {("OCSF-3002", "alice@example.com"), ("OCSF-6005", "alice@example.com")} <= got
        started = time.monotonic()
        up.send_signal(signal.SIGTERM)
        up.wait(stop_bound() + 5)
        assert time.monotonic() - started <= stop_bound()
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        receiver.stop()


def test_a_receiver_that_drops_every_connection_is_retried_with_pauses_not_in_a_loop(kafka_settings, tmp_path):
    """A receiver that accepts and at once closes (a proxy in front of a dead SIEM, a full one): the sink sees each
    connection go, resends from the committed offset, and pauses longer each time (0.2 s, 0.4 s, … max_backoff)
    instead of reconnecting and resending the same batch in a tight loop; nothing is committed meanwhile."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted: list[float] = []

    def drop_all() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(time.monotonic())
            conn.close()
    threading.Thread(target=drop_all, daemon=True).start()
    soc = SocSettings(ocsf=True, syslog=f"tcp://127.0.0.1:{port}", syslog_group=f"drop-{port}")
    kafka.ensure_topics(kafka_settings, ("violations.ocsf",))
    publish(kafka_settings, [finding(n) for n in range(20)])
    try:
        with RunningSink(kafka_settings, soc, syslog.Destination.parse(soc.syslog)) as sink:
            time.sleep(5)
            assert 2 <= len(accepted) <= 8, f"{len(accepted)} connections in 5 s"
            assert all(b - a >= 0.15 for a, b in zip(accepted, accepted[1:])), "no pause between attempts"
            assert not sink.consumer.committed(next(iter(sink.consumer.assignment()))), "nothing confirmed"
    finally:
        server.close()
