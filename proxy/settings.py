"""`[identity]`, `[[proxy]]` and `[cpus]`, and what a proxy process reads of the whole config.

`ServiceConfig` is a protocol rather than `custody.config.Config` itself so that
the proxy never imports the command above it; `Config` satisfies it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ingest.settings import ConfigError, KafkaSettings, KeySettings, SpoolSettings, Table

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


def parse_cpu_list(text: str) -> frozenset[int]:
    """CPU numbers in taskset's list form ("0", "1-3", "0,2-3"); ValueError says what is wrong."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{part.strip()!r} is not a CPU number or range (e.g. \"0\", \"1-3\", \"0,2-3\")")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"range {part.strip()!r} runs backwards")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


@dataclass(frozen=True)
class CpuSettings:
    """`[cpus]` (Linux): the CPUs `custody proxy`'s two processes may run on; absent, any (the kernel places them).

    Why: on a small machine the kernel often puts the recorder (signing, spooling, sending in bursts) on the core
    the relay's event loop is about to be woken on, and a query then waits for it. On 2 cores (bench/pg_proxy.py,
    two runs) `SELECT 1` through the proxy had a p99 2.4-2.7x the bare relay's unpinned and 1.0-1.7x with the
    relay on CPU 0 and the recorder on CPU 1, and pgbench ran 13-34 % (select-only) and 25-29 % (tpcb-like) faster.
    Not a default: proxies sharing a host would all take the same CPU, and a pinned process cannot move off a busy
    one."""

    source: Path | None = None
    """The config file, named in errors."""
    relay: frozenset[int] | None = None
    """The proxy's own process: its event loop relays and records every session (one core's worth at most)."""
    recorder: frozenset[int] | None = None
    """Its recorder process; unset while `relay` is set, the CPUs the relay is not given."""

    @classmethod
    def from_table(cls, t: Table) -> CpuSettings:
        return cls(source=t.source, relay=cls._cpus(t, "relay"), recorder=cls._cpus(t, "recorder"))

    @staticmethod
    def _cpus(t: Table, key: str) -> frozenset[int] | None:
        text = t.str(key, None)
        if text is None:
            return None
        try:
            return parse_cpu_list(text)
        except ValueError as exc:
            raise t.error(key, str(exc)) from None

    def placement(self, available: frozenset[int]) -> tuple[frozenset[int] | None, frozenset[int] | None]:
        """The relay's and the recorder's CPUs among `available` (this process's now), None where unpinned;
        ConfigError for a CPU this process may not run on."""
        for name, cpus in (("relay", self.relay), ("recorder", self.recorder)):
            if cpus is not None and not cpus <= available:
                missing = ", ".join(map(str, sorted(cpus - available)))
                raise ConfigError(f"{self.source}: [cpus] {name}: CPU {missing} not available to this process "
                                  f"(it may run on {', '.join(map(str, sorted(available)))})")
        recorder = self.recorder
        if recorder is None and self.relay is not None and available - self.relay:
            recorder = available - self.relay
        return self.relay, recorder


def available_cpus() -> frozenset[int] | None:
    """The CPUs this process may run on; None where the platform cannot place processes (not Linux)."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    return frozenset(getaffinity(0)) if getaffinity else None


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
