"""The protocol-neutral part of one `[[proxy]]` entry: where to listen, TLS to clients and to the target,
deadlines, fail mode.

Read once at start-up, so that a wrong key is a one-line error naming the
file, table and key before any client connects. Each front end reads its own
keys (the upstream URL, message size limits…) from the same table.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from typing import Any
from pathlib import Path
from urllib.parse import unquote, urlsplit

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


UPSTREAM_TLS_MODES = ("disable", "require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class UpstreamTLS:
    """TLS from the proxy to the target (`[[proxy]] upstream_tls`), with libpq's sslmode meanings.

    * `disable`: plaintext.
    * `require`: TLS, the certificate is not checked (anyone in the path can pose as the target).
    * `verify-ca`: TLS, the certificate must chain to `upstream_ca` (or the system's trust store).
    * `verify-full`: as verify-ca, and it must name the host the proxy connects to (SAN DNS name or IP).

    The default is `verify-full`, except for a loopback target (`disable`). Any
    protocol uses it: those that start TLS in-protocol (PostgreSQL's SSLRequest)
    yield `StartTLS(SERVER, context, server_hostname)`, the others pass it to
    `OpenUpstream`.
    """

    mode: str
    context: ssl.SSLContext | None
    server_hostname: str | None

    @property
    def enabled(self) -> bool:
        return self.context is not None

    @classmethod
    def from_table(cls, t: Table, host: str) -> "UpstreamTLS":
        """From `upstream_tls`, `upstream_ca`, `upstream_client_cert`/`_key`; `host` is where the proxy connects."""
        default = "disable" if is_loopback(host) else "verify-full"
        mode = t.str("upstream_tls", default)
        if mode not in UPSTREAM_TLS_MODES:
            raise t.error("upstream_tls", f"expected one of {', '.join(UPSTREAM_TLS_MODES)}, got {mode!r}")
        ca = t.path("upstream_ca", None)
        cert, key = t.path("upstream_client_cert", None), t.path("upstream_client_key", None)
        if mode == "disable":
            for name, value in (("upstream_ca", ca), ("upstream_client_cert", cert), ("upstream_client_key", key)):
                if value is not None:
                    raise t.error(name, 'has no effect with upstream_tls = "disable"')
            return cls(mode, None, None)
        if key is not None and cert is None:
            raise t.error("upstream_client_key", "needs upstream_client_cert")
        if mode == "require":
            if ca is not None:  # libpq would quietly verify then; say what is meant instead
                raise t.error("upstream_ca", 'is not used with upstream_tls = "require"; use "verify-ca" or '
                                             '"verify-full" to check the target\'s certificate')
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            if ca is None:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)  # the system's trust store
            else:
                try:
                    context.load_verify_locations(Path(ca))
                except (OSError, ssl.SSLError) as exc:
                    raise t.error("upstream_ca", f"cannot load {ca}: {exc}") from None
            context.verify_mode = ssl.CERT_REQUIRED
            context.check_hostname = mode == "verify-full"
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None:
            try:
                context.load_cert_chain(Path(cert), Path(key) if key else None)
            except (OSError, ssl.SSLError) as exc:
                raise t.error("upstream_client_cert", f"cannot load {cert} / {key}: {exc}") from None
        return cls(mode, context, host)


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1: a target on this machine."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def string_list(t: Table, key: str) -> tuple[str, ...]:
    """An optional list of non-empty strings (absent: empty)."""
    value = t.raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise t.error(key, f"expected a list of non-empty strings, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class DatabaseUpstream:
    """Where and as whom a database front end logs in (`postgresql://`, `mysql://` URLs); the client never
    learns the user or the password."""

    host: str
    port: int
    database: str | None
    user: str
    password: str | None

    def describe(self, database: str | None = None) -> str:
        """host:port/database, for events: never the user or the password."""
        return f"{self.host}:{self.port}/{database or self.database or ''}"


def database_upstream(t: Table, url: str, schemes: tuple[str, ...], default_port: int) -> DatabaseUpstream:
    """SCHEME://user@host:port/database, the password from upstream_password_file/_env (never inline)."""
    shape = f"{schemes[0]}://user@host:port/database"
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        raise t.error("upstream", f"expected {shape}, got {url!r}")
    if parts.password is not None:
        raise t.error("upstream", "secrets are never inline; use upstream_password_file or upstream_password_env")
    try:
        port = parts.port or default_port
    except ValueError:
        raise t.error("upstream", f"invalid port in {url!r}") from None
    if not parts.hostname or not parts.username:
        raise t.error("upstream", f"expected {shape}, got {url!r}")
    return DatabaseUpstream(parts.hostname, port, unquote(parts.path.lstrip("/")) or None, unquote(parts.username),
                            t.secret("upstream_password"))


@dataclass(frozen=True)
class DatabaseSettings:
    """What every database front end reads the same way: the listener, the held login, TLS to the target and
    the `databases` the client may pick besides the upstream's own (empty: the client's choice is ignored)."""

    listener: ListenerSettings
    upstream: DatabaseUpstream
    upstream_tls: UpstreamTLS
    databases: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.listener.name

    @staticmethod
    def common(proxy: ProxySettings, default_fail_open: bool, upstream: DatabaseUpstream) -> dict[str, Any]:
        """The shared fields as keyword arguments, for a front end's `from_config` to add its own to."""
        t = proxy.table
        return {"listener": ListenerSettings.from_settings(proxy, default_fail_open), "upstream": upstream,
                "upstream_tls": UpstreamTLS.from_table(t, upstream.host), "databases": string_list(t, "databases")}
