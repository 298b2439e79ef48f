"""The protocol-neutral part of one `[[proxy]]` entry: where to listen, TLS to clients, deadlines, fail mode.

Read once at start-up, so that a wrong key is a one-line error naming the
file, table and key before any client connects. Each front end reads its own
keys (the upstream URL, message size limits…) from the same table.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from ingest.settings import Table
from proxy.settings import ProxySettings

DEFAULT_STARTUP_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class ListenerSettings:
    name: str
    listen_host: str
    listen_port: int
    tls: ssl.SSLContext | None
    startup_timeout: float
    connect_timeout: float
    fail_open: bool

    @classmethod
    def from_settings(cls, proxy: ProxySettings, default_fail_open: bool = False) -> "ListenerSettings":
        t = proxy.table
        host, port = parse_listen(t, proxy.listen)
        return cls(
            name=proxy.name,
            listen_host=host,
            listen_port=port,
            tls=client_tls_context(t),
            startup_timeout=t.float("startup_timeout", DEFAULT_STARTUP_TIMEOUT, minimum=0.1),
            connect_timeout=t.float("upstream_connect_timeout", DEFAULT_CONNECT_TIMEOUT, minimum=0.1),
            fail_open=t.bool("fail_open", default_fail_open),
        )


def parse_listen(t: Table, listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise t.error("listen", f"expected host:port, got {listen!r}")
    return host.strip("[]"), int(port)


def client_tls_context(t: Table) -> ssl.SSLContext | None:
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
