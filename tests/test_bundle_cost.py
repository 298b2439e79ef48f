"""What `custody bundle verify` must not spend CPU on: it shares the cores with its own workers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ingest.keys import add_to_keyring, generate_key_file
from query.bundle import Scope, export_bundle
from query.sample import ORIGIN, build_demo_ledger

REPO = Path(__file__).resolve().parent.parent


def test_verifying_a_bundle_never_imports_pandas(tmp_path):
    """pyarrow imports pandas (0.2-0.8 s of CPU) on its first to_numpy or conversion from Python objects."""
    demo = build_demo_ledger(tmp_path, sessions=3, statements=2)
    exporter = generate_key_file(tmp_path / "keys" / "exporter.key", "exporter")
    keyring = add_to_keyring(demo.keyring, exporter, "exporter")
    out = tmp_path / "all.custody"
    export_bundle(demo.ledger_dir, out, Scope(where="true"), case="C", purpose="test", recipient=None,
                  exporter_key=exporter, keyring=keyring, origin=ORIGIN)
    script = ("import sys\nfrom pathlib import Path\nfrom ingest.keys import Keyring\n"
              "from query.bundle_verify import verify_bundle\n"
              f"report = verify_bundle(Path({str(out)!r}), Keyring.load(Path({str(demo.keyring)!r})))\n"
              "assert report.ok, report.problems\n"
              "print('pandas' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
