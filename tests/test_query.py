"""The query layer on a real sealed ledger: views, read-only SQL, session listing, verified replay."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

import events_factory
from conftest import make_key
from custody.cli import main
from ingest import protocols
from ingest.consumer import Record
from ingest.events import SessionChain
from ingest.keys import Keyring, TrustedKey
from ingest.protocols import ProtocolViolation
from ingest.protocols.postgres import messages as pg
from ingest.protocols.postgres.records import split_run
from ingest.records import frames_body
from ledger.segments import SCHEMA
from ledger.service import PartitionWriter
from ledger.settings import LedgerSettings
from ledger.state import recover
from query.views import open_ledger
from query.html import render_html
from query.filters import SessionFilter, parse_time
from query.render import render_text
from query.replay import replay_session
from query.sample import build_demo_ledger
from query.sql import QueryError, run_query


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_ledger(tmp_path_factory.mktemp("demo"), sessions=80, statements=6, segment_events=300)


@pytest.fixture(scope="module")
def con(demo):
    return open_ledger(demo.ledger_dir)


@pytest.fixture(scope="module")
def keyring(demo):
    return Keyring.load(demo.keyring)


def scalar(con, sql, params=None):
    return run_query(con, sql, params).to_pylist()[0]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """`custody …` in process: exit code, stdout, stderr."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def session_with(con, where: str) -> str:
    return scalar(con, f"SELECT session_id FROM statements WHERE {where} ORDER BY ts LIMIT 1")["session_id"]


# --- replay reads PostgreSQL through the proxy's own codec --------------------------------------


def test_replay_reads_recorded_rows_with_the_codec_the_proxy_records_with():
    """The proxy folds the DataRows of one read into one record; replay shows every row of it."""
    rows = [pg.data_row([str(i).encode(), None if i == 1 else f"Zoë {i}".encode()]) for i in range(3)]
    messages = [{"type": "RowDescription", "data": pg.row_description(["id", "name"]), "attributes": {}},
                {"type": "DataRow", "data": b"".join(rows), "attributes": {"messages": "3"}},
                {"type": "CommandComplete", "data": pg.command_complete("SELECT 3"), "command_tag": "SELECT 3"}]
    step = protocols.renderer("postgres").step("server", messages, max_rows=2, reveal=None)
    assert step["columns"] == ["id", "name"] and step["rows"] == [["0", "Zoë 0"], ["1", None]]
    assert step["row_count"] == 3 and step["command_tags"] == ["SELECT 3"] and "undecodable" not in step
    assert [m.payload for m in split_run("server", messages[1])] == [r[5:] for r in rows]
    with pytest.raises(ProtocolViolation, match="incomplete message"):
        split_run("server", {"data": b"".join(rows)[:-1]})
    torn = protocols.renderer("postgres").step("server", [{**messages[1], "data": rows[0][:-1]}], max_rows=9, reveal=None)
    assert torn["rows"] == [] and torn["undecodable"][0].startswith("DataRow: incomplete message")


# --- views -----------------------------------------------------------------------------------------


def test_events_view_has_every_sealed_event_with_the_segment_columns(con, demo):
    assert scalar(con, "SELECT count(*) AS n FROM events")["n"] == demo.events
    columns = [r["column_name"] for r in run_query(con, "DESCRIBE events").to_pylist()]
    assert columns == SCHEMA.names


def test_sessions_view_one_row_per_session_with_identity_and_counts(con):
    assert scalar(con, "SELECT count(*) AS n, count(DISTINCT session_id) AS d FROM sessions") == {"n": 80, "d": 80}
    row = scalar(con, "SELECT * FROM sessions WHERE end_reason = 'client_terminate' ORDER BY started LIMIT 1")
    assert row["subject"].endswith("example.com") and row["target"] in ("orders-db", "billing-db")
    assert row["protocol"] == "postgres" and row["statements"] >= 1
    assert row["ended"] > row["started"] and row["client_bytes"] > 0 and row["server_bytes"] > 0
    reasons = {r["end_reason"] for r in run_query(con, "SELECT DISTINCT end_reason FROM sessions").to_pylist()}
    assert reasons == {"client_terminate", "auth_failed", "protocol_error"}


def test_statements_view_pairs_statement_parameters_and_outcome(con):
    extended = scalar(con, "SELECT * FROM statements WHERE parameters IS NOT NULL LIMIT 1")
    assert "$1" in extended["statement"] and len(extended["parameters"]) == 2
    assert extended["command_tag"].startswith("SELECT") and extended["rows"] == int(extended["command_tag"].split()[1])
    failed = scalar(con, "SELECT * FROM statements WHERE error_code = '42P01' LIMIT 1")
    assert "does not exist" in failed["error_message"] and failed["command_tag"] is None
    blocked = scalar(con, "SELECT * FROM statements WHERE policy_action = 'block' LIMIT 1")
    assert blocked["policy_rule"] == "block-ddl" and blocked["error_code"] == "42501"
    approved = scalar(con, "SELECT * FROM statements WHERE policy_action = 'approve' LIMIT 1")
    assert approved["approver_subject"] == "carol@example.com" and approved["command_tag"].startswith("DELETE")
    assert scalar(con, "SELECT count(*) AS n FROM statements WHERE statement IS NULL")["n"] == 0


def test_violations_and_approvals(con):
    kinds = {r["violation"] for r in run_query(con, "SELECT DISTINCT violation FROM violations").to_pylist()}
    assert kinds == {"blocked", "denied", "auth_failure", "protocol_error"}
    auth = scalar(con, "SELECT * FROM violations WHERE violation = 'auth_failure' LIMIT 1")
    assert auth["subject"] is None and "token expired" in auth["reason"]
    held = run_query(con, "SELECT request_id, list(action ORDER BY seq) AS actions FROM approvals "
                          "GROUP BY request_id").to_pylist()
    assert held and all(r["request_id"].startswith("req-") for r in held)
    assert {tuple(r["actions"]) for r in held} <= {("hold", "approve"), ("hold", "deny")}


def test_seals_view_reads_the_seal_files(con, demo):
    seals = run_query(con, "SELECT * FROM seals ORDER BY partition, number").to_pylist()
    assert sum(s["leaves"] for s in seals) == demo.events
    assert all(len(s["tree_root"]) == 64 and s["segment_path"].startswith("segments/p") for s in seals)
    assert seals[0]["previous_hash"] is None and seals[1]["previous_hash"]


def test_only_sealed_segments_are_queried(demo, tmp_path):
    orphan = demo.ledger_dir / "segments" / "p0" / "999999.parquet"
    orphan.write_bytes((demo.ledger_dir / "segments" / "p0" / "000001.parquet").read_bytes())
    try:
        assert scalar(open_ledger(demo.ledger_dir), "SELECT count(*) AS n FROM events")["n"] == demo.events
    finally:
        orphan.unlink()


def test_empty_ledger_has_the_views_and_no_rows(tmp_path):
    (tmp_path / "seals").mkdir()
    con = open_ledger(tmp_path)
    for view in ("events", "sessions", "statements", "violations", "approvals", "seals"):
        assert scalar(con, f"SELECT count(*) AS n FROM {view}")["n"] == 0


# --- read-only SQL ---------------------------------------------------------------------------------


@pytest.mark.parametrize("statement", [
    "DELETE FROM events", "CREATE TABLE t AS SELECT 1", "COPY events TO 'x.csv'", "ATTACH 'x.db'",
    "SET enable_external_access = true", "INSERT INTO events SELECT * FROM events", "DROP VIEW events",
])
def test_writes_are_refused(con, statement):
    with pytest.raises(QueryError, match="read-only"):
        run_query(con, statement)


def test_files_outside_the_ledger_cannot_be_read(con):
    with pytest.raises(QueryError, match="Permission"):
        run_query(con, "SELECT * FROM read_csv('/etc/passwd')")


def test_sql_command_formats_and_one_line_errors(capsys, demo, tmp_path):
    code, out, _ = run(capsys, "sql", "--config", str(demo.config), "--format", "json",
                       "SELECT violation, count(*) AS n FROM violations GROUP BY 1 ORDER BY 1")
    assert code == 0 and {r["violation"] for r in json.loads(out)} >= {"blocked", "auth_failure"}
    code, out, _ = run(capsys, "sql", "--ledger", str(demo.ledger_dir), "--format", "csv",
                       "SELECT session_id, duration FROM sessions LIMIT 2")
    assert code == 0 and out.splitlines()[0] == "session_id,duration" and len(out.splitlines()) == 3
    target = tmp_path / "s.parquet"
    code, _, _ = run(capsys, "sql", "--config", str(demo.config), "--format", "parquet", "-o", str(target),
                     "SELECT * FROM statements")
    assert code == 0 and pq.read_table(target).num_rows > 80
    code, out, _ = run(capsys, "sql", "--config", str(demo.config), "SELECT subject FROM sessions LIMIT 1")
    assert code == 0 and "subject" in out and "1 rows" in out
    for bad in ("DELETE FROM events", "SELECT nope FROM sessions", "SELEC 1"):
        code, _, err = run(capsys, "sql", "--config", str(demo.config), bad)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


# --- sessions --------------------------------------------------------------------------------------


def test_parse_time():
    assert parse_time("2026-03-02").isoformat() == "2026-03-02T00:00:00+00:00"
    assert parse_time("2026-03-02T08:00Z").hour == 8
    now = parse_time("2026-03-02T08:00Z")
    assert parse_time("2h", now=now).hour == 6


def test_session_filters(con):
    def ids(**kw):
        return [r["session_id"] for r in run_query(con, *SessionFilter(limit=None, **kw).query()).to_pylist()]
    everyone = ids()
    assert len(everyone) == 80
    mallory = ids(identity="mallory@example.com")
    assert mallory and set(mallory) < set(everyone)
    orders = ids(target="orders-db")
    assert set(ids(identity="mallory@example.com", target="orders-db")) == set(mallory) & set(orders)
    flagged = ids(with_violations=True)
    assert flagged and set(flagged) < set(everyone)
    assert set(ids(since=parse_time("2026-03-04"))) | set(ids(until=parse_time("2026-03-04"))) == set(everyone)


def test_sessions_command(capsys, demo):
    code, out, _ = run(capsys, "sessions", "--config", str(demo.config), "--identity", "mallory@example.com",
                       "--with-violations", "--format", "json", "--limit", "0")
    rows = json.loads(out)
    assert code == 0 and rows and all(r["subject"] == "mallory@example.com" and r["violations"] > 0 for r in rows)
    assert [r["started"] for r in rows] == sorted((r["started"] for r in rows), reverse=True)
    code, _, err = run(capsys, "sessions", "--config", str(demo.config), "--since", "last tuesday")
    assert code == 2 and "expected a time" in err


# --- replay ----------------------------------------------------------------------------------------


def test_replay_of_a_held_and_approved_statement(con, keyring):
    session = session_with(con, "policy_action = 'approve'")
    replay = replay_session(con, session[:13], keyring)
    assert replay.verification.ok and replay.verification.ended
    assert replay.verification.line.startswith(f"VERIFIED session {session}")
    steps = replay.steps
    assert [s["seq"] for s in steps] == list(range(len(steps))) and steps[0]["step"] == "start"
    assert steps[-1]["step"] == "end" and steps[-1]["reason"] == "client_terminate"
    assert all(b["offset_s"] >= a["offset_s"] for a, b in zip(steps, steps[1:]))
    policy = [s for s in steps if s["step"] == "policy"]
    hold, approve = next((a, b) for a, b in zip(policy, policy[1:]) if (a["action"], b["action"]) == ("hold", "approve"))
    assert hold["request_id"] == approve["request_id"] and approve["approver"]["subject"] == "carol@example.com"
    assert approve["reason"] == "cleanup ticket OPS-1234"


def test_replay_shows_rows_as_the_client_saw_them(con, keyring):
    session = session_with(con, "statement LIKE 'SELECT id, email%'")
    result = next(s for s in replay_session(con, session, keyring).steps if s["step"] == "result" and s["columns"])
    assert result["columns"] == ["id", "email", "plan"]
    assert result["rows"] and all("***@example.com" in row[1] for row in result["rows"])
    assert result["masked_rows"] == list(range(len(result["rows"])))
    assert result["command_tags"] == [f"SELECT {result['row_count']}"] and result["transaction_status"] == "I"


def test_replay_text_has_statements_parameters_errors_notices_and_policy(capsys, con, demo):
    for where, expected in [("parameters IS NOT NULL", "parameters: ["),
                            ("error_code = '42P01'", "ERROR 42P01: relation"),
                            ("statement = 'DROP TABLE IF EXISTS tmp_export'", "NOTICE 00000: table \"tmp_export\""),
                            ("policy_action = 'block'", "BLOCK by rule block-ddl"),
                            ("policy_action = 'deny'", "approval expired")]:
        code, out, _ = run(capsys, "replay", session_with(con, where), "--config", str(demo.config))
        assert code == 0 and out.startswith("VERIFIED session ") and expected in out, (where, out)


def test_replay_json_and_failed_sessions(capsys, con, demo):
    session = scalar(con, "SELECT session_id FROM sessions WHERE end_reason = 'protocol_error'")["session_id"]
    code, out, _ = run(capsys, "replay", session, "--config", str(demo.config), "--format", "json")
    replay = json.loads(out)
    assert code == 0 and replay["verification"]["verified"]
    assert [s["step"] for s in replay["steps"]] == ["start", "protocol_error", "end"]
    session = scalar(con, "SELECT session_id FROM sessions WHERE end_reason = 'auth_failed'")["session_id"]
    code, out, _ = run(capsys, "replay", session, "--config", str(demo.config))
    assert "(no identity: authentication failed)" in out and "DENY by rule authentication" in out


def test_replay_says_when_a_session_does_not_verify(capsys, demo, tmp_path):
    """A missing event breaks the chain; an untrusted key fails every signature. Both exit 1."""
    con = open_ledger(demo.ledger_dir)
    session = session_with(con, "policy_action = 'block'")
    other = tmp_path / "keyring.toml"
    Keyring([k for k in Keyring.load(demo.keyring) if k.role == "ledger"]).save(other)
    code, out, _ = run(capsys, "replay", session, "--ledger", str(demo.ledger_dir), "--keyring", str(other))
    assert code == 1 and out.startswith("NOT VERIFIED session") and "unknown_key" in out.splitlines()[0]

    path = demo.ledger_dir / scalar(con, "SELECT s.segment_path FROM seals s, events e WHERE e.session_id = ? "
                                         "AND e.partition = s.partition AND e.leaf_index >= s.first_leaf "
                                         "AND e.leaf_index < s.first_leaf + s.leaves AND e.seq = 3",
                                    [session])["segment_path"]
    original = path.read_bytes()
    table = pq.read_table(path)
    keep = [not (s == session and q == 3) for s, q in zip(table["session_id"].to_pylist(), table["seq"].to_pylist())]
    pq.write_table(table.filter(keep), path)
    try:
        code, out, _ = run(capsys, "replay", session, "--config", str(demo.config))
        assert code == 1 and "seq 4: seq_gap" in out.splitlines()[0]
    finally:
        path.write_bytes(original)


def test_replay_of_an_unknown_session_is_one_line(capsys, demo):
    code, _, err = run(capsys, "replay", "ffffffff", "--config", str(demo.config))
    assert code == 2 and err == "error: no session starts with 'ffffffff'\n"


# --- contract v2: one Frames, both directions, several channels ------------------------------------


def ledger_of(tmp_path, bodies: list[tuple[str, dict]]):
    """A sealed one-session ledger of these event bodies, and its keyring."""
    proxy_key, ledger_key = make_key("proxy"), make_key("ledger")
    trust = Keyring([TrustedKey(proxy_key.key_id, "proxy", proxy_key.public_key),
                     TrustedKey(ledger_key.key_id, "ledger", ledger_key.public_key)])
    chain = SessionChain(proxy_key, "v2-proxy")
    root = tmp_path / "ledger"
    settings = LedgerSettings(dir=root, origin="custody.test/replay", segment_max_events=100,
                              segment_max_bytes=1 << 24, segment_max_seconds=60.0, idle_seal_seconds=60.0)
    writer = PartitionWriter(root, settings, "t.events", recover(root, 0), trust, ledger_key)
    for offset, (kind, body) in enumerate(bodies):
        event = chain.event(kind, body)
        writer.add(Record("t.events", 0, offset, event.session_id.encode(), event.value), os.urandom(32))
    writer.seal()
    return open_ledger(root), trust, event.session_id


def test_replay_orders_and_attributes_each_message_by_its_own_direction_channel_and_offset(tmp_path):
    """A protocol without a renderer: each run is shown with its type, direction, channel and bytes."""
    ssh = {**events_factory.session_start(), "protocol": "telnet", "target": "bastion", "client_application": "tn"}
    mixed = frames_body([  # recorded out of read order: the offsets say when each was read
        {"type": "data", "data": b"a\nb\n", "direction": "server", "channel": "0", "offset_us": 400},
        {"type": "exec", "data": b"ls /tmp", "direction": "client", "channel": "0", "offset_us": 0},
        {"type": "data", "data": b"tail -f log", "direction": "client", "channel": "1", "offset_us": 600},
        {"type": "exit-status", "data": b"\0\0\0\0", "direction": "server", "channel": "0", "offset_us": 500},
        {"type": "data", "data": b"x" * 40, "direction": "server", "channel": "1", "offset_us": 900}])
    con, trust, session = ledger_of(tmp_path, [("session_start", ssh), ("frames", mixed),
                                               ("session_end", events_factory.session_end())])
    replay = replay_session(con, session, trust)
    assert replay.verification.ok and replay.protocol == "telnet"
    frames = [s for s in replay.steps if s["seq"] == 1]
    assert [(s["direction"], s["channel"], s["messages"]) for s in frames] == [
        ("client", "0", ["exec"]), ("server", "0", ["data", "exit-status"]), ("client", "1", ["data"]),
        ("server", "1", ["data"])]
    assert [round((s["offset_s"] - frames[0]["offset_s"]) * 1e6) for s in frames] == [0, 400, 600, 900]
    assert frames[1]["sizes"] == [4, 4] and frames[3]["preview"] == "78 " * 15 + "78 …"
    text = render_text(replay)
    lines = [line.strip() for line in text.splitlines()]
    exec_at = next(i for i, line in enumerate(lines) if line.endswith("CLIENT exec (7 B)"))
    assert lines[exec_at + 1:exec_at + 3] == ["client, channel 0", "first bytes: 6c 73 20 2f 74 6d 70"]
    assert [line.split()[1] for line in lines if " CLIENT " in f" {line} " or " SERVER " in f" {line} "] == [
        "CLIENT", "SERVER", "CLIENT", "SERVER"]
    assert "server, channel 1" in text and 'data-direction="server"' in render_html(replay)


def test_a_postgres_frames_with_both_directions_replays_as_statement_then_result(tmp_path):
    both = frames_body([
        {"type": "Query", "data": pg.query("SELECT 1"), "statement": "SELECT 1", "offset_us": 0},
        {"type": "CommandComplete", "data": pg.command_complete("SELECT 1"), "command_tag": "SELECT 1",
         "direction": "server", "offset_us": 250},
        {"type": "ReadyForQuery", "data": pg.ready_for_query("I"), "attributes": {"transaction_status": "I"},
         "direction": "server", "offset_us": 260}], "client")
    assert both["direction"] == "mixed"
    con, trust, session = ledger_of(tmp_path, [("session_start", events_factory.session_start()), ("frames", both),
                                               ("session_end", events_factory.session_end())])
    steps = [s for s in replay_session(con, session, trust).steps if s["seq"] == 1]
    assert [(s["step"], s["direction"], s["channel"]) for s in steps] == [("statement", "client", None),
                                                                          ("result", "server", None)]
    assert steps[0]["statement"] == "SELECT 1" and steps[1]["command_tags"] == ["SELECT 1"]
    assert steps[1]["transaction_status"] == "I"
