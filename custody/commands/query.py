"""`custody sql`, `custody sessions`, `custody activity` and `custody replay`.

Each reads a ledger directory, from `--ledger DIR` or the config's `[ledger] dir`;
`replay` also needs the keyring (`--keyring FILE` or `[keys] keyring`) to say
whether the session verified. All are read-only.
"""

from __future__ import annotations

import base64
import importlib
from pathlib import Path

import click
from nacl.public import PrivateKey

from custody.config import config_option, load_config
from ingest.errors import CustodyError
from ingest.keys import Keyring
from query.activity import ActivityFilter
from query.filters import SessionFilter, parse_time
from query.html import render_html
from query.output import FORMATS, write_result
from query.render import render_json, render_text
from query.replay import DEFAULT_ROWS, custodian_reveal, extract_file, replay_session
from query.sql import run_query
from query.views import open_ledger

ledger_option = click.option("--ledger", "ledger_path", type=click.Path(file_okay=False), default=None,
                             help="Ledger directory (default: the config's [ledger] dir).")
output_option = click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), default=None,
                             help="Write to FILE instead of stdout.")
bundle_option = click.option("--bundle", "bundle_path", type=click.Path(exists=True, dir_okay=False), default=None,
                             help="Read a sealed bundle instead of the ledger (verify it first: `custody bundle verify`).")
format_option = click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)


def ledger_dir(config_path: str | None, ledger_path: str | None) -> Path:
    if ledger_path:
        return Path(ledger_path)
    directory = load_config(config_path).ledger.dir
    if not isinstance(directory, Path):
        raise CustodyError(f"[ledger] dir {directory!r}: only a local directory can be queried so far")
    return directory


def connect(config_path: str | None, ledger_path: str | None, bundle_path: str | None):
    """The views over a bundle when one is named, else over the ledger."""
    if bundle_path:
        from query.bundle import open_bundle

        return open_bundle(Path(bundle_path))
    return open_ledger(ledger_dir(config_path, ledger_path))


def keyring_path(config_path: str | None, keyring: str | None) -> Path:
    return Path(keyring) if keyring else load_config(config_path).keys.keyring


@click.command("sql")
@click.argument("statement")
@config_option
@ledger_option
@bundle_option
@format_option
@output_option
def sql(statement: str, config_path: str | None, ledger_path: str | None, bundle_path: str | None, fmt: str,
        output: str | None) -> None:
    """Run one read-only SQL query over the ledger's views.

    Views: events, frames, sessions, statements, activity, violations, approvals, seals (see query/README.md).
    """
    con = connect(config_path, ledger_path, bundle_path)
    write_result(run_query(con, statement), fmt, Path(output) if output else None)


@click.command("sessions")
@config_option
@ledger_option
@bundle_option
@click.option("--identity", help="Subject or email of the caller.")
@click.option("--target", help="Target (proxy) name.")
@click.option("--since", help="Started at or after: ISO 8601, or relative like 24h, 7d.")
@click.option("--until", help="Started before: ISO 8601, or relative like 1h.")
@click.option("--with-violations", is_flag=True, help="Only sessions with a block, denial, auth or protocol failure.")
@click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True, help="0 for all.")
@format_option
@output_option
def sessions(config_path: str | None, ledger_path: str | None, bundle_path: str | None, identity: str | None,
             target: str | None,
             since: str | None, until: str | None, with_violations: bool, limit: int, fmt: str,
             output: str | None) -> None:
    """List sessions, newest first."""
    query = SessionFilter(identity, target, parse_time(since) if since else None,
                          parse_time(until) if until else None, with_violations, limit or None)
    con = connect(config_path, ledger_path, bundle_path)
    write_result(run_query(con, *query.query()), fmt, Path(output) if output else None)


@click.command("activity")
@config_option
@ledger_option
@bundle_option
@click.option("--identity", "--subject", "identity", help="Subject or email of the caller.")
@click.option("--target", help="Target (proxy) name.")
@click.option("--protocol", help="postgres, ssh, http, kubernetes, mysql.")
@click.option("--since", help="At or after: ISO 8601, or relative like 24h, 7d.")
@click.option("--until", help="Before: ISO 8601, or relative like 1h.")
@click.option("--limit", type=click.IntRange(min=0), default=1000, show_default=True,
              help="The first N operations in time order; 0 for all.")
@format_option
@output_option
def activity(config_path: str | None, ledger_path: str | None, bundle_path: str | None, identity: str | None,
             target: str | None, protocol: str | None, since: str | None, until: str | None, limit: int, fmt: str,
             output: str | None) -> None:
    """Every operation across protocols (statements, commands, requests), oldest first, with outcome and policy."""
    query = ActivityFilter(identity, target, protocol, parse_time(since) if since else None,
                           parse_time(until) if until else None, limit or None)
    con = connect(config_path, ledger_path, bundle_path)
    write_result(run_query(con, *query.query()), fmt, Path(output) if output else None)


def load_custodian_key(path: Path) -> PrivateKey:
    try:
        return PrivateKey(base64.b64decode(path.read_text(encoding="utf-8").strip(), validate=True))
    except (ValueError, TypeError) as exc:
        raise CustodyError(f"{path}: not a custodian private key (base64 X25519): {exc}") from None


RENDERERS = {"text": render_text, "json": render_json, "html": render_html}


@click.command("replay")
@click.argument("session")
@config_option
@ledger_option
@bundle_option
@click.option("--keyring", type=click.Path(dir_okay=False), default=None,
              help="Trusted keys (default: the config's [keys] keyring).")
@click.option("--format", "fmt", type=click.Choice((*RENDERERS, "asciicast")), default="text", show_default=True)
@click.option("--rows", type=click.IntRange(min=0), default=DEFAULT_ROWS, show_default=True,
              help="Result rows shown per statement.")
@click.option("--reveal", is_flag=True, help="Show the originals of masked rows (needs --custodian-key).")
@click.option("--input", "with_input", is_flag=True,
              help="asciicast: include the client's keystrokes as \"i\" events (they may hold secrets).")
@click.option("--custodian-key", type=click.Path(dir_okay=False, exists=True), default=None,
              help="The evidence custodian's private key (base64, as custody init writes keys/custodian.key).")
@click.option("--extract-file", "extract_path", metavar="PATH", default=None,
              help="Write the file PATH as an SFTP transfer of the session moved it (upload or download; "
                   "not legacy scp -O) to -o FILE, rebuilt from the recorded packets and checked against the "
                   "recorded SHA-256 and size.")
@click.option("--nth", type=click.IntRange(min=1), default=None,
              help="--extract-file: the Nth transfer of PATH in the session (default: the last).")
@output_option
def replay(session: str, config_path: str | None, ledger_path: str | None, bundle_path: str | None,
           keyring: str | None, fmt: str, rows: int, reveal: bool, with_input: bool, custodian_key: str | None,
           extract_path: str | None, nth: int | None, output: str | None) -> None:
    """Replay SESSION (an id or a unique prefix) step by step; the first line says whether it verified.

    Exits 1 when the session's signatures or chain do not verify. With --extract-file PATH -o FILE, writes
    that transferred file instead and says in one line whether it matches the recorded SHA-256 and size.
    """
    if extract_path is not None:
        extract(session, config_path, ledger_path, bundle_path, keyring, extract_path, nth, output)
        return
    if nth is not None:
        raise click.UsageError("--nth goes with --extract-file PATH")
    if reveal and not custodian_key:
        raise click.UsageError("--reveal needs --custodian-key FILE")
    opener = custodian_reveal(load_custodian_key(Path(custodian_key))) if reveal and custodian_key else None
    trusted = Keyring.load(keyring_path(config_path, keyring))
    con = connect(config_path, ledger_path, bundle_path)
    story = replay_session(con, session, trusted, max_rows=rows, reveal=opener)
    if fmt == "asciicast":  # a terminal session (SSH, kubectl exec/attach) for asciinema: output, resizes, markers
        asciicast = getattr(importlib.import_module(type(story.renderer).__module__), "asciicast", None)
        if asciicast is None:
            raise click.UsageError(f"--format asciicast: a {story.protocol or 'generic'} session is not a terminal")
        text = asciicast(story.steps, include_input=with_input, title=f"custody session {story.verification.session_id}")
    else:
        text = RENDERERS[fmt](story)
    if output:
        Path(output).write_text(text, encoding="utf-8")
        click.echo(story.verification.line, err=True)
    else:
        click.echo(text, nl=False)
    if not story.verification.ok:
        raise SystemExit(1)


def extract(session: str, config_path: str | None, ledger_path: str | None, bundle_path: str | None,
            keyring: str | None, path: str, nth: int | None, output: str | None) -> None:
    """`replay --extract-file`: the rebuilt file to OUTPUT, one line on whether it is the recorded transfer."""
    if not output:
        raise click.UsageError("--extract-file PATH needs -o FILE")
    trusted = Keyring.load(keyring_path(config_path, keyring))
    verification, file = extract_file(connect(config_path, ledger_path, bundle_path), session, trusted, path, nth)
    Path(output).write_bytes(file.data)
    what = f"{path} ({file.mode}, {len(file.data)} bytes"
    problem = file.problem()
    if problem is not None:
        raise CustodyError(f"{what}) rebuilt from session {verification.session_id} is not the recorded "
                           f"transfer: {problem} (written to {output} for inspection)")
    if not verification.ok:
        click.echo(f"{what}, SHA-256 {file.sha256}) matches its record but {verification.line}", err=True)
        raise SystemExit(1)
    click.echo(f"MATCH {what}, SHA-256 {file.sha256}) as recorded, written to {output}; "
               f"session {verification.session_id} verified")


commands: list[click.Command] = [sql, sessions, activity, replay]
