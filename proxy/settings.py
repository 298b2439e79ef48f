"""`[identity]` and `[[proxy]]`, and what a proxy process reads of the whole config.

`ServiceConfig` is a protocol rather than `custody.config.Config` itself so that
the proxy never imports the command above it; `Config` satisfies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ingest.settings import KafkaSettings, KeySettings, SpoolSettings, Table

PROTOCOLS = ("postgres", "mysql", "http", "kubernetes", "ssh")


@dataclass(frozen=True)
class IdentitySettings:
    issuer: str
    audience: str
    jwks: str | Path
    username_claim: str
    groups_claim: str
    dev_signing_key: Path | None
    leeway_seconds: float = 30.0  # clock skew allowed on exp/nbf; a session also ends this long after exp
    end_sessions_on_expiry: bool = True

    @classmethod
    def from_table(cls, t: Table) -> IdentitySettings | None:
        """None for an empty or absent `[identity]`: a config without callers to identify (e.g. ledger only)."""
        if not t.raw:
            return None
        return cls(
            issuer=t.str("issuer"),
            audience=t.str("audience"),
            jwks=t.path("jwks"),
            username_claim=t.str("username_claim", "sub"),
            groups_claim=t.str("groups_claim", "groups"),
            dev_signing_key=t.path("dev_signing_key", None),
            leeway_seconds=t.float("leeway_seconds", 30.0),
            end_sessions_on_expiry=t.bool("end_sessions_on_expiry", True),
        )


@dataclass(frozen=True)
class ProxySettings:
    """One `[[proxy]]` entry; protocol front ends read their own extra keys from `table`."""

    name: str
    protocol: str
    listen: str
    upstream: str
    policy: Path | None
    table: Table

    @classmethod
    def from_table(cls, t: Table) -> ProxySettings:
        protocol = t.str("protocol")
        if protocol not in PROTOCOLS:
            raise t.error("protocol", f"expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        return cls(
            name=t.str("name"),
            protocol=protocol,
            listen=t.str("listen"),
            upstream=t.str("upstream"),
            policy=t.path("policy", None),
            table=t,
        )


class ServiceConfig(Protocol):
    """The settings a proxy process runs on; `path` is the config file, named in errors."""

    @property
    def path(self) -> Path: ...

    @property
    def kafka(self) -> KafkaSettings: ...

    @property
    def keys(self) -> KeySettings: ...

    @property
    def identity(self) -> IdentitySettings | None: ...

    @property
    def spool(self) -> SpoolSettings: ...

    @property
    def proxies(self) -> tuple[ProxySettings, ...]: ...
