"""The checker: what the clients say they did against what the sealed ledger says, through `custody activity`,
`custody sql` and `custody verify` only (the CLI an analyst or auditor runs).

For every client session: exactly one sealed session with its tag, closed (a SessionEnd sealed, the client's
end reason), its chain whole (seq 0..last, no gap), and its operations the client's, in the client's order, with
the same outcomes (and, for PostgreSQL, the same command tags, i.e. row counts; for sftp, the same file hashes;
for kubectl, the same request lines and HTTP statuses, and the verb, resource, namespace and name it asked for).
For the ledger as a whole: no event twice, no session nobody made, `custody verify` clean, and the newest
checkpoint of every partition cosigned by the witness `custody up` runs (`custody bundle verify --witnesses 1`
of a bundle of the whole run).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

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
    """(operation, text, outcome) as `custody activity` should show the client's operations (a `kubectl exec`'s
    outcome is its command's, from the Status on the error channel, as kubectl's own exit status says)."""
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
    by_token = {log.token_id: log.tag for log in logs if log.token_id}
    for row in stack.sql("SELECT session_id, json_extract_string(event_body(event), '$.identity.token_id') AS jti "
                         "FROM events WHERE kind = 'session_start' AND protocol = 'kubernetes'"):
        if row["jti"] in by_token and None in tags and row["session_id"] in tags[None]:
            tags[None].remove(row["session_id"])  # a kubectl connection without a tag: found by its token
            tags[by_token[row["jti"]]].append(row["session_id"])
    if not tags.get(None, True):
        del tags[None]
    kube = kube_sessions(stack)

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
        # An exec's stream connection is ended by the cluster once the command is done (as the kubelet does)
        # unless kubectl closes it first: both are the end of a finished exchange.
        ends = allowed_end_reasons | ({"server_disconnect"} if log.protocol == "kubernetes" else set())
        if s["end_reason"] not in ends:
            report.problem(f"{log.tag}: {log.protocol} session ended {s['end_reason']!r}")
        if ours != sealed:
            report.problem(f"{log.protocol} {log.tag}: operations differ at {first_difference(ours, sealed)}")
        if log.protocol == "postgres":
            theirs = [(r["statement"], r["command_tag"] if r["error_code"] is None else r["error_code"])
                      for r in sorted(statements[sid], key=lambda r: r["statement_no"])]
            mine_tags = [(op.text, op.tag if op.outcome == "ok" else op.code) for op in log.ops]
            if theirs != mine_tags:
                report.problem(f"{log.tag}: command tags / SQLSTATEs differ at {first_difference(mine_tags, theirs)}")
        if log.protocol == "kubernetes":
            report.problems += kube_differences(log, kube.get(sid, KubeSession()))
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


@dataclass
class KubeSession:
    """What the ledger sealed of one Kubernetes connection."""

    exchanges: list[list] = field(default_factory=list)  # [request line, status answered, request attributes]
    stdout: bytes = b""  # an exec's channel 1
    status: str | None = None  # an exec's Status (channel 3): Success, Failure


def kube_sessions(stack: SystemStack) -> dict[str, KubeSession]:
    """Every Kubernetes session's sealed client Requests with the server's Responses, and an exec's channels 1 and 3
    (the attributes and the bytes are in the event bodies only)."""
    out: dict[str, KubeSession] = defaultdict(KubeSession)
    for row in stack.sql("SELECT session_id, event_body(event) AS body FROM events WHERE protocol = 'kubernetes' "
                         "AND kind = 'frames' ORDER BY session_id, seq"):
        session = out[row["session_id"]]
        body = json.loads(row["body"])
        for message in body.get("messages", []):
            attributes, data = message.get("attributes") or {}, base64.b64decode(message.get("data") or "")
            direction = message.get("direction") or body.get("direction")  # per message only in a mixed event
            if message.get("type") == "Request":
                session.exchanges.append([message.get("statement"), None, attributes])
            elif message.get("type") == "Response" and session.exchanges:
                session.exchanges[-1][1] = attributes.get("status")
            elif direction == "server" and message.get("channel") == "1":
                session.stdout += data
            elif direction == "server" and message.get("channel") == "3":
                session.status = json.loads(data).get("status")
    return out


def kube_differences(log: SessionLog, sealed: KubeSession) -> list[str]:
    """kubectl's own log of its requests (line and status) against the sealed ones, what it asked for against the
    sealed verb, resource, namespace and name, and an exec's exit status and output against the sealed channels."""
    ours = [(op.request, op.code) for op in log.ops]
    theirs = [(line, status) for line, status, _ in sealed.exchanges]
    if ours != theirs:
        return [f"{log.tag}: kubectl requests / statuses differ at {first_difference(ours, theirs)}"]
    problems = []
    for op, (_, _, attributes) in zip(log.ops, sealed.exchanges):
        if op.meaning and {key: attributes.get(key) for key in op.meaning} != op.meaning:
            problems.append(f"{log.tag}: {op.request} sealed as {attributes}, asked for {op.meaning}")
        if op.operation == "command":
            status = "Success" if op.outcome == "ok" else "Failure"
            if (sealed.status, hashlib.sha256(sealed.stdout).hexdigest()) != (status, op.digest):
                problems.append(f"{log.tag}: exec sealed with Status {sealed.status} and stdout {sealed.stdout!r}; "
                                f"kubectl exited {op.outcome} with another output")
    return problems


def witnessed(stack: SystemStack, work: Path) -> tuple[list[str], dict[str, object]]:
    """A bundle of the whole run, verified offline as an auditor would: every partition's newest checkpoint cosigned
    by one trusted witness (`--witnesses 1`). Problems, and the witnessed tree sizes by partition."""
    bundle = work / "run.custody"
    config = str(stack.config_path)
    exported = custody("bundle", "export", "--where", "true", "--case", "system-test", "--purpose", "witness check",
                       "-o", str(bundle), "--config", config)
    if exported.returncode != 0:
        return [f"custody bundle export exit {exported.returncode}: {exported.stderr[-800:]}"], {}
    verified = custody("bundle", "verify", str(bundle), "--trust", str(stack.config.keys.keyring), "--witnesses", "1",
                       "--jobs", "1")
    sizes = {f"p{m['partition']}": int(m["size"]) for m in WITNESSED.finditer(verified.stdout)}
    problems = []
    if verified.returncode != 0:
        problems.append(f"custody bundle verify --witnesses 1 exit {verified.returncode}: {verified.stdout[-1500:]}")
    newest = newest_tree_sizes(stack)
    if sizes != newest:
        problems.append(f"witnessed tree sizes {sizes} != the newest seals' {newest}")
    return problems, {"witnessed tree sizes": sizes, "bundle": exported.stdout.strip()}


WITNESSED = re.compile(r"Checkpoint p(?P<partition>\d+) \(seal \d+, tree size (?P<size>\d+)\) witnessed by \S+ at")


def newest_tree_sizes(stack: SystemStack) -> dict[str, int]:
    """The tree size of every partition's newest seal, as the ledger directory has it."""
    from query.bundle import load_seals

    return {f"p{partition}": chain[-1].tree_size for partition, chain in sorted(load_seals(stack.ledger_dir).items())}


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
