"""The README's main job, end to end: `custody demo` on a fresh directory against the machine's PostgreSQL."""

from __future__ import annotations

import re
import subprocess
import sys


def test_the_demo_runs_the_whole_pipeline_and_investigates_it(tmp_path):
    result = subprocess.run([sys.executable, "-m", "custody", "demo", "--dir", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=240)
    out = result.stdout
    assert result.returncode == 0, result.stderr[-2000:]
    assert "a***@example.org" in out and "[MASKED:column]" in out, "bob's read is masked"
    assert "42501: custody: DROP DATABASE/SCHEMA/TABLE is not allowed" in out, "the DROP is blocked"
    assert "wrong_audience" in out, "the forged token is refused"
    assert re.search(r"^VERIFIED session \S+: \d+ events, signatures and chain intact, ended$", out, re.M)
    assert re.search(r"policy_block\s+bob@example.com", out) and re.search(r"auth_failure", out)
    summary = re.search(r"^(\d+)/(\d+) segments valid, (\d+)/(\d+) events valid, 0 session gaps", out, re.M)
    assert summary and summary[1] == summary[2] and summary[3] == summary[4]
    assert (tmp_path / "demo" / "ledger" / "seals").is_dir()
