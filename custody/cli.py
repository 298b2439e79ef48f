"""The `custody` command: assembles the click commands each package contributes.

Errors are one clear line (exit 2 for a usage or configuration problem, 1 for a
failure); `--debug` shows the traceback instead. The exit status is the
command's verdict: the process ends through `leave` (see there), so that
native thread pools torn down at interpreter exit cannot turn it into an abort.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import sys
import threading
import traceback
from typing import NoReturn

import click

from ingest.errors import CustodyError


COMMAND_MODULES = {
    "init": "custody.init", "up": "custody.up", "demo": "custody.demo",
    "keys": "custody.commands.ingest", "broker": "custody.commands.ingest", "violations": "custody.commands.ingest",
    "proxy": "custody.commands.proxy", "token": "custody.commands.proxy", "login": "custody.commands.proxy",
    "logout": "custody.commands.proxy", "kubeconfig": "custody.commands.proxy",
    "ssh-login": "custody.commands.ssh", "policy": "custody.commands.policy", "approvals": "custody.commands.approvals",
    "ledger": "custody.commands.ledger", "verify": "custody.commands.ledger",
    "sql": "custody.commands.query", "sessions": "custody.commands.query", "activity": "custody.commands.query",
    "replay": "custody.commands.query", "bundle": "custody.commands.bundle", "witness": "custody.commands.witness",
}
"""Each top-level command and the module that defines it (in its `commands`, or as its one command)."""


class _Commands(click.Group):
    """The `custody` group, each command imported when it is looked up rather than all of them with this module:
    `custody bundle verify` then starts without the proxy's, the ledger's and the query layer's imports, and a
    worker that multiprocessing spawns from the program (`bundle verify --jobs`) imports the program's script, so
    this module, without them (~0.4 s of CPU each)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            module = importlib.import_module(COMMAND_MODULES[cmd_name])
            for command in getattr(module, "commands", None) or [getattr(module, cmd_name)]:
                if command.name == cmd_name:
                    self.add_command(command)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.version_option(package_name="custody")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Custody: signed, sealed, queryable evidence of every command that reaches production."""
    ctx.obj = {"debug": debug}
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not debug:
        logging.getLogger("kafka").setLevel(logging.CRITICAL)


def run(argv: list[str] | None = None) -> int:
    """Run one `custody` command; returns its exit status (the verdict, for `verify` and `bundle verify`)."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        result = cli.main(args=argv, standalone_mode=False)
        return result if isinstance(result, int) else 0  # an int here is a `ctx.exit(code)`
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        click.echo(exc.code, err=True)
        return 1
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except CustodyError as exc:
        if debug:
            traceback.print_exc()
        else:
            click.echo(f"error: {exc}", err=True)
        return 2
    except Exception as exc:  # the last resort: still one line unless --debug
        if debug:
            traceback.print_exc()
        else:
            click.echo(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
        return 1


def leave(code: int) -> NoReturn:
    """End the process with `code` after Python's own clean-up, but without interpreter finalization.

    Native thread pools outlive the work: Arrow's I/O and CPU pools, DuckDB's scheduler. When Python finalizes
    while one of their threads still touches Python (an Arrow I/O thread releasing the Python file object a
    Parquet file was read from takes the GIL), Python ends that thread with pthread_exit, the unwind meets a C++
    frame that may not throw, and the process aborts: `terminate called without an active exception`, exit 134,
    after a clean report was printed. An auditor's exit status must be the verdict, so the `custody` command ends
    like this instead: non-daemon threads are joined and atexit handlers run (logging, multiprocessing,
    finalizers) exactly as at a normal exit, stdout and stderr are flushed, then os._exit, which skips the
    finalization and the C++ static destructors where the abort happens.
    """
    try:
        shutdown_threads = getattr(threading, "_shutdown", None)  # what Py_FinalizeEx runs first
        if shutdown_threads is not None:
            shutdown_threads()
        else:
            for thread in threading.enumerate():
                if thread is not threading.current_thread() and not thread.daemon:
                    thread.join()
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - a clean-up failure must not change the verdict
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`custody sql … | head`), a closed stream
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    """The `custody` program. Given `argv` it runs in process (tests): it returns on success and raises
    SystemExit otherwise, as before; as the program itself (no `argv`) it ends the process through `leave`."""
    if argv is None:
        from custody.lifeline import adopt

        adopt()  # a child of `custody up` dies with it, however it dies
        leave(run(argv))
    code = run(argv)
    if code:
        sys.exit(code)
