"""The settings of one `[[proxy]]` entry with `protocol = "postgres"`.

Read once at start-up from the entry's config table, so that a wrong key is a
one-line error naming the file, table and key before any client connects.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ingest.settings import Table
from proxy.settings import ProxySettings

DEFAULT_MAX_CLIENT_MESSAGE = 16 << 20
DEFAULT_MAX_SERVER_MESSAGE = 256 << 20
DEFAULT_STARTUP_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Upstream:
    """Where and as whom the proxy logs in; the client never learns any of it."""

    host: str
    port: int
    database: str
    user: str
    password: str | None

    def describe(self) -> str:
        """host:port/database, for events: never the user or the password."""
        return f"{self.host}:{self.port}/{self.database}"


@dataclass(frozen=True)
class PostgresSettings:
    name: str
    listen_host: str
    listen_port: int
    upstream: Upstream
    tls: ssl.SSLContext | None
    max_client_message: int
    max_server_message: int
    startup_timeout: float
    connect_timeout: float
    fail_open: bool

    @classmethod
    def from_config(cls, proxy: ProxySettings, default_fail_open: bool = False) -> "PostgresSettings":
        t = proxy.table
        host, port = parse_listen(t, proxy.listen)
        return cls(
            name=proxy.name,
            listen_host=host,
            listen_port=port,
            upstream=_upstream(t, proxy.upstream),
            tls=_tls_context(t),
            max_client_message=t.int("max_message_bytes", DEFAULT_MAX_CLIENT_MESSAGE, minimum=1024),
            max_server_message=t.int("max_server_message_bytes", DEFAULT_MAX_SERVER_MESSAGE, minimum=1024),
            startup_timeout=t.float("startup_timeout", DEFAULT_STARTUP_TIMEOUT, minimum=0.1),
            connect_timeout=t.float("upstream_connect_timeout", DEFAULT_CONNECT_TIMEOUT, minimum=0.1),
            fail_open=t.bool("fail_open", default_fail_open),
        )


def parse_listen(t: Table, listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise t.error("listen", f"expected host:port, got {listen!r}")
    return host.strip("[]"), int(port)


def _upstream(t: Table, url: str) -> Upstream:
    """postgresql://user@host:port/database; the password comes from upstream_password_file/_env."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise t.error("upstream", f"expected postgresql://user@host:port/database, got {url!r}")
    if parts.password is not None:
        raise t.error("upstream", "secrets are never inline; use upstream_password_file or upstream_password_env")
    try:
        port = parts.port or 5432
    except ValueError:
        raise t.error("upstream", f"invalid port in {url!r}") from None
    if not parts.hostname or not parts.username:
        raise t.error("upstream", f"expected postgresql://user@host:port/database, got {url!r}")
    database = unquote(parts.path.lstrip("/")) or unquote(parts.username)
    return Upstream(parts.hostname, port, database, unquote(parts.username), t.secret("upstream_password"))


def _tls_context(t: Table) -> ssl.SSLContext | None:
    """TLS towards clients when tls_cert is set; client_ca verifies client certificates."""
    cert, key, client_ca = t.path("tls_cert", None), t.path("tls_key", None), t.path("client_ca", None)
    require_cert = t.bool("require_client_cert", False)
    if cert is None:
        for name, value in (("tls_key", key), ("client_ca", client_ca)):
            if value is not None:
                raise t.error(name, "needs tls_cert")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(Path(cert), Path(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        raise t.error("tls_cert", f"cannot load {cert} / {key}: {exc}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(Path(client_ca))
        except (OSError, ssl.SSLError) as exc:
            raise t.error("client_ca", f"cannot load {client_ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED if require_cert else ssl.CERT_OPTIONAL
    elif require_cert:
        raise t.error("require_client_cert", "needs client_ca")
    return context
