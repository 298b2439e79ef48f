"""The `custody` command's exit status is its verdict, never an abort of native threads at interpreter exit.

`custody bundle verify` used to exit 134 now and then after printing a clean
report: an Arrow I/O thread that still held the Python file object a Parquet
file was read from took the GIL while Python finalized, and the process aborted
(`terminate called without an active exception`). The CLI now ends through
`custody.cli.leave` (Python's clean-up, flush, os._exit) and never finalizes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

from ingest.keys import Keyring, add_to_keyring, generate_key_file
from query.bundle import Scope, export_bundle
from query.sample import ORIGIN, build_demo_ledger

# A command whose Arrow I/O thread is certain to be inside Python when the command returns: the streaming CSV
# reader reads ahead from a slow Python file. Ended by a normal interpreter exit, this aborts every time.
LATE_ARROW_THREAD = textwrap.dedent("""
    import io, sys, time
    import click
    import pyarrow.csv
    from custody.cli import cli, main

    class Slow(io.RawIOBase):
        def __init__(self):
            self.data = io.BytesIO(b"a,b\\n" + b"".join(b"%d,%d\\n" % (i, i) for i in range(100_000)))
        def readable(self):
            return True
        def readinto(self, buffer):
            time.sleep(0.2)
            return self.data.readinto(buffer)

    @cli.command("read-ahead")
    def read_ahead():
        reader = pyarrow.csv.open_csv(Slow(), read_options=pyarrow.csv.ReadOptions(block_size=1 << 14))
        click.echo(f"{reader.read_next_batch().num_rows} rows")

    sys.argv[1:] = ["read-ahead"]
    main()
""")


def test_an_arrow_thread_still_in_python_at_exit_does_not_change_the_exit_status():
    for _ in range(3):
        ran = subprocess.run([sys.executable, "-c", LATE_ARROW_THREAD], capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, (ran.returncode, ran.stderr[-2000:])
        assert ran.stdout.strip().endswith(" rows")


def test_bundle_verify_exit_status_is_the_verdict_run_after_run(tmp_path):
    demo = build_demo_ledger(tmp_path, sessions=12, statements=3)
    exporter = generate_key_file(tmp_path / "keys" / "exporter.key", "exporter")
    add_to_keyring(demo.keyring, exporter, "exporter")
    bundle = tmp_path / "case.custody"
    export_bundle(demo.ledger_dir, bundle, Scope(identity="alice@example.com"), case="CASE-1", purpose="exit status",
                  recipient=None, exporter_key=exporter, keyring=Keyring.load(demo.keyring), origin=ORIGIN)

    def verify(_: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "custody", "bundle", "verify", str(bundle),
                               "--trust", str(demo.keyring)], capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(2) as pool:  # two at a time, as an auditor's scripts or CI would
        runs = list(pool.map(verify, range(40)))
    codes = [r.returncode for r in runs]
    assert codes == [0] * 40, [(r.returncode, r.stderr[-500:]) for r in runs if r.returncode]
    assert all("events valid" in r.stdout.splitlines()[-1] and "manifest signed by" in r.stdout for r in runs)
