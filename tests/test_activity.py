"""The `activity` view and `custody activity`: one row per operation across protocols, on a real sealed ledger.

The demo ledger (query/sample.py) has PostgreSQL sessions; the test adds SSH sessions of the same people on a
partition of its own, written and sealed by the ledger's writer, with contract-v2 Frames events that carry
both directions and two channels.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from custody.cli import main
from custody.config import LedgerSettings
from ingest.consumer import Record
from ingest.events import SessionChain, datetime_to_micros
from ingest.keys import Keyring, load_key_file
from ingest.records import frames_body
from ledger.merkle import SALT_SIZE
from ledger.segments import MESSAGE
from ledger.service import PartitionWriter
from ledger.state import PartitionState
from query.views import open_ledger
from query.activity import ActivityFilter
from query.bundle import Scope, _select, load_seals
from query.sample import ORIGIN, TOPIC, build_demo_ledger
from query.sql import run_query

SSH_PARTITION = 2
SSH_START = datetime(2026, 3, 3, 12, 0, tzinfo=timezone.utc)
MS = 1000


def ssh_start(subject: str) -> dict:
    return {"identity": {"subject": subject, "username": subject.split("@")[0], "email": subject, "groups": ["dba"],
                         "issuer": "https://idp.example.com/", "token_id": None},
            "source_address": "10.1.0.7:52100", "client_cert_fingerprint": None, "target": "bastion",
            "upstream": "10.0.9.1:22", "protocol": "ssh", "client_application": "OpenSSH_9.2p1",
            "attributes": {"user": subject.split("@")[0]}}


def msg(type_: str, direction: str | None = None, channel: str | None = "0", offset_us: int = 0, **fields) -> dict:
    return {"type": type_, "data": b"", "direction": direction, "channel": channel, "offset_us": offset_us, **fields}


def ssh_steps() -> list[tuple[int, str, dict]]:
    """(µs after the session's start, kind, body): three commands, one blocked, two running at once on two channels."""
    ls = [msg("exec", "client", operation="command", text="ls -l /var/log", objects=["/var/log"]),
          msg("data", "server", offset_us=900),
          msg("exit-status", "server", offset_us=1_200, outcome="ok", error_code="0")]
    shadow = [msg("exec", "client", channel="1", operation="command", text="cat /etc/shadow", objects=["/etc/shadow"])]
    refused = [msg("exit-status", "server", channel="1", outcome="error", error_code="126",
                   error_message="blocked by policy")]
    # two channels at once: tail starts on 2, uptime on 3 answers first, then tail fails
    both = [msg("exec", "client", channel="2", operation="command", text="tail -n 5 /var/log/syslog",
                objects=["/var/log/syslog"]),
            msg("exec", "client", channel="3", offset_us=200, operation="command", text="uptime"),
            msg("exit-status", "server", channel="3", offset_us=5_000, outcome="ok", error_code="0"),
            msg("exit-status", "server", channel="2", offset_us=8_000, outcome="error", error_code="1",
                error_message="exit status 1")]
    decision = {"rule": "no-secrets", "action": "block", "reason": "reading /etc/shadow is not allowed",
                "statement": "cat /etc/shadow", "request_id": None, "approver": None, "attributes": {}}
    end = {"reason": "client_disconnect", "duration_us": 30_000 * MS, "client_bytes": 300, "server_bytes": 900,
           "client_messages": 4, "server_messages": 5}
    return [(0, "session_start", ssh_start("alice@example.com")),
            (1_000 * MS, "frames", frames_body(ls)),
            (5_000 * MS, "frames", frames_body(shadow)),
            (5_001 * MS, "policy_decision", decision),
            (5_002 * MS, "frames", frames_body(refused)),
            (9_000 * MS, "frames", frames_body(both)),
            (30_000 * MS, "session_end", end)]


def kube_steps() -> list[tuple[int, str, dict]]:
    """A `kubectl exec` that fails: the request has no channel, its streams do; the exit is the error channel's
    Status (the 101 that opened the stream is no final answer)."""
    start = {**ssh_start("alice@example.com"), "target": "cluster", "upstream": "10.0.9.2:6443",
             "protocol": "kubernetes", "client_application": "kubectl/v1.32.0", "attributes": {}}
    request = [msg("Request", "client", channel=None, operation="command", text="sh -c 'exit 3'",
                   objects=["pods/web-1/exec"]),
               msg("Response", "server", channel=None, offset_us=300, attributes={"status": "101"})]
    streams = [msg("ws.binary", "server", channel="1", offset_us=0),
               msg("ws.binary", "server", channel="3", offset_us=100, outcome="error", error_code="3",
                   error_message="command terminated with non-zero exit code: exit status 3")]
    end = {"reason": "client_disconnect", "duration_us": 2_000 * MS, "client_bytes": 200, "server_bytes": 400,
           "client_messages": 1, "server_messages": 3}
    return [(40_000 * MS, "session_start", start), (40_001 * MS, "frames", frames_body(request)),
            (40_500 * MS, "frames", frames_body(streams)), (42_000 * MS, "session_end", end)]


def add_ssh_partition(demo) -> list:
    """Sign SSH sessions (and a Kubernetes exec) as a proxy would and seal them on a partition of their own, as
    the ledger does."""
    ledger_dir = demo.ledger_dir
    settings = LedgerSettings(dir=ledger_dir, origin=ORIGIN, segment_max_events=100, segment_max_bytes=1 << 40,
                              segment_max_seconds=1e9, idle_seal_seconds=1e9)
    keys = demo.root / "keys"
    writer = PartitionWriter(ledger_dir, settings, TOPIC, PartitionState(SSH_PARTITION), Keyring.load(demo.keyring),
                             load_key_file(keys / "ledger.key"))
    began = datetime_to_micros(SSH_START)
    events = []
    ssh, kube = (SessionChain(load_key_file(keys / "proxy.key"), name) for name in ("ssh-proxy-0", "kube-proxy-0"))
    steps = [(ssh, step) for step in ssh_steps()] + [(kube, step) for step in kube_steps()]
    for offset, (chain, (at, kind, body)) in enumerate(steps):
        event = chain.event(kind, body, ts_micros=began + at)
        assert writer.add(Record(TOPIC, SSH_PARTITION, offset, chain.session_id.encode(), event.value),
                          os.urandom(SALT_SIZE)) is None
        events.append(event)
    writer.seal()
    return events


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    demo = build_demo_ledger(tmp_path_factory.mktemp("activity"), sessions=40, statements=5, segment_events=300)
    add_ssh_partition(demo)
    return demo


@pytest.fixture(scope="module")
def con(demo):
    return open_ledger(demo.ledger_dir)


def rows(con, sql, params=None) -> list[dict]:
    return run_query(con, sql, params).to_pylist()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


# --- frames and events: each message's own direction, channel and time -----------------------------


def test_frames_view_has_each_message_with_its_effective_direction_channel_and_time(con):
    found = rows(con, "SELECT seq, message_no, direction, channel, offset_us, ts, type, operation, text, outcome "
                      "FROM frames WHERE protocol = 'ssh' ORDER BY seq, message_no")
    assert [(r["seq"], r["message_no"], r["direction"], r["channel"]) for r in found[:3]] == [
        (1, 1, "client", "0"), (1, 2, "server", "0"), (1, 3, "server", "0")]
    assert found[2]["ts"] - found[0]["ts"] == pa.scalar(1_200, pa.duration("us")).as_py()
    event = rows(con, "SELECT direction, messages FROM events WHERE protocol = 'ssh' AND seq = 1")[0]
    assert event["direction"] == "mixed"
    assert [m["direction"] for m in event["messages"]] == ["client", "server", "server"]
    # a v2 event of one direction: the Frames' direction, and every message's effective one, is that direction
    one_way = rows(con, "SELECT direction, messages FROM events WHERE protocol = 'ssh' AND seq = 2")[0]
    assert one_way["direction"] == "client" and [m["direction"] for m in one_way["messages"]] == ["client"]
    # PostgreSQL events name no direction per message: each message has its event's
    pg = rows(con, "SELECT count(*) AS n FROM frames f JOIN events e USING (session_id, seq) "
                   "WHERE e.protocol = 'postgres' AND f.direction IS DISTINCT FROM e.direction")[0]
    assert pg["n"] == 0


# --- activity ----------------------------------------------------------------------------------------


def test_activity_has_one_row_per_postgres_statement_with_outcome_and_policy(con):
    statements = rows(con, "SELECT session_id, statement_no, ts, statement, error_code, policy_action, policy_rule "
                           "FROM statements ORDER BY session_id, statement_no")
    activity = rows(con, "SELECT session_id, operation_no, ts, text, operation, outcome, error_code, policy_action, "
                         "policy_rule, objects FROM activity WHERE protocol = 'postgres' "
                         "ORDER BY session_id, operation_no")
    assert len(activity) == len(statements) > 50
    for s, a in zip(statements, activity):
        assert (a["session_id"], a["operation_no"], a["ts"], a["text"]) == \
               (s["session_id"], s["statement_no"], s["ts"], s["statement"])
        assert a["operation"] == "statement"
        assert a["error_code"] == s["error_code"]
        assert (a["policy_action"] or "allow", a["policy_rule"]) == (s["policy_action"], s["policy_rule"])
    blocked = [a for a in activity if a["policy_action"] == "block"]
    assert blocked and all(a["outcome"] == "error" and a["error_code"] == "42501" for a in blocked)
    approved = [a for a in activity if a["policy_action"] == "approve"]
    assert approved and all(a["outcome"] == "ok" and a["objects"] == ["orders"] for a in approved)
    assert {a["outcome"] for a in activity} == {"ok", "error"}


def test_activity_across_protocols_for_one_identity_in_order(con):
    alice = rows(con, "SELECT ts, protocol, target, operation, text, objects, outcome, error_code, channel, "
                      "policy_action, policy_rule FROM activity WHERE subject = 'alice@example.com' ORDER BY ts")
    assert {r["protocol"] for r in alice} == {"postgres", "ssh", "kubernetes"}
    assert [r["ts"] for r in alice] == sorted(r["ts"] for r in alice)
    pg_count = rows(con, "SELECT count(*) AS n FROM statements WHERE subject = 'alice@example.com'")[0]["n"]
    ssh = [r for r in alice if r["protocol"] == "ssh"]
    kube = [r for r in alice if r["protocol"] == "kubernetes"]
    assert len(alice) == pg_count + len(ssh) + len(kube)
    # the exec's outcome is its error channel's Status, though the request itself has no channel
    assert [(r["operation"], r["text"], r["channel"], r["outcome"], r["error_code"]) for r in kube] == [
        ("command", "sh -c 'exit 3'", None, "error", "3")]
    assert [(r["target"], r["operation"], r["text"], r["channel"], r["outcome"], r["error_code"]) for r in ssh] == [
        ("bastion", "command", "ls -l /var/log", "0", "ok", None),
        ("bastion", "command", "cat /etc/shadow", "1", "error", "126"),
        ("bastion", "command", "tail -n 5 /var/log/syslog", "2", "error", "1"),  # its own channel's outcome
        ("bastion", "command", "uptime", "3", "ok", None),
    ]
    assert (ssh[1]["policy_action"], ssh[1]["policy_rule"]) == ("block", "no-secrets")
    assert ssh[0]["policy_action"] is None and ssh[0]["objects"] == ["/var/log"]
    assert ssh[3]["ts"] - ssh[2]["ts"] == pa.scalar(200, pa.duration("us")).as_py()  # the message's offset_us


def test_activity_filter_query_binds_values():
    sql, params = ActivityFilter(identity="x' OR 1=1 --", protocol="ssh", limit=5).query()
    assert "x'" not in sql and params == ["x' OR 1=1 --", "x' OR 1=1 --", "ssh"]
    assert sql.endswith("ORDER BY ts, session_id, operation_no LIMIT 5")


def test_activity_command_filters_and_formats(capsys, demo):
    ledger = str(demo.ledger_dir)
    code, out, err = run(capsys, "activity", "--ledger", ledger, "--identity", "alice@example.com", "--format", "json")
    assert code == 0, err
    everything = json.loads(out)
    assert {r["protocol"] for r in everything} == {"postgres", "ssh", "kubernetes"}
    assert {r["subject"] for r in everything} == {"alice@example.com"}
    assert [r["ts"] for r in everything] == sorted(r["ts"] for r in everything)

    code, out, err = run(capsys, "activity", "--ledger", ledger, "--subject", "alice@example.com",
                         "--protocol", "ssh", "--format", "csv")
    assert code == 0, err
    table = list(csv.DictReader(io.StringIO(out)))
    assert [r["text"] for r in table] == ["ls -l /var/log", "cat /etc/shadow", "tail -n 5 /var/log/syslog", "uptime"]
    assert table[1]["policy_action"] == "block" and table[1]["outcome"] == "error"

    code, out, _ = run(capsys, "activity", "--ledger", ledger, "--target", "bastion", "--since", "2026-03-03T12:00:05Z",
                       "--until", "2026-03-03T12:00:09.0001Z", "--format", "json")
    assert code == 0 and [r["text"] for r in json.loads(out)] == ["cat /etc/shadow", "tail -n 5 /var/log/syslog"]

    code, out, _ = run(capsys, "activity", "--ledger", ledger, "--protocol", "postgres", "--limit", "3")
    assert code == 0 and "post" in out and out.rstrip().endswith("3 rows")

    code, _, err = run(capsys, "activity", "--ledger", ledger, "--since", "yesterday-ish")
    assert code == 2 and err.startswith("error: ")


def test_segments_written_before_contract_v2_still_query(demo, tmp_path):
    """A segment with the v1 message struct (no direction, operation… fields): the views fill NULLs and derive."""
    ledger = shutil.copytree(demo.ledger_dir, tmp_path / "ledger")
    v1_message = pa.struct(list(MESSAGE)[:7])
    for path in (ledger / "segments").glob("p0/*.parquet"):
        table = pq.read_table(path)
        index = table.schema.get_field_index("messages")
        old = table.set_column(index, pa.field("messages", pa.list_(v1_message)),
                               table.column("messages").cast(pa.list_(v1_message)))
        pq.write_table(old, path, compression="zstd")
    con = open_ledger(ledger)
    assert "operation" not in str(pq.read_schema(next((ledger / "segments").glob("p0/*.parquet"))))
    statements = rows(con, "SELECT count(*) AS n FROM statements")[0]["n"]
    activity = {r["protocol"]: r for r in rows(con, "SELECT protocol, count(*) AS n, count(objects) AS with_objects, "
                                                    "count(outcome) AS ended FROM activity GROUP BY ALL")}
    postgres = activity["postgres"]
    assert postgres["n"] == statements
    assert 0 < postgres["with_objects"] < postgres["n"]  # p1 still has v2 fields, p0 derives without them
    assert postgres["ended"] == postgres["n"]
    assert activity["ssh"]["n"] == 4 and activity["kubernetes"]["n"] == 1
    # a bundle's selection reads old and new segments alike, in the current segment schema
    selected = _select(ledger, load_seals(ledger), Scope(identity="alice@example.com"))
    assert selected.schema.field("messages").type == pa.list_(MESSAGE)
    assert set(selected.column("protocol").to_pylist()) == {"postgres", "ssh", "kubernetes"}
