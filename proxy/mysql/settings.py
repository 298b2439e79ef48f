"""The MySQL keys of one `[[proxy]]` entry with `protocol = "mysql"` (the rest is the core's).

Read once at start-up, so that a wrong key is a one-line error naming the
file, table and key before any client connects.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ingest.settings import Table
from proxy.core.settings import DatabaseUpstream, ListenerSettings, UpstreamTLS, database_upstream, string_list
from proxy.settings import ProxySettings

DEFAULT_MAX_PACKET = 64 << 20
DEFAULT_SERVER_VERSION = "5.5.5-10.11.0-MariaDB-custody"


@dataclass(frozen=True)
class MysqlSettings:
    listener: ListenerSettings
    upstream: DatabaseUpstream
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


def _upstream(t: Table, url: str) -> DatabaseUpstream:
    """mysql://user@host:port/database; no password configured means an empty one."""
    upstream = database_upstream(t, url, ("mysql", "mariadb"), 3306)
    return replace(upstream, password=upstream.password or "")
