"""The checker: what the clients say they did against what the sealed ledger says, through `custody activity`,
`custody sql` and `custody verify` only (the CLI an analyst or auditor runs).

For every client session: exactly one sealed session with its tag, closed (a SessionEnd sealed, the client's
end reason), its chain whole (seq 0..last, no gap), and its operations the client's, in the client's order, with
the same outcomes (and, for PostgreSQL, the same command tags, i.e. row counts; for sftp, the same file hashes).
For the ledger as a whole: no event twice, no session nobody made, `custody verify` clean.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from system_clients import SessionLog
from system_stack import SystemStack, custody

TAG = re.compile(r"sys-[0-9a-f]{10}")
CLIENT_ENDS = {"client_terminate", "client_disconnect", "client_close", "client_exit", "channel_closed"}


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    figures: dict[str, object] = field(default_factory=dict)

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def __str__(self) -> str:
        shown = "\n  ".join(self.problems[:40])
        more = f"\n  … {len(self.problems) - 40} more" if len(self.problems) > 40 else ""
        return f"{len(self.problems)} problems:\n  {shown}{more}\nfigures: {self.figures}"


def client_ops(log: SessionLog) -> list[tuple]:
    return [(op.operation, op.text, op.outcome) for op in log.ops]


def sealed_ops(rows: list[dict]) -> list[tuple]:
    return [(r["operation"], r["text"], r["outcome"]) for r in sorted(rows, key=lambda r: r["operation_no"])]


def first_difference(a: list, b: list) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"#{i}: client {x!r} / sealed {y!r}"
    return f"lengths: client {len(a)} / sealed {len(b)}"


def check(stack: SystemStack, logs: list[SessionLog], allowed_end_reasons: set[str] = CLIENT_ENDS,
          unclosed: set[str] = frozenset()) -> Report:
    """Compare; `unclosed` names tags whose clients were cut off on purpose (their sessions must still be closed
    in the ledger, but by the proxy, and hold a prefix of what the client did)."""
    report = Report()
    config = str(stack.config_path)
    result = custody("activity", "--config", config, "--limit", "0", "--format", "json")
    assert result.returncode == 0, result.stderr
    activity = json.loads(result.stdout or "[]")
    sessions = stack.sql("SELECT session_id, protocol, target, subject, client_application, ended IS NOT NULL "
                         "AS closed, end_reason, events, last_seq FROM sessions")
    seqs = {r["session_id"]: r for r in stack.sql(
        "SELECT session_id, count(*) AS n, count(DISTINCT seq) AS distinct_seq, min(seq) AS first, "
        "max(seq) AS last, count(*) FILTER (kind = 'session_start') AS starts, "
        "count(*) FILTER (kind = 'session_end') AS ends FROM events GROUP BY session_id")}
    totals = stack.sql("SELECT count(*) AS events, count(DISTINCT event_id) AS ids, "
                       "count(DISTINCT (session_id, seq)) AS positions, "
                       "coalesce(sum(len(messages)) FILTER (kind = 'frames'), 0) AS messages FROM events")[0]
    report.figures.update(sealed_events=totals["events"], sealed_messages=totals["messages"],
                          sealed_sessions=len(sessions), sealed_operations=len(activity))
    if totals["ids"] != totals["events"] or totals["positions"] != totals["events"]:
        report.problem(f"duplicates: {totals['events']} events, {totals['ids']} distinct ids, "
                       f"{totals['positions']} distinct (session, seq)")

    by_session = defaultdict(list)
    for row in activity:
        by_session[row["session_id"]].append(row)
    tags: dict[str, list[str]] = defaultdict(list)
    for s in sessions:
        tag = s["client_application"] if TAG.fullmatch(s["client_application"] or "") else None
        if tag is None:
            first = min(by_session.get(s["session_id"], []), key=lambda r: r["operation_no"], default=None)
            found = TAG.search(first["text"] or "") if first else None
            tag = found.group(0) if found else None
        tags[tag].append(s["session_id"])
    info = {s["session_id"]: s for s in sessions}

    statements = defaultdict(list)
    for row in stack.sql("SELECT session_id, statement_no, statement, command_tag, error_code FROM statements "
                         "WHERE target = 'local-postgres'"):
        statements[row["session_id"]].append(row)

    mine = {log.tag for log in logs}
    for tag, ids in tags.items():
        if tag not in mine:
            report.problem(f"{len(ids)} sealed sessions no client made (tag {tag}): {ids[:3]}")
    operations = 0
    for log in logs:
        ids = tags.get(log.tag, [])
        if len(ids) != 1:
            report.problem(f"{log.protocol} {log.tag}: {len(ids)} sealed sessions")
            continue
        sid = ids[0]
        s, chain = info[sid], seqs[sid]
        if chain["first"] != 0 or chain["distinct_seq"] != chain["n"] or chain["last"] != chain["n"] - 1:
            report.problem(f"{log.tag}: chain not whole: {chain}")
        if chain["starts"] != 1 or chain["ends"] != 1:
            report.problem(f"{log.tag}: {chain['starts']} SessionStart, {chain['ends']} SessionEnd")
        if s["subject"] != log.identity or s["target"] != log.target:
            report.problem(f"{log.tag}: sealed as {s['subject']} on {s['target']}")
        ours, sealed = client_ops(log), sealed_ops(by_session[sid])
        operations += len(ours)
        if log.tag in unclosed or not log.closed:
            if log.tag not in unclosed:
                report.problem(f"{log.tag}: the client did not close its session: {log.failure}")
            # the client may have sent one more than it logged (cut off before the answer)
            if sealed[:len(ours)] != ours[:len(sealed)] or len(sealed) > len(ours) + 1:
                report.problem(f"{log.tag} (cut off): sealed operations not a prefix: "
                               f"{first_difference(ours, sealed)}")
            continue
        if s["end_reason"] not in allowed_end_reasons:
            report.problem(f"{log.tag}: ended {s['end_reason']!r}")
        if ours != sealed:
            report.problem(f"{log.protocol} {log.tag}: operations differ at {first_difference(ours, sealed)}")
        if log.protocol == "postgres":
            theirs = [(r["statement"], r["command_tag"] if r["error_code"] is None else r["error_code"])
                      for r in sorted(statements[sid], key=lambda r: r["statement_no"])]
            mine_tags = [(op.text, op.tag if op.outcome == "ok" else op.code) for op in log.ops]
            if theirs != mine_tags:
                report.problem(f"{log.tag}: command tags / SQLSTATEs differ at {first_difference(mine_tags, theirs)}")
        if log.protocol == "ssh" and any(op.operation == "transfer" for op in log.ops):
            hashes = transfer_hashes(stack, sid)
            expected = [(op.text.split()[1], op.digest) for op in log.ops if op.digest]
            if hashes != expected:
                report.problem(f"{log.tag}: sealed file hashes {hashes} != {expected}")
    report.figures["client_sessions"] = len(logs)
    report.figures["client_operations"] = operations

    verify = custody("verify", "--config", config)
    report.figures["verify"] = (verify.stdout.strip().splitlines() or [verify.stderr.strip()])[-1]
    if verify.returncode != 0:
        report.problem(f"custody verify exit {verify.returncode}: {verify.stdout[-1500:]} {verify.stderr[-500:]}")
    return report


def transfer_hashes(stack: SystemStack, session_id: str) -> list[tuple[str, str]]:
    """(direction, sha256) of each completed sftp transfer, from the sealed server messages' attributes."""
    rows = stack.sql(f"SELECT seq, event_body(event) AS body FROM events WHERE session_id = '{session_id}' "
                     f"AND kind = 'frames' ORDER BY seq")
    out = []
    for row in rows:
        for message in json.loads(row["body"]).get("messages", []):
            attributes = message.get("attributes") or {}
            if attributes.get("sha256") and attributes.get("complete") == "true":
                out.append((attributes["direction"], attributes["sha256"]))
    return out


def count_by(logs: list[SessionLog]) -> Counter:
    return Counter(log.protocol for log in logs)
