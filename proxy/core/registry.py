"""Which front end serves `[[proxy]] protocol = "..."`.

A front end registers here with one line: the protocol's name and where its
`Protocol` class lives (imported only when a listener of that protocol is
configured, so one protocol's dependencies never load for another's).
"""

from __future__ import annotations

import importlib

from ingest.settings import ConfigError
from proxy.settings import ProxySettings

from .frontend import Protocol

FRONT_ENDS: dict[str, str] = {
    "postgres": "proxy.postgres.frontend:PostgresProtocol",
    "ssh": "proxy.ssh.frontend:SSHProtocol",
    "mysql": "proxy.mysql.frontend:MysqlProtocol",
    "http": "proxy.http.frontend:HttpProtocol",
    "kubernetes": "proxy.http.frontend:KubernetesProtocol",
}


def protocol_for(proxy: ProxySettings, fail_open: bool) -> Protocol:
    """The listener-wide protocol object of one `[[proxy]]` entry; a protocol not built yet is a config error."""
    where = FRONT_ENDS.get(proxy.protocol)
    if where is None:
        built = ", ".join(sorted(FRONT_ENDS))
        raise proxy.table.error("protocol", f"{proxy.protocol!r} has no front end yet (built: {built})")
    module, _, name = where.partition(":")
    cls: type[Protocol] = getattr(importlib.import_module(module), name)
    return cls.from_settings(proxy, fail_open)
