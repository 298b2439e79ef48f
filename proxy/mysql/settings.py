"""The MySQL keys of one `[[proxy]]` entry with `protocol = "mysql"` (the rest is the core's).

Read once at start-up, so that a wrong key is a one-line error naming the
file, table and key before any client connects.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ingest.settings import Table
from proxy.core.settings import DatabaseSettings, DatabaseUpstream, database_upstream
from proxy.settings import ProxySettings

DEFAULT_MAX_PACKET = 64 << 20
DEFAULT_SERVER_VERSION = "5.5.5-10.11.0-MariaDB-custody"


@dataclass(frozen=True)
class MysqlSettings(DatabaseSettings):
    max_packet: int
    server_version: str

    @classmethod
    def from_config(cls, proxy: ProxySettings, default_fail_open: bool = False) -> "MysqlSettings":
        t = proxy.table
        return cls(
            **DatabaseSettings.common(proxy, default_fail_open, _upstream(t, proxy.upstream)),
            max_packet=t.int("max_message_bytes", DEFAULT_MAX_PACKET, minimum=1024),
            server_version=t.str("server_version", DEFAULT_SERVER_VERSION),
        )


def _upstream(t: Table, url: str) -> DatabaseUpstream:
    """mysql://user@host:port/database; no password configured means an empty one."""
    upstream = database_upstream(t, url, ("mysql", "mariadb"), 3306)
    return replace(upstream, password=upstream.password or "")
