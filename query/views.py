"""DuckDB views over a ledger directory: `events`, `frames`, `sessions`, `statements`, `activity`, `violations`,
`approvals`, `seals`.

Only what the seals cover is queried: the segment list is taken from the seal
files, so a segment a crashed ledger left behind (and will rewrite) never
shows. The connection is in-memory and, once the views exist, can open no
file but those segments and seals (`allowed_paths`, external access off,
configuration locked). `query/README.md` documents every column.

Fields that the segment contract does not lift into columns (an approval's
request id, a SessionEnd's byte counts) are read from the signed event bytes
by the `event_body(event)` function, which returns the body as JSON; the
views call it only in projections, so DuckDB evaluates it just for the rows
a query keeps.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from ingest.errors import CustodyError
from ingest.events import open_event
from ledger.seals import SEALS_DIR, MalformedSealError, Seal
from ledger.segments import MESSAGE, SCHEMA


class LedgerNotFound(CustodyError):
    """The directory is not a ledger (no seals)."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def event_body_json(event: bytes) -> str:
    """The body of one signed event as JSON (bytes as base64): everything the columns leave out."""
    return json.dumps(_jsonable(open_event(event).body), ensure_ascii=False)


def _event_body_udf(events: pa.Array) -> pa.Array:
    return pa.array([None if e is None else event_body_json(e) for e in events.to_pylist()], pa.string())


def sealed_files(ledger_dir: Path) -> tuple[list[Path], list[Path]]:
    """(seal files, the segment files they cover that exist), in partition and seal order."""
    seals = sorted((ledger_dir / SEALS_DIR).glob("p*/*.json"), key=lambda p: (len(p.parent.name), p.parent.name, p.name))
    segments = []
    for path in seals:
        try:
            segment = Seal.load(path).segment
        except MalformedSealError:
            continue  # `custody verify` names it; the query layer shows what it can
        if segment and (ledger_dir / segment["path"]).is_file():
            segments.append(ledger_dir / segment["path"])
    return seals, segments


def _sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def _sql_type(value: pa.DataType) -> str:
    """DuckDB's name for the few Arrow types of a segment's `messages`."""
    if pa.types.is_struct(value):
        return "STRUCT(" + ", ".join(f'"{f.name}" {_sql_type(f.type)}' for f in value) + ")"
    if pa.types.is_list(value):
        return _sql_type(value.value_type) + "[]"
    return {pa.string(): "VARCHAR", pa.int64(): "BIGINT"}[value]


MESSAGES_TYPE = _sql_type(pa.list_(MESSAGE))
"""The `messages` column as written now; segments from before contract v2 are cast to it (new fields NULL)."""

# Each message's `direction` is its effective one: its own (contract v2), else its Frames event's.
EVENTS = """
CREATE VIEW events AS
SELECT * REPLACE (list_transform(CAST(messages AS {messages_type}),
                                 lambda m: struct_update(m, direction := coalesce(m.direction, direction))) AS messages)
FROM {source}
"""

# One row per recorded message, at its own time (the event's ts + offset_us).
FRAMES = """
CREATE VIEW frames AS
WITH unnested AS (
    SELECT session_id, seq, ts, subject, email, groups, target, protocol,
           unnest(messages) AS m, generate_subscripts(messages, 1) AS message_no
    FROM events
    WHERE kind = 'frames'
)
SELECT session_id, seq, CAST(message_no AS BIGINT) AS message_no,
       ts + to_microseconds(coalesce(m.offset_us, 0)) AS ts,
       subject, email, groups, target, protocol,
       m.direction AS direction, m.channel AS channel, m.offset_us AS offset_us, m.type AS type,
       m.statement AS statement, m.parameters AS parameters, m.command_tag AS command_tag, m.rows AS rows,
       m.error_code AS error_code, m.error_message AS error_message,
       m.operation AS operation, m.text AS text, m.objects AS objects, m.outcome AS outcome
FROM unnested
"""

# One row per operation, across protocols. An operation starts at a message with `operation` set (contract v2) or,
# in PostgreSQL events from before v2, at a client message with statement text; it owns the messages of its
# session and channel up to the next one (outcome: `error` if any says error, else `ok` if any says ok; before v2,
# an ErrorResponse or a CommandComplete) and the policy decisions of its session up to the next one. The windows
# are partitioned by the identity columns too (constant per session) so that identity, target and protocol
# filters reach the Parquet scan. A Kubernetes exec's streams carry channels its request has not: their outcome
# (the Status on the error channel, `ingest.protocols.kubernetes.status`) belongs to the request before them.
ACTIVITY = """
CREATE VIEW activity AS
WITH steps AS (
    SELECT session_id, seq, message_no, ts, subject, email, groups, target, protocol, channel,
           coalesce(operation, CASE WHEN protocol = 'postgres' AND direction = 'client' AND statement IS NOT NULL
                                    THEN 'statement' END) AS operation,
           coalesce(text, statement) AS text, objects,
           coalesce(outcome, CASE WHEN protocol = 'postgres' AND direction = 'server'
                                  THEN CASE WHEN error_code IS NOT NULL THEN 'error'
                                            WHEN command_tag IS NOT NULL THEN 'ok' END END) AS outcome,
           error_code, error_message,
           NULL::VARCHAR AS policy_action, NULL::VARCHAR AS policy_rule, NULL::VARCHAR AS policy_reason,
           NULL::VARCHAR AS approver_subject
    FROM frames
    WHERE operation IS NOT NULL OR outcome IS NOT NULL
       OR (protocol = 'postgres' AND (statement IS NOT NULL OR error_code IS NOT NULL OR command_tag IS NOT NULL))
    UNION ALL
    SELECT session_id, seq, 0 AS message_no, ts, subject, email, groups, target, protocol, NULL AS channel,
           NULL AS operation, NULL AS text, NULL AS objects, NULL AS outcome, NULL AS error_code,
           NULL AS error_message, policy_action, policy_rule, policy_reason, approver_subject
    FROM events
    WHERE kind = 'policy_decision'
), started AS (
    SELECT *,
           sum(CASE WHEN operation IS NOT NULL THEN 1 ELSE 0 END)
               OVER (PARTITION BY session_id, subject, email, target, protocol ORDER BY seq, message_no
                     ROWS UNBOUNDED PRECEDING) AS session_no
    FROM steps
), assigned AS (
    SELECT *,
           CASE WHEN message_no = 0 OR operation IS NOT NULL THEN session_no
                ELSE coalesce(max(CASE WHEN operation IS NOT NULL THEN session_no END)
                                  OVER (PARTITION BY session_id, subject, email, target, protocol, channel
                                        ORDER BY seq, message_no ROWS UNBOUNDED PRECEDING),
                              CASE WHEN protocol = 'kubernetes' THEN session_no END) END AS operation_no
    FROM started
), grouped AS (
    SELECT session_id, operation_no, subject, email, target, protocol,
           any_value(seq) FILTER (operation IS NOT NULL) AS seq,
           any_value(ts) FILTER (operation IS NOT NULL) AS ts,
           any_value(groups) AS groups,
           any_value(channel) FILTER (operation IS NOT NULL) AS channel,
           any_value(operation) FILTER (operation IS NOT NULL) AS operation,
           any_value(text) FILTER (operation IS NOT NULL) AS text,
           any_value(objects) FILTER (operation IS NOT NULL) AS objects,
           CASE WHEN bool_or(outcome = 'error') THEN 'error' WHEN bool_or(outcome = 'ok') THEN 'ok' END AS outcome,
           arg_min(error_code, (seq, message_no)) FILTER (outcome = 'error') AS error_code,
           arg_min(error_message, (seq, message_no)) FILTER (outcome = 'error') AS error_message,
           max(ts) FILTER (outcome IS NOT NULL) AS ended,
           arg_max(policy_action, seq) FILTER (policy_action IS NOT NULL) AS policy_action,
           arg_max(policy_rule, seq) FILTER (policy_action IS NOT NULL) AS policy_rule,
           arg_max(policy_reason, seq) FILTER (policy_action IS NOT NULL) AS policy_reason,
           arg_max(approver_subject, seq) FILTER (policy_action IS NOT NULL) AS approver_subject
    FROM assigned
    WHERE operation_no > 0
    GROUP BY session_id, operation_no, subject, email, target, protocol
)
SELECT ts, session_id, CAST(operation_no AS BIGINT) AS operation_no, seq, subject, email, groups, protocol, target,
       channel, operation, text, objects, outcome, error_code, error_message, ended - ts AS duration,
       policy_action, policy_rule, policy_reason, approver_subject
FROM grouped
"""

# The ledger puts a session's identity on every one of its rows, so grouping by it is free and lets DuckDB push
# identity and target filters down into the Parquet scan.
SESSIONS = """
CREATE VIEW sessions AS
WITH per_session AS (
    SELECT session_id,
           subject, email, groups, issuer, source_address, target, protocol, client_application,
           min(ts) AS started,
           max(ts) FILTER (kind = 'session_end') AS ended,
           count(*) AS events,
           coalesce(sum(len(list_filter(messages, lambda m: m.direction = 'client' AND m.statement IS NOT NULL)))
               FILTER (kind = 'frames' AND statement IS NOT NULL), 0) AS statements,
           coalesce(sum(len(list_filter(messages, lambda m: m.direction = 'server' AND m.error_code IS NOT NULL)))
               FILTER (kind = 'frames' AND error_code IS NOT NULL), 0) AS errors,
           count(*) FILTER (kind = 'protocol_error' OR policy_action IN ('block', 'deny')) AS violations,
           any_value(end_reason) FILTER (kind = 'session_end') AS end_reason,
           any_value(event) FILTER (kind = 'session_end') AS end_event,
           max(seq) AS last_seq
    FROM events
    GROUP BY session_id, subject, email, groups, issuer, source_address, target, protocol, client_application
)
SELECT session_id, subject, email, groups, issuer, source_address, target, protocol, client_application,
       started, ended, ended - started AS duration, statements, errors, violations,
       CAST(json_extract(event_body(end_event), '$.client_bytes') AS BIGINT) AS client_bytes,
       CAST(json_extract(event_body(end_event), '$.server_bytes') AS BIGINT) AS server_bytes,
       end_reason, events, last_seq
FROM per_session
"""

# A statement starts at a client message carrying statement text (Query, Parse) and owns every message of its
# session up to the next one, in recorded order (seq, then position in a folded event): the Bind with its
# parameters, the server's answer; and the policy decisions recorded after it.
STATEMENTS = """
CREATE VIEW statements AS
WITH steps AS (
    SELECT session_id, seq, message_no, ts, subject, target, direction, statement, parameters, command_tag, rows,
           error_code, error_message, NULL::VARCHAR AS policy_rule, NULL::VARCHAR AS policy_action,
           NULL::VARCHAR AS policy_reason, NULL::VARCHAR AS approver_subject
    FROM frames
    WHERE statement IS NOT NULL OR parameters IS NOT NULL OR command_tag IS NOT NULL OR rows IS NOT NULL
       OR error_code IS NOT NULL OR direction = 'server'
    UNION ALL
    SELECT session_id, seq, 0 AS message_no, ts, subject, target, NULL AS direction, NULL AS statement,
           NULL AS parameters, NULL AS command_tag, NULL AS rows, NULL AS error_code, NULL AS error_message,
           policy_rule, policy_action, policy_reason, approver_subject
    FROM events
    WHERE kind = 'policy_decision'
), numbered AS (
    SELECT *,
           sum(CASE WHEN direction = 'client' AND statement IS NOT NULL THEN 1 ELSE 0 END)
               OVER (PARTITION BY session_id ORDER BY seq, message_no ROWS UNBOUNDED PRECEDING) AS statement_no
    FROM steps
), grouped AS (
    SELECT session_id, statement_no,
           min(seq) AS seq, min(ts) AS ts,
           any_value(subject) AS subject, any_value(target) AS target,
           arg_min(statement, (seq, message_no)) FILTER (direction = 'client' AND statement IS NOT NULL) AS statement,
           arg_min(parameters, (seq, message_no)) FILTER (direction = 'client' AND parameters IS NOT NULL)
               AS parameters,
           arg_min(command_tag, (seq, message_no)) FILTER (direction = 'server' AND command_tag IS NOT NULL)
               AS command_tag,
           sum(rows) FILTER (direction = 'server') AS rows,
           arg_min(error_code, (seq, message_no)) FILTER (direction = 'server' AND error_code IS NOT NULL)
               AS error_code,
           arg_min(error_message, (seq, message_no)) FILTER (direction = 'server' AND error_code IS NOT NULL)
               AS error_message,
           max(ts) FILTER (direction = 'server') AS answered,
           arg_max(policy_rule, seq) FILTER (policy_action IS NOT NULL) AS policy_rule,
           arg_max(policy_action, seq) FILTER (policy_action IS NOT NULL) AS policy_action,
           arg_max(policy_reason, seq) FILTER (policy_action IS NOT NULL) AS policy_reason,
           arg_max(approver_subject, seq) FILTER (policy_action IS NOT NULL) AS approver_subject
    FROM numbered
    WHERE statement_no > 0
    GROUP BY session_id, statement_no
)
SELECT session_id, CAST(statement_no AS BIGINT) AS statement_no, seq, ts, subject, target, statement,
       parameters, command_tag, CAST(rows AS BIGINT) AS rows, error_code, error_message, answered - ts AS duration,
       coalesce(policy_action, 'allow') AS policy_action, policy_rule, policy_reason, approver_subject
FROM grouped
"""

VIOLATIONS = """
CREATE VIEW violations AS
SELECT session_id, seq, ts, subject, email, source_address, target, protocol,
       CASE WHEN kind = 'protocol_error' THEN 'protocol_error'
            WHEN policy_rule = 'authentication' THEN 'auth_failure'
            WHEN policy_action = 'block' THEN 'blocked'
            ELSE 'denied' END AS violation,
       coalesce(policy_rule, error_code) AS rule,
       coalesce(policy_reason, error_message) AS reason,
       statement, approver_subject
FROM events
WHERE kind = 'protocol_error' OR policy_action IN ('block', 'deny')
"""

APPROVALS = """
CREATE VIEW approvals AS
SELECT session_id, seq, ts, subject AS requester, target, policy_rule AS rule, policy_action AS action,
       policy_reason AS reason, statement,
       json_extract_string(event_body(event), '$.request_id') AS request_id,
       approver_subject
FROM events
WHERE kind = 'policy_decision' AND policy_action IN ('hold', 'approve', 'deny') AND policy_rule <> 'authentication'
"""

SEALS = """
CREATE VIEW seals AS
SELECT seal.partition AS partition, seal.number AS number, seal.origin AS origin, seal.key_id AS key_id,
       CAST(seal.sealed_at AS TIMESTAMPTZ) AS sealed_at,
       seal.segment.path AS segment_path, seal.segment.sha256 AS segment_sha256, seal.segment.bytes AS segment_bytes,
       seal.leaves.first AS first_leaf, seal.leaves.count AS leaves,
       CAST(seal.time.first AS TIMESTAMPTZ) AS first_ts, CAST(seal.time.last AS TIMESTAMPTZ) AS last_ts,
       seal.kafka.topic AS topic, seal.kafka.first_offset AS first_offset, seal.kafka.next_offset AS next_offset,
       seal.events.quarantined AS quarantined,
       seal.tree.size AS tree_size, seal.tree.root AS tree_root,
       seal.previous.hash AS previous_hash,
       checkpoint, filename AS file
FROM read_json({files}, format = 'auto', filename = true, columns = {{seal: '{seal_type}', checkpoint: 'VARCHAR'}})
"""

SEAL_TYPE = ("STRUCT(partition INTEGER, number INTEGER, origin VARCHAR, key_id VARCHAR, sealed_at VARCHAR, "
             "segment STRUCT(path VARCHAR, sha256 VARCHAR, bytes BIGINT), "
             "leaves STRUCT(first BIGINT, count BIGINT), time STRUCT(first VARCHAR, last VARCHAR), "
             "kafka STRUCT(topic VARCHAR, partition INTEGER, first_offset BIGINT, next_offset BIGINT), "
             "events STRUCT(accepted BIGINT, quarantined BIGINT), tree STRUCT(size BIGINT, root VARCHAR), "
             "previous STRUCT(first_seal BOOLEAN, number INTEGER, hash VARCHAR, signature VARCHAR))")

SEALS_EMPTY = """
CREATE VIEW seals AS
SELECT * FROM (SELECT NULL::INTEGER AS partition, NULL::INTEGER AS number, NULL AS origin, NULL AS key_id,
       NULL::TIMESTAMPTZ AS sealed_at, NULL AS segment_path, NULL AS segment_sha256, NULL::BIGINT AS segment_bytes,
       NULL::BIGINT AS first_leaf, NULL::BIGINT AS leaves, NULL::TIMESTAMPTZ AS first_ts, NULL::TIMESTAMPTZ AS last_ts,
       NULL AS topic, NULL::BIGINT AS first_offset, NULL::BIGINT AS next_offset, NULL::BIGINT AS quarantined,
       NULL::BIGINT AS tree_size, NULL AS tree_root, NULL AS previous_hash, NULL AS checkpoint, NULL AS file) WHERE false
"""


def _create_events(con: duckdb.DuckDBPyConnection, segments: list[Path]) -> None:
    if segments:  # by name: segments from before contract v2 lack the new message fields
        source = f"read_parquet({_sql_list(segments)}, union_by_name = true)"
    else:  # a ledger that has sealed nothing yet: the same columns, no rows
        con.register("_empty_segment", SCHEMA.empty_table())
        source = "_empty_segment"
    con.execute(EVENTS.format(messages_type=MESSAGES_TYPE, source=source))


def open_ledger(ledger_dir: str | Path, threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the ledger's views, able to read nothing but the ledger."""
    ledger_dir = Path(ledger_dir).absolute()
    if not (ledger_dir / SEALS_DIR).is_dir():
        raise LedgerNotFound(f"{ledger_dir}: not a ledger directory (no {SEALS_DIR}/)")
    seals, segments = sealed_files(ledger_dir)
    return open_files(segments, seals, threads)


def open_files(segments: list[Path], seals: list[Path], threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """The views over these segment and seal files (a ledger's, or a bundle's), and access to nothing else."""
    con = duckdb.connect(":memory:", config={"threads": threads} if threads else {})
    con.create_function("event_body", _event_body_udf, [duckdb.sqltype("BLOB")], duckdb.sqltype("VARCHAR"),
                        type="arrow", side_effects=False)
    _create_events(con, segments)
    for ddl in (FRAMES, SESSIONS, STATEMENTS, ACTIVITY, VIOLATIONS, APPROVALS):
        con.execute(ddl)
    if seals:
        con.execute(SEALS.format(files=_sql_list(seals), seal_type=SEAL_TYPE))
    else:
        con.execute(SEALS_EMPTY)
    con.execute(f"SET allowed_paths = {_sql_list(segments + seals)}")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con
