"""The keys of a `[[proxy]]` entry with `protocol = "http"` or `"kubernetes"` (the rest is the core's).

* `upstream`: the target's base URL, `http://host:port[/base]` or `https://…` (TLS verified:
  `upstream_tls` defaults to `verify-full` for https, `upstream_ca` names the CA; `disable` is refused
  there, the scheme says which it is).
* The credential the proxy alone holds, injected into every request it relays (the client's own
  `Authorization` — its OIDC token — is removed first): `upstream_bearer_file`/`_env` (a bearer
  token), `upstream_basic_file`/`_env` (`user:password`), or `upstream_client_cert`/`_key` (mTLS;
  https only; it may come with bearer or basic). At most one of bearer and basic; none is allowed (a
  target that needs no credential).
  Files are read once, at start-up.
* `max_body_bytes` (default 1 MiB): how much of one body is buffered for decoding, masking and
  display; `max_header_bytes` (default 64 KiB): the largest request or response head.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from urllib.parse import urlsplit

from ingest.settings import Table
from proxy.core.settings import ListenerSettings, UpstreamTLS
from proxy.settings import ProxySettings

DEFAULT_MAX_BODY = 1 << 20
DEFAULT_MAX_HEADER = 64 << 10


@dataclass(frozen=True)
class HttpUpstream:
    scheme: str
    host: str
    port: int
    base_path: str  # "" or "/prefix" (no trailing slash)

    @property
    def netloc(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    def describe(self) -> str:
        """scheme://host:port/base, for events: never the credential."""
        return f"{self.scheme}://{self.netloc}{self.base_path}"


@dataclass(frozen=True)
class HttpSettings:
    listener: ListenerSettings
    upstream: HttpUpstream
    upstream_tls: UpstreamTLS
    authorization: bytes | None  # the Authorization header value the proxy sends; never logged or recorded
    credential: str  # what the proxy presents, for events: bearer | basic | client_cert | bearer+client_cert | … | none
    max_body: int
    max_header: int

    @property
    def name(self) -> str:
        return self.listener.name

    @classmethod
    def from_config(cls, proxy: ProxySettings, default_fail_open: bool = False) -> "HttpSettings":
        t = proxy.table
        upstream = _upstream(t, proxy.upstream)
        if upstream.scheme == "https" and "upstream_tls" not in t.raw:
            tls_table = Table(t.source, t.name, {**t.raw, "upstream_tls": "verify-full"})
        elif upstream.scheme == "http" and t.raw.get("upstream_tls", "disable") != "disable":
            raise t.error("upstream_tls", "needs an https:// upstream")
        elif upstream.scheme == "https" and t.raw["upstream_tls"] == "disable":
            # it would send the requests, the injected credential with them, in clear to an https target
            raise t.error("upstream_tls", 'cannot be "disable" with an https:// upstream; use http:// for plaintext')
        else:
            tls_table = t
        upstream_tls = UpstreamTLS.from_table(tls_table, upstream.host)
        bearer, basic = t.secret("upstream_bearer"), t.secret("upstream_basic")
        if bearer is not None and basic is not None:
            raise t.error("upstream_bearer", "set upstream_bearer_* or upstream_basic_*, not both")
        if basic is not None and ":" not in basic:
            raise t.error("upstream_basic", "expected user:password")
        if bearer is not None:
            authorization, kinds = b"Bearer " + bearer.strip().encode(), ["bearer"]
        elif basic is not None:
            authorization, kinds = b"Basic " + base64.b64encode(basic.encode()), ["basic"]
        else:
            authorization, kinds = None, []
        if "upstream_client_cert" in t.raw:  # with https only (UpstreamTLS refuses it otherwise); a header too, or not
            kinds.append("client_cert")
        return cls(
            listener=ListenerSettings.from_settings(proxy, default_fail_open),
            upstream=upstream,
            upstream_tls=upstream_tls,
            authorization=authorization,
            credential="+".join(kinds) or "none",
            max_body=t.int("max_body_bytes", DEFAULT_MAX_BODY, minimum=1024),
            max_header=t.int("max_header_bytes", DEFAULT_MAX_HEADER, minimum=1024),
        )


def _upstream(t: Table, url: str) -> HttpUpstream:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise t.error("upstream", f"expected http://host:port or https://host:port, got {url!r}")
    if parts.username or parts.password:
        raise t.error("upstream", "credentials are never inline; use upstream_bearer_* or upstream_basic_*")
    if parts.query or parts.fragment:
        raise t.error("upstream", f"expected a base URL without query or fragment, got {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise t.error("upstream", f"invalid port in {url!r}") from None
    return HttpUpstream(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))
