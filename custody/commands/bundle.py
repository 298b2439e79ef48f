"""`custody bundle export | verify | transfer`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import Progress

from custody.config import config_option, load_config
from ingest.keys import Keyring, load_key_file
from query.bundle_verify import verify_bundle


@click.group()
def bundle() -> None:
    """Sealed evidence bundles for auditors: export, verify offline, hand over."""


@bundle.command("export")
@click.option("--session", "sessions", multiple=True, help="A session id (repeatable).")
@click.option("--identity", help="Every session of this subject.")
@click.option("--target", help="Every session against this target.")
@click.option("--since", help="Sessions with events at or after this time (ISO 8601).")
@click.option("--until", help="Sessions with events before this time (ISO 8601).")
@click.option("--where", help="A SQL predicate over the events view, e.g. \"statement ILIKE '%payments%'\".")
@click.option("--case", required=True, help="Case id, recorded in the chain-of-custody record.")
@click.option("--purpose", required=True, help="Why the evidence is exported.")
@click.option("--recipient", help="Who the bundle is for.")
@click.option("--exporter", help="Who exports it, for the record (default: user@host).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The bundle file to write.")
@click.option("--ledger", "ledger_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Ledger directory (default: the config's [ledger] dir).")
@config_option
def export(sessions, identity, target, since, until, where, case, purpose, recipient, exporter, output, ledger_dir,
           config_path) -> None:
    """Write the selected sessions, their proofs, seals and keys into one signed file."""
    from query.bundle import Scope, export_bundle  # imported here: `bundle verify` starts without the exporter's

    config = load_config(config_path)
    scope = Scope(tuple(sessions), identity, target, since, until, where)
    with Progress(transient=True) as progress:
        task = progress.add_task("exporting", total=None)

        def step(what: str, done: int, total: int) -> None:
            progress.update(task, description=what, completed=done, total=total)

        predicate = export_bundle(Path(ledger_dir or config.ledger.dir), output, scope, case=case, purpose=purpose,
                                  recipient=recipient, exporter_key=load_key_file(config.keys.exporter_key),
                                  keyring=Keyring.load(config.keys.keyring), origin=config.ledger.origin,
                                  exporter=exporter, progress=step)
    counts = predicate["counts"]
    click.echo(f"wrote {output}: {counts['events']:,} events in {counts['sessions']} sessions, case {case}")


@bundle.command("verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--trust", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Keyring of the public keys you trust (proxy, ledger, exporter).")
@click.option("--witnesses", type=click.IntRange(min=0), default=0, show_default=True,
              help="Trusted witness cosignatures (keyring role witness) required on each partition's newest checkpoint.")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A witnessed checkpoint obtained elsewhere: the bundle must not be older (stale), and at its "
                   "tree size the bundle's seals must state its root and its session-map root (else forked). "
                   "Repeatable.")
@click.option("--verbose", is_flag=True, help="Print every proof step.")
@click.option("--jobs", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default="the machine's cores",
              help="Processes checking events; 1 checks them in this process. The report is the same either way.")
def verify(file: Path, trust: Path, witnesses: int, checkpoints: tuple[Path, ...], verbose: bool, jobs: int) -> None:
    """Check a bundle offline: signatures, proofs, checkpoints, witnesses, completeness, custody history.

    One line per problem, then a summary; exit status 0 when it verifies, 1 when anything is wrong, 2 for a usage
    error or an unreadable keyring.
    """
    trace = click.echo if verbose else None
    given = dict(witnesses=witnesses, checkpoints=[p.read_bytes() for p in checkpoints])
    if sys.stderr.isatty():
        with Progress(console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task("verifying events", total=None)
            report = verify_bundle(file, Keyring.load(trust), trace=trace, jobs=jobs, **given,
                                   progress=lambda done, total: progress.update(task, completed=done, total=total))
    else:
        report = verify_bundle(file, Keyring.load(trust), trace=trace, jobs=jobs, **given)
    for line in report.witnessed:
        click.echo(line)
    for problem in report.problems:
        click.echo(problem)
    for note in report.notes:
        click.echo(f"note: {note}")
    for record in report.transfers:
        click.echo(f"custody: #{record['sequence']} {record['at']} {record['from']} -> {record['to']}: {record['reason']}")
    click.echo(report.summary())
    if not report.ok:
        raise SystemExit(1)


@bundle.command("transfer")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--to", "to", required=True, help="Who receives the evidence.")
@click.option("--reason", required=True, help="Why, recorded in the signed record.")
@click.option("--by", help="Who hands it over (default: the signing key's id).")
@click.option("--key", "key_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Signing key (default: the config's exporter key).")
@config_option
def transfer_command(file: Path, to: str, reason: str, by: str | None, key_path: Path | None, config_path) -> None:
    """Append a signed chain-of-custody record; earlier signatures stay valid."""
    from query.bundle import transfer

    key = load_key_file(key_path or load_config(config_path).keys.exporter_key)
    record = transfer(file, to=to, reason=reason, key=key, by=by)
    click.echo(f"custody record #{record['sequence']}: {record['from']} -> {to}")


commands: list[click.Command] = [bundle]
