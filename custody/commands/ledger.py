"""`custody ledger` (the worker), `custody ledger rotate-key` and `custody verify`."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from custody.config import config_option, load_config
from ingest.errors import CustodyError
from ingest.keys import Keyring, load_key_file
from ledger.rotation import RotationError, chain_key, rotate_partition
from ledger.seals import SEALS_DIR, Seal, partition_name
from ledger.service import GROUP_ID, LedgerService, ledger_dir
from ledger.state import numbered_files
from ledger.verify import LedgerProblem, Report, sealed_event_count, verify_ledger
from ledger.witnessed import check_ledger

PROGRESS_MIN_EVENTS = 100_000
"""Below this many events verification takes a second or two, and a progress bar is only noise."""


@click.group("ledger", invoke_without_command=True)
@click.option("--group", default=GROUP_ID, show_default=True, help="Kafka consumer group; run more workers to scale out.")
@click.option("--instance", default=None,
              help="Static group member id (one per worker): a restarted worker takes its partitions back at once.")
@click.option("--partitions", default=None, metavar="0,1,…",
              help="Pin these partitions instead of joining the group's rebalancing (one worker per partition set).")
@config_option
@click.pass_context
def ledger(ctx: click.Context, group: str, instance: str | None, partitions: str | None,
           config_path: str | None) -> None:
    """Verify, chain and seal custody.events into Parquet segments and signed seals, until stopped.

    SIGTERM or Ctrl-C seals what was read and stops; SIGKILL loses nothing either:
    a restart re-reads from the last seal.
    """
    if ctx.invoked_subcommand is not None:
        return
    config = load_config(config_path)
    try:
        pinned = [int(p) for p in partitions.split(",")] if partitions else None
    except ValueError:
        raise click.BadParameter(f"{partitions!r} is not a comma-separated list of numbers", param_hint="--partitions")
    service = LedgerService.from_settings(config.kafka, config.ledger, config.keys, group, instance, pinned,
                                          config.soc)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    click.echo(f"ledger: sealing {config.kafka.topic('events')} into {service.dir} as group {group}", err=True)
    service.run(stop)


@ledger.command("rotate-key")
@click.argument("new_key_path", metavar="NEW_KEY", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--partition", "only", type=click.IntRange(min=0), multiple=True,
              help="Rotate only this partition (repeatable; default: every partition with a seal).")
@config_option
def rotate_key(new_key_path: Path, only: tuple[int, ...], config_path: str | None) -> None:
    """Hand every partition's seal chain from the configured [keys] ledger_key to NEW_KEY (a private key file,
    e.g. from `custody keys generate ledger-2 --role ledger`), with the ledger stopped.

    Each partition gets a rotation seal: signed by the old key, countersigned by the new one, stated in its
    checkpoint for the witnesses to cosign (they read it from custody.seals when the ledger starts again).
    Auditors trust the new key only through that witnessed seal. A partition already handed to NEW_KEY is left
    as it is, so an interrupted rotation is finished by running the command again.
    """
    config = load_config(config_path)
    root, origin = ledger_dir(config.ledger), config.ledger.origin
    old_key, new_key = load_key_file(config.keys.ledger_key), load_key_file(new_key_path)
    if new_key.key_id == old_key.key_id:
        raise RotationError(f"{new_key_path} is the configured ledger key {old_key.key_id} itself")
    found = sorted(int(p.name[1:]) for p in (root / SEALS_DIR).glob("p*") if p.name[1:].isdigit())
    for partition in only:
        if partition not in found:
            raise RotationError(f"partition {partition} has no seal in {root}: nothing to rotate")
    partitions = list(only) or found
    if not partitions:
        raise RotationError(f"{root} holds no seal yet: start the ledger with the new key instead")
    for partition in partitions:
        sealed = numbered_files(root / SEALS_DIR / partition_name(partition))  # read only: no lock taken yet
        last = Seal.load(sealed[max(sealed)]) if sealed else None
        if last is not None and chain_key(last.record) == new_key.key_id:
            click.echo(f"p{partition}: already handed to {new_key.key_id} (seal {last.number})")
            continue
        seal = rotate_partition(root, partition, origin, old_key, new_key)
        click.echo(f"p{partition}: seal {seal.number} hands the chain from {old_key.key_id} to {new_key.key_id} "
                   f"at tree size {seal.tree_size}")
    click.echo(f"next: set [keys] ledger_key = \"{new_key_path}\" and start the ledger: it publishes the rotation "
               f"seals, and the witnesses cosign them")


class VerifyError(CustodyError):
    pass


def _verify_target(ledger_path: Path | None, keyring_path: Path | None,
                   config_path: str | None) -> tuple[Path, Keyring, str | None]:
    """The directory, the trusted keys and (when it is the config's ledger) the expected origin."""
    if ledger_path is not None and keyring_path is not None:
        return ledger_path, Keyring.load(keyring_path), None
    config = load_config(config_path)
    origin = None if ledger_path else config.ledger.origin
    return ledger_path or ledger_dir(config.ledger), Keyring.load(keyring_path or config.keys.keyring), origin


def _run_verify(root: Path, keyring: Keyring, origin: str | None) -> Report:
    total = sealed_event_count(root)
    progress = Progress(TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), TextColumn("events"),
                        TimeRemainingColumn(), console=Console(stderr=True), transient=True,
                        disable=total < PROGRESS_MIN_EVENTS or not sys.stderr.isatty())
    with progress:
        task = progress.add_task("verify", total=total)

        def on_problem(problem: LedgerProblem) -> None:
            click.echo(problem.line)

        return verify_ledger(root, keyring, origin, on_problem=on_problem,
                             on_events=lambda n: progress.advance(task, n))


@click.command("verify")
@click.option("--ledger", "ledger_path", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Ledger directory (default: the config's [ledger] dir).")
@click.option("--keyring", "keyring_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Trusted keys (default: the config's [keys] keyring).")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A witnessed checkpoint obtained elsewhere (e.g. a witness's GET <origin hash>/checkpoint): the "
                   "ledger must still hold its tree with its root (catches removed newest seals). Repeatable.")
@click.option("--witnesses", type=click.IntRange(min=1), default=1, show_default=True,
              help="Trusted witness cosignatures each --checkpoint needs.")
@config_option
def verify(ledger_path: Path | None, keyring_path: Path | None, checkpoints: tuple[Path, ...], witnesses: int,
           config_path: str | None) -> None:
    """Check a ledger offline: segment hashes, seal signatures and chain, checkpoints, consistency
    proofs, Merkle roots, every event's signature and session chain, missing or extra files.

    One line per problem, then a summary; exit status 1 if anything is wrong.
    """
    root, keyring, origin = _verify_target(ledger_path, keyring_path, config_path)
    if not root.is_dir():
        raise VerifyError(f"{root}: no such ledger directory")
    report = _run_verify(root, keyring, origin)
    witnessed = check_ledger(root, keyring, [p.read_bytes() for p in checkpoints], witnesses)
    for line in witnessed:
        click.echo(line)
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(report.summary())
    if not report.ok or witnessed:
        sys.exit(1)


commands: list[click.Command] = [ledger, verify]
