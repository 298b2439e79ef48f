"""CPU µs per statement of the whole policy path as the PostgreSQL front end runs it, in process.

    .venv/bin/python bench/policy_path.py [--statements 20000] [--rounds 5]

Per Query, proxy/postgres/frontend.py runs: input redaction's gate on the statement text
(`proxy.postgres.redaction.find_secrets` with the policy's mask detectors, what `PostgresRedactor` calls), the
operation (`StatementPolicy.operation`), and the session's decision (`PolicyGate.decide`: `BoundPolicy.decide`,
the analyzer, `sql.analyze`, the rules). This loop runs exactly those calls, with the policy custody init
writes (proxy/policies/default.toml), over pgbench's statements (select-only's SELECT and tpcb-like's
BEGIN/UPDATE/SELECT/UPDATE/UPDATE/INSERT/END) with random numbers as pgbench draws them: every text new.
The same-run baselines: the same loop over one fixed set of texts, seen before (a cache hit all the way: the
floor of the path), and the decision under the same policy plus a `text` rule, which turns the decision by
numeric shape off (each text is decided on its own, as before issue 11's shapes). CPU time
(time.process_time), best of `--rounds`; each stage is also timed alone.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nacl.public import PrivateKey  # noqa: E402

from proxy.core.policy import PolicyGate, PolicyRuntime  # noqa: E402
from proxy.identity import Identity  # noqa: E402
from proxy.policy import PolicyHolder  # noqa: E402
from proxy.policy.detectors import scanner_for  # noqa: E402
from proxy.postgres.policy_layer import StatementPolicy  # noqa: E402
from proxy.postgres.redaction import find_secrets  # noqa: E402

RUN_ALL_ARGS = ["--statements", "10000", "--rounds", "3"]


def pgbench_statements(count: int, rng: random.Random) -> list[str]:
    """pgbench's built-in scripts as it sends them (one Query each), numbers drawn as it draws them."""
    out: list[str] = []
    while len(out) < count:
        aid, bid, tid, delta = rng.randint(1, 100_000), rng.randint(1, 1), rng.randint(1, 10), rng.randint(-5000, 5000)
        out.append(f"SELECT abalance FROM pgbench_accounts WHERE aid = {rng.randint(1, 100_000)};")
        out.extend([
            "BEGIN;",
            f"UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid};",
            f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};",
            f"UPDATE pgbench_tellers SET tbalance = tbalance + {delta} WHERE tid = {tid};",
            f"UPDATE pgbench_branches SET bbalance = bbalance + {delta} WHERE bid = {bid};",
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
            f"VALUES ({tid}, {bid}, {aid}, {delta}, CURRENT_TIMESTAMP);",
            "END;",
        ])
    return out[:count]


# A rule that reads the text, and so may read its numbers: the binding decides every text on its own.
TEXT_RULE = """
[[rule]]
name = "block-marker"
action = "block"
text = "custody-bench-never-sent"
"""


def gate_for(directory: Path, extra: str = "") -> PolicyGate:
    """A session's PolicyGate on the default policy (+ `extra`), for an identity outside `dba` (the masks apply)."""
    path = directory / f"default{len(extra)}.toml"
    path.write_text((ROOT / "proxy" / "policies" / "default.toml").read_text() + extra)
    runtime = PolicyRuntime(PolicyHolder(path), PrivateKey.generate().public_key, "bench")
    identity = Identity("alice@example.com", "alice", None, ("dev",), "bench", None, datetime.now(timezone.utc))
    return PolicyGate(runtime, identity, "pg")


def stages(gate: PolicyGate, text_gate: PolicyGate) -> dict[str, Callable[[str], object]]:
    """Each stage of the path, and the whole of it, as one call per statement text."""
    policy, text_policy = StatementPolicy(gate, "postgres"), StatementPolicy(text_gate, "postgres")
    kinds = frozenset().union(*(mask.detectors for mask in gate.runtime.holder.policy.masks))
    scanner = scanner_for(kinds) if kinds else None

    def whole(sql: str) -> object:
        find_secrets(sql, scanner)
        return gate.decide(policy.operation(sql))

    return {
        "whole path": whole,
        "redaction gate": lambda sql: find_secrets(sql, scanner),
        "operation": policy.operation,
        "decide": lambda sql: gate.decide(policy.operation(sql)),
        "decide, + a text rule": lambda sql: text_gate.decide(text_policy.operation(sql)),
    }


def cpu_us(call: Callable[[str], object], texts: list[str], rounds: int) -> float:
    """Best CPU µs per text over `rounds` passes (fresh texts each pass are the caller's business)."""
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for text in texts:
            call(text)
        best = min(best, time.process_time() - start)
    return best / len(texts) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--statements", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(11)
    with tempfile.TemporaryDirectory() as work:
        calls = stages(gate_for(Path(work)), gate_for(Path(work), TEXT_RULE))
        repeated = pgbench_statements(8, rng)
        for text in repeated:  # seen once: the baseline is the cache-hit path
            calls["whole path"](text)
            calls["decide, + a text rule"](text)
        print(f"policy path, CPU µs per pgbench statement ({args.statements:,} statements, best of {args.rounds})")
        print("  stage   numbers vary (custody)   same texts again")
        for name, call in calls.items():
            # fresh numbers for every round: a text seen in an earlier round would be a cache hit
            varying = min(cpu_us(call, pgbench_statements(args.statements, rng), 1) for _ in range(args.rounds))
            again = cpu_us(call, repeated * (args.statements // len(repeated)), args.rounds)
            label = "custody" if name == "whole path" else name
            print(f"  {label}   {varying:.2f} µs   {again:.2f} µs")


if __name__ == "__main__":
    main()
