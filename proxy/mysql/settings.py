"""The MySQL keys of one `[[proxy]]` entry with `protocol = "mysql"` (the rest is the core's).

Read once at start-up, so that a wrong key is a one-line error naming the
file, table and key before any client connects.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from ingest.settings import Table
from proxy.core.settings import ListenerSettings, UpstreamTLS, string_list
from proxy.settings import ProxySettings

DEFAULT_MAX_PACKET = 64 << 20
DEFAULT_SERVER_VERSION = "5.5.5-10.11.0-MariaDB-custody"


@dataclass(frozen=True)
class Upstream:
    """Where and as whom the proxy logs in; the client never learns any of it."""

    host: str
    port: int
    database: str | None
    user: str
    password: str

    def describe(self, database: str | None = None) -> str:
        """host:port/database, for events: never the user or the password."""
        return f"{self.host}:{self.port}/{database or self.database or ''}"


@dataclass(frozen=True)
class MysqlSettings:
    listener: ListenerSettings
    upstream: Upstream
    upstream_tls: UpstreamTLS
    databases: tuple[str, ...]  # what the client's schema may pick besides upstream.database; empty: ignored
    max_packet: int
    server_version: str

    @property
    def name(self) -> str:
        return self.listener.name

    @classmethod
    def from_config(cls, proxy: ProxySettings, default_fail_open: bool = False) -> "MysqlSettings":
        t = proxy.table
        upstream = _upstream(t, proxy.upstream)
        return cls(
            listener=ListenerSettings.from_settings(proxy, default_fail_open),
            upstream=upstream,
            upstream_tls=UpstreamTLS.from_table(t, upstream.host),
            databases=string_list(t, "databases"),
            max_packet=t.int("max_message_bytes", DEFAULT_MAX_PACKET, minimum=1024),
            server_version=t.str("server_version", DEFAULT_SERVER_VERSION),
        )


def _upstream(t: Table, url: str) -> Upstream:
    """mysql://user@host:port/database; the password comes from upstream_password_file/_env (absent: none)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mysql", "mariadb"):
        raise t.error("upstream", f"expected mysql://user@host:port/database, got {url!r}")
    if parts.password is not None:
        raise t.error("upstream", "secrets are never inline; use upstream_password_file or upstream_password_env")
    try:
        port = parts.port or 3306
    except ValueError:
        raise t.error("upstream", f"invalid port in {url!r}") from None
    if not parts.hostname or not parts.username:
        raise t.error("upstream", f"expected mysql://user@host:port/database, got {url!r}")
    database = unquote(parts.path.lstrip("/")) or None
    return Upstream(parts.hostname, port, database, unquote(parts.username), t.secret("upstream_password") or "")
