"""`custody.toml`: one file, typed settings, one-line errors that name the key.

The key names follow `shared/custody.example.toml`, which users and scripts rely
on. Paths are relative to the config file. This module reads the file and hands
each table to the package that owns its settings (`ingest.settings`,
`ledger.settings`, `proxy.settings`); the table reader and `ConfigError` live
in `ingest.settings`.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ingest.settings import ConfigError, KafkaSettings, KeySettings, SocSettings, SpoolSettings, Table
from ledger.settings import LedgerSettings, WitnessSettings
from proxy.login import LoginSettings
from proxy.settings import CpuSettings, IdentitySettings, ProxySettings

DEFAULT_CONFIG = "custody.toml"


@dataclass(frozen=True)
class Config:
    path: Path
    kafka: KafkaSettings
    keys: KeySettings
    identity: IdentitySettings | None
    ledger: LedgerSettings
    spool: SpoolSettings
    proxies: tuple[ProxySettings, ...]
    login: LoginSettings | None = None  # [login]: `custody login` / `custody token`
    witness: WitnessSettings | None = None  # [witness]: `custody witness` (and the one `custody up` runs)
    soc: SocSettings = SocSettings()  # [soc]: OCSF topics and the syslog sink
    cpus: CpuSettings = CpuSettings()  # [cpus]: where `custody proxy` and its recorder run (Linux)

    @property
    def base_dir(self) -> Path:
        return self.path.parent


def _table(source: Path, raw: dict[str, Any], name: str) -> Table:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    return Table(source, name, value)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and check the config; `path` defaults to $CUSTODY_CONFIG, then ./custody.toml."""
    source = Path(path or os.environ.get("CUSTODY_CONFIG") or DEFAULT_CONFIG).absolute()
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such config file (run `custody init`, or pass --config)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    proxies = raw.get("proxy", [])
    if not isinstance(proxies, list):
        raise ConfigError(f"{source}: [[proxy]] must be an array of tables")
    identity = IdentitySettings.from_table(_table(source, raw, "identity"))
    ledger = LedgerSettings.from_table(_table(source, raw, "ledger"))
    config = Config(
        path=source,
        kafka=KafkaSettings.from_table(_table(source, raw, "kafka")),
        keys=KeySettings.from_table(_table(source, raw, "keys")),
        identity=identity,
        ledger=ledger,
        spool=SpoolSettings.from_table(_table(source, raw, "spool")),
        proxies=tuple(ProxySettings.from_table(Table(source, f"proxy.{i}", p)) for i, p in enumerate(proxies)),
        login=LoginSettings.from_table(_table(source, raw, "login"), identity.issuer if identity else None),
        witness=WitnessSettings.from_table(_table(source, raw, "witness"), ledger.origin),
        soc=SocSettings.from_table(_table(source, raw, "soc")),
        cpus=CpuSettings.from_table(_table(source, raw, "cpus")),
    )
    names = [p.name for p in config.proxies]
    if len(names) != len(set(names)):
        raise ConfigError(f"{source}: [[proxy]] names must be unique, got {names}")
    return config


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config file (default: $CUSTODY_CONFIG, then ./custody.toml).",
)
