"""Query results out: a terminal table, CSV, JSON or Parquet, to stdout or a file.

DuckDB cannot write anything (its file access is locked to the ledger), so
results are written here, from the Arrow table DuckDB hands back.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from ingest.errors import CustodyError

FORMATS = ("table", "csv", "json", "parquet")
MAX_BYTES_SHOWN = 16


def _interval(value: pa.MonthDayNano) -> timedelta:
    """DuckDB's INTERVAL as a timedelta; ledger durations never span months, but a 30-day month keeps order."""
    return timedelta(days=value.days + 30 * value.months, microseconds=value.nanoseconds // 1000)


def plain(value: Any) -> Any:
    """A JSON-able value: times as ISO 8601, intervals as seconds, bytes as hex."""
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, pa.MonthDayNano):
        value = _interval(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def cell(value: Any) -> str:
    """One table cell: short, and unambiguous about NULL."""
    if value is None:
        return "NULL"
    if isinstance(value, (bytes, bytearray, memoryview)):
        hexed = bytes(value).hex()
        return hexed if len(hexed) <= 2 * MAX_BYTES_SHOWN else hexed[:2 * MAX_BYTES_SHOWN] + "…"
    if isinstance(value, pa.MonthDayNano):
        return str(_interval(value))
    value = plain(value)
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else str(value)


WIDE = 250
"""Console width when the output is not a terminal: rows stay one line each, for grep and less -S."""


def to_table(result: pa.Table, console: Console) -> None:
    table = Table(show_lines=False, header_style="bold")
    for name in result.column_names:
        table.add_column(name, no_wrap=True, overflow="ellipsis")
    for row in result.to_pylist():
        table.add_row(*(cell(v) for v in row.values()))
    console.print(table)
    console.print(f"{result.num_rows:,} rows", style="dim")


def to_csv(result: pa.Table) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(result.column_names)
    for row in result.to_pylist():
        writer.writerow(["" if v is None else cell(v) for v in row.values()])
    return out.getvalue()


def to_json(result: pa.Table) -> str:
    return json.dumps([plain(row) for row in result.to_pylist()], ensure_ascii=False, indent=1) + "\n"


def parquet_safe(result: pa.Table) -> pa.Table:
    """Parquet has no interval type: intervals become durations in microseconds."""
    for i, column in enumerate(result.schema):
        if pa.types.is_interval(column.type):
            values = [None if v is None else _interval(v) for v in result.column(i).to_pylist()]
            result = result.set_column(i, column.name, pa.array(values, pa.duration("us")))
    return result


def write_result(result: pa.Table, fmt: str, output: Path | None) -> None:
    """Write `result` in `fmt` to `output`, or stdout (Parquet needs a file)."""
    if fmt == "parquet":
        if output is None:
            raise CustodyError("--format parquet needs --output FILE")
        pq.write_table(parquet_safe(result), output, compression="zstd")
        return
    if fmt == "table":
        if output is None:
            console = Console()
            to_table(result, console if console.is_terminal else Console(width=WIDE))
            return
        with open(output, "w", encoding="utf-8") as f:
            to_table(result, Console(file=f, width=WIDE, color_system=None))
        return
    text = to_csv(result) if fmt == "csv" else to_json(result)
    if output is None:
        sys.stdout.write(text)
    else:
        Path(output).write_text(text, encoding="utf-8")
