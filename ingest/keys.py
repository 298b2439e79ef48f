"""Ed25519 key files and the keyring of trusted public keys.

One private key per role (proxy, ledger, exporter, witness) so that a stolen
proxy key cannot forge seals, nor a ledger key a witness's cosignature. The
keyring lists every public key a verifier trusts, with its role and validity
window: rotation adds a key; revocation sets `not_after`, after which events
signed by that key are rejected.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from nacl.signing import SigningKey, VerifyKey

from ingest.errors import CustodyError

ROLES = ("proxy", "ledger", "exporter", "witness")


class KeyFileError(CustodyError):
    """A private key file that cannot be created or read."""


class KeyringError(CustodyError):
    """A keyring file that is malformed or a lookup it cannot answer."""


def key_id_for(name: str, public_key: bytes) -> str:
    """`name+<16 hex>`: readable, and bound to the key bytes so a name cannot be reused silently."""
    return f"{name}+{hashlib.sha256(public_key).hexdigest()[:16]}"


@dataclass(frozen=True)
class PrivateKey:
    """An Ed25519 signing key with the id verifiers know it by."""

    key_id: str
    signing_key: SigningKey

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature


def generate_key_file(path: Path, name: str) -> PrivateKey:
    """Create a new key at `path` (mode 0600); never overwrites an existing file."""
    signing_key = SigningKey.generate()
    key = PrivateKey(key_id_for(name, bytes(signing_key.verify_key)), signing_key)
    document = {"type": "custody-ed25519-private-key", "key_id": key.key_id,
                "seed": base64.b64encode(bytes(signing_key)).decode()}
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path}: already exists; refusing to overwrite a key") from None
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(document, out)
        out.write("\n")
    return key


def load_key_file(path: Path) -> PrivateKey:
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        seed = base64.b64decode(document["seed"], validate=True)
        key = PrivateKey(document["key_id"], SigningKey(seed))
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file (run `custody keys generate`)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(f"{path}: not a custody private key file ({exc})") from None
    if os.stat(path).st_mode & 0o077:
        raise KeyFileError(f"{path}: permissions {oct(os.stat(path).st_mode & 0o777)} are too open; chmod 600")
    return key


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    role: str
    public_key: bytes
    not_before: datetime | None = None
    not_after: datetime | None = None
    comment: str = ""

    @property
    def verify_key(self) -> VerifyKey:
        return VerifyKey(self.public_key)


class KeyLookupError(KeyringError):
    """Why a key may not verify an event: `reason` is machine-readable."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Keyring:
    """The trusted public keys, by key id."""

    def __init__(self, keys: list[TrustedKey] | None = None):
        self._keys: dict[str, TrustedKey] = {}
        for key in keys or []:
            self.add(key)

    def __iter__(self):
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: TrustedKey) -> None:
        if key.role not in ROLES:
            raise KeyringError(f"key {key.key_id}: role {key.role!r} is not one of {', '.join(ROLES)}")
        if key.key_id != key_id_for(key.key_id.split("+")[0], key.public_key):
            raise KeyringError(f"key {key.key_id}: id does not match its public key")
        if key.key_id in self._keys:
            raise KeyringError(f"key {key.key_id}: listed twice")
        self._keys[key.key_id] = key

    def revoke(self, key_id: str, at: datetime) -> None:
        self._keys[key_id] = replace(self.get(key_id), not_after=at)

    def get(self, key_id: str) -> TrustedKey:
        try:
            return self._keys[key_id]
        except KeyError:
            raise KeyLookupError("unknown_key", f"key {key_id} is not in the keyring") from None

    def key_for(self, key_id: str, signed_at: datetime, role: str) -> VerifyKey:
        """The key that may verify something `role` signed at `signed_at`, or why not."""
        key = self.get(key_id)
        if key.role != role:
            raise KeyLookupError("wrong_role", f"key {key_id} is a {key.role} key, not a {role} key")
        if key.not_before and signed_at < key.not_before:
            raise KeyLookupError("key_not_yet_valid", f"key {key_id} is valid from {key.not_before.isoformat()}, signed at {signed_at.isoformat()}")
        if key.not_after and signed_at > key.not_after:
            raise KeyLookupError("key_revoked", f"key {key_id} was revoked at {key.not_after.isoformat()}, signed at {signed_at.isoformat()}")
        return key.verify_key

    # --- the keyring file -------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path) -> "Keyring":
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KeyringError(f"{path}: no such keyring") from None
        except tomllib.TOMLDecodeError as exc:
            raise KeyringError(f"{path}: not valid TOML: {exc}") from None
        keyring = cls()
        for i, entry in enumerate(raw.get("key", [])):
            try:
                keyring.add(TrustedKey(
                    key_id=entry["key_id"], role=entry["role"],
                    public_key=base64.b64decode(entry["public_key"], validate=True),
                    not_before=_utc(entry.get("not_before")), not_after=_utc(entry.get("not_after")),
                    comment=entry.get("comment", ""),
                ))
            except (KeyError, ValueError, TypeError) as exc:
                raise KeyringError(f"{path}: [[key]] #{i + 1}: {type(exc).__name__}: {exc}") from None
            except KeyringError as exc:
                raise KeyringError(f"{path}: {exc}") from None
        return keyring

    def dumps(self) -> str:
        blocks = []
        for key in self:
            lines = ["[[key]]", f'key_id = "{key.key_id}"', f'role = "{key.role}"',
                     f'public_key = "{base64.b64encode(key.public_key).decode()}"']
            if key.not_before:
                lines.append(f"not_before = {_toml_time(key.not_before)}")
            if key.not_after:
                lines.append(f"not_after = {_toml_time(key.not_after)}")
            if key.comment:
                lines.append(f"comment = {json.dumps(key.comment)}")
            blocks.append("\n".join(lines) + "\n")
        return "# Trusted public keys (custody keyring). Revoke with `custody keys revoke`.\n\n" + "\n".join(blocks)

    def save(self, path: Path) -> None:
        """Atomically replace the keyring file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.dumps(), encoding="utf-8")
        os.replace(tmp, path)


def _utc(value: datetime | str | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(f"expected a date-time with an offset (e.g. 2026-01-01T00:00:00Z), got {value!r}")
    return value.astimezone(timezone.utc)


def _toml_time(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def add_to_keyring(keyring_path: Path, key: PrivateKey, role: str, comment: str = "") -> Keyring:
    """Trust `key` for `role` in the keyring file (created if missing)."""
    keyring = Keyring.load(keyring_path) if keyring_path.exists() else Keyring()
    keyring.add(TrustedKey(key.key_id, role, key.public_key, not_before=None, comment=comment))
    keyring.save(keyring_path)
    return keyring
