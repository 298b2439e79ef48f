"""MySQL protocol features the audit of issue 13 found untested, against the machine's MariaDB through the
proxy with real clients: a read-only cursor and COM_STMT_FETCH (mysql-connector-python's command API, and a
raw wire client for CLIENT_DEPRECATE_EOF, which no installed client opens a cursor with; fetched rows masked),
COM_STMT_SEND_LONG_DATA, COM_STMT_RESET and COM_STMT_CLOSE, COM_RESET_CONNECTION (records, and `custody
activity` after the real ledger sealed them), a client that resets its socket while a large result streams,
and the settings `upstream_tls = "require"` (this MariaDB has no TLS: refused, never plaintext),
`upstream_password_file` and the session's end at the token's expiry (`[identity] leeway_seconds = 0`);
`client_ca` with `require_client_cert`, and a client on another address that must use TLS to send its token.
"""

from __future__ import annotations

import io
import json
import uuid
import socket
import ssl
import struct
import subprocess
import time
from datetime import datetime, timedelta, timezone

import jwt
import mysql.connector
import pymysql
import pytest
from click.testing import CliRunner
from mysql.connector.constants import ServerFlag

from custody.cli import cli
from ingest.keys import Keyring, load_key_file
from ingest.protocols.mysql import auth
from ingest.protocols.mysql import messages as m
from ingest.protocols.mysql.conversation import Conversation
from ingest.protocols.mysql.packets import PacketReader, make
from ledger.service import LedgerService
from ledger.settings import LedgerSettings
from mysql_fixtures import make_target, proxy_entry
from pg_fixtures import EventLog, make_tls, messages, new_app, start_proxy

PLAIN, TLS, REQUIRE_TLS, PASSWORD_FILE, WRONG_PASSWORD_FILE, CLIENT_CERT, NOT_LOOPBACK = range(1, 8)  # 0: PostgreSQL
CURSOR_TYPE_READ_ONLY = 1


@pytest.fixture(scope="module")
def target():
    target = make_target()
    with target.direct() as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE nums (id INT PRIMARY KEY, label VARCHAR(20))")
        cur.execute("INSERT INTO nums VALUES " + ", ".join(f"({i}, 'n{i}')" for i in range(1, 8)))
        cur.execute("CREATE TABLE logins (id INT PRIMARY KEY, password VARCHAR(64))")
        cur.execute("INSERT INTO logins VALUES (1, 'hunter2-secret'), (2, 'swordfish-secret'), (3, 'letmein-secret')")
    yield target
    target.drop()


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory, target):
    directory = tmp_path_factory.mktemp("custody")
    tls = make_tls(tmp_path_factory.mktemp("tls"))
    (directory / "right.pw").write_text(target.password + "\n")
    (directory / "wrong.pw").write_text("not-the-password\n")

    def from_file(name: str, file: str) -> str:
        return proxy_entry(target, name).replace(f'upstream_password_env = "{target.env}"',
                                                 f'upstream_password_file = "{directory / file}"')

    entries = (proxy_entry(target)
               + proxy_entry(target, "tls-mysql",
                             f'tls_cert = "{tls["server_cert"]}"\ntls_key = "{tls["server_key"]}"\n')
               + proxy_entry(target, "tls-required-mysql", 'upstream_tls = "require"\n')
               + from_file("file-mysql", "right.pw") + from_file("wrong-file-mysql", "wrong.pw")
               + proxy_entry(target, "cert-mysql", f'tls_cert = "{tls["server_cert"]}"\ntls_key = "{tls["server_key"]}"\n'
                             f'client_ca = "{tls["ca"]}"\nrequire_client_cert = true\n')
               + proxy_entry(target, "wide-mysql", f'tls_cert = "{tls["server_cert"]}"\ntls_key = "{tls["server_key"]}"\n')
               .replace('listen = "127.0.0.1:0"', f'listen = "{machine_address()}:0"'))
    running = start_proxy(directory, broker, extra_proxies=entries, replace={
        'dev_signing_key = "keys/dev-idp.key"': 'dev_signing_key = "keys/dev-idp.key"\nleeway_seconds = 0'})
    running.events = EventLog.open(running)
    running.tls = tls
    yield running
    running.events.close()
    running.background.stop()


def machine_address() -> str:
    """An IPv4 address of this machine that is not loopback: a client there is not "on this machine" to the proxy."""
    addresses = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout.split()
    found = [a for a in addresses if "." in a and not a.startswith("127.")]
    assert found, f"this machine has no IPv4 address besides loopback: {addresses}"
    return found[0]


def connector(proxy, target, app: str, user: str = "alice@example.com", groups: tuple[str, ...] = ("dba",),
              **kwargs) -> mysql.connector.MySQLConnection:
    host, port = proxy.address(TLS)
    return mysql.connector.connect(host=host, port=port, user=user, password=proxy.token(user, groups=groups),
                                   database=target.database, auth_plugin="mysql_clear_password", use_pure=True,
                                   ssl_disabled=False, ssl_verify_cert=False, conn_attrs={"program_name": app},
                                   autocommit=True, **kwargs)


def pymysql_to(proxy, target, index: int, app: str, token: str | None = None, **kwargs) -> pymysql.Connection:
    host, port = proxy.address(index)
    return pymysql.connect(host=host, port=port, user="alice@example.com", password=token or proxy.token(),
                           database=target.database, autocommit=True, program_name=app, **kwargs)


def records(events, direction: str, kind: str) -> list[dict]:
    return [m for m in messages(events, direction) if m["type"] == kind]


def proxy_errors(events) -> list[tuple[str, str, str]]:
    return [(m["error_code"], m["attributes"]["errno"], m["error_message"]) for m in records(events, "server", "ERR")
            if m["attributes"].get("origin") == "proxy"]


def cursor_fetches(conn, sql: str, batch: int = 3) -> tuple[int, list[list[tuple]]]:
    """PREPARE, EXECUTE with a read-only cursor, then FETCH `batch` rows twice and the rest; the EXECUTE's status."""
    prepared = conn.cmd_stmt_prepare(sql.encode())
    statement_id = prepared["statement_id"]
    _, columns, eof = conn.cmd_stmt_execute(statement_id, flags=CURSOR_TYPE_READ_ONLY)
    batches = []
    for size in (batch, batch, 100):
        conn.cmd_stmt_fetch(statement_id, size)
        rows, _ = conn.get_rows(binary=True, columns=columns)
        batches.append([tuple(r) for r in rows])
    conn.cmd_stmt_close(statement_id)
    return eof["status_flag"], batches


def test_a_read_only_cursor_fetched_in_batches_same_as_direct_and_recorded(proxy, target):
    sql = "SELECT id, label FROM nums ORDER BY id"
    direct = mysql.connector.connect(host="127.0.0.1", port=3306, user=target.user, password=target.password,
                                     database=target.database, use_pure=True)
    try:
        expected_status, expected = cursor_fetches(direct, sql, 3)
    finally:
        direct.close()
    app = new_app("cursor")
    conn = connector(proxy, target, app)
    try:
        status, batches = cursor_fetches(conn, sql, 3)
        cur = conn.cursor()  # the session goes on after the cursor
        cur.execute("SELECT 42")
        assert cur.fetchall() == [(42,)]
    finally:
        conn.close()
    assert status & ServerFlag.STATUS_CURSOR_EXISTS and expected_status & ServerFlag.STATUS_CURSOR_EXISTS
    assert batches == expected == [[(1, "n1"), (2, "n2"), (3, "n3")], [(4, "n4"), (5, "n5"), (6, "n6")], [(7, "n7")]]
    events = proxy.events.session(app)
    (execute,) = records(events, "client", "COM_STMT_EXECUTE")
    assert execute["statement"] == sql and execute["attributes"]["cursor"] == "read_only"
    statement_id = execute["attributes"]["statement_id"]
    fetches = records(events, "client", "COM_STMT_FETCH")
    assert [m["attributes"]["statement_id"] for m in fetches] == [statement_id] * 3
    opened = [m for m in records(events, "server", "EOF") if m["attributes"].get("cursor") == "open"]
    assert len(opened) == 1  # EXECUTE's answer: the columns, then the rows wait for FETCH
    ends = [m for m in records(events, "server", "EOF") if m.get("rows") is not None]
    assert [m["rows"] for m in ends] == [3, 3, 1, 1]  # the three FETCHes, then SELECT 42
    assert int(ends[2]["attributes"]["status"]) & ServerFlag.STATUS_LAST_ROW_SENT
    assert sum(int(m["attributes"].get("messages", "1")) for m in records(events, "server", "BinaryRow")) == 7
    (close,) = records(events, "client", "COM_STMT_CLOSE")
    assert close["attributes"]["statement_id"] == statement_id
    assert events[-1].body["reason"] == "client_terminate"


def test_rows_fetched_from_a_cursor_are_masked_like_any_others(proxy, target):
    app = new_app("cursor-mask")
    conn = connector(proxy, target, app, user="eve@example.com", groups=("dev",))
    try:
        _, batches = cursor_fetches(conn, "SELECT id, password FROM logins ORDER BY id", 1)
    finally:
        conn.close()
    assert batches == [[(1, "[MASKED:column]")], [(2, "[MASKED:column]")], [(3, "[MASKED:column]")]]
    events = proxy.events.session(app)
    assert not any(b"-secret" in e.value for e in events)
    assert all(m["sealed_original"] for m in records(events, "server", "BinaryRow"))


class RawClient:
    """A client on the wire itself, for what no installed client sends: a cursor under CLIENT_DEPRECATE_EOF
    (MariaDB then ends column definitions and fetched batches with OK packets, not EOF)."""

    def __init__(self, host: str, port: int, user: str, password: str, database: str, app: str,
                 deprecate_eof: bool, token: bool = True) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.deprecate_eof = deprecate_eof
        greeting = m.decode_handshake(self.read()[1])
        caps = (m.CLIENT_PROTOCOL_41 | m.CLIENT_SECURE_CONNECTION | m.CLIENT_PLUGIN_AUTH | m.CLIENT_LONG_PASSWORD
                | m.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA | m.CLIENT_CONNECT_ATTRS | m.CLIENT_TRANSACTIONS
                | (m.CLIENT_DEPRECATE_EOF if deprecate_eof else 0))
        if token:  # the proxy takes the token in clear from loopback
            plugin, answer = auth.CLEAR, password.encode()
        else:  # the target: its password hashed
            plugin, answer = auth.NATIVE, auth.native_password(password, greeting.scramble)
        self.write(1, m.handshake_response(caps, 1 << 24, 45, user, answer, database, plugin, {"program_name": app}))
        seq, reply = self.read()
        if reply[:1] == b"\xfe":  # an auth switch
            switch = m.decode_auth_switch(reply)
            self.write(seq + 1, auth.native_password(password, switch.data))
            seq, reply = self.read()
        assert reply[:1] == b"\x00", reply

    def read(self) -> tuple[int, bytes]:
        head = self._exactly(4)
        return head[3], self._exactly(int.from_bytes(head[:3], "little"))

    def _exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "connection closed"
            data += chunk
        return data

    def write(self, seq: int, payload: bytes) -> None:
        self.sock.sendall(len(payload).to_bytes(3, "little") + bytes((seq,)) + payload)

    def _columns(self, count: int) -> None:
        for _ in range(count):
            self.read()
        if not self.deprecate_eof:
            assert m.is_eof(self.read()[1])

    def prepare(self, sql: str) -> int:
        self.write(0, b"\x16" + sql.encode())
        ok = m.decode_prepare_ok(self.read()[1])
        if ok.params:
            self._columns(ok.params)
        if ok.columns:
            self._columns(ok.columns)
        return ok.statement_id

    def execute_with_cursor(self, statement_id: int) -> int:
        """COM_STMT_EXECUTE with CURSOR_TYPE_READ_ONLY: the columns, then the status that says a cursor is open."""
        self.write(0, b"\x17" + statement_id.to_bytes(4, "little") + bytes((CURSOR_TYPE_READ_ONLY,))
                   + (1).to_bytes(4, "little"))
        count = m.Reader(self.read()[1], "column count").lenenc_int()
        for _ in range(count):
            self.read()
        payload = self.read()[1]
        return m.terminator_status(payload, self.deprecate_eof)[0], len(payload) > 5

    def fetch(self, statement_id: int, rows: int) -> tuple[list[bytes], int, bool]:
        """COM_STMT_FETCH: the binary rows as the wire had them, the batch's closing status, and whether an OK
        packet (not an EOF) closed it."""
        self.write(0, b"\x1c" + statement_id.to_bytes(4, "little") + rows.to_bytes(4, "little"))
        got = []
        while True:
            payload = self.read()[1]
            if m.is_eof(payload, self.deprecate_eof):
                return got, m.terminator_status(payload, self.deprecate_eof)[0], len(payload) > 5
            got.append(payload)

    def close_statement(self, statement_id: int) -> None:
        self.write(0, b"\x19" + statement_id.to_bytes(4, "little"))

    def quit(self) -> None:
        self.write(0, b"\x01")
        self.sock.close()


def raw_cursor(client: RawClient) -> list:
    statement_id = client.prepare("SELECT id, label FROM nums ORDER BY id")
    opened, ok_packet = client.execute_with_cursor(statement_id)
    flags = m.SERVER_STATUS_CURSOR_EXISTS | m.SERVER_STATUS_LAST_ROW_SENT
    out = [(opened & flags, ok_packet)]
    for size in (2, 2, 100):
        rows, status, ok_packet = client.fetch(statement_id, size)
        out.append((rows, status & flags, ok_packet))
    client.close_statement(statement_id)
    client.quit()
    return out


@pytest.mark.parametrize("deprecate_eof", [True, False], ids=["deprecate-eof", "eof"])
def test_a_raw_client_cursor_is_the_same_as_direct_byte_for_byte(proxy, target, deprecate_eof):
    direct = raw_cursor(RawClient("127.0.0.1", 3306, target.user, target.password, target.database, "direct",
                                  deprecate_eof, token=False))
    app = new_app("raw-cursor")
    host, port = proxy.address(PLAIN)
    through = raw_cursor(RawClient(host, port, "alice@example.com", proxy.token(), target.database, app,
                                   deprecate_eof))
    assert through == direct
    assert direct[0] == (m.SERVER_STATUS_CURSOR_EXISTS, deprecate_eof)
    assert [(len(rows), ok_packet) for rows, _, ok_packet in direct[1:]] == [(n, deprecate_eof) for n in (2, 2, 3)]
    assert direct[-1][1] & m.SERVER_STATUS_LAST_ROW_SENT
    events = proxy.events.session(app)
    (login,) = records(events, "client", "HandshakeResponse")
    assert bool(int(login["attributes"]["capabilities"], 16) & m.CLIENT_DEPRECATE_EOF) == deprecate_eof
    assert events[-1].body["reason"] == "client_terminate"
    (execute,) = records(events, "client", "COM_STMT_EXECUTE")
    assert execute["attributes"]["cursor"] == "read_only"
    assert len(records(events, "client", "COM_STMT_FETCH")) == 3
    assert [m_["rows"] for m_ in records(events, "server", "EOF") if m_.get("rows") is not None] == [2, 2, 3]
    assert not [e for e in events if e.kind == "protocol_error"]


def test_send_long_data_reset_and_close_recorded(proxy, target):
    blob = bytes(range(256)) * 1200  # 300 KiB: mysql-connector sends it in 128 KiB COM_STMT_SEND_LONG_DATA packets
    app = new_app("long-data")
    conn = connector(proxy, target, app)
    try:
        prepared = conn.cmd_stmt_prepare(b"SELECT LENGTH(?), MD5(?), ?")
        statement_id, parameters = prepared["statement_id"], prepared["parameters"]
        conn.cmd_stmt_send_long_data(statement_id, 0, io.BytesIO(b"thrown away by the reset"))
        conn.cmd_stmt_reset(statement_id)  # the long data sent so far is discarded
        _, columns, _ = conn.cmd_stmt_execute(statement_id, data=(io.BytesIO(blob), io.BytesIO(blob), 7),
                                              parameters=parameters)
        conn.unread_result = True  # as the prepared cursor's _handle_result says, before it reads the rows
        rows, _ = conn.get_rows(binary=True, columns=columns)
        conn.cmd_stmt_close(statement_id)
        with pytest.raises(mysql.connector.Error) as closed:  # the target forgot it, and so did the proxy
            conn.cmd_stmt_execute(statement_id, data=(1, 2, 3), parameters=parameters)
        assert closed.value.errno == 1243
        cur = conn.cursor()
        cur.execute("SELECT MD5(%s)", (blob,))
        (expected_md5,) = cur.fetchone()
    finally:
        conn.close()
    assert [tuple(r) for r in rows] == [(len(blob), expected_md5, 7)]
    events = proxy.events.session(app)
    long_data = records(events, "client", "COM_STMT_SEND_LONG_DATA")
    assert [(m["attributes"]["statement_id"], m["attributes"]["parameter"], m["attributes"]["bytes"])
            for m in long_data] == [(str(statement_id), "0", "24")] + [
        (str(statement_id), p, n) for p in "01" for n in ("131072", "131072", str(len(blob) - 2 * 131072))]
    (reset,) = records(events, "client", "COM_STMT_RESET")
    assert reset["attributes"]["statement_id"] == str(statement_id)
    execute, after_close = records(events, "client", "COM_STMT_EXECUTE")
    assert after_close.get("statement") is None and after_close["attributes"] == {"statement_id": str(statement_id)}
    assert execute["statement"] == "SELECT LENGTH(?), MD5(?), ?"
    assert execute["parameters"] == ["\\x" + blob.hex()] * 2 + ["7"]  # the long data, its 3 packets joined;
    # not the data the reset discarded
    (close,) = records(events, "client", "COM_STMT_CLOSE")
    assert close["attributes"]["statement_id"] == str(statement_id)
    assert [m["attributes"]["errno"] for m in messages(events, "server") if m["outcome"] == "error"] == ["1243"]


def test_reset_connection_is_relayed_recorded_and_the_session_goes_on(proxy, target):
    app = new_app("reset")
    conn = connector(proxy, target, app)
    try:
        cur = conn.cursor()
        cur.execute("SET @marker = 'before'")
        prepared = conn.cmd_stmt_prepare(b"SELECT ?")
        assert conn.cmd_reset_connection()
        cur = conn.cursor()
        cur.execute("SELECT @marker")  # the target reset the session: the user variable is gone
        assert cur.fetchall() == [(None,)]
        with pytest.raises(mysql.connector.Error) as unknown:  # so is the prepared statement
            conn.cmd_stmt_execute(prepared["statement_id"], data=(1,), parameters=prepared["parameters"])
        assert unknown.value.errno == 1243
        cur.execute("SELECT DATABASE()")
        assert cur.fetchall() == [(target.database,)]
    finally:
        conn.close()
    events = proxy.events.session(app)
    ordered = [(m.get("direction") or e.body["direction"], m) for e in events if e.kind == "frames"
               for m in e.body["messages"]]
    reset = next(i for i, (_, m) in enumerate(ordered) if m["type"] == "COM_RESET_CONNECTION")
    answer = next(m for direction, m in ordered[reset + 1:] if direction == "server")
    assert (answer["type"], answer["outcome"]) == ("OK", "ok")
    (execute,) = records(events, "client", "COM_STMT_EXECUTE")
    assert execute["attributes"]["statement_id"] == str(prepared["statement_id"])
    assert "statement" not in execute or execute.get("statement") is None  # forgotten with the reset
    (unknown_err,) = [m for m in records(events, "server", "ERR") if m["attributes"]["errno"] == "1243"]
    assert unknown_err["outcome"] == "error"
    assert events[-1].body["reason"] == "client_terminate"


def test_a_client_gone_mid_result_ends_its_session_and_the_proxy_serves_the_next(proxy, target):
    app = new_app("abrupt")
    host, port = proxy.address(PLAIN)
    client = RawClient(host, port, "alice@example.com", proxy.token(), target.database, app, deprecate_eof=False)
    client.write(0, b"\x03SELECT seq, REPEAT('x', 500) FROM seq_1_to_200000")  # ~100 MB if read to its end
    assert client.read() == (1, b"\x02")  # two columns: the result has begun
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()  # a reset, with most of the result still coming
    events = proxy.events.session(app)
    assert events[-1].body["reason"] == "client_disconnect"
    assert records(events, "client", "COM_QUERY")[-1]["statement"].startswith("SELECT seq")
    assert records(events, "server", "TextRow")  # some rows were relayed before the end
    with pymysql_to(proxy, target, PLAIN, new_app("after")) as after, after.cursor() as cur:
        cur.execute("SELECT count(*) FROM nums")
        assert cur.fetchone() == (7,)
    assert target_threads_running("SELECT seq, REPEAT%", within=10) == 0  # the proxy hung up on the target too


def target_threads_running(pattern: str, within: float) -> int:
    """How many of the target's threads still run a statement like `pattern`, once none do or `within` passed."""
    deadline = time.monotonic() + within
    with pymysql.connect(host="127.0.0.1", port=3306, user="root", password="") as root, root.cursor() as cur:
        while True:
            cur.execute("SELECT count(*) FROM information_schema.processlist WHERE info LIKE %s", (pattern,))
            (running,) = cur.fetchone()
            if running == 0 or time.monotonic() > deadline:
                return running
            time.sleep(0.2)


def test_upstream_tls_require_against_a_target_without_tls_is_refused(proxy, target):
    app = new_app("tls-require")
    with pytest.raises(pymysql.err.MySQLError) as refused:
        pymysql_to(proxy, target, REQUIRE_TLS, app)
    reason = 'the target does not offer TLS, and upstream_tls = "require" requires it'
    assert reason in str(refused.value)
    events = proxy.events.session(app)
    assert events[-1].body["reason"] == "upstream_unavailable"
    [(_, _, message)] = proxy_errors(events)
    assert reason in message and "'tls-required-mysql' is unavailable" in message
    assert not records(events, "client", "COM_QUERY")


def test_upstream_password_file_logs_in_and_a_wrong_one_is_refused(proxy, target):
    app = new_app("pw-file")
    with pymysql_to(proxy, target, PASSWORD_FILE, app) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_user()")
        assert cur.fetchone() == (f"{target.user}@127.0.0.1",)
    assert proxy.events.session(app)[0].body["target"] == "file-mysql"
    app = new_app("pw-wrong")
    with pytest.raises(pymysql.err.MySQLError) as refused:
        pymysql_to(proxy, target, WRONG_PASSWORD_FILE, app)
    assert "the target refused the proxy's login (1045 28000)" in str(refused.value)
    events = proxy.events.session(app)
    assert events[-1].body["reason"] == "upstream_unavailable"
    assert not any(b"not-the-password" in e.value or target.password.encode() in e.value for e in events)


def exp_of(token: str) -> datetime:
    return datetime.fromtimestamp(jwt.decode(token, options={"verify_signature": False})["exp"], timezone.utc)


def test_an_idle_session_ends_when_its_token_expires(proxy, target):
    app = new_app("exp-idle")
    token = proxy.token(ttl=timedelta(seconds=3))
    exp = exp_of(token)
    conn = pymysql_to(proxy, target, PLAIN, app, token=token)
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    time.sleep(max(0.0, (exp - datetime.now(timezone.utc)).total_seconds()) + 1.0)
    with pytest.raises(pymysql.err.MySQLError) as ended, conn.cursor() as cur:
        cur.execute("SELECT 2")
    conn.close()
    events = proxy.events.session(app)
    start, end = events[0].body, events[-1].body
    assert start["attributes"]["token_exp"] == exp.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert end["reason"] == "identity_expired" and events[-1].ts >= exp
    [(code, errno, message)] = proxy_errors(events)
    assert (code, errno) == ("70100", "1927")
    assert f"the token of alice@example.com expired at {start['attributes']['token_exp']}" in message
    assert "SELECT 2" not in [m["statement"] for m in records(events, "client", "COM_QUERY")]
    assert ended.value.args[0] == 1927 and "reconnect with a new token" in ended.value.args[1]


def test_a_statement_in_flight_at_expiry_finishes_first(proxy, target):
    app = new_app("exp-busy")
    token = proxy.token(ttl=timedelta(seconds=2))
    exp = exp_of(token)
    conn = pymysql_to(proxy, target, PLAIN, app, token=token)
    left = (exp - datetime.now(timezone.utc)).total_seconds()
    assert left > 0.5
    with conn.cursor() as cur:
        cur.execute("SELECT SLEEP(%s), 'done'", (left + 1.5,))
        assert cur.fetchone() == (0, "done")  # it ran past the expiry, to its end
    with pytest.raises(pymysql.err.MySQLError), conn.cursor() as cur:
        cur.execute("SELECT 'after'")
    conn.close()
    events = proxy.events.session(app)
    assert events[-1].body["reason"] == "identity_expired"
    kinds = [m["type"] for m in messages(events, "server")]
    assert kinds.index("TextRow") < len(kinds) - 1 - kinds[::-1].index("ERR")  # the result, then the proxy's ERR
    assert [c for c, *_ in proxy_errors(events)] == ["70100"]


def sealed_activity(proxy, session: list, directory) -> list[dict]:
    """The session sealed by the real ledger, then `custody activity` of it as JSON rows."""
    keys = proxy.directory / "keys"
    settings = LedgerSettings(dir=directory, origin="custody.test/ledger", segment_max_events=1000,
                              segment_max_bytes=1 << 24, segment_max_seconds=0.3, idle_seal_seconds=3600)
    service = LedgerService(proxy.kafka, settings, load_key_file(keys / "ledger.key"),
                            Keyring.load(keys / "keyring.toml"), group_id=f"gaps-{uuid.uuid4().hex[:8]}")
    deadline = time.monotonic() + 40
    try:
        while service.sealed_leaves < len(session) or any(w.opened_at is not None for w in service.writers.values()):
            assert time.monotonic() < deadline, "the ledger did not seal in time"
            service.step(0.1)
    finally:
        service.close()
    result = CliRunner().invoke(cli, ["activity", "--ledger", str(directory), "--protocol", "mysql",
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    return [r for r in json.loads(result.output) if r["session_id"] == session[0].session_id]


def test_cursor_long_data_and_reset_in_activity(proxy, target, tmp_path):
    app = new_app("activity")
    conn = connector(proxy, target, app)
    try:
        cursor_fetches(conn, "SELECT id, label FROM nums ORDER BY id")
        prepared = conn.cmd_stmt_prepare(b"SELECT LENGTH(?)")
        _, columns, _ = conn.cmd_stmt_execute(prepared["statement_id"], data=(io.BytesIO(b"y" * 1000),),
                                              parameters=prepared["parameters"])
        conn.unread_result = True
        assert [tuple(r) for r in conn.get_rows(binary=True, columns=columns)[0]] == [(1000,)]
        assert conn.cmd_reset_connection()
    finally:
        conn.close()
    rows = sealed_activity(proxy, proxy.events.session(app), tmp_path / "ledger")
    sql = "SELECT id, label FROM nums ORDER BY id"
    assert [(r["operation"], r["text"], r["outcome"]) for r in rows if not r["text"].startswith("SET ")] == [
        ("prepare", sql, "ok"), ("statement", sql, "ok"),  # the cursor's EXECUTE, its FETCHes no rows of their own
        ("prepare", "SELECT LENGTH(?)", "ok"), ("statement", "SELECT LENGTH(?)", "ok")]
    assert [r["text"] for r in rows][-2:] == ["SET NAMES 'utf8mb4' COLLATE 'utf8mb4_general_ci'",
                                             "SET @@session.autocommit = ON"]  # mysql-connector after the reset
    assert [r["operation_no"] for r in rows] == list(range(1, len(rows) + 1))


@pytest.mark.parametrize("answer, kept", [(m.ok(), False), (m.err(1047, "08S01", "Unknown command"), True)])
def test_reset_connection_forgets_prepared_statements_only_when_the_target_did(answer, kept):
    """Sans I/O: the statements go with the target's OK to COM_RESET_CONNECTION, not with the command itself."""
    conversation = Conversation(m.CLIENT_PROTOCOL_41 | m.CLIENT_DEPRECATE_EOF)
    conversation.sent(make(0, b"\x16SELECT 1"))
    conversation.server(make(1, b"\x00" + (5).to_bytes(4, "little") + b"\x00\x00\x00\x00\x00\x00\x00"))
    assert list(conversation.statements) == [5] and conversation.idle
    reset = make(0, b"\x1f")
    assert conversation.client(reset)[0] == "COM_RESET_CONNECTION"
    conversation.sent(reset)
    assert list(conversation.statements) == [5]  # until the target answers
    conversation.server(make(1, answer))
    assert bool(conversation.statements) == kept and conversation.idle


def test_long_data_is_bounded_before_its_execute(monkeypatch):
    """Sans I/O: long data is kept until its EXECUTE (to record the value); a client that sends more than
    LONG_DATA_MAX for one statement ends its connection with a protocol error instead of growing the proxy."""
    from ingest.protocols.mysql import conversation as conv
    from ingest.protocols.mysql.packets import ProtocolViolation

    monkeypatch.setattr(conv, "LONG_DATA_MAX", 1000)
    conversation = Conversation(m.CLIENT_PROTOCOL_41 | m.CLIENT_DEPRECATE_EOF)
    conversation.sent(make(0, b"\x16SELECT LENGTH(?)"))
    conversation.server(make(1, b"\x00" + (7).to_bytes(4, "little") + b"\x00\x00\x01\x00\x00\x00\x00"))
    long_data = lambda piece: make(0, b"\x18" + (7).to_bytes(4, "little") + (0).to_bytes(2, "little") + piece)  # noqa: E731
    for _ in range(3):
        packet = long_data(b"x" * 300)
        conversation.client(packet)
        conversation.sent(packet)
    assert bytes(conversation.statements[7].long_data[0]) == b"x" * 900
    with pytest.raises(ProtocolViolation, match="more than 1000 bytes of long data"):
        conversation.client(long_data(b"x" * 300))


def test_client_certificates_are_required_by_client_ca_and_recorded(proxy, target):
    """`client_ca` + `require_client_cert`: the certificate's fingerprint is in SessionStart; no certificate, no
    session (the TLS handshake itself fails, nothing reaches the target)."""
    tls, app = proxy.tls, new_app("cert")
    with pymysql_to(proxy, target, CLIENT_CERT, app, ssl_ca=str(tls["ca"]), ssl_cert=str(tls["client_cert"]),
                    ssl_key=str(tls["client_key"]), ssl_verify_identity=False) as conn, conn.cursor() as cur:
        cur.execute("SELECT 7")
        assert cur.fetchone() == (7,)
    start = proxy.events.session(app)[0].body
    assert start["client_cert_fingerprint"] == tls["client_der_sha256"]
    assert start["attributes"]["tls"].startswith("TLSv1.")
    with pytest.raises(pymysql.err.OperationalError):
        pymysql_to(proxy, target, CLIENT_CERT, new_app("no-cert"), ssl_ca=str(tls["ca"]), ssl_verify_identity=False)


def test_a_client_not_on_this_machine_must_use_tls_to_send_its_token(proxy, target):
    """The token is the password: from another address only inside TLS (refused `tls_required` in clear, before
    any token is asked for), from loopback in clear too (tested everywhere else)."""
    refused = new_app("clear-remote")
    with pytest.raises(pymysql.err.OperationalError) as error:
        pymysql_to(proxy, target, NOT_LOOPBACK, refused, ssl_disabled=True)
    assert error.value.args[0] == 1045 and "connect with TLS" in error.value.args[1]
    events = proxy.events.session(refused)
    start, end = events[0].body, events[-1].body
    assert start["identity"] is None and not start["source_address"].startswith("127.")
    denials = [e.body for e in events if e.kind == "policy_decision"]
    assert len(denials) == 1 and denials[0]["action"] == "deny" and denials[0]["reason"].startswith("tls_required:")
    assert end["reason"] == "auth_failed"
    assert [x["type"] for x in records(events, "client", "HandshakeResponse")] == ["HandshakeResponse"]
    assert not records(events, "client", "AuthSwitchResponse"), "a token was asked for in clear"
    allowed = new_app("tls-remote")
    with pymysql_to(proxy, target, NOT_LOOPBACK, allowed, ssl_ca=str(proxy.tls["ca"]),
                    ssl_verify_identity=False) as conn, conn.cursor() as cur:
        cur.execute("SELECT 8")
        assert cur.fetchone() == (8,)
    start = proxy.events.session(allowed)[0].body
    assert not start["source_address"].startswith("127.") and start["attributes"]["tls"].startswith("TLSv1.")


def test_a_client_hello_in_the_same_write_as_the_ssl_request_starts_tls(proxy, target):
    """A MySQL client starts TLS right behind its SSLRequest, without waiting for an answer, so both can arrive in
    one read: those bytes are the handshake's (before, they were lost and the login hung until its timeout; the
    installed clients hit it now and then, from another address more often)."""
    host, port = proxy.address(TLS)
    context = ssl.create_default_context(cafile=str(proxy.tls["ca"]))
    context.check_hostname = False
    with socket.create_connection((host, port), timeout=8) as sock:
        reader = PacketReader("server")
        greeting = _next_packet(sock, reader)
        assert greeting.seq == 0
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing)
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        caps = (m.CLIENT_PROTOCOL_41 | m.CLIENT_SECURE_CONNECTION | m.CLIENT_PLUGIN_AUTH | m.CLIENT_SSL
                | m.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA)
        sock.sendall(make(1, m.ssl_request(caps, 1 << 24, 45)).data + outgoing.read())  # one write
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                data = sock.recv(65536)
                assert data, "the proxy closed the connection during the TLS handshake"
                incoming.write(data)
        sock.sendall(outgoing.read())
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        login = m.handshake_response(caps, 1 << 24, 45, "alice@example.com", proxy.token().encode(), target.database,
                                     auth.CLEAR, {})
        tls.write(make(2, login).data)
        sock.sendall(outgoing.read())
        answer = b""
        while not answer:
            try:
                answer = tls.read(65536)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                assert data, "the proxy closed the connection after TLS"
                incoming.write(data)
                if outgoing.pending:
                    sock.sendall(outgoing.read())
        assert answer[4:5] == b"\x00", answer  # OK: logged in over the TLS that began in the SSLRequest's read


def _next_packet(sock: socket.socket, reader: PacketReader):
    while True:
        packets = reader.feed(sock.recv(65536))
        if packets:
            return packets[0]
