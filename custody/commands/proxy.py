"""`custody proxy`, `custody login` / `logout`, `custody token`, `custody token issue` and `custody kubeconfig`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
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
    from proxy.server import ProxyService, ServiceOptions, pin_relay

    config = load_config(config_path)
    recorder_cpus = pin_relay(config.cpus)  # before the service starts its threads: they inherit the relay's CPUs
    service = ProxyService(config, ServiceOptions(max_queue, producer_name, recorder_cpus))

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


def _login_settings(config_path: str | None):
    config = load_config(config_path)
    if config.login is None:
        raise ConfigError(f"{config.path}: [login] is not set: name your identity provider's client_id there "
                          "(issuer, scopes, audience: see the README's Identity section)")
    return config.login


@click.command()
@click.option("--flow", type=click.Choice(["device", "code"]), default=None,
              help="device: enter a code on any device (RFC 8628); code: a browser on this machine "
                   "(authorization code + PKCE, loopback redirect). Default: [login] flow.")
@click.option("--no-browser", is_flag=True, help="Print the URL instead of opening a browser.")
@click.option("--timeout", type=click.FloatRange(min=1), default=300, show_default=True,
              help="Seconds to wait for the browser (code flow).")
@config_option
def login(flow: str | None, no_browser: bool, timeout: float, config_path: str | None) -> None:
    """Log in to the configured OIDC provider; the tokens are cached (0600) for `custody token`."""
    import webbrowser

    from proxy.login import TokenCache, code_flow, device_flow, discover

    settings = _login_settings(config_path)
    discovery = discover(settings)
    flow = flow or settings.flow

    def show(code) -> None:
        click.echo(f"To log in, open {code.verification_uri} and enter the code {code.user_code}", err=True)
        if code.verification_uri_complete:
            click.echo(f"  (or open {code.verification_uri_complete})", err=True)

    def open_url(url: str) -> None:
        if no_browser or not webbrowser.open(url):
            click.echo(f"Open this URL in a browser on this machine to log in:\n  {url}", err=True)

    if flow == "device":
        tokens = device_flow(settings, discovery, show)
    else:
        tokens = code_flow(settings, discovery, open_url, timeout)
    TokenCache(settings.token_cache).put(settings.cache_key, tokens)
    click.echo(f"custody: logged in to {settings.issuer}; token cached in {settings.token_cache}", err=True)


@click.command()
@config_option
def logout(config_path: str | None) -> None:
    """Forget the cached tokens of the configured identity provider and client."""
    from proxy.login import TokenCache

    settings = _login_settings(config_path)
    TokenCache(settings.token_cache).put(settings.cache_key, None)
    click.echo(f"custody: tokens for {settings.issuer} removed from {settings.token_cache}", err=True)


@click.group(invoke_without_command=True)
@click.option("--min-valid", type=click.FloatRange(min=0), default=30, show_default=True,
              help="Refresh first when the cached token has fewer seconds left than this.")
@click.option("--format", "output_format", type=click.Choice(["token", "exec-credential"]), default="token",
              show_default=True, help="exec-credential: a client.authentication.k8s.io ExecCredential (JSON) "
                                      "with the token and its expirationTimestamp, for kubectl (custody kubeconfig).")
@config_option
@click.pass_context
def token(ctx: click.Context, min_valid: float, output_format: str, config_path: str | None) -> None:
    """Print the access token `custody login` cached, refreshed when needed: PGPASSWORD=$(custody token) psql ...

    `custody token issue` mints a dev-only token instead.
    """
    if ctx.invoked_subcommand is not None:
        return
    from proxy.login import current_credential, exec_credential

    token, expires_at = current_credential(_login_settings(config_path), min_valid)
    if output_format == "exec-credential":
        click.echo(json.dumps(exec_credential(token, expires_at, os.environ.get("KUBERNETES_EXEC_INFO"))))
    else:
        click.echo(token)


@token.command("issue")
@click.option("--sub", "subject", required=True, help="Subject (sub); also the user name to connect as.")
@click.option("--groups", default="", help="Comma-separated groups.")
@click.option("--email", default=None, help="Email claim (default: none).")
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


def _plugin_command() -> tuple[str, list[str]]:
    """How kubectl runs this custody: the `custody` script beside this Python, on PATH, or `python -m custody`."""
    import shutil

    beside = os.path.join(os.path.dirname(sys.executable), "custody")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside, []
    found = shutil.which("custody")
    if found:
        return os.path.abspath(found), []
    return sys.executable, ["-m", "custody"]


@click.command()
@click.option("--proxy", "proxy_name", default=None,
              help="The [[proxy]] (protocol = \"kubernetes\") to reach; needed when there are several.")
@click.option("--server", default=None,
              help="The URL kubectl connects to (default: https:// and the proxy's listen address); needed "
                   "when it listens on 0.0.0.0, ::, or port 0.")
@click.option("--certificate-authority", "ca_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="PEM file of the CA kubectl verifies the proxy's certificate with (default: the proxy's "
                   "tls_cert itself, pinned).")
@click.option("--system-roots", is_flag=True,
              help="Embed no CA: kubectl verifies the proxy's certificate with the system's roots.")
@click.option("--namespace", default=None, help="The context's namespace.")
@click.option("--context", "context_name", default=None, help="The cluster/user/context name (default: the proxy's).")
@click.option("--output", "-o", "output", default="-", show_default=True,
              help="File to write (mode 0600), or - for stdout.")
@config_option
def kubeconfig(proxy_name: str | None, server: str | None, ca_file: str | None, system_roots: bool,
               namespace: str | None, context_name: str | None, output: str, config_path: str | None) -> None:
    """Write a kubeconfig for a Kubernetes proxy whose user runs `custody token` (an exec credential plugin).

    kubectl --kubeconfig FILE get pods then uses the token `custody login` cached, refreshed when needed.
    """
    from pathlib import Path

    from proxy.http.kubeconfig import kubeconfig as build, to_yaml

    config = load_config(config_path)
    _login_settings(config_path)  # the plugin would fail on every kubectl run without [login]
    clusters = [p for p in config.proxies if p.protocol == "kubernetes"]
    if proxy_name is not None:
        chosen = [p for p in clusters if p.name == proxy_name]
        if not chosen:
            names = ", ".join(p.name for p in clusters) or "none"
            raise ConfigError(f"{config.path}: no [[proxy]] named {proxy_name!r} with protocol = \"kubernetes\" "
                              f"(there are: {names})")
    elif len(clusters) != 1:
        raise ConfigError(f"{config.path}: " + ("no [[proxy]] has protocol = \"kubernetes\"" if not clusters else
                          "several Kubernetes proxies; name one with --proxy: "
                          + ", ".join(p.name for p in clusters)))
    else:
        chosen = clusters
    settings = chosen[0]
    tls_cert = settings.table.path("tls_cert", None)
    if tls_cert is None:
        raise ConfigError(f"{config.path}: [[proxy]] {settings.name} has no tls_cert: kubectl would send the "
                          "token in clear; give the proxy tls_cert/tls_key")
    if server is None:
        host, _, port = settings.listen.rpartition(":")
        host = host.strip("[]")
        if host in ("", "0.0.0.0", "::") or port == "0":
            raise ConfigError(f"[[proxy]] {settings.name} listens on {settings.listen}: say where kubectl "
                              "reaches it with --server https://HOST:PORT")
        server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    if not server.startswith("https://"):
        raise click.UsageError("--server must be an https:// URL (the token is a credential)")
    if system_roots and ca_file:
        raise click.UsageError("--system-roots and --certificate-authority exclude each other")
    ca_pem = None if system_roots else Path(ca_file or tls_cert).read_bytes()
    command, args = _plugin_command()
    args += ["token", "--format", "exec-credential", "--config", str(Path(config.path).resolve())]
    document = build(context_name or settings.name, server, command, args, ca_pem, namespace,
                     install_hint="custody is not installed where kubectl looks; log in with `custody login`")
    text = to_yaml(document)
    if output == "-":
        click.echo(text, nl=False)
        return
    path = Path(output)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
    click.echo(f"custody: wrote {path} (cluster {server}, user: custody token); "
               f"kubectl --kubeconfig {path} get pods", err=True)


commands: list[click.Command] = [proxy, token, login, logout, kubeconfig]
