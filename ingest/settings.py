"""The typed TOML table reader every package parses its settings with, and the settings of ingest.

Each package owns its settings dataclasses and builds them from a `Table`;
`custody.config` only reads the file and hands each package its table. Errors
are one line naming the file, table and key. Secrets are never inline: a
setting `X_file` or `X_env` names where the secret lives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.errors import CustodyError

_REQUIRED = object()
_INLINE_SECRET_KEYS = {"password", "upstream_password", "secret", "private_key", "sasl_plain_password", "ssl_password", "upstream_bearer"}


class ConfigError(CustodyError):
    """A missing or wrong setting; the message names the file, table and key."""


class Table:
    """One TOML table with typed, self-explaining accessors."""

    def __init__(self, source: Path, name: str, raw: dict[str, Any]):
        self.source, self.name, self.raw = source, name, raw
        for key in raw:
            if key in _INLINE_SECRET_KEYS:
                raise self.error(key, f"secrets are never inline; use {key}_file or {key}_env")

    @property
    def base_dir(self) -> Path:
        return self.source.parent

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: [{self.name}] {key}: {problem}")

    def _get(self, key: str, default: Any) -> Any:
        if key in self.raw:
            return self.raw[key]
        if default is _REQUIRED:
            raise self.error(key, "missing (required)")
        return default

    def str(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default)
        if value is not default and (not isinstance(value, str) or not value):
            raise self.error(key, f"expected a non-empty string, got {value!r}")
        return value

    def int(self, key: str, default: Any = _REQUIRED, minimum: int = 0) -> Any:
        value = self._get(key, default)
        if value is not default and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise self.error(key, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def float(self, key: str, default: Any = _REQUIRED, minimum: float = 0.0) -> Any:
        value = self._get(key, default)
        if value is not default and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum):
            raise self.error(key, f"expected a number >= {minimum}, got {value!r}")
        return value

    def bool(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default)
        if value is not default and not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def path(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.str(key, default)
        return None if value is None else (self.base_dir / value if not _is_url(value) else value)

    def secret(self, key: str) -> str | None:
        """The secret named by `key_file` or `key_env`; None when neither is set."""
        file_key, env_key = f"{key}_file", f"{key}_env"
        if file_key in self.raw and env_key in self.raw:
            raise self.error(key, f"set {file_key} or {env_key}, not both")
        if file_key in self.raw:
            path = self.path(file_key)
            try:
                return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise self.error(file_key, f"cannot read {path}: {exc.strerror}") from None
        if env_key in self.raw:
            var = self.str(env_key)
            if var not in os.environ:
                raise self.error(env_key, f"environment variable {var} is not set")
            return os.environ[var]
        return None


def _is_url(value: str) -> bool:
    return "://" in value


_KAFKA_KEYS = {"bootstrap", "topic_prefix", "embedded_listen", "partitions"}
_KAFKA_SECRETS = {"sasl_plain_password", "ssl_password"}


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap: str
    topic_prefix: str
    embedded_listen: str
    partitions: int
    client: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_table(cls, t: Table) -> KafkaSettings:
        return cls(
            bootstrap=t.str("bootstrap", "embedded"),
            topic_prefix=t.raw.get("topic_prefix", "custody."),
            embedded_listen=t.str("embedded_listen", "127.0.0.1:9192"),
            partitions=t.int("partitions", 3, minimum=1),
            client=_kafka_client(t),
        )

    @property
    def embedded(self) -> bool:
        return self.bootstrap == "embedded"

    @property
    def bootstrap_servers(self) -> str:
        return self.embedded_listen if self.embedded else self.bootstrap

    def topic(self, name: str) -> str:
        """`events` -> `custody.events` with the configured prefix."""
        return f"{self.topic_prefix}{name}"

    def client_options(self) -> dict[str, Any]:
        """kafka-python keyword arguments shared by producers, consumers and admin clients."""
        return {"bootstrap_servers": self.bootstrap_servers.split(","), **self.client}


def _kafka_client(t: Table) -> dict[str, Any]:
    """Every other key goes to kafka-python as is; `X_file` / `X_env` become X, read from the file or variable."""
    client: dict[str, Any] = {}
    for key, value in t.raw.items():
        if key in _KAFKA_KEYS:
            continue
        if key.endswith(("_file", "_env")) and key.rsplit("_", 1)[0] in _KAFKA_SECRETS:
            name = key.rsplit("_", 1)[0]
            client[name] = t.secret(name)
        else:
            client[key] = value
    return client


@dataclass(frozen=True)
class KeySettings:
    proxy_key: Path
    ledger_key: Path
    exporter_key: Path
    keyring: Path
    custodian_public_key: Path

    @classmethod
    def from_table(cls, t: Table) -> KeySettings:
        return cls(
            proxy_key=t.path("proxy_key", "keys/proxy.key"),
            ledger_key=t.path("ledger_key", "keys/ledger.key"),
            exporter_key=t.path("exporter_key", "keys/exporter.key"),
            keyring=t.path("keyring", "keys/keyring.toml"),
            custodian_public_key=t.path("custodian_public_key", "keys/custodian.pub"),
        )


@dataclass(frozen=True)
class SpoolSettings:
    dir: Path
    max_bytes: int
    fail_open: bool
    fsync_interval_ms: int

    @classmethod
    def from_table(cls, t: Table) -> SpoolSettings:
        return cls(
            dir=t.path("dir", "spool"),
            max_bytes=t.int("max_bytes", 1 << 30, minimum=1 << 16),
            fail_open=t.bool("fail_open", False),
            fsync_interval_ms=t.int("fsync_interval_ms", 5, minimum=0),
        )


SYSLOG_SCHEMES = ("udp", "tcp", "tls")


@dataclass(frozen=True)
class SocSettings:
    """`[soc]`: violations and activity in OCSF (ingest/ocsf.py) and the optional syslog sink (ingest/syslog.py)."""
    ocsf: bool = False
    activity: bool = False
    syslog: str | None = None
    syslog_format: str = "ocsf"
    syslog_ca: Path | None = None
    syslog_cert: Path | None = None
    syslog_key: Path | None = None
    syslog_app_name: str = "custody"
    syslog_group: str = "custody-syslog"

    @property
    def topics(self) -> tuple[str, ...]:
        """What the ledger publishes besides custody.violations."""
        return (("violations.ocsf",) if self.ocsf or self.activity else ()) + (("activity.ocsf",) if self.activity else ())

    def sink_topics(self) -> tuple[str, ...]:
        """What the syslog sink reads: the OCSF topics, or custody.violations in Custody's own shape."""
        if self.syslog_format == "custody":
            return ("violations",)
        return self.topics or ("violations.ocsf",)

    @classmethod
    def from_table(cls, t: Table) -> SocSettings:
        syslog = t.str("syslog", None)
        if syslog is not None and (syslog.split("://", 1)[0] not in SYSLOG_SCHEMES or "://" not in syslog):
            raise t.error("syslog", f"expected udp://host:port, tcp://host:port or tls://host:port, got {syslog!r}")
        fmt = t.str("syslog_format", "ocsf")
        if fmt not in ("ocsf", "custody"):
            raise t.error("syslog_format", f"expected ocsf or custody, got {fmt!r}")
        return cls(ocsf=t.bool("ocsf", False), activity=t.bool("activity", False), syslog=syslog,
                   syslog_format=fmt, syslog_ca=t.path("syslog_ca", None), syslog_cert=t.path("syslog_cert", None),
                   syslog_key=t.path("syslog_key", None), syslog_app_name=t.str("syslog_app_name", "custody"),
                   syslog_group=t.str("syslog_group", "custody-syslog"))
