"""Every benchmark in bench/, one run, one markdown table: each figure beside its same-run baseline.

    .venv/bin/python bench/run_all.py                      # short form of every bench (~15 min), table on stdout
    .venv/bin/python bench/run_all.py --readme             # ... and the table written into bench/README.md
    .venv/bin/python bench/run_all.py --only ledger,query --set ledger="--events 2000" --out /tmp/t.md
    .venv/bin/python bench/run_all.py --full               # every bench with its own defaults (long)

The benches are discovered, not listed: every bench/*.py with a `__main__` entry point except this one
(a bench added later is picked up by its file). Each runs as its own process with a short-form argument set:
the bench's own module-level `RUN_ALL_ARGS = [...]` if it declares one (read from its source, not imported),
else the one in SHORT below, else its defaults. Every bench already prints its figures beside baselines it
measures in the same run (direct connections, bare relays, raw crypto rates); the parsers below turn those
lines into table rows (figure, Custody, baseline, ratio), and any line no parser claims is still published
as printed, so a changed output format loses no figure. A bench that fails or times out is reported with its
exit status and the last lines of its stderr, and the others still run.

Run it on a quiet machine: the figures are wall-clock rates, and the machine's state (CPU, cores, RAM, kernel,
load average at the start and before each bench) is printed above the table for that reason.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
README = BENCH / "README.md"
BEGIN, END = "<!-- run_all: begin -->", "<!-- run_all: end -->"

# Short forms chosen so the whole run takes about 15 minutes on the 2-core CI machine; a bench's own
# RUN_ALL_ARGS wins over these.
SHORT: dict[str, list[str]] = {
    "bundle": ["--events", "100000"],
    "http_proxy": ["--seconds", "5"],
    "ingest": ["--events", "10000"],
    "ledger": ["--events", "20000"],
    "mysql_proxy": ["--queries", "1000", "--rows", "100000"],
    "pg_load": ["--seconds", "20", "--clients", "8,50", "--modes", "select-only"],
    "pg_memory": ["--sessions", "300"],
    "pg_protocol": [],
    "pg_proxy": ["--queries", "1000", "--seconds", "5", "--rows", "200000", "--idle-sessions", "20"],
    "policy": ["--rows", "50000", "--statements", "2000"],
    "query": ["--sessions", "2000"],
    "ssh_proxy": ["--execs", "10", "--mib", "20", "--keys", "100"],
    "system": [],
    "witness": ["--checkpoints", "500", "--events", "20000", "--sessions", "100000"],
}
NUMBER = r"-?[\d,]*\.?\d+"


@dataclass
class Row:
    """One published figure: what it is, Custody's value, the same-run baseline it is read against."""

    figure: str
    value: str
    baseline: str = ""
    ratio: str = ""


@dataclass
class Result:
    """One bench's run: its command, exit status, time, output and the rows parsed from it."""

    name: str
    command: list[str]
    load: float
    returncode: int | None = None
    seconds: float = 0.0
    stdout: str = ""
    stderr: str = ""
    rows: list[Row] = field(default_factory=list)


def number(text: str) -> float:
    """A printed figure's value: its first word without thousands separators (`12,345 rows/s` -> 12345.0)."""
    return float(text.split()[0].replace(",", ""))


def ratio(value: str, baseline: str) -> str:
    try:
        base = number(baseline)
        return f"{number(value) / base:.2f}x" if base else ""
    except ValueError:
        return ""


# --- parsers: a bench's printed lines -> rows; each returns (rows, the lines it used) --------------------------


def sections(text: str) -> list[tuple[str, list[str], list[tuple[str, list[str]]], list[str]]]:
    """Blocks of a heading line and indented `  name   1.0   2.0` rows (2+ spaces between cells).

    Returns (title, column names, [(row name, cells)], lines used). Column names come from the heading's
    own cells (`SELECT 1 round trip (µs)   p50   p99`) or from an indented line of names only.
    """
    blocks: list = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            cells = re.split(r"\s{2,}", line.strip())
            blocks.append([cells[0], cells[1:], [], [line]])
            continue
        if not blocks:
            continue
        cells = re.split(r"\s{2,}", line.strip())
        starts = [bool(re.match(NUMBER + r"(\s|$)", c)) for c in cells]
        if len(cells) >= 2 and starts[1]:
            figures = cells[1:1 + (starts[1:] + [False]).index(False)]
            blocks[-1][2].append((cells[0], figures))
            blocks[-1][3].append(line)
        elif not any(starts) and not blocks[-1][2]:
            blocks[-1][1] = cells
            blocks[-1][3].append(line)
    return [tuple(b) for b in blocks if b[2]]


def parse_sections(text: str) -> tuple[list[Row], set[str]]:
    """Tables whose rows are targets (direct, a bare relay, nginx, pgbouncer, `custody proxy`): Custody's row
    beside every other row of the same table, column by column; tables without a Custody row as plain figures."""
    rows: list[Row] = []
    used: set[str] = set()
    for title, columns, table, lines in sections(text):
        ours = [cells for name, cells in table if "custody" in name.lower()]
        for i in range(max(len(cells) for _, cells in table)):
            column = columns[i] if i < len(columns) else ""
            title = title.rstrip(":")
            label = f"{title}, {column}" if column else title
            if ours:
                mine = ours[0][i] if i < len(ours[0]) else ""
                for name, cells in table:
                    if "custody" not in name.lower() and i < len(cells):
                        rows.append(Row(label, mine, f"{name}: {cells[i]}", ratio(mine, cells[i])))
            else:
                for name, cells in table:
                    if i < len(cells):
                        rows.append(Row(f"{label}: {name}", cells[i]))
        used.update(lines)
    return rows, used


def parse_direct_proxy(text: str) -> tuple[list[Row], set[str]]:
    """`<figure>: direct <n> <unit>, proxy <n> <unit> (...)[; <p99>: direct ..., proxy ...]` (bench/ssh_proxy.py)."""
    rows, used = [], set()
    for line in text.splitlines():
        head = ""
        for part in line.split("; "):
            m = re.match(rf"(.+?): direct ({NUMBER}) ([^,]+), proxy ({NUMBER})", part)
            if not m:
                continue
            label = m[1] if not head else f"{head} {m[1]}"
            head = head or m[1].rsplit(" ", 1)[0]
            rows.append(Row(f"{label} ({m[3].strip()})", m[4], f"direct: {m[2]}", ratio(m[4], m[2])))
            used.add(line)
    return rows, used


def parse_ledger(text: str) -> tuple[list[Row], set[str]]:
    """`<label>   <value>  (...)` rows read against the run's raw Ed25519 verify rate (one thread)."""
    rows, used, raw = [], set(), ""
    for line in text.splitlines():
        m = re.match(rf"\s*(.+?)\s{{2,}}({NUMBER})(?:\s+\((.*)\))?$", line)
        if not m:
            continue
        used.add(line)
        if m[1].startswith("raw Ed25519"):
            raw = m[2]
        if "events/s" in m[1] and raw and not m[1].startswith("raw"):
            rows.append(Row(m[1], m[2], f"raw Ed25519 verify/s: {raw}", ratio(m[2], raw)))
        else:
            rows.append(Row(m[1], m[2], "", m[3] or ""))
    return rows, used


def parse_ingest(text: str) -> tuple[list[Row], set[str]]:
    """The three fixed-width tables, told apart by their header lines: encode+sign (and +produce) against raw
    sign/s; raw kafka-python rates; the recorder's producer against the best raw rate for its message size."""
    rows, used, table = [], set(), ""
    for line in text.splitlines():
        cells = line.split()
        if "raw sign/s" in line or "raw msg/s" in line or "producer ev/s" in line:
            table = "sign" if "raw sign/s" in line else "raw" if "producer" not in line else "producer"
            used.add(line)
            continue
        if not (cells and re.fullmatch(r"\d+B", cells[0])):
            continue
        if table == "sign" and len(cells) == 6:
            rows.append(Row(f"encode+sign/s, {cells[0]} payload", cells[2], f"raw Ed25519 sign/s: {cells[1]}",
                            f"{cells[3]}x"))
            rows.append(Row(f"encode+sign+produce/s, {cells[0]} payload", cells[4],
                            f"raw Ed25519 sign/s: {cells[1]}", f"{cells[5]}x"))
        elif table == "raw" and len(cells) == 4:
            rows.append(Row(f"raw kafka-python msg/s, {cells[0]} messages, {cells[1]}", cells[2], "",
                            f"{cells[3]} MB/s"))
        elif table == "producer" and len(cells) == 6:
            rows.append(Row(f"recorder producer events/s, {cells[0]} payload ({cells[1]} B events)", cells[2],
                            f"best raw kafka-python msg/s: {cells[4]}", f"{cells[5]}x"))
        else:
            continue
        used.add(line)
    return rows, used


def parse_bundle(text: str) -> tuple[list[Row], set[str]]:
    """`jobs  wall ev/s  cores used  ev/CPU-s  raw verify/CPU-s  ratio` rows (bench/bundle.py):
    events per CPU second beside the raw Ed25519 verify per CPU second measured during the same run."""
    rows, used = [], set()
    for line in text.splitlines():
        cells = line.split()
        if cells[:1] == ["jobs"]:
            used.add(line)
        if len(cells) == 6 and cells[0].isdigit() and re.fullmatch(r"\d+\.\d\d", cells[5]):
            jobs, wall, cores, per_cpu, raw, share = cells
            rows.append(Row(f"bundle verify events/s, jobs={jobs} (wall, {cores} cores used)", wall))
            rows.append(Row(f"bundle verify events per CPU second, jobs={jobs}", per_cpu,
                            f"raw Ed25519 verify per CPU second: {raw}", f"{share}x"))
            used.add(line)
    return rows, used


def parse_policy(text: str) -> tuple[list[Row], set[str]]:
    """Masked rows/s against the same run's unmasked pass; a session's p99 while masking against idle."""
    rows, used, unmasked, idle = [], set(), "", ""
    for line in text.splitlines():
        m = re.match(rf"\s*unmasked.*?:\s+({NUMBER}) rows/s", line)
        if m:
            unmasked = m[1]
            used.add(line)
            continue
        m = re.match(rf"\s*masked\s+\((.*?)\).*?:\s+({NUMBER}) rows/s", line)
        if m and unmasked:
            rows.append(Row(f"masked rows/s ({m[1]})", m[2], f"unmasked: {unmasked}", ratio(m[2], unmasked)))
            used.add(line)
            continue
        m = re.match(rf"another session's SELECT 1 p99: ({NUMBER}) µs idle, ({NUMBER}) µs", line)
        if m:
            idle = m[1]
            rows.append(Row("another session's SELECT 1 p99 (µs) while masked results stream", m[2],
                            f"idle: {idle}", ratio(m[2], idle)))
            used.add(line)
            continue
        m = re.match(rf"\s*baseline, the same stream unmasked.*?: ({NUMBER}) µs", line)
        if m and idle:
            rows.append(Row("the same while unmasked results stream (baseline)", m[1], f"idle: {idle}",
                            ratio(m[1], idle)))
            used.add(line)
    return rows, used


def parse_system(text: str) -> tuple[list[Row], set[str]]:
    """bench/system.py's `figure   no faults   with faults` table: the faulted run beside the clean one."""
    rows, used, inside = [], set(), False
    for line in text.splitlines():
        if "no faults (baseline)" in line:
            inside = True
            used.add(line)
            continue
        if inside and line.startswith("  ") and len(line) > 80:
            # fixed columns: f"  {row:36} {str(a)[:40]:>40}   {b}"
            name, clean, faulted = line[2:38].strip(), line[39:79].strip(), line[82:].strip()
            rows.append(Row(f"{name} (with faults)", faulted, f"no faults: {clean}", ratio(faulted, clean)))
            used.add(line)
    return rows, used


def parse_query(text: str) -> tuple[list[Row], set[str]]:
    """The final JSON line of figures (seconds); the printed lines stay as published notes."""
    rows, used = [], set()
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                figures = json.loads(line)
            except ValueError:
                continue
            rows.extend(Row(f"{key[:-2]} (s)" if key.endswith("_s") else key,
                            f"{value:.3f}" if isinstance(value, float) else str(value))
                        for key, value in figures.items())
            used.add(line)
    return rows, used


PARSERS: dict[str, Callable[[str], tuple[list[Row], set[str]]]] = {
    "bundle": parse_bundle, "ingest": parse_ingest, "ledger": parse_ledger, "mysql_proxy": parse_sections,
    "policy": parse_policy, "query": parse_query, "ssh_proxy": parse_direct_proxy, "system": parse_system,
}


def rows_of(name: str, text: str) -> list[Row]:
    """The bench's own parser, then tables of targets, then every other line with a figure in it, as printed."""
    rows, used = PARSERS.get(name, parse_sections)(text)
    if name in PARSERS:
        more, used_more = parse_sections("\n".join(line for line in text.splitlines() if line not in used))
        if not rows:
            rows, used = more, used | used_more
    rows += [Row(" ".join(line.split()), "") for line in text.splitlines()
             if line not in used and line.strip()]
    return rows


# --- discovery, the machine, running ------------------------------------------------------------------------


def discover() -> list[str]:
    """Every bench/*.py that runs as a script, this one excepted."""
    return sorted(p.stem for p in BENCH.glob("*.py")
                  if p.name != Path(__file__).name and "__main__" in p.read_text())


def declared_args(name: str) -> list[str] | None:
    """A bench's own `RUN_ALL_ARGS = [...]` (a literal list of strings), read from its source."""
    for node in ast.parse((BENCH / f"{name}.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "RUN_ALL_ARGS" for t in node.targets):
            return [str(a) for a in ast.literal_eval(node.value)]
    return None


def machine() -> list[str]:
    """CPU model, cores, RAM, kernel, Python, load average, commit: what the figures depend on."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    mem = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), 0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()
    return [f"- CPU: {cpu}, {os.cpu_count()} cores",
            f"- RAM: {mem / 1024 / 1024:.1f} GiB",
            f"- kernel: {platform.system()} {platform.release()}; Python {platform.python_version()}",
            f"- load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
            f"- commit: {commit.stdout.strip() or 'unknown'}{' (with uncommitted changes)' if dirty else ''}",
            f"- run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"]


def run(name: str, args: list[str], timeout: float) -> Result:
    command = [".venv/bin/python", f"bench/{name}.py", *args]
    result = Result(name, command, os.getloadavg()[0])
    start = time.monotonic()
    print(f"run_all: {shlex.join(command)}", file=sys.stderr, flush=True)
    try:
        done = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
        result.returncode, result.stdout, result.stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        result.stdout = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) \
            else (expired.stdout or "")
        result.stderr = f"timed out after {timeout:.0f} s"
    result.seconds = time.monotonic() - start
    result.rows = rows_of(name, result.stdout)
    return result


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(results: list[Result], header: list[str]) -> str:
    """The machine, one table of every figure, then each bench's command, status and time."""
    out = ["Machine:", "", *header, "",
           "| Bench | Figure | Custody | Same-run baseline | Ratio |", "|---|---|---:|---|---:|"]
    for r in results:
        for row in r.rows:
            out.append(f"| {r.name} | {cell(row.figure)} | {cell(row.value)} | {cell(row.baseline)} | "
                       f"{cell(row.ratio)} |")
        if r.returncode != 0:
            why = (r.stderr.strip().splitlines() or ["no output"])[-1]
            out.append(f"| {r.name} | **failed** (exit {r.returncode}): {cell(why[:200])} | | | |")
    out += ["", "| Bench | Command (from the repository root) | Exit | Seconds | Load before |",
            "|---|---|---:|---:|---:|"]
    for r in results:
        out.append(f"| {r.name} | `{shlex.join(r.command)}` | {r.returncode} | {r.seconds:.0f} | {r.load:.2f} |")
    return "\n".join(out) + "\n"


def write_readme(table: str) -> None:
    """Replaces what lies between the run_all markers in bench/README.md (the rest is written by hand)."""
    text = README.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"run_all: {README} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    README.write_text(f"{head}{BEGIN}\n{table}{END}{rest.split(END, 1)[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated bench names (default: every bench found)")
    parser.add_argument("--skip", default="", help="comma-separated bench names to leave out")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=ARGS",
                        help="a bench's arguments for this run (shell words), e.g. ledger='--events 2000'")
    parser.add_argument("--full", action="store_true", help="each bench with its own defaults, not the short form")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one bench may take")
    parser.add_argument("--out", type=Path, help="write the table to this file too")
    parser.add_argument("--readme", action="store_true", help="write the table into bench/README.md")
    args = parser.parse_args()
    found = discover()
    names = [n.strip() for n in args.only.split(",")] if args.only else found
    unknown = [n for n in names if n not in found]
    if unknown:
        raise SystemExit(f"run_all: no bench named {', '.join(unknown)} (found: {', '.join(found)})")
    names = [n for n in names if n not in set(args.skip.split(","))]
    overrides = {}
    for item in args.set:
        name, _, words = item.partition("=")
        overrides[name] = shlex.split(words)
    header = machine()
    results = []
    for name in names:
        if name in overrides:
            bench_args = overrides[name]
        elif args.full:
            bench_args = []
        else:
            declared = declared_args(name)
            bench_args = declared if declared is not None else SHORT.get(name, [])
        results.append(run(name, bench_args, args.timeout))
    table = markdown(results, header)
    print(table)
    if args.out:
        args.out.write_text(table)
    if args.readme:
        write_readme(table)
    sys.exit(1 if any(r.returncode != 0 for r in results) else 0)


if __name__ == "__main__":
    main()
