"""Analysts' SQL: queries only, one statement, errors as one line.

The connection from `query.views.open_ledger` can already read nothing but
the ledger; this refuses anything but a query before DuckDB runs it, by the
statement type DuckDB's own parser reports (not by looking at the text), so
`COPY`, `ATTACH`, `CREATE`, `SET`, `INSERT`… are a clear error instead of a
surprise.
"""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa

from ingest.errors import CustodyError

READ_ONLY_TYPES = frozenset({duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN})


class QueryError(CustodyError):
    """A query DuckDB rejected, or a statement that is not a query."""


def one_line(error: Exception) -> str:
    """DuckDB's message without its caret diagram and hints: the first line says what is wrong."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(one_line(exc)) from None
    if len(statements) != 1:
        raise QueryError(f"expected one SQL statement, got {len(statements)}")
    kind = statements[0].type
    if kind not in READ_ONLY_TYPES:
        raise QueryError(f"read-only: {kind.name} statements are not allowed; the ledger is evidence "
                         "(use SELECT, or --format/--output to save a result)")


def run_query(con: duckdb.DuckDBPyConnection, sql: str, parameters: list[Any] | None = None) -> pa.Table:
    """The result of one read-only statement, as Arrow."""
    check_read_only(con, sql)
    try:
        return con.sql(sql, params=parameters or None).to_arrow_table()
    except duckdb.Error as exc:
        raise QueryError(one_line(exc)) from None
