"""`custody proxy` and `custody token issue`."""

from __future__ import annotations

import asyncio
import signal
from datetime import timedelta

import click

from custody.config import config_option, load_config
from ingest.settings import ConfigError


@click.command()
@config_option
@click.option("--max-queue", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Events the recorder may fall behind by before the proxy stops reading from "
                   "clients (back-pressure: sessions slow down, none is ended); bounds what a proxy crash can lose.")
@click.option("--producer-name", default=None, help="This instance's name in events (default: HOST/proxy).")
def proxy(config_path: str | None, max_queue: int, producer_name: str | None) -> None:
    """Serve every [[proxy]] of the config until SIGINT/SIGTERM."""
    from proxy.server import ProxyService, ServiceOptions

    service = ProxyService(load_config(config_path), ServiceOptions(max_queue, producer_name))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await service.start()
        for p in service.proxies:
            host, port = p.address
            click.echo(f"proxy {p.settings.name}: {p.protocol.name} on {host}:{port} -> {p.protocol.upstream}")
        try:
            await stop.wait()
        finally:
            await service.stop()

    try:
        asyncio.run(main())
    finally:
        service.close()
        stats = service.recorder.stats
        click.echo(f"recorder: {stats.recorded}/{stats.queued} events recorded as {stats.events_written} "
                   f"({stats.frames} frames), {stats.refused} refused, throttled {stats.throttled} times; "
                   f"largest backlog {stats.max_backlog} events / {stats.max_backlog_frames} frames / "
                   f"{stats.max_backlog_bytes} bytes (the most a crash could have lost)")


@click.group()
def token() -> None:
    """OIDC access tokens for the proxies."""


@token.command("issue")
@click.option("--sub", "subject", required=True, help="Subject (sub); also the user name to connect as.")
@click.option("--groups", default="", help="Comma-separated groups.")
@click.option("--email", default=None)
@click.option("--ttl", type=click.IntRange(min=1), default=3600, show_default=True, help="Lifetime in seconds.")
@config_option
def issue(subject: str, groups: str, email: str | None, ttl: int, config_path: str | None) -> None:
    """DEV ONLY: mint a token from the dev identity provider that `custody init` created.

    Prints the token on stdout, e.g. `PGPASSWORD=$(custody token issue --sub alice@example.com) psql ...`.
    """
    from proxy.devidp import issue_token

    config = load_config(config_path)
    identity = config.identity
    if identity is None or identity.dev_signing_key is None:
        raise ConfigError(f"{config.path}: [identity] dev_signing_key is not set: no dev IdP to issue from "
                          "(production tokens come from your identity provider)")
    names = [g.strip() for g in groups.split(",") if g.strip()]
    click.echo(issue_token(identity.dev_signing_key, identity.issuer, identity.audience, subject, names,
                           email=email, ttl=timedelta(seconds=ttl)))
    click.echo("custody: DEV-ONLY token from the local dev identity provider; never use dev_signing_key in production",
               err=True)


commands: list[click.Command] = [proxy, token]
