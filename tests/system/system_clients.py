"""Real clients of every protocol, each keeping its own log of what it did: the operations it sent in order, what
came back (outcome, SQLSTATE / errno / HTTP status / exit status, command tags, row counts, hashes of results and
files), and whether it closed its session. The checker compares these logs with the sealed ledger.

Every session carries a tag `sys-<hex>` the checker finds it by: PostgreSQL's application_name, MySQL's
program_name, HTTP's User-Agent, in the first command of an SSH session or of a `kubectl exec`; a kubectl
connection that cannot carry one (its requests are kubectl's) is found by the id of its token, unique per run.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shlex
import subprocess
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pymysql
import pymysql.constants.COMMAND


def new_tag() -> str:
    return f"sys-{uuid.uuid4().hex[:10]}"


@dataclass
class Op:
    operation: str  # statement | command | request | transfer
    text: str
    outcome: str  # ok | error
    code: str | None = None  # SQLSTATE, MySQL errno, HTTP status, exit status
    tag: str | None = None  # PostgreSQL command tag
    digest: str | None = None  # SHA-256 of the result rows / response body / file
    request: str | None = None  # Kubernetes: the request line, `METHOD path?query`, as kubectl logged it
    meaning: dict[str, str] | None = None  # Kubernetes: verb, resource, namespace, name the client asked for


@dataclass
class SessionLog:
    protocol: str
    target: str
    identity: str
    tag: str
    ops: list[Op] = field(default_factory=list)
    closed: bool = False
    failure: str | None = None  # the client's own error, if its session broke
    pending: str | None = None  # the operation in flight
    started: float = 0.0
    ended: float = 0.0
    token_id: str | None = None  # the jti of the token the session was opened with, when the tag cannot be sent


def _digest(rows) -> str:
    return hashlib.sha256(repr(rows).encode()).hexdigest()


class Workload:
    """Runs client sessions on threads until a deadline; keeps every session's log."""

    def __init__(self) -> None:
        self.logs: list[SessionLog] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def spawn(self, fn, log: SessionLog, *args, companions: tuple[SessionLog, ...] = ()) -> None:
        """Run `fn(log, *args)` on a thread; `companions` are further sessions the same client opens (kubectl
        exec's stream), filled by `fn` and ended with `log`."""
        mine = (log, *companions)
        with self.lock:
            self.logs += mine

        def run() -> None:
            for each in mine:
                each.started = time.time()
            try:
                fn(log, *args)
            except Exception:  # the log says it; the checker decides whether that was allowed
                log.failure = f"{log.pending!r} at {time.time() - log.started:.1f}s: {traceback.format_exc(limit=-2)}"
            for each in mine:
                each.failure = each.failure or log.failure
                each.ended = time.time()

        thread = threading.Thread(target=run, daemon=True, name=log.tag)
        self.threads.append(thread)
        thread.start()

    def join(self, timeout: float) -> list[SessionLog]:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        return [log for log in self.logs if log.ended == 0.0]  # still running


# --- PostgreSQL: psycopg, autocommit so that psycopg sends no BEGIN of its own -----------------------------------
def pg_session(log: SessionLog, port: int, token: str, table: str, deadline: float, pace: float) -> None:
    conn = psycopg.connect(host="127.0.0.1", port=port, user=log.identity, password=token, dbname="postgres",
                           sslmode="disable", application_name=log.tag, autocommit=True, connect_timeout=30)
    # psycopg's defaults: a query run 5 times is prepared, then only Binds of the named statement are sent; each
    # execution must still be one operation with its SQL in `activity` and `statements`.

    def run(sql: str) -> None:
        log.pending = sql
        with conn.cursor() as cur:
            try:
                cur.execute(sql)
            except psycopg.Error as exc:
                log.ops.append(Op("statement", sql, "error", exc.sqlstate))
                return
            rows = cur.fetchall() if cur.description else None
            log.ops.append(Op("statement", sql, "ok", None, cur.statusmessage, _digest(rows) if rows else None))

    with conn:
        run(f"SELECT '{log.tag}' AS tag")
        n = 0
        while time.time() < deadline:
            n += 1
            # not the email itself: the policy's detectors redact email literals in recorded SQL (sealed originals)
            who = log.identity.split("@")[0]
            run(f"INSERT INTO {table} (who, tag, n, note) VALUES ('{who}', '{log.tag}', {n}, 'row {n}')")
            run(f"SELECT n, note FROM {table} WHERE tag = '{log.tag}' ORDER BY n")
            if n % 3 == 0:
                run(f"UPDATE {table} SET note = note || '+' WHERE tag = '{log.tag}' AND n = {n - 1}")
            if n % 7 == 0:
                run(f"DROP TABLE {table}")  # refused by the default policy: an error, the session goes on
            if n % 11 == 0:
                run("SELECT nope FROM pg_class LIMIT 1")  # the target's own error
            time.sleep(pace)
        run(f"SELECT count(*) FROM {table} WHERE tag = '{log.tag}'")
    log.closed = True


# --- MySQL: PyMySQL (text protocol) against the machine's MariaDB -------------------------------------------------
class LoggedConnection(pymysql.connections.Connection):
    """PyMySQL, logging the queries it sends on its own while connecting (`SET NAMES …`)."""

    def __init__(self, *args, log: SessionLog, **kwargs) -> None:
        self._sys_log, self._connecting = log, True
        super().__init__(*args, **kwargs)
        self._connecting = False

    def _execute_command(self, command, sql):
        if self._connecting and command == pymysql.constants.COMMAND.COM_QUERY:
            text = sql.decode() if isinstance(sql, bytes) else sql
            self._sys_log.ops.append(Op("statement", text, "ok"))  # the connect fails if it does
        return super()._execute_command(command, sql)


def mysql_session(log: SessionLog, port: int, token: str, database: str, deadline: float, pace: float) -> None:
    conn = LoggedConnection(host="127.0.0.1", port=port, user=log.identity, password=token, database=database,
                            autocommit=True, program_name=log.tag, connect_timeout=30, log=log)

    def run(sql: str) -> None:
        log.pending = sql
        with conn.cursor() as cur:
            try:
                count = cur.execute(sql)
            except pymysql.MySQLError as exc:
                log.ops.append(Op("statement", sql, "error", str(exc.args[0])))
                return
            rows = cur.fetchall()
            log.ops.append(Op("statement", sql, "ok", None, str(count), _digest(rows) if rows else None))

    try:
        run(f"SELECT '{log.tag}' AS tag")
        n = 0
        while time.time() < deadline:
            n += 1
            run(f"INSERT INTO items (tag, n) VALUES ('{log.tag}', {n})")
            run(f"SELECT n FROM items WHERE tag = '{log.tag}' ORDER BY n")
            if n % 5 == 0:
                run("DROP TABLE items")  # refused by the default policy
            time.sleep(pace)
    finally:
        conn.close()
    log.closed = True


# --- HTTP: one keep-alive connection per session through the proxy to nginx --------------------------------------
def http_session(log: SessionLog, port: int, token: str, deadline: float, pace: float) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {token}", "User-Agent": log.tag}

    def request(method: str, path: str, body: bytes | None = None) -> None:
        log.pending = f"{method} {path}"
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        outcome = "ok" if response.status < 400 else "error"
        log.ops.append(Op("request", f"{method} {path}", outcome, str(response.status), None,
                          hashlib.sha256(data).hexdigest()))

    request("GET", f"/echo?{log.tag}")
    n = 0
    while time.time() < deadline:
        n += 1
        request("GET", "/index.html")
        request("GET", f"/echo?n={n}")
        if n % 4 == 0:
            request("POST", "/upload", body=bytes([n % 256]) * (1000 + n))
        if n % 6 == 0:
            request("GET", "/missing.html")  # 404
        time.sleep(pace)
    conn.close()
    log.closed = True


# --- SSH: the real OpenSSH clients; every `ssh` / `sftp` invocation is one session ---------------------------------
def ssh_exec_session(log: SessionLog, client, token: str, command: str) -> None:
    result = client.ssh(log.identity, token, command, timeout=120)
    log.ops.append(Op("command", command, "ok" if result.returncode == 0 else "error", str(result.returncode),
                      None, hashlib.sha256(result.stdout).hexdigest()))
    if result.returncode == 255:
        raise RuntimeError(f"ssh failed: {result.stderr[-500:]!r}")
    log.closed = True


def sftp_session(log: SessionLog, client, token: str, workdir: Path, size: int) -> None:
    local, back, remote = workdir / f"{log.tag}.up", workdir / f"{log.tag}.down", f"/tmp/{log.tag}.bin"
    payload = hashlib.sha256(log.tag.encode()).digest() * (size // 32)
    local.write_bytes(payload)
    result = client.sftp(log.identity, token, f"put {local} {remote}\nget {remote} {back}\nrm {remote}\n",
                         timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"sftp failed: {result.stderr[-500:]!r}")
    digest = hashlib.sha256(payload).hexdigest()
    if hashlib.sha256(back.read_bytes()).hexdigest() != digest:
        raise RuntimeError("the downloaded file differs from the uploaded one")
    log.ops += [Op("transfer", f"sftp upload {remote}", "ok", None, None, digest),
                Op("transfer", f"sftp download {remote}", "ok", None, None, digest),
                Op("transfer", f"sftp remove {remote}", "ok")]
    log.closed = True


# --- Kubernetes: the real kubectl, one run per session, through `custody kubeconfig`'s exec credential plugin ----
# kubectl 1.32 itself: /usr/bin/kubectl is gcloud's dispatcher (v1.32.4-dispatcher), which sends GET /version?timeout=5s
# of its own before it runs a versioned kubectl and logs it nowhere: its log would miss a recorded request.
KUBECTL = "/usr/lib/google-cloud-sdk/bin/kubectl.1.32"
# `-v=6` makes kubectl log every request it sends, as it completes: `GET https://host:port/path?query 200 OK in 5 ms`
KUBECTL_REQUEST = re.compile(r"round_trippers\.go:\d+\] ([A-Z]+) https://[^/\s]+(/\S*) (\d{3})\b")


def kubectl_session(log: SessionLog, kubeconfig: Path, home: Path, args: list[str], meaning: dict[str, str],
                    stream: SessionLog | None = None) -> None:
    """One kubectl run (its own HOME, discovery cache and token cache), its requests as its `-v=6` log has them.

    kubectl sends its requests one after another on one connection; an upgraded one (`kubectl exec`: 101, then
    WebSocket) gets a connection of its own, logged in `stream` as the command it runs. `meaning` is what the
    client asked for (verb, resource, namespace, name), expected on its last plain request or on the stream."""
    env = {**os.environ, "HOME": str(home), "CUSTODY_TOKEN_CACHE": str(home / "tokens.json")}
    env.pop("KUBECONFIG", None)
    log.pending = shlex.join(["kubectl", *args])
    result = subprocess.run([KUBECTL, "--kubeconfig", str(kubeconfig), "--cache-dir", str(home / "cache"), "-v=6",
                             *args], capture_output=True, env=env, timeout=120)
    stderr = result.stderr.decode(errors="replace")
    for method, path, status in KUBECTL_REQUEST.findall(stderr):
        request, outcome = f"{method} {path}", "ok" if int(status) < 400 else "error"
        if status == "101" and stream is not None:
            command = args[args.index("--") + 1:]
            outcome = "ok" if result.returncode == 0 else "error"  # the command's, as kubectl's exit status says
            stream.ops.append(Op("command", shlex.join(command), outcome, status,
                                 digest=hashlib.sha256(result.stdout).hexdigest(), request=request, meaning=meaning))
        else:
            log.ops.append(Op("request", request, outcome, status, request=request))
    if stream is None and log.ops:
        log.ops[-1].meaning = meaning
    if not log.ops or (stream is not None and not stream.ops):
        raise RuntimeError(f"kubectl exit {result.returncode}, no request logged: {stderr[-800:]!r}")
    log.closed = True
    if stream is not None:
        stream.closed = result.returncode == 0
