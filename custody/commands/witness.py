"""`custody witness`: cosign the ledger's checkpoints, fed over custody.seals and over HTTP (C2SP add-checkpoint)."""

from __future__ import annotations

import signal
import threading

import click

from custody.config import config_option, load_config
from ingest.errors import CustodyError
from ingest.keys import Keyring, load_key_file
from ledger.witness import SealFeed, Witness, cosigner_for, custody_log_keys, serve


@click.command("witness")
@click.option("--no-feed", is_flag=True, help="Serve HTTP add-checkpoint only; do not read custody.seals.")
@config_option
def witness(no_feed: bool, config_path: str | None) -> None:
    """Witness the ledger: verify each new checkpoint against the last one cosigned (consistency proof),
    refuse forks and rollbacks (published to custody.violations), and return C2SP cosignature/v1.

    Reads custody.seals (cosignatures go to custody.cosignatures, which the ledger stores beside its seals)
    and serves POST /add-checkpoint on [witness] listen for any log's witness tooling. SIGTERM stops it.
    """
    config = load_config(config_path)
    settings = config.witness
    key = load_key_file(settings.key)
    keyring = Keyring.load(config.keys.keyring)
    core = Witness(settings.state_dir, cosigner_for(key), custody_log_keys(keyring, settings.logs))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server = None
    if settings.listen:
        host, _, port = settings.listen.rpartition(":")
        try:
            server = serve(core, host, int(port))
        except OSError as exc:
            raise CustodyError(f"[witness] listen {settings.listen}: {exc.strerror}") from None
        threading.Thread(target=server.serve_forever, name="witness-http", daemon=True).start()
    where = f"; add-checkpoint on http://{host}:{server.server_address[1]}" if server is not None else ""
    click.echo(f"witness: {core.verifier.vkey} for {', '.join(settings.logs)}{where}", err=True)
    feed = None if no_feed else SealFeed(core, config.kafka, settings.group)
    try:
        while not stop.is_set():
            if feed is not None:
                feed.step(0.2)
            else:
                stop.wait(0.5)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        if feed is not None:
            feed.close()
        core.close()


commands: list[click.Command] = [witness]
