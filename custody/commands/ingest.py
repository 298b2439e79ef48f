"""`custody keys …` and `custody broker`."""

from __future__ import annotations

import signal
import threading
from datetime import datetime, timezone
from pathlib import Path

import click

from custody.config import config_option, load_config
from ingest.broker import BrokerError, DevBroker
from ingest.keys import ROLES, Keyring, add_to_keyring, generate_key_file


@click.group()
def keys() -> None:
    """Signing keys and the keyring of trusted public keys."""


@keys.command("generate")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), default=None, help="What the key signs (default: NAME if it is a role).")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Private key file (default: NAME.key in the keyring's directory).")
@click.option("--keyring", "keyring_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Keyring to append the public key to (default: the config's [keys] keyring).")
@config_option
def generate(name: str, role: str | None, out: Path | None, keyring_path: Path | None, config_path: str | None) -> None:
    """Create a new Ed25519 key NAME (0600, never overwritten) and trust it in the keyring.

    Rotation: generate a new key, point the config at it, then revoke the old one.
    """
    role = role or name
    if role not in ROLES:
        raise click.UsageError(f"--role is required when NAME is not one of {', '.join(ROLES)}")
    if keyring_path is None:
        keyring_path = load_config(config_path).keys.keyring
    key = generate_key_file(out or keyring_path.parent / f"{name}.key", name)
    add_to_keyring(keyring_path, key, role)
    click.echo(f"{key.key_id}  {role}  written to {out or keyring_path.parent / f'{name}.key'}, trusted in {keyring_path}")


def _keyring_path(keyring_path: Path | None, config_path: str | None) -> Path:
    return keyring_path or load_config(config_path).keys.keyring


keyring_option = click.option("--keyring", "keyring_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                              help="Keyring file (default: the config's [keys] keyring).")


@keys.command("list")
@keyring_option
@config_option
def list_keys(keyring_path: Path | None, config_path: str | None) -> None:
    """The trusted keys, their roles and validity."""
    for key in Keyring.load(_keyring_path(keyring_path, config_path)):
        window = f"revoked {key.not_after.isoformat()}" if key.not_after else "valid"
        click.echo(f"{key.key_id}  {key.role:8}  {window}")


@keys.command("revoke")
@click.argument("key_id")
@click.option("--at", "at", default=None, help="Revocation time, ISO 8601 with offset (default: now). Events signed after it are rejected.")
@keyring_option
@config_option
def revoke(key_id: str, at: str | None, keyring_path: Path | None, config_path: str | None) -> None:
    """Stop trusting KEY_ID for anything signed after --at."""
    path = _keyring_path(keyring_path, config_path)
    try:
        when = datetime.fromisoformat(at) if at else datetime.now(timezone.utc)
    except ValueError:
        raise click.BadParameter(f"{at!r} is not an ISO 8601 time, e.g. 2026-11-25T12:00:00Z", param_hint="--at") from None
    if when.tzinfo is None:
        raise click.BadParameter("needs an offset, e.g. 2026-11-25T12:00:00Z", param_hint="--at")
    keyring = Keyring.load(path)
    keyring.revoke(key_id, when)
    keyring.save(path)
    click.echo(f"{key_id} revoked at {when.astimezone(timezone.utc).isoformat()}")


@click.command()
@click.option("--listen", default=None, help="host:port (default: the config's [kafka] embedded_listen).")
@config_option
def broker(listen: str | None, config_path: str | None) -> None:
    """Run the development Kafka broker (Tansu, memory storage) in the foreground."""
    listen = listen or load_config(config_path).kafka.embedded_listen
    dev = DevBroker(listen).start()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # `custody up` stops it with SIGTERM: Tansu goes too
        signal.signal(signum, lambda *_: stop.set())
    click.echo(f"dev broker listening on {dev.bootstrap} (memory storage; Ctrl-C stops it)")
    try:
        while not stop.wait(0.2):
            if not dev.running:
                raise BrokerError(f"dev broker exited with code {dev.wait()}")
    finally:
        dev.stop()


@click.group()
def violations() -> None:
    """The violations stream the SOC subscribes to (custody.violations)."""


@violations.command("tail")
@click.option("--follow", "-f", is_flag=True, help="Keep waiting for new violations.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "ocsf"]), default="table", show_default=True,
              help="ocsf: the OCSF documents of custody.violations.ocsf ([soc] ocsf = true), JSON lines.")
@click.option("--activity", is_flag=True, help="With --format ocsf: custody.activity.ocsf instead.")
@config_option
def tail(follow: bool, fmt: str, activity: bool, config_path: str | None) -> None:
    """Print violations from the start of the topic, as a table or JSON lines.

    Without --follow it stops once the topic has been quiet for 2 s.
    """
    from ingest import kafka
    from ingest.violations import encode, tail as read

    settings = load_config(config_path).kafka
    topic = ("activity.ocsf" if activity else "violations.ocsf") if fmt == "ocsf" else "violations"
    kafka.ensure_topics(settings, (topic,))
    consumer = kafka.consumer(settings, settings.topic(topic), group_id=None)
    try:
        for v in read(consumer, follow):
            if fmt in ("json", "ocsf"):
                click.echo(encode(v))
            else:
                who = (v["identity"] or {}).get("subject", "-")
                click.echo(f"{v['time'][:19]}  {v['severity']:8}  {v['category']:16}  {who:24}  "
                           f"{v['target'] or '-':16}  {v['reason']}: {v['statement'] or v['detail'] or ''}")
    finally:
        consumer.close()


@violations.command("forward")
@click.option("--syslog", "url", default=None, metavar="URL",
              help="udp://host:port, tcp://host:port or tls://host:port (default: [soc] syslog).")
@click.option("--format", "fmt", type=click.Choice(["ocsf", "custody"]), default=None,
              help="OCSF documents (the OCSF topics) or Custody's own shape (custody.violations); default [soc].")
@click.option("--ca", type=click.Path(dir_okay=False), default=None, help="TLS: the receiver's CA (default: [soc]).")
@config_option
def forward(url: str | None, fmt: str | None, ca: str | None, config_path: str | None) -> None:
    """Forward violations (and activity) to a syslog receiver, RFC 5424, until stopped; resumes where it left off."""
    import dataclasses
    import signal
    import threading

    from ingest.syslog import Destination, SyslogSink

    config = load_config(config_path)
    soc = dataclasses.replace(config.soc, **({"syslog_format": fmt} if fmt else {}))
    url = url or soc.syslog
    if not url:
        raise click.UsageError("no receiver: pass --syslog tcp://host:port or set [soc] syslog")
    destination = Destination.parse(url, Path(ca) if ca else soc.syslog_ca, soc.syslog_cert, soc.syslog_key)
    sink = SyslogSink(config.kafka, soc, destination)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    click.echo(f"forwarding {', '.join(soc.sink_topics())} to {destination} (Ctrl-C stops)", err=True)
    sink.run(stop)


commands: list[click.Command] = [keys, broker, violations]
