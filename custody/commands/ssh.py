"""`custody ssh-login`: a verified OIDC token, exchanged at the SSH proxy for a short-lived OpenSSH user certificate.

OpenSSH's `ssh` reads a password into a 1,024-byte buffer, so a long RS256
token cannot be typed or askpass'd as the password. This command logs in to
the SSH proxy with asyncssh (no such limit) with the token as the password,
sends the user's public key on the subsystem the proxy answers itself
(`proxy.ssh.certificates.CERT_SUBSYSTEM`) and writes the certificate it
gets beside the key (`KEY-cert.pub`, where `ssh -i KEY` looks for it). The
proxy verified the token like any login and signed with its own CA, so the
certificate says no more than the token did: its username as the principal,
valid until the token expires.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import click

from custody.config import config_option, load_config
from ingest.settings import ConfigError

DEFAULT_KEY = "~/.ssh/id_ed25519"


@click.command("ssh-login")
@click.option("--proxy", "proxy_name", default=None, help="The [[proxy]] (protocol = \"ssh\") to log in at "
                                                          "(default: the only one).")
@click.option("--address", default=None, help="HOST:PORT where the proxy is reached (default: its listen).")
@click.option("--key", "key_path", default=DEFAULT_KEY, show_default=True,
              help="The private key the certificate is for (an ed25519 key is made when missing).")
@click.option("--host-key-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="The proxy's public host key, pinned (default: the .pub beside its host_key_file).")
@click.option("--token-env", default=None, help="Read the token from this environment variable instead of "
                                                "the cache `custody login` fills.")
@click.option("--user", default=None, help="The SSH user (default: the token's username claim).")
@click.option("--timeout", type=click.FloatRange(min=1), default=30, show_default=True)
@config_option
def ssh_login(proxy_name: str | None, address: str | None, key_path: str, host_key_file: str | None,
              token_env: str | None, user: str | None, timeout: float, config_path: str | None) -> None:
    """Get an SSH certificate for your key from the SSH proxy; then plain `ssh -i KEY USER@PROXY` works."""
    import asyncssh

    config = load_config(config_path)
    settings = _ssh_proxy(config, proxy_name)
    host, port = _address(address or settings.listen, settings.name)
    pinned = _host_key(settings, host_key_file)
    token = _token(config_path, token_env)
    user = user or _username(token, config.identity.username_claim if config.identity else "sub")
    key_file = Path(os.path.expanduser(key_path))
    key = _user_key(key_file)

    async def exchange() -> bytes:
        async with asyncssh.connect(host, port, username=user, password=token, known_hosts=([pinned], [], []),
                                    client_keys=None, agent_path=None, config=None, preferred_auth="password",
                                    connect_timeout=timeout) as conn:
            from proxy.ssh.certificates import CERT_SUBSYSTEM

            process = await conn.create_process(subsystem=CERT_SUBSYSTEM, encoding=None)
            try:
                process.stdin.write(key.export_public_key())
                process.stdin.write_eof()
            except (BrokenPipeError, OSError):
                pass  # the proxy refused at once: its reason is on stderr
            done = await process.wait(timeout=timeout)
            if done.exit_status != 0:
                raise click.ClickException(
                    (done.stderr or b"").decode("utf-8", "replace").strip() or f"exit status {done.exit_status}")
            return done.stdout

    try:
        line = asyncio.run(exchange())
    except (OSError, asyncio.TimeoutError, asyncssh.Error) as exc:
        raise click.ClickException(f"ssh-login at {host}:{port}: {type(exc).__name__}: {exc}") from None
    cert = asyncssh.import_certificate(line)
    if cert.key.public_data != key.public_data:
        raise click.ClickException("the proxy answered with a certificate for another key")
    cert_file = key_file.with_name(key_file.name + "-cert.pub")
    cert_file.write_bytes(line)
    from proxy.ssh.certificates import Fields

    until = datetime.fromtimestamp(Fields.of(cert).valid_before, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    click.echo(f"custody: wrote {cert_file} for {', '.join(cert.principals)}, valid until {until}; "
               f"ssh -i {key_file} -p {port} {user}@{host}", err=True)


def _ssh_proxy(config, name: str | None):
    candidates = [p for p in config.proxies if p.protocol == "ssh" and (name is None or p.name == name)]
    if len(candidates) == 1:
        return candidates[0]
    what = f"no SSH [[proxy]] named {name!r}" if name else (
        "no [[proxy]] has protocol = \"ssh\"" if not candidates else "several SSH proxies; name one with --proxy")
    raise ConfigError(f"{config.path}: {what}")


def _address(text: str, name: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::") or not port.isdigit() or port == "0":
        raise click.UsageError(f"[[proxy]] {name} listens on {text}: say where it is reached with --address HOST:PORT")
    return host, int(port)


def _host_key(settings, path: str | None):
    import asyncssh

    if path is None:
        private = settings.table.path("host_key_file", None)
        if private is None:
            raise ConfigError(f"[[proxy]] {settings.name} has no host_key_file: pin its key with --host-key-file")
        path = str(private) + ".pub"
    try:
        return asyncssh.read_public_key(path)
    except (OSError, asyncssh.KeyImportError) as exc:
        raise ConfigError(f"cannot read the proxy's host key {path}: {exc}") from None


def _token(config_path: str | None, env: str | None) -> str:
    if env is not None:
        token = os.environ.get(env, "").strip()
        if not token:
            raise click.UsageError(f"--token-env {env}: the variable is not set")
        return token
    from custody.commands.proxy import _login_settings
    from proxy.login import current_credential

    return current_credential(_login_settings(config_path), 60)[0]


def _username(token: str, claim: str) -> str:
    """The token's username claim, unverified: only to name the SSH user; the proxy verifies the token."""
    try:
        payload = token.split(".")[1]
        value = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))[claim]
    except (IndexError, ValueError, KeyError, TypeError):
        raise click.UsageError(f"cannot read the token's {claim!r} claim: name the SSH user with --user") from None
    if not isinstance(value, str) or not value:
        raise click.UsageError(f"the token's {claim!r} claim is not a user name: name the SSH user with --user")
    return value


def _user_key(path: Path):
    """The user's private key; a new ed25519 one (0600, its .pub beside it) when there is none."""
    import asyncssh

    if not path.exists():
        from custody.init import write_ssh_host_key

        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_ssh_host_key(path, "custody ssh-login")
    try:
        return asyncssh.read_private_key(str(path))
    except (OSError, asyncssh.KeyImportError) as exc:
        raise click.UsageError(f"cannot read the key {path}: {exc} (ssh-login needs an unencrypted key, or "
                               "name another with --key)") from None


commands: list[click.Command] = [ssh_login]
