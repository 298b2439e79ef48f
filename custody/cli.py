"""The `custody` command: assembles the click commands each package contributes.

Errors are one clear line (exit 2 for a usage or configuration problem, 1 for a
failure); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys

import click

from ingest.errors import CustodyError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


def _assemble() -> None:
    from custody.commands import approvals, bundle, ingest, ledger, policy, proxy, query
    from custody.demo import demo
    from custody.init import init
    from custody.up import up

    for command in [init, up, demo]:
        cli.add_command(command)
    for module in (ingest, proxy, policy, approvals, ledger, query, bundle):
        for command in module.commands:
            cli.add_command(command)


_assemble()


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except CustodyError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:  # the last resort: still one line unless --debug
        if debug:
            raise
        click.echo(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True)
        sys.exit(1)
