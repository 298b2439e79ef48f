"""`custody demo`: the whole pipeline on embedded defaults, against the local PostgreSQL.

`custody init` into a fresh directory, `custody up` (dev broker, ledger, proxy),
then real psycopg sessions through the proxy by two identities — including a
login with a forged token, a query error and a statement the default policy
blocks — then, once the ledger has sealed them, the investigator's view:
`custody sessions`, one `custody replay`, and `custody verify`. Each command is
printed before its output, so the demo doubles as a tour.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import click

from custody.config import Config, load_config
from custody.init import initialise
from custody.up import Stack
from ingest.broker import free_port
from ingest.errors import CustodyError

if TYPE_CHECKING:  # psycopg is imported where the demo connects: every other `custody` command starts without it
    import psycopg

DEMO_TABLE = "custody_demo_customers"


def _token(config: Config, subject: str, groups: list[str], **extra) -> str:
    from proxy.devidp import issue_token

    identity = config.identity
    return issue_token(identity.dev_signing_key, identity.issuer, identity.audience, subject, groups,
                       email=subject, ttl=timedelta(minutes=10), extra_claims=extra or None)


def _connect(config: Config, subject: str, token: str, app: str) -> psycopg.Connection:
    import psycopg

    host, _, port = config.proxies[0].listen.rpartition(":")
    return psycopg.connect(host=host, port=int(port), user=subject, password=token, dbname="postgres",
                           sslmode="disable", application_name=app, autocommit=True, connect_timeout=10)


def _say(text: str) -> None:
    click.echo(click.style(text, bold=True))


def run_sessions(config: Config) -> int:
    """The demo's clients; returns how many sessions the proxy should have recorded."""
    import psycopg

    alice, bob = "alice@example.com", "bob@example.com"
    _say(f"\n# {alice} (group dba) creates and fills a table through the proxy")
    with _connect(config, alice, _token(config, alice, ["dba"]), "psql") as conn:
        conn.execute(f"CREATE TABLE {DEMO_TABLE} (id int PRIMARY KEY, name text, email text, card_number text)")
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {DEMO_TABLE} VALUES (%s, %s, %s, %s)", [
                (1, "Ada Lovelace", "ada@example.org", "4111 1111 1111 1111"),
                (2, "Alan Turing", "alan@example.org", "5500 0000 0000 0004"),
            ])
        rows = conn.execute(f"SELECT name, email FROM {DEMO_TABLE} ORDER BY id").fetchall()
        click.echo(f"  alice sees: {rows}")
    _say(f"\n# {bob} (group developers) reads, makes a mistake, and tries something dangerous")
    with _connect(config, bob, _token(config, bob, ["developers"]), "DBeaver 24.1") as conn:
        rows = conn.execute(f"SELECT name, email, card_number FROM {DEMO_TABLE} ORDER BY id").fetchall()
        click.echo(f"  bob sees:   {rows}")
        for sql in ("SELECT 1/0", f"DROP TABLE {DEMO_TABLE}"):
            try:
                conn.execute(sql)
            except psycopg.Error as exc:
                click.echo(f"  {sql!r} -> {exc.sqlstate}: {str(exc).splitlines()[0]}")
    _say("\n# someone presents a token for another audience")
    try:
        _connect(config, "mallory@example.com", _token(config, "mallory@example.com", ["dba"], aud="another-service"),
                 "psql").close()
    except psycopg.OperationalError as exc:
        click.echo(f"  refused: {str(exc).strip().splitlines()[-1]}")
    return 3


def _sealed_sessions(config: Config) -> int:
    from query.views import open_ledger

    try:
        con = open_ledger(config.ledger.dir)
    except CustodyError:
        return 0
    return con.execute("SELECT count(*) FROM sessions WHERE end_reason IS NOT NULL").fetchone()[0]


def _session_of(config: Config, subject: str) -> str:
    from query.views import open_ledger

    return open_ledger(config.ledger.dir).execute(
        "SELECT session_id FROM sessions WHERE subject = ? ORDER BY started DESC LIMIT 1", [subject]).fetchone()[0]


def wait_for_seal(config: Config, sessions: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while _sealed_sessions(config) < sessions:
        if time.monotonic() > deadline:
            raise CustodyError(f"the ledger did not seal {sessions} sessions within {timeout:.0f}s")
        time.sleep(0.5)


def show(config: Config, *args: str) -> str:
    """Run a custody command as a user would, print it and its output."""
    _say(f"\n$ custody {' '.join(args)}")
    result = subprocess.run([sys.executable, "-m", "custody", *args, "--config", str(config.path)],
                            capture_output=True, text=True)
    click.echo(result.stdout.rstrip())
    if result.returncode:
        click.echo(result.stderr.rstrip(), err=True)
        raise CustodyError(f"`custody {' '.join(args)}` failed with exit code {result.returncode}")
    return result.stdout


def _drop_demo_table() -> None:
    """Clean up the machine's PostgreSQL directly (not through the proxy: this is not part of the story)."""
    import psycopg

    try:
        with psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {DEMO_TABLE}")
    except psycopg.Error:
        pass


@click.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to `custody init` (default: a new temporary directory, removed afterwards).")
def demo(directory: Path | None) -> None:
    """Run the whole pipeline on embedded defaults against the local PostgreSQL and investigate it."""
    keep = directory is not None
    directory = directory or Path(tempfile.mkdtemp(prefix="custody-demo-"))
    config_path = initialise(directory, proxy_port=free_port(), broker_port=free_port())
    text = config_path.read_text().replace("segment_max_seconds = 5", "segment_max_seconds = 1")
    config_path.write_text(text)
    config = load_config(config_path)
    _say(f"$ custody init {directory}\n$ custody up   # dev broker, ledger, proxy on {config.proxies[0].listen}")
    _drop_demo_table()  # a table left by an interrupted run; not through the proxy: not part of the story
    try:
        with Stack(config):
            sessions = run_sessions(config)
            _say("\n# waiting for the ledger to seal the sessions …")
            wait_for_seal(config, sessions)
            show(config, "violations", "tail")  # from the broker, so while the stack runs
        show(config, "sessions")
        show(config, "replay", _session_of(config, "bob@example.com"))
        show(config, "verify")
        _say(f"\nEverything above is in {directory}: `custody sql --config {config_path} \"SELECT * FROM statements\"`"
             if keep else "\n(demo directory removed; pass --dir to keep it)")
    finally:
        _drop_demo_table()
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)
