"""What `pip install .` without extras gives a user must be enough to run the product.

The test venv has the test extra too (numpy, pandas, …), which hid that the
query layer needed numpy. Here the product runs in a subprocess that can import
only the distributions `[project] dependencies` pull in (transitively, as
installed), the standard library and Custody itself. `.ci/run` also installs
the package without extras into a fresh venv and runs `custody demo` from it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from query.sample import build_demo_ledger

ROOT = Path(__file__).resolve().parent.parent


def core_distributions() -> set[str]:
    """The distributions `pip install .` brings, by the installed metadata of each (canonical names)."""
    wanted = [(Requirement(r), ()) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    found: set[str] = set()
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while wanted:
        requirement, extras_of_parent = wanted.pop()
        if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in (extras_of_parent or ("",))):
            continue
        name = canonicalize_name(requirement.name)
        key = (name, tuple(sorted(requirement.extras)))
        if key in seen:
            continue
        seen.add(key)
        found.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        extras = tuple(sorted(requirement.extras))
        wanted += [(Requirement(r), extras) for r in dist.requires or ()]
    return found


GUARD = textwrap.dedent("""
    import importlib.abc, importlib.metadata, json, sys
    allowed = set(json.loads(sys.argv[1]))
    providers = importlib.metadata.packages_distributions()
    canon = lambda n: n.lower().replace("_", "-").replace(".", "-")

    class OnlyCoreDependencies(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            dists = {canon(d) for d in providers.get(top, ())}
            if dists and not dists & allowed:
                raise ModuleNotFoundError(f"No module named {top!r} (not a core dependency: {sorted(dists)})", name=top)
            return None

    sys.meta_path.insert(0, OnlyCoreDependencies())
    from custody.cli import main
    main(sys.argv[2:])
""")


def run_core_only(*args: str) -> subprocess.CompletedProcess:
    allowed = sorted(core_distributions() | {"custody"})
    return subprocess.run([sys.executable, "-c", GUARD, json.dumps(allowed), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_the_core_dependencies_leave_out_the_test_extra():
    core = core_distributions()
    assert {"duckdb", "pyarrow", "click"} <= core
    assert not {"pandas", "pytest", "matplotlib"} & core  # else this test would prove nothing


def test_sessions_sql_and_replay_run_on_the_core_dependencies_alone(tmp_path):
    demo = build_demo_ledger(tmp_path, sessions=6, statements=3)
    sessions = run_core_only("sessions", "--config", str(demo.config))
    assert sessions.returncode == 0, sessions.stderr
    assert "alice@example.com" in sessions.stdout or "bob@example.com" in sessions.stdout
    sql = run_core_only("sql", "--config", str(demo.config),
                        "SELECT count(*) AS n FROM sessions WHERE client_bytes IS NOT NULL")
    assert sql.returncode == 0, sql.stderr
