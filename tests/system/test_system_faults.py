"""Faults of one component at a time, cheap enough for every CI run (marker `system`, a few seconds each):

* the recorder process SIGKILLed alone: the proxy fails closed (nothing it relays afterwards goes unrecorded);
* the proxy SIGKILLed: its recorder outlives it, delivers what it had and writes a SessionEnd with reason
  `proxy_lost` for each session the proxy had open (in well under a second, not after its 10 s bound);
* the spool full (a spool limit far smaller than the outage, the broker SIGSTOPped): sessions fail closed,
  nothing already recorded is lost, new sessions work again once the broker is back;
* the spool's disk full (its directory on a small tmpfs, filled up): the same, and recording resumes when
  space returns;
* the proxy and its recorder on a clock 10 minutes ahead (Debian's `faketime`; broker, ledger and token issuer on
  the real clock): events keep their order by seq and `custody verify` names the skew;
* the ledger's disk full (its directory on a small tmpfs, filled up): sealing stops and says why, the ledger
  process lives on (a ledger that exited would stop `custody up`'s whole stack), nothing is lost, and sealing
  resumes from the last seal once space returns.

All six run in every CI run (`.ci/run` installs faketime; the ledger's tmpfs needs root, as CI runs).

One dev broker, one `custody ledger` (directory on a tmpfs of its own) and a `custody proxy` per test (its own
spool, its own clock), from one `custody init` directory. The invariant every test checks against the machine's
PostgreSQL itself: each row a client's INSERT left in the target has its statement in the sealed ledger.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from pg_fixtures import DIRECT
from system_stack import CUSTODY, ROOT, children_of, custody, free_port, port_open, wait_for

pytestmark = pytest.mark.system

FAKETIME = shutil.which("faketime")
SKEW_S = 600


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


class FaultStack:
    """A dev broker, one ledger on a tmpfs, and proxies started one by one (each with its own spool and clock)."""

    def __init__(self, directory: Path):
        from custody.config import load_config
        from custody.init import initialise
        from ingest.broker import DevBroker
        from ingest.kafka import ensure_topics

        self.directory, self.logs = directory, directory / "logs"
        self.logs.mkdir()
        self.broker = DevBroker(log_path=self.logs / "broker.log").start()
        self.ledger_dir = directory / "ledger-fs"
        self.ledger_dir.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(self.ledger_dir)],
                                 capture_output=True, text=True)
        self.mounted = mounted.returncode == 0
        self.mount_error = mounted.stderr.strip()
        self.base_port = free_port()
        self.config_path = initialise(directory / "custody", proxy_port=self.base_port)
        text = self.config_path.read_text().replace('bootstrap = "embedded"', f'bootstrap = "{self.broker.bootstrap}"')
        text = text.replace('dir = "ledger"', f'dir = "{self.ledger_dir / "ledger"}"')
        text = text.replace("segment_max_seconds = 5", "segment_max_seconds = 1")
        text = text.replace("idle_seal_seconds = 60", "idle_seal_seconds = 1")
        self.config_path.write_text(text)
        self.config = load_config(self.config_path)
        ensure_topics(self.config.kafka)
        self.ledger: subprocess.Popen | None = None
        self.start_ledger()
        self.proxies: list[subprocess.Popen] = []

    def start_ledger(self) -> None:
        self.ledger = subprocess.Popen([*CUSTODY, "--debug", "ledger", "--config", str(self.config_path)], cwd=ROOT,
                                       stdin=subprocess.DEVNULL, stdout=open(self.logs / "ledger.log", "ab"),
                                       stderr=subprocess.STDOUT)

    def proxy(self, name: str, spool_max_bytes: int = 1 << 30, skew_s: int = 0,
              spool_dir: Path | None = None) -> tuple[subprocess.Popen, int]:
        """`custody proxy` with its own port and spool (and, with skew_s, on a clock that far ahead)."""
        port = free_port()
        text = self.config_path.read_text()
        text = text.replace(f'listen = "127.0.0.1:{self.base_port}"', f'listen = "127.0.0.1:{port}"', 1)
        text = text.replace('dir = "spool"', f'dir = "{spool_dir or "spool-" + name}"').replace(
            "max_bytes = 1073741824", f"max_bytes = {spool_max_bytes}")
        config = self.config_path.with_name(f"custody-{name}.toml")
        config.write_text(text)
        command = [*CUSTODY, "--debug", "proxy", "--config", str(config)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if skew_s:
            command = [FAKETIME, "-f", f"+{skew_s}s", *command]
            env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
        # A process group of its own: `faketime` runs the proxy as its child and does not pass SIGTERM on (one CI
        # run left the skewed proxy and its recorder running after the suite), so `stop` signals the whole group.
        process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                   stdout=open(self.logs / f"proxy-{name}.log", "ab"), stderr=subprocess.STDOUT)
        self.proxies.append(process)
        if not wait_for(lambda: port_open(port) or process.poll() is not None, 60) or process.poll() is not None:
            raise RuntimeError(f"custody proxy {name} did not start: {self.tail(f'proxy-{name}.log')}")
        return process, port

    def token(self, subject: str = "alice@example.com") -> str:
        from proxy.devidp import issue_token

        identity = self.config.identity
        return issue_token(identity.dev_signing_key, identity.issuer, identity.audience, subject, ["dba"],
                           email=subject)

    def dsn(self, port: int) -> str:
        return f"host=127.0.0.1 port={port} dbname=postgres user=alice@example.com password={self.token()} " \
               f"sslmode=disable connect_timeout=10"

    def sealed_statements(self, like: str) -> list[str]:
        from query.views import open_ledger

        if not (self.ledger_dir / "ledger" / "seals").is_dir():
            return []
        con = open_ledger(self.ledger_dir / "ledger")
        try:
            return [row[0] for row in con.sql("SELECT statement FROM statements WHERE statement LIKE ? "
                                              "ORDER BY session_id, statement_no", params=[like]).fetchall()]
        finally:
            con.close()

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / name
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        for process in [*self.proxies, self.ledger]:
            if process is not None and process.poll() is None:
                if process in self.proxies:  # a proxy below faketime hears it only so
                    _signal_group(process, signal.SIGTERM)
                else:
                    process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for process in self.proxies:  # whatever is left of a proxy's group (an orphaned recorder) goes too
            _signal_group(process, signal.SIGKILL)
        self.broker.stop()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.ledger_dir)], capture_output=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    built = FaultStack(tmp_path_factory.mktemp("faults"))
    yield built
    built.stop()


@pytest.fixture(scope="module")
def table():
    name = f"faults_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(DIRECT, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (tag text, n int, note text)")
        conn.execute(f"GRANT ALL ON {name} TO PUBLIC")
    yield name
    with psycopg.connect(DIRECT, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def gone(pid: int) -> bool:
    """Dead: reaped, or a zombie (state Z: exited, not yet waited for; an exiting process is not dead yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def target_rows(table: str, tag: str) -> list[int]:
    """What the target itself holds, read directly (not through the proxy)."""
    with psycopg.connect(DIRECT, autocommit=True) as conn:
        return [row[0] for row in conn.execute(f"SELECT n FROM {table} WHERE tag = %s ORDER BY n", [tag])]


def insert(table: str, tag: str, n: int, note: str = "") -> str:
    return f"INSERT INTO {table} (tag, n, note) VALUES ('{tag}', {n}, '{note}')"


def a_new_session_works(stack: FaultStack, port: int, table: str, tag: str) -> bool:
    """Whether a new session through the proxy on `port` can write again (row n = 1,000,000 for `tag`)."""
    try:
        with psycopg.connect(stack.dsn(port), autocommit=True) as again:
            again.execute(insert(table, tag, 1_000_000))
        return True
    except psycopg.Error:
        return False


def assert_every_target_row_was_sealed(stack: FaultStack, table: str, tag: str, timeout: float = 60) -> list[int]:
    """Each row the target holds for `tag` has its INSERT in the sealed ledger (waits for the ledger to catch up)."""
    rows = target_rows(table, tag)
    expected = set(rows)
    prefix = f"INSERT INTO {table} (tag, n, note) VALUES ('{tag}', "

    def sealed() -> set[int]:
        return {int(s[len(prefix):].split(",", 1)[0]) for s in stack.sealed_statements(prefix + "%")}
    assert wait_for(lambda: expected <= sealed(), timeout, 1.0), (
        f"{len(expected - sealed())} of {len(rows)} rows in the target have no sealed INSERT (relayed unrecorded "
        f"or lost): n = {sorted(expected - sealed())[:20]}")
    return rows


def test_a_sigkilled_recorder_makes_the_proxy_fail_closed(stack, table):
    proxy, port = stack.proxy("recorder-kill")
    tag = uuid.uuid4().hex[:12]
    conn = psycopg.connect(stack.dsn(port), autocommit=True)
    for n in range(5):
        conn.execute(insert(table, tag, n))
    # steady state first: the recorder is up and what it was handed is sealed (a recorder killed while it still
    # starts loses what the proxy relayed meanwhile: the window of loss, see the report of issue 17)
    assert assert_every_target_row_was_sealed(stack, table, tag) == list(range(5))
    recorders = [pid for pid in children_of(proxy.pid)  # spawn's child, not its resource tracker
                 if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(recorders) == 1, f"the proxy's recorder process: {recorders}"
    os.kill(recorders[0], signal.SIGKILL)
    assert wait_for(lambda: gone(recorders[0]), 5, 0.01)
    time.sleep(0.2)
    # From here on the recorder has been dead for a while: nothing may be relayed. (A statement sent within a few
    # ms of its death was seen relayed unrecorded in 2 of 5 runs without this pause: the proxy learns of the death
    # at its next hand-over, from waitpid; what the recorder had been handed and not yet spooled when the signal
    # hit is the documented window of loss, bounded and reported by RecorderStats; none here.)
    refused = 0
    for n in range(5, 10):  # the open session: each statement is refused, or the connection is ended
        try:
            conn.execute(insert(table, tag, n))
        except psycopg.Error:
            refused += 1
            if conn.closed:
                break
    conn.close()
    with pytest.raises(psycopg.Error):  # and no new session is relayed unrecorded either
        with psycopg.connect(stack.dsn(port), autocommit=True) as again:
            again.execute(insert(table, tag, 100))
    assert refused >= 1
    assert target_rows(table, tag) == list(range(5)), "relayed after the recorder died: unrecorded"
    assert "FAIL CLOSED: recorder process exited with code -9" in stack.tail("proxy-recorder-kill.log", 1 << 30)
    assert proxy.poll() is None, "the proxy itself must outlive its recorder (it fails closed, it does not crash)"
    proxy.kill()  # a stop would wait its full flush timeout for the dead recorder


def test_a_spool_too_small_for_a_broker_outage_fails_sessions_closed_and_loses_nothing(stack, table):
    proxy, port = stack.proxy("small-spool", spool_max_bytes=1 << 18)
    tag, note = uuid.uuid4().hex[:12], "x" * 2000
    broker_pid = stack.broker._process.pid  # the Tansu process itself
    conn = psycopg.connect(stack.dsn(port), autocommit=True)
    conn.execute(insert(table, tag, 0))
    os.kill(broker_pid, signal.SIGSTOP)
    failed_at = None
    try:
        deadline = time.monotonic() + 60
        n = 1
        while time.monotonic() < deadline:  # ~2 KB per statement: a 1 MiB spool is full after a few hundred
            try:
                conn.execute(insert(table, tag, n, note))
            except psycopg.Error:
                failed_at = n
                break
            n += 1
    finally:
        os.kill(broker_pid, signal.SIGCONT)
    conn.close()
    assert failed_at is not None, "the session went on with a full spool: it must fail closed"
    print(f"spool full after {failed_at} statements")

    assert wait_for(lambda: a_new_session_works(stack, port, table, tag), 60, 1.0), \
        f"no recovery: {stack.tail('proxy-small-spool.log')}"
    rows = assert_every_target_row_was_sealed(stack, table, tag, timeout=120)
    assert len(rows) >= failed_at, (len(rows), failed_at)  # what the client saw succeed is in the target


@pytest.mark.skipif(os.geteuid() != 0, reason="a tmpfs of its own for the spool needs root")
def test_a_full_spool_disk_fails_sessions_closed_and_loses_nothing(stack, table, tmp_path):
    """The spool's own disk fills (not its max_bytes): the write that meets it used to leave part of its record in
    the segment, and every later record followed those bytes, which the drainer stops at: appended, never
    delivered. Now a full disk is a full spool: sessions fail closed, nothing recorded is lost, and recording
    resumes once there is room."""
    disk = tmp_path / "spool-fs"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True)
    assert mounted.returncode == 0, f"mount -t tmpfs was refused: {mounted.stderr}"
    proxy = None
    try:
        proxy, port = stack.proxy("disk-spool", spool_dir=disk / "spool")
        tag, note = uuid.uuid4().hex[:12], "x" * 2000
        conn = psycopg.connect(stack.dsn(port), autocommit=True)
        conn.execute(insert(table, tag, 0))
        ballast = disk / "ballast"
        with open(ballast, "wb") as f:  # leave ~96 KiB: a few dozen statements of ~2 KB, both ways recorded
            f.write(b"\0" * max(0, shutil.disk_usage(disk).free - (96 << 10)))
        failed_at = None
        for n in range(1, 2000):
            try:
                conn.execute(insert(table, tag, n, note))
            except psycopg.Error:
                failed_at = n
                break
        conn.close()
        assert failed_at is not None, "the session went on with its spool's disk full: it must fail closed"
        assert "no space left" in stack.tail("proxy-disk-spool.log", 1 << 20), stack.tail("proxy-disk-spool.log")
        ballast.unlink()

        assert wait_for(lambda: a_new_session_works(stack, port, table, tag), 60, 1.0), \
            f"no recovery: {stack.tail('proxy-disk-spool.log')}"
        rows = assert_every_target_row_was_sealed(stack, table, tag, timeout=120)
        assert len(rows) >= failed_at and 1_000_000 in rows, (len(rows), failed_at)
    finally:
        if proxy is not None:
            proxy.send_signal(signal.SIGTERM)
            proxy.wait(30)
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_sigkilled_proxy_has_its_open_sessions_ended_as_proxy_lost_by_its_recorder(stack, table):
    proxy, port = stack.proxy("proxy-kill")
    tag = uuid.uuid4().hex[:12]
    busy = psycopg.connect(stack.dsn(port), autocommit=True)
    idle = psycopg.connect(stack.dsn(port), autocommit=True)
    for n in range(5):
        busy.execute(insert(table, tag, n))
    idle.execute(f"SELECT '{tag}'")
    # what the recorder had is delivered: wait until it had everything (a kill within a hand-over, ~2 ms, of the
    # last statement loses that statement: the documented window of loss, the recorder-kill test's too)
    assert assert_every_target_row_was_sealed(stack, table, tag) == list(range(5))
    recorders = [pid for pid in children_of(proxy.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(recorders) == 1, f"the proxy's recorder process: {recorders}"
    os.kill(proxy.pid, signal.SIGKILL)
    killed = time.monotonic()
    assert wait_for(lambda: gone(recorders[0]), 30, 0.05), "the recorder outlived its bound"
    print(f"recorder exited {time.monotonic() - killed:.1f} s after the proxy's SIGKILL")
    for conn in (busy, idle):
        conn.close()
    from query.views import open_ledger

    def sessions() -> list[tuple]:
        con = open_ledger(stack.ledger_dir / "ledger")
        try:
            return con.sql("SELECT end_reason, statements, client_bytes FROM sessions WHERE session_id IN "
                           "(SELECT session_id FROM statements WHERE statement LIKE ?) ORDER BY statements",
                           params=[f"%'{tag}'%"]).fetchall()
        finally:
            con.close()
    assert wait_for(lambda: all(reason is not None for reason, *_ in sessions()), 60, 1.0), sessions()
    assert [(reason, statements) for reason, statements, _ in sessions()] == [("proxy_lost", 1), ("proxy_lost", 5)]
    assert all(client_bytes > 0 for *_, client_bytes in sessions())  # counted from the frames the recorder had


@pytest.mark.skipif(FAKETIME is None, reason="Debian's faketime is not installed (apt-get install faketime)")
def test_a_proxy_clock_ahead_keeps_order_by_seq_and_verify_names_the_skew(stack, table):
    proxy, port = stack.proxy("skewed", skew_s=SKEW_S)
    tag = uuid.uuid4().hex[:12]
    with psycopg.connect(stack.dsn(port), autocommit=True) as conn:
        for n in range(20):
            conn.execute(insert(table, tag, n))
    assert assert_every_target_row_was_sealed(stack, table, tag) == list(range(20))
    from query.views import open_ledger

    con = open_ledger(stack.ledger_dir / "ledger")
    try:
        rows = con.sql("SELECT statement, epoch(ts) FROM statements WHERE statement LIKE ? ORDER BY statement_no",
                       params=[f"%'{tag}'%"]).fetchall()
    finally:
        con.close()
    # by seq (and message within an event): the client's order, whatever the stamps say
    assert [r[0] for r in rows] == [insert(table, tag, n) for n in range(20)]
    lead = min(r[1] for r in rows) - time.time()
    assert SKEW_S - 120 < lead < SKEW_S + 5, f"the events' timestamps are not the skewed clock's: {lead:.0f} s"
    verified = custody("verify", "--config", str(stack.config_path))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "clock skew" in verified.stdout and "ran ahead" in verified.stdout, verified.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="a tmpfs of its own for the ledger needs root")
def test_a_full_ledger_disk_stops_sealing_says_why_and_resumes(stack, table):
    assert stack.mounted, f"mount -t tmpfs was refused: {stack.mount_error}"
    proxy, port = stack.proxy("ledger-full")
    tag = uuid.uuid4().hex[:12]
    ballast = stack.ledger_dir / "ballast"
    free = shutil.disk_usage(stack.ledger_dir).free
    with open(ballast, "wb") as f:  # leave a few KiB: less than one segment and its seal
        f.write(b"\0" * max(0, free - 8192))
    log_before = len(stack.tail("ledger.log", 1 << 30))
    with psycopg.connect(stack.dsn(port), autocommit=True) as conn:
        for n in range(200):
            conn.execute(insert(table, tag, n, "x" * 200))
    said = lambda: "No space left" in stack.tail("ledger.log", 1 << 30)[log_before:]  # noqa: E731
    assert wait_for(said, 30, 0.5), f"the ledger did not say why it stopped: {stack.tail('ledger.log')}"
    assert stack.sealed_statements(f"%'{tag}'%") == [], "sealed with no space left?"
    assert stack.ledger.poll() is None, "the ledger exited on a full disk: it must wait for room"
    ballast.unlink()
    rows = assert_every_target_row_was_sealed(stack, table, tag, timeout=90)
    assert stack.ledger.poll() is None  # it waited for room (or, a group rebalance meanwhile, was reassigned)
    assert rows == list(range(200))
    verified = custody("verify", "--config", str(stack.config_path))
    assert verified.returncode == 0, verified.stdout + verified.stderr
