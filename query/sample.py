"""A demo ledger: realistic PostgreSQL sessions, signed, chained and sealed by the ledger's own writer.

Tests, the investigation notebook and `bench/query.py` share this generator so
that they all look at the same kind of evidence: people, CI and an agent
querying two databases, with result rows (some masked), errors, notices,
statements blocked by policy, holds that were approved or expired, a failed
authentication and a protocol violation. Events go through
`ledger.service.PartitionWriter` (verify, Merkle leaves, segments, seals), the
path a real ledger takes minus Kafka. Messages carry the contract-v2 operation
fields as the PostgreSQL front end fills them (`operation`, `text`, `objects`
on Query/Parse, `outcome` on CommandComplete/ErrorResponse). Content is deterministic for a seed;
event and session ids are UUIDv7s and so are not.
"""

from __future__ import annotations

import heapq
import json
import os
import random
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ingest.consumer import Record
from ingest.events import SessionChain, datetime_to_micros, uuid7
from ingest.keys import Keyring, add_to_keyring, generate_key_file, load_key_file
from ingest.protocols.postgres import messages as w
from ledger.merkle import SALT_SIZE
from ledger.service import PartitionWriter
from ledger.settings import LedgerSettings
from ledger.state import PartitionState

ORIGIN = "custody.example/ledger/demo"
TOPIC = "custody.events"
DEFAULT_START = datetime(2026, 3, 2, 8, 0, tzinfo=timezone.utc)
SECOND = 1_000_000

# subject, groups, client application, weights of the statement kinds below
PEOPLE = [
    ("alice@example.com", ["dba"], "psql", {"select": 5, "extended": 2, "update": 2, "notice": 1, "hold": 1}),
    ("bob@example.com", ["developers"], "DBeaver 24.1", {"select": 6, "extended": 2, "error": 2, "update": 1}),
    ("ci-runner@ci.example.com", ["ci"], "psycopg 3.2", {"extended": 6, "update": 2, "notice": 1}),
    ("agent-7@agents.example.com", ["agents"], "custody-agent/1.2", {"select": 4, "error": 3, "block": 1, "expired": 1}),
    ("mallory@example.com", ["contractors"], "psql", {"select": 3, "block": 3, "error": 1, "hold": 1}),
]
TARGETS = [("orders-db", "10.0.3.12:5432/orders"), ("billing-db", "10.0.3.20:5432/billing")]
APPROVER = {"subject": "carol@example.com", "username": "carol", "email": "carol@example.com",
            "groups": ["security"], "issuer": "https://idp.example.com/", "token_id": None}

Step = tuple[int, str, dict[str, Any]]
"""(microseconds since the session started, event kind, body)."""


def message(type_: str, data: bytes, **fields: Any) -> dict[str, Any]:
    """A recorded message, with the decoded fields the proxy's recorder fills for its type."""
    return {"type": type_, "data": data, **fields}


def statement_fields(sql: str, tables: list[str]) -> dict[str, Any]:
    """The SQL-named and (contract v2) protocol-neutral fields of a message that starts a statement."""
    return {"statement": sql, "operation": "statement", "text": sql, "objects": tables}


def frames(direction: str, *messages: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "frames", {"direction": direction, "messages": list(messages)}


def result(columns: list[str], rows: list[list[str | None]], tag: str, masked: set[int] = frozenset(),
           rng: random.Random | None = None) -> list[dict[str, Any]]:
    """RowDescription, DataRows (masked ones carry a sealed original), CommandComplete."""
    out = [message("RowDescription", w.row_description(columns),
                   attributes={"columns": json.dumps(columns), "type_oids": json.dumps([w.TEXT_OID] * len(columns))})]
    for row in rows:
        sealed = rng.randbytes(48 + 8 * len(row)) if masked and rng else None
        out.append(message("DataRow", w.data_row([None if v is None else v.encode() for v in row]), sealed_original=sealed))
    return out + [complete(tag)]


def complete(tag: str) -> dict[str, Any]:
    words = tag.split()
    rows = int(words[-1]) if len(words) > 1 and words[-1].isdigit() else None
    return message("CommandComplete", w.command_complete(tag), command_tag=tag, rows=rows, outcome="ok")


def ready(status: str = "I") -> dict[str, Any]:
    return message("ReadyForQuery", w.ready_for_query(status), attributes={"transaction_status": status})


def error(code: str, text: str) -> dict[str, Any]:
    return message("ErrorResponse", w.error_response(severity="ERROR", code=code, message=text), error_code=code, error_message=text, outcome="error",
                   attributes={"severity": "ERROR", "severity_nonlocalized": "ERROR"})


def notice(code: str, text: str) -> dict[str, Any]:
    return message("NoticeResponse", w.notice_response(severity="NOTICE", code=code, message=text),
                   attributes={"severity": "NOTICE", "severity_nonlocalized": "NOTICE", "code": code, "message": text})


def simple_query(sql: str, tables: list[str]) -> tuple[str, dict[str, Any]]:
    return frames("client", message("Query", w.query(sql), **statement_fields(sql, tables)))


def decision(rule: str, action: str, reason: str, statement: str, request_id: str | None = None,
             approver: dict | None = None) -> tuple[str, dict[str, Any]]:
    return "policy_decision", {"rule": rule, "action": action, "reason": reason, "statement": statement,
                               "request_id": request_id, "approver": approver, "attributes": {}}


# --- statements: each returns its events as (delay after the previous one in µs, kind, body) ----------


def _select(rng: random.Random) -> list[tuple[int, str, dict]]:
    ids = sorted(rng.sample(range(1000, 9999), rng.randint(1, 4)))
    sql = f"SELECT id, email, plan FROM customers WHERE id IN ({', '.join(map(str, ids))})"
    rows = [[str(i), f"{rng.choice('abcdefgh')}***@example.com", rng.choice(["free", "pro", "enterprise"])] for i in ids]
    return [(0, *simple_query(sql, ["customers"])),
            (rng.randint(800, 30_000), *frames("server", *result(["id", "email", "plan"], rows, f"SELECT {len(rows)}",
                                                                  masked={1}, rng=rng), ready()))]


def _extended(rng: random.Random) -> list[tuple[int, str, dict]]:
    sql = "SELECT id, total, status FROM orders WHERE customer_id = $1 AND status = $2"
    params = [str(rng.randint(1000, 9999)), rng.choice(["paid", "open", "shipped"])]
    rows = [[str(rng.randint(10_000, 99_999)), f"{rng.randint(5, 900)}.{rng.randint(0, 99):02d}", params[1]]
            for _ in range(rng.randint(0, 3))]
    client = frames("client", message("Parse", w.parse("", sql), **statement_fields(sql, ["orders"]), attributes={"statement_name": ""}),
                    message("Bind", w.bind([p.encode() for p in params]), parameters=params, attributes={"portal": "", "statement_name": ""}),
                    message("Execute", w.execute(), attributes={"portal": "", "max_rows": "0"}),
                    message("Sync", w.SYNC))
    server = frames("server", message("ParseComplete", b"1\0\0\0\4"), message("BindComplete", b"2\0\0\0\4"),
                    *result(["id", "total", "status"], rows, f"SELECT {len(rows)}"), ready())
    return [(0, *client), (rng.randint(500, 12_000), *server)]


def _update(rng: random.Random) -> list[tuple[int, str, dict]]:
    sql = f"UPDATE orders SET status = 'shipped' WHERE id = {rng.randint(10_000, 99_999)}"
    return [(0, *simple_query(sql, ["orders"])), (rng.randint(1_000, 40_000), *frames("server", complete("UPDATE 1"), ready()))]


def _error(rng: random.Random) -> list[tuple[int, str, dict]]:
    table = rng.choice(["custmers", "order_items_old", "payments_2019"])
    return [(0, *simple_query(f"SELECT * FROM {table} LIMIT 10", [table])),
            (rng.randint(300, 3_000), *frames("server", error("42P01", f'relation "{table}" does not exist'), ready()))]


def _notice(rng: random.Random) -> list[tuple[int, str, dict]]:
    return [(0, *simple_query("DROP TABLE IF EXISTS tmp_export", ["tmp_export"])),
            (rng.randint(300, 3_000), *frames("server", notice("00000", 'table "tmp_export" does not exist, skipping'),
                                               complete("DROP TABLE"), ready()))]


def _block(rng: random.Random) -> list[tuple[int, str, dict]]:
    sql, tables = rng.choice([("DROP TABLE customers", ["customers"]), ("TRUNCATE payments", ["payments"]),
                              ("ALTER ROLE app SUPERUSER", [])])
    reason = f"{sql.split()[0]} is not allowed on production"
    return [(0, *simple_query(sql, tables)),
            (rng.randint(100, 800), *decision("block-ddl", "block", reason, sql)),
            (rng.randint(100, 800), *frames("server", error("42501", f"blocked by policy block-ddl: {reason}"), ready()))]


def _hold(rng: random.Random, approved: bool) -> list[tuple[int, str, dict]]:
    sql = f"DELETE FROM orders WHERE created_at < '20{rng.randint(18, 22)}-01-01'"
    request = f"req-{rng.randrange(16**8):08x}"
    if approved:
        end = [(rng.randint(20, 240) * SECOND, *decision("approve-bulk-delete", "approve", "cleanup ticket OPS-1234",
                                                         sql, request, APPROVER)),
               (rng.randint(5_000, 90_000), *frames("server", complete(f"DELETE {rng.randint(1, 900)}"), ready()))]
    else:
        end = [(300 * SECOND, *decision("approve-bulk-delete", "deny", "approval expired after 300 s", sql, request)),
               (rng.randint(100, 800), *frames("server", error("42501", "approval request expired"), ready()))]
    return [(0, *simple_query(sql, ["orders"])),
            (rng.randint(100, 800), *decision("approve-bulk-delete", "hold", "bulk DELETE needs approval", sql, request)),
            *end]


STATEMENTS = {"select": _select, "extended": _extended, "update": _update, "error": _error, "notice": _notice,
              "block": _block, "hold": lambda rng: _hold(rng, True), "expired": lambda rng: _hold(rng, False)}


# --- sessions --------------------------------------------------------------------------------------


def session_start(person: tuple, target: tuple, rng: random.Random) -> dict[str, Any]:
    subject, groups, application, _ = person
    identity = {"subject": subject, "username": subject.split("@")[0], "email": subject, "groups": groups,
                "issuer": "https://idp.example.com/", "token_id": f"jti-{rng.randrange(16**8):08x}"}
    return {"identity": identity, "source_address": f"10.1.{rng.randint(0, 9)}.{rng.randint(2, 250)}:{rng.randint(40000, 60999)}",
            "client_cert_fingerprint": None, "target": target[0], "upstream": target[1], "protocol": "postgres",
            "client_application": application, "attributes": {"database": target[1].rsplit("/", 1)[1]}}


def session_end(reason: str, duration: int, steps: list[Step]) -> dict[str, Any]:
    def count(direction: str, what: str) -> int:
        found = [m for _, k, b in steps if k == "frames" and b["direction"] == direction for m in b["messages"]]
        return sum(len(m["data"]) for m in found) if what == "bytes" else len(found)
    return {"reason": reason, "duration_us": duration, "client_bytes": count("client", "bytes"),
            "server_bytes": count("server", "bytes"), "client_messages": count("client", "messages"),
            "server_messages": count("server", "messages")}


def failed_session(rng: random.Random, protocol_error: bool) -> list[Step]:
    """A session that never got going: a rejected token, or a client that broke the protocol."""
    start = session_start(rng.choice(PEOPLE), rng.choice(TARGETS), rng)
    if protocol_error:
        steps = [(0, "session_start", start),
                 (2_000, "protocol_error", {"code": "08P01", "message": "invalid message length 1213486160",
                                            "sample": b"GET / HTTP/1.1\r\n"})]
        return steps + [(2_100, "session_end", session_end("protocol_error", 2_100, steps))]
    start["identity"] = None
    steps = [(0, "session_start", start),
             (1_500, *decision("authentication", "deny", "token expired at 2026-03-01T23:59:59Z", None))]
    return steps + [(1_700, "session_end", session_end("auth_failed", 1_700, steps))]


def session_steps(rng: random.Random, statements: int) -> list[Step]:
    """One session: start, `statements` statements chosen by who is acting, a clean end."""
    person, target = rng.choice(PEOPLE), rng.choice(TARGETS)
    kinds, weights = zip(*person[3].items())
    steps: list[Step] = [(0, "session_start", session_start(person, target, rng))]
    at = rng.randint(5_000, 50_000)
    for kind in rng.choices(kinds, weights, k=statements):
        for delay, event_kind, body in STATEMENTS[kind](rng):
            at += delay
            steps.append((at, event_kind, body))
        at += rng.randint(SECOND // 2, 20 * SECOND)
    steps.append((at, *frames("client", message("Terminate", b"X\0\0\0\4"))))
    return steps + [(at + 300, "session_end", session_end("client_terminate", at + 300, steps))]


def demo_session(index: int, seed: int, statements: int) -> list[Step]:
    """Session `index` of the demo: every 25th fails authentication, every 40th breaks the protocol."""
    rng = random.Random(seed * 1_000_003 + index)
    if index % 25 == 24:
        return failed_session(rng, protocol_error=False)
    if index % 40 == 39:
        return failed_session(rng, protocol_error=True)
    return session_steps(rng, max(1, round(rng.gauss(statements, statements / 4))))


# --- writing the ledger -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What to generate: `sessions` sessions of about `statements` statements, spread over `span_us`."""

    sessions: int
    statements: int
    seed: int
    start_us: int
    span_us: int
    partitions: int
    segment_events: int


def _began(plan: Plan, index: int) -> int:
    return plan.start_us + plan.span_us * index // plan.sessions + random.Random(index).randint(0, SECOND)


def _events(plan: Plan, partition: int) -> Iterator[tuple[int, int, str, dict]]:
    """(ts, session index, kind, body) of one partition's sessions, interleaved in time as they happened.

    A session's steps are made only when the clock reaches its start, so memory holds the open sessions only.
    """
    upcoming = iter(range(partition, plan.sessions, plan.partitions))
    open_: list[tuple[int, int, int, str, dict, Iterator]] = []  # (ts, index, step number, kind, body, rest)

    def admit(index: int) -> None:
        began = _began(plan, index)
        steps = ((began + offset, index, n, kind, body)
                 for n, (offset, kind, body) in enumerate(demo_session(index, plan.seed, plan.statements)))
        heapq.heappush(open_, (*next(steps), steps))

    following = next(upcoming, None)
    while open_ or following is not None:
        if following is not None and (not open_ or _began(plan, following) <= open_[0][0]):
            admit(following)
            following = next(upcoming, None)
            continue
        ts, index, _, kind, body, steps = heapq.heappop(open_)
        yield ts, index, kind, body
        step = next(steps, None)
        if step is not None:
            heapq.heappush(open_, (*step, steps))


def write_partition(ledger_dir: Path, keyring_path: Path, proxy_key_path: Path, ledger_key_path: Path,
                    plan: Plan, partition: int) -> int:
    """Sign one partition's events as a proxy would, and seal them as the ledger does; returns the event count."""
    settings = LedgerSettings(dir=ledger_dir, origin=ORIGIN, segment_max_events=plan.segment_events,
                              segment_max_bytes=1 << 40, segment_max_seconds=1e9, idle_seal_seconds=1e9)
    proxy_key = load_key_file(proxy_key_path)
    writer = PartitionWriter(ledger_dir, settings, TOPIC, PartitionState(partition), Keyring.load(keyring_path),
                             load_key_file(ledger_key_path))
    chains: dict[int, SessionChain] = {}
    offset = 0
    for ts, index, kind, body in _events(plan, partition):
        if kind == "session_start":
            chains[index] = SessionChain(proxy_key, f"pg-proxy-{index % 3}", uuid7(ts // 1000))
        chain = chains.pop(index) if kind == "session_end" else chains[index]
        event = chain.event(kind, body, ts_micros=ts)
        rejected = writer.add(Record(TOPIC, partition, offset, chain.session_id.encode(), event.value),
                              os.urandom(SALT_SIZE))
        assert rejected is None, rejected
        offset += 1
        if len(writer.builder) >= plan.segment_events:
            writer.seal()
    if writer.opened_at is not None:
        writer.seal()
    return offset


@dataclass(frozen=True)
class DemoLedger:
    root: Path
    ledger_dir: Path
    keyring: Path
    config: Path
    events: int


CONFIG = """# A demo ledger made by query.sample
[keys]
proxy_key = "keys/proxy.key"
ledger_key = "keys/ledger.key"
keyring = "keys/keyring.toml"

[ledger]
dir = "ledger"
origin = "{origin}"
"""


def build_demo_ledger(root: Path, sessions: int = 60, statements: int = 6, seed: int = 7, partitions: int = 2,
                      segment_events: int = 400, start: datetime = DEFAULT_START, span_days: float = 5.0,
                      workers: int = 1) -> DemoLedger:
    """Keys, keyring, a custody.toml and a sealed ledger under `root`; `workers` processes write partitions."""
    root = Path(root)
    keyring = root / "keys" / "keyring.toml"
    keys = {}
    for role in ("proxy", "ledger"):
        keys[role] = root / "keys" / f"{role}.key"
        add_to_keyring(keyring, generate_key_file(keys[role], role), role)
    (root / "custody.toml").write_text(CONFIG.format(origin=ORIGIN), encoding="utf-8")
    plan = Plan(sessions, statements, seed, datetime_to_micros(start), int(span_days * 86_400 * SECOND),
                partitions, segment_events)
    args = [(root / "ledger", keyring, keys["proxy"], keys["ledger"], plan, p) for p in range(partitions)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            counts = list(pool.map(write_partition, *zip(*args)))
    else:
        counts = [write_partition(*a) for a in args]
    return DemoLedger(root, root / "ledger", keyring, root / "custody.toml", sum(counts))

