"""Cancel across proxy replicas: two proxies (replica 0 and 1 of one [[proxy]]) in front of the machine's
PostgreSQL, behind a round-robin TCP load balancer. psycopg's session goes to replica 0; its conn.cancel_safe()
opens a new connection, which the balancer gives to replica 1, which forwards it, sealed on the replicas'
authenticated channel, to replica 0: the pg_sleep ends with 57014 and the cancel is in replica 0's session.
Forged keys and forged forwarded cancels are ignored.
"""

from __future__ import annotations

import itertools
import secrets
import socket
import struct
import threading
import time

import psycopg
import pytest

from pg_fixtures import EventLog, messages, new_app, start_proxy
from proxy.core.peers import PeerChannel
from proxy.postgres import cancel

CANCEL_CODE = 80877102


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RoundRobin:
    """A TCP load balancer: each new connection goes to the next backend of `order`."""

    def __init__(self, order) -> None:
        self.order = iter(order)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            backend = socket.create_connection(("127.0.0.1", next(self.order)))
            for a, b in ((client, backend), (backend, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def replicas(broker, tmp_path_factory):
    secret = tmp_path_factory.mktemp("secret") / "cancel.secret"
    secret.write_text(secrets.token_hex(32) + "\n")
    secret.chmod(0o600)
    ports = [free_port(), free_port()]
    peers = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
    running = []
    for replica_id, port in enumerate(ports):
        keys = f'replica_id = {replica_id}\nreplicas = [{peers}]\ncancel_secret_file = "{secret}"\n'
        proxy = start_proxy(tmp_path_factory.mktemp(f"replica{replica_id}"), broker,
                            replace={'listen = "127.0.0.1:0"': f'listen = "127.0.0.1:{port}"',
                                     'policy = "policies/default.toml"': "# no policy"},
                            proxy_keys=keys)
        running.append(proxy)
    running[0].events = EventLog.open(running[0])
    yield running, secret.read_text().strip()
    running[0].events.close()
    for proxy in running:
        proxy.background.stop()


def raw_cancel(port: int, process_id: int, key_field: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(struct.pack(">iIi", 12 + len(key_field), CANCEL_CODE, process_id) + key_field)
        s.settimeout(5)
        assert s.recv(1) == b""  # the proxy closes a cancel connection without a word, as PostgreSQL does


def sleep_in_thread(conn: psycopg.Connection, seconds: float) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        started = time.monotonic()
        try:
            conn.execute(f"SELECT pg_sleep({seconds})")
            outcome["result"] = "finished"
        except psycopg.Error as exc:
            outcome["result"] = exc.sqlstate
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.5)  # the statement is running at the target
    return thread, outcome


def the_key(proxy, process_id: int) -> bytes:
    """The secret replica 0 gave its client (what libpq keeps from BackendKeyData)."""
    keys = proxy.background.service.proxies[0].protocol.cancel_keys
    return proxy.background.call(lambda: keys._targets[process_id][0])


def test_cancel_through_the_other_replica(replicas):
    (a, b), _ = replicas
    balancer = RoundRobin(itertools.chain([a.address()[1]], itertools.repeat(b.address()[1])))
    app = new_app("cancel")
    try:
        dsn = a.dsn(application_name=app).replace(f"port='{a.address()[1]}'", f"port='{balancer.port}'")
        with psycopg.connect(dsn, autocommit=True) as conn:
            process_id = conn.info.backend_pid
            assert cancel.owner(process_id) == 0 and process_id > 0
            thread, outcome = sleep_in_thread(conn, 30)
            conn.cancel_safe()  # a new connection: the balancer sends it to replica 1 (cancel() would hold the GIL)
            thread.join(10)
            assert outcome["result"] == "57014" and outcome["seconds"] < 5
            assert conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on
    finally:
        balancer.close()
    events = a.events.session(app)
    [record] = [m for m in messages(events, "client") if m["type"] == "CancelRequest"]
    assert record["attributes"]["forwarded_by"].startswith("replica 1 (127.0.0.1:")
    assert record["attributes"]["source_address"].startswith("127.0.0.1:")
    assert record["attributes"]["redacted"] == "cancel key" and not record["data"]


def test_raw_cancel_to_the_other_replica_and_forgeries(replicas):
    (a, b), shared = replicas
    app = new_app("forged")
    with psycopg.connect(a.dsn(application_name=app), autocommit=True) as conn:
        process_id = conn.info.backend_pid
        key = the_key(a, process_id)
        # forgeries first: a wrong key via replica 1, a forwarded cancel sealed with another secret,
        # one that was sealed right but altered, and a replay of a genuine one
        thread, outcome = sleep_in_thread(conn, 2.5)
        raw_cancel(b.address()[1], process_id, secrets.token_bytes(4))
        wrong = PeerChannel(b"not the replicas' secret at all")
        raw_cancel(a.address()[1], process_id, cancel.forwarded_key_field(wrong, 1, process_id, key, "10.0.0.9:1"))
        right = PeerChannel(shared.encode())
        other_pid = process_id ^ 1  # sealed for another process id: the HMAC binds it
        raw_cancel(a.address()[1], process_id, cancel.forwarded_key_field(right, 1, other_pid, key, "10.0.0.9:1"))
        thread.join(10)
        assert outcome["result"] == "finished" and outcome["seconds"] >= 2.4
        # the key replica 0 gave, sent raw to replica 1: cancelled
        thread, outcome = sleep_in_thread(conn, 30)
        genuine = cancel.forwarded_key_field(right, 1, process_id, key, "10.0.0.9:1")
        raw_cancel(b.address()[1], process_id, key)
        thread.join(10)
        assert outcome["result"] == "57014" and outcome["seconds"] < 5
        # a genuine forwarded cancel is good once
        raw_cancel(a.address()[1], process_id, genuine)
        time.sleep(1)  # its (idle) cancel has reached the target
        thread, outcome = sleep_in_thread(conn, 1.5)
        raw_cancel(a.address()[1], process_id, genuine)
        thread.join(10)
        assert outcome["result"] == "finished"
    events = a.events.session(app)
    cancels = [m["attributes"] for m in messages(events, "client") if m["type"] == "CancelRequest"]
    assert len(cancels) == 2  # the key via replica 1, and the first use of the sealed one
    assert all(c["forwarded_by"].startswith("replica 1 ") for c in cancels)


def test_replica_settings_are_checked(tmp_path, broker):
    from ingest.settings import ConfigError

    with pytest.raises(ConfigError, match="cancel_secret_file: missing"):
        start_proxy(tmp_path / "x", broker, proxy_keys='replica_id = 0\nreplicas = ["127.0.0.1:1"]\n')
    with pytest.raises(ConfigError, match="replica_id: 2 is not an index"):
        start_proxy(tmp_path / "y", broker, proxy_keys='replica_id = 2\nreplicas = ["127.0.0.1:1"]\n')
