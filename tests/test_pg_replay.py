"""Replay of sessions recorded through the real proxy and sealed by the real ledger: exact text snapshots.

A simple-protocol session (psql) and an extended-protocol session (psycopg with parameters) read like
what the client did: the login is one line, each extended statement one step with its parameters and
what came back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import psycopg
import pytest

from ingest.keys import Keyring, load_key_file
from ledger.service import LedgerService
from ledger.settings import LedgerSettings
from pg_fixtures import DIRECT, EventLog, new_app, start_proxy
from query.html import render_html
from query.render import render_json, render_text
from query.replay import replay_session
from query.views import open_ledger

TABLE = "custody_replay_t"


def seal(proxy, sessions: list[list], ledger_dir, group: str) -> None:
    """Run the real ledger until every event of these sessions is sealed."""
    keys = proxy.directory / "keys"
    settings = LedgerSettings(dir=ledger_dir, origin="custody.test/replay", segment_max_events=1000,
                              segment_max_bytes=1 << 24, segment_max_seconds=0.3, idle_seal_seconds=3600)
    service = LedgerService(proxy.kafka, settings, load_key_file(keys / "ledger.key"),
                            Keyring.load(keys / "keyring.toml"), group_id=group)
    total = sum(len(s) for s in sessions)
    deadline = time.monotonic() + 40
    while service.sealed_leaves < total or any(w.opened_at is not None for w in service.writers.values()):
        assert time.monotonic() < deadline, "the ledger did not seal in time"
        service.step(0.1)
    service.close()


@pytest.fixture(scope="module")
def recorded(broker, tmp_path_factory):
    """psql (simple protocol) and psycopg (extended, with parameters) sessions, sealed into a ledger."""
    root = tmp_path_factory.mktemp("replay")
    proxy = start_proxy(root / "custody", broker, replace={'policy = "policies/default.toml"': "# no policy"})
    events = EventLog.open(proxy)
    with psycopg.connect(DIRECT, autocommit=True) as direct:
        direct.execute(f"DROP TABLE IF EXISTS {TABLE}")
        direct.execute(f"CREATE TABLE {TABLE} (id int, name text)")
        direct.execute(f"INSERT INTO {TABLE} VALUES (1, 'ada'), (2, 'bob')")
    try:
        simple, extended = new_app("simple"), new_app("extended")
        host, port = proxy.address()
        env = {**os.environ, "PGPASSWORD": proxy.token(), "PGAPPNAME": simple, "PGSSLMODE": "disable",
               "PGGSSENCMODE": "disable"}
        result = subprocess.run(["psql", "-X", "-At", "-h", host, "-p", str(port), "-U", "alice@example.com",
                                 "-d", "postgres", "-c", f"SELECT id, name FROM {TABLE} ORDER BY id",
                                 "-c", "SELECT 1/0"], env=env, capture_output=True, text=True, timeout=60)
        assert "division by zero" in result.stderr
        with proxy.connect(extended, autocommit=True) as conn:
            assert conn.execute(f"SELECT name FROM {TABLE} WHERE id = %s", (2,)).fetchall() == [("bob",)]
            conn.execute(f"UPDATE {TABLE} SET name = %s WHERE id = %s", ("eve", 1))
            for n in (41, 9):
                assert conn.execute("SELECT %s::int + 1 AS answer", (n,), prepare=True).fetchone() == (n + 1,)
            with pytest.raises(psycopg.errors.UndefinedColumn):
                conn.execute(f"SELECT nope FROM {TABLE} WHERE id = %s", (1,))
        sessions = {app: events.session(app) for app in (simple, extended)}
        seal(proxy, list(sessions.values()), root / "ledger", f"replay-{simple}")
        con = open_ledger(root / "ledger")
        keyring = Keyring.load(proxy.config.keys.keyring)
        yield {app: replay_session(con, events[0].session_id, keyring)
               for app, events in sessions.items()}, simple, extended
    finally:
        events.close()
        proxy.background.stop()
        with psycopg.connect(DIRECT, autocommit=True) as direct:
            direct.execute(f"DROP TABLE IF EXISTS {TABLE}")


def normalized(text: str, app: str) -> str:
    """The replay text without what differs between runs: ids, ports, times, byte counts (token lengths), and how
    many events the recorder folded the session's frames into (that depends on timing)."""
    text = re.sub(r"session [0-9a-f-]{36}: \d+ events", "session ID: N events", text)
    text = re.sub(r"127\.0\.0\.1:\d+ to", "127.0.0.1:PORT to", text)
    text = re.sub(r"^ *\+\d+\.\d+s ", f"{'+T':>10} ", text, flags=re.M)
    text = re.sub(r"after \d+\.\d+s", "after T", text)
    text = re.sub(r"\d[\d,]* B in", "N B in", text)
    return text.replace(app, "APP")


SIMPLE = """\
VERIFIED session ID: N events, signatures and chain intact, ended

        +T START  alice@example.com (dba) from 127.0.0.1:PORT to local-postgres
                  postgres via APP, upstream 127.0.0.1:5432/postgres
        +T LOGIN  ok as alice@example.com (13 server parameters)
        +T SQL    SELECT id, name FROM custody_replay_t ORDER BY id
        +T RESULT SELECT 2
                  id | name
                  ---+-----
                  1  | ada
                  2  | bob
        +T SQL    SELECT 1/0
        +T ERROR  ERROR 22012: division by zero
        +T CLIENT Terminate
        +T END    client_terminate after T
                  client N B in 3 messages, server N B in 24 messages
"""

EXTENDED = """\
VERIFIED session ID: N events, signatures and chain intact, ended

        +T START  alice@example.com (dba) from 127.0.0.1:PORT to local-postgres
                  postgres via APP, upstream 127.0.0.1:5432/postgres
        +T LOGIN  ok as alice@example.com (13 server parameters)
        +T SQL    SELECT name FROM custody_replay_t WHERE id = $1
                  parameters: [2]
                  → SELECT 1
                  name
                  ----
                  bob
        +T SQL    UPDATE custody_replay_t SET name = $1 WHERE id = $2
                  parameters: ["eve", 1]
                  → UPDATE 1
        +T SQL    SELECT $1::int + 1 AS answer
                  → prepared as "_pg3_0"
        +T SQL    SELECT $1::int + 1 AS answer
                  parameters: [41]
                  → SELECT 1
                  answer
                  ------
                  42
        +T SQL    SELECT $1::int + 1 AS answer
                  parameters: [9]
                  → SELECT 1
                  answer
                  ------
                  10
        +T ERROR  SELECT nope FROM custody_replay_t WHERE id = $1
                  parameters: [1]
                  → ERROR 42703: column "nope" does not exist
        +T CLIENT Terminate
        +T END    client_terminate after T
                  client N B in 26 messages, server N B in 42 messages
"""


def test_simple_protocol_session_replays_like_psql_showed_it(recorded):
    replays, simple, _ = recorded
    assert normalized(render_text(replays[simple]), simple) == SIMPLE


def test_extended_protocol_session_is_one_step_per_statement_with_its_parameters(recorded):
    replays, _, extended = recorded
    assert normalized(render_text(replays[extended]), extended) == EXTENDED


def test_json_and_html_show_the_same_steps(recorded):
    replays, simple, extended = recorded
    steps = json.loads(render_json(replays[extended]))["steps"]
    assert [s["step"] for s in steps] == ["start", "login"] + ["statement"] * 6 + ["client", "end"]
    login = steps[1]
    assert login["outcome"] == "ok" and login["subject"] == "alice@example.com" and login["user"] == "alice@example.com"
    assert "server_version" in login["server_parameters"] and len(login["server_parameters"]) == 13
    assert login["messages"] == ["StartupMessage", "PasswordMessage"]
    assert login["server_messages"][-1] == "ReadyForQuery"
    select = steps[2]
    assert select["messages"] == ["Parse", "Bind", "Describe", "Execute", "Sync"]
    assert select["parameters"] == ["\\x0002"] and select["values"] == [2]  # as recorded, and as read
    assert select["columns"] == ["name"] and select["rows"] == [["bob"]] and select["command_tags"] == ["SELECT 1"]
    assert select["server_messages"][-1] == "ReadyForQuery" and select["transaction_status"] == "I"
    page = render_html(replays[simple])
    assert page.count('<span class="kind">LOGIN</span>') == 1 and "ok as alice@example.com" in page
    assert "ParameterStatus" not in page


def test_a_reply_split_over_several_events_is_one_step():
    """How the recorder folds reads into events depends on timing: an ErrorResponse and its ReadyForQuery, or a
    result's rows and its CommandComplete, may arrive in separate events and still read as one reply."""
    from ingest.protocols.postgres.render import RENDERER
    from ingest.protocols.render import Entry

    def entry(n: int, direction: str, records: list[dict]) -> Entry:
        step = RENDERER.step(direction, records, max_rows=10, reveal=None)
        return Entry({"seq": n, "ts": n, "offset_s": n / 10, "direction": direction, "channel": None, **step},
                     records)

    error = {"type": "ErrorResponse", "data": b"", "error_code": "22012", "error_message": "division by zero",
             "attributes": {"severity": "ERROR"}}
    ready = {"type": "ReadyForQuery", "data": b"", "attributes": {"transaction_status": "I"}}
    steps = RENDERER.arrange([entry(1, "client", [{"type": "Query", "data": b"", "statement": "SELECT 1/0"}]),
                              entry(2, "server", [error]), entry(3, "server", [ready]),
                              entry(4, "server", [{"type": "CommandComplete", "data": b"", "command_tag": "LISTEN"}]),
                              entry(5, "server", [ready]),
                              entry(6, "client", [{"type": "Terminate", "data": b""}])], max_rows=10, reveal=None)
    assert [(s["step"], s["offset_s"]) for s in steps] == [("statement", 0.1), ("error", 0.2), ("result", 0.4),
                                                           ("client", 0.6)]
    assert [RENDERER.describe(s)[:2] for s in steps[1:3]] == [("ERROR", "ERROR 22012: division by zero"),
                                                             ("RESULT", "LISTEN")]
    assert steps[1]["messages"] == ["ErrorResponse", "ReadyForQuery"]
