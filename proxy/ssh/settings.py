"""The SSH keys of one `[[proxy]]` entry with `protocol = "ssh"` (the rest is the core's).

    upstream = "ssh://USER@HOST:PORT"          # as whom the proxy logs in to the target
    upstream_key_file = "keys/deploy_ed25519"  # or upstream_password_file / upstream_password_env
    upstream_host_key = "ssh-ed25519 AAAA..."  # the target's host key, pinned (or upstream_host_key_file)
    host_key_file = "keys/ssh_host_ed25519"    # the proxy's own host key (`custody init` writes one)
    user_ca_key_file = "keys/ssh_user_ca"      # optional: the CA of `custody ssh-login` certificates
                                               # (`custody init` writes one); absent = no certificate login
    [[proxy.authorized_key]]                   # optional, repeated: a public key logs in as an identity
    key = "ssh-ed25519 AAAA... ci@runner"      # or key_file = "keys/ci_runner.pub"
    username = "ci-runner"                     # the SSH user it must log in as
    groups = ["ci"]                            # what policy sees
    expires = 2027-01-01T00:00:00Z             # optional (a TOML date-time or an RFC 3339 string)

Read once at start-up, so that a wrong key is a one-line error naming the
file, table and key before any client connects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Mapping
from urllib.parse import unquote, urlsplit

import asyncssh

from ingest.settings import Table
from proxy.core.settings import ListenerSettings, string_list
from proxy.settings import ProxySettings

from .authorized_keys import AuthorizedKey

DEFAULT_MAX_SFTP_PACKET = 1 << 20  # OpenSSH's sftp-server refuses packets over 256 KiB; 1 MiB is generous
AUTHORIZED_KEY_KEYS = {"key", "key_file", "username", "groups", "expires"}


@dataclass(frozen=True)
class SSHUpstream:
    """Where and as whom the proxy logs in; the client never learns the credential."""

    host: str
    port: int
    user: str
    key: asyncssh.SSHKey | None
    password: str | None
    host_key: asyncssh.SSHKey  # pinned: any other key is refused

    def describe(self) -> str:
        """user@host:port, for events: never the credential."""
        return f"{self.user}@{self.host}:{self.port}"


@dataclass(frozen=True)
class SSHSettings:
    listener: ListenerSettings
    upstream: SSHUpstream
    host_key: asyncssh.SSHKey
    max_sftp_packet: int
    user_ca: asyncssh.SSHKey | None = None  # signs and is the only CA trusted for user certificates
    authorized_keys: Mapping[bytes, AuthorizedKey] = field(default_factory=dict)  # by the key's wire bytes

    @property
    def name(self) -> str:
        return self.listener.name

    @classmethod
    def from_config(cls, proxy: ProxySettings, default_fail_open: bool = False) -> "SSHSettings":
        t = proxy.table
        return cls(
            listener=ListenerSettings.from_settings(proxy, default_fail_open),
            upstream=_upstream(t, proxy.upstream),
            host_key=_private_key(t, "host_key_file", t.path("host_key_file")),
            max_sftp_packet=t.int("max_sftp_packet_bytes", DEFAULT_MAX_SFTP_PACKET, minimum=34000),
            user_ca=_optional_private_key(t, "user_ca_key_file"),
            authorized_keys=_authorized_keys(t),
        )


def _private_key(t: Table, key: str, path: Path) -> asyncssh.SSHKey:
    try:
        return asyncssh.read_private_key(str(path))
    except (OSError, asyncssh.KeyImportError) as exc:
        raise t.error(key, f"cannot read the private key {path}: {exc}") from None


def _optional_private_key(t: Table, key: str) -> asyncssh.SSHKey | None:
    path = t.path(key, None)
    return _private_key(t, key, path) if path is not None else None


def _upstream(t: Table, url: str) -> SSHUpstream:
    parts = urlsplit(url)
    if parts.scheme != "ssh" or not parts.hostname or not parts.username:
        raise t.error("upstream", f"expected ssh://user@host:port, got {url!r}")
    if parts.password is not None:
        raise t.error("upstream", "secrets are never inline; use upstream_key_file or upstream_password_file/_env")
    try:
        port = parts.port or 22
    except ValueError:
        raise t.error("upstream", f"invalid port in {url!r}") from None
    key_file = t.path("upstream_key_file", None)
    password = t.secret("upstream_password")
    if key_file is None and password is None:
        raise t.error("upstream_key_file", "the proxy needs a credential for the target: "
                                           "upstream_key_file, or upstream_password_file / upstream_password_env")
    key = _private_key(t, "upstream_key_file", key_file) if key_file is not None else None
    return SSHUpstream(parts.hostname, port, unquote(parts.username), key, password, _host_key(t))


def _host_key(t: Table) -> asyncssh.SSHKey:
    """`upstream_host_key` (an OpenSSH public key line) or `upstream_host_key_file`: required, it is pinned."""
    return _public_key(t, "upstream_host_key", "the target's host key is pinned, so it is required "
                                               "(an OpenSSH public key line, or upstream_host_key_file)")


def _authorized_keys(t: Table) -> dict[bytes, AuthorizedKey]:
    """`[[proxy.authorized_key]]`: absent = no key logins (closed by default); one entry per key, or it is ambiguous."""
    raw = t.raw.get("authorized_key", [])
    if not isinstance(raw, list) or not all(isinstance(entry, dict) for entry in raw):
        raise t.error("authorized_key", "expected an array of tables ([[proxy.authorized_key]])")
    entries: dict[bytes, AuthorizedKey] = {}
    for index, entry in enumerate(raw):
        table = Table(t.source, f"{t.name}.authorized_key.{index}", entry)
        unknown = sorted(set(entry) - AUTHORIZED_KEY_KEYS)
        if unknown:  # a misspelt `groups` would quietly log in with none: say so instead
            raise table.error(unknown[0], f"unknown key; expected {', '.join(sorted(AUTHORIZED_KEY_KEYS))}")
        mapped = AuthorizedKey(key=_public_key(table, "key", "an OpenSSH public key line (or key_file) is required"),
                               username=table.str("username"), groups=string_list(table, "groups"),
                               expires=_expires(table))
        if mapped.key.public_data in entries:
            raise table.error("key", f"the key {mapped.fingerprint} is already mapped to "
                                     f"{entries[mapped.key.public_data].username!r}")
        entries[mapped.key.public_data] = mapped
    return entries


def _expires(t: Table) -> datetime | None:
    """`expires`: a TOML offset date-time or an RFC 3339 string; an offset is required (whose midnight?)."""
    value = t.raw.get("expires")
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise t.error("expires", f"expected a date-time like 2027-01-01T00:00:00Z, got {value!r}") from None
    if value is not None and (not isinstance(value, datetime) or value.utcoffset() is None):
        raise t.error("expires", f"expected a date-time with an offset like 2027-01-01T00:00:00Z, got {value!r}")
    return value


def _public_key(t: Table, key_name: str, missing: str) -> asyncssh.SSHKey:
    """A required OpenSSH public key line, inline as `key_name` or in the file `key_name`_file."""
    text = t.str(key_name, None)
    if text is None:
        path = t.path(f"{key_name}_file", None)
        if path is None:
            raise t.error(key_name, missing)
        key_name = f"{key_name}_file"
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise t.error(key_name, f"cannot read {path}: {exc.strerror}") from None
    try:
        return asyncssh.import_public_key(text.strip())
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise t.error(key_name, f"not an OpenSSH public key: {exc}") from None
