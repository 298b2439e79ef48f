"""Run a `custody` command inside the test process, with its exit status and its two output streams.

A `python -m custody` subprocess costs a second or more of interpreter start and imports on a loaded 2-core CI
machine; most CLI tests check what a command prints and the status it returns, not how the process ends. This
runs the command through `custody.cli.run`, the function whose result `custody.cli.main` hands to `leave` as the
process's exit status, so the status is the same one a shell would see (2 for usage and configuration errors,
1 for a failed verification or a failure, 0 otherwise). How the process itself ends (`leave`, no abort at
interpreter exit) is tests/test_cli_exit.py's subject, with real subprocesses.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from click.testing import CliRunner

from custody.cli import run


@dataclass(frozen=True)
class Ran:
    """What `subprocess.run(..., capture_output=True, text=True)` would have given."""

    returncode: int
    stdout: str
    stderr: str


def custody(*args: str) -> Ran:
    """`custody ARGS...` in process: stdin empty, stdout and stderr captured apart, not a terminal."""
    with CliRunner().isolation() as (out, err, _):
        code = run(list(args))
        sys.stdout.flush()  # as `leave` does: a command may write to sys.stdout without click.echo's flush
        sys.stderr.flush()
    return Ran(code, out.getvalue().decode(errors="replace"), err.getvalue().decode(errors="replace"))
