"""C2SP tlog-checkpoint bodies inside C2SP signed notes, with Ed25519 keys.

A checkpoint (c2sp.org/tlog-checkpoint) states a log's origin, tree size and
root hash; a signed note (c2sp.org/signed-note) carries it with one or more
signature lines. Using these formats unchanged, with key strings in the
golang.org/x/mod/sumdb/note encoding, lets auditors check our seals with
off-the-shelf tools (Go's `note` package, witnesses, sigsum/tessera tooling)
instead of trusting our code. Pure functions, no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import nacl.exceptions
import nacl.signing

ED25519_ALGORITHM = 0x01
"""Signature type byte for Ed25519 in c2sp.org/signed-note key IDs and keys."""

KEY_ID_SIZE = 4
MAX_SIGNATURES = 100
"""Signature lines accepted per note; the spec requires at least 16, Go allows 100."""

SIGNATURE_PREFIX = "\u2014 "
"""Each signature line starts with an em dash (U+2014) and a space."""

_HASH_SIZE = 32
_KEY_ID_HEX = re.compile(r"[0-9a-f]{8}")
_TREE_SIZE = re.compile(r"0|[1-9][0-9]*")
_MAX_TREE_SIZE = 2**64 - 1


class NoteError(ValueError):
    """A note, key or checkpoint is malformed or fails verification."""


class MalformedNoteError(NoteError):
    """The note does not follow the signed-note syntax."""


class MalformedKeyError(NoteError):
    """A verifier or signer key string is malformed or inconsistent."""


class AmbiguousKeyError(NoteError):
    """Two different trusted keys share a name and key ID."""


class InvalidSignatureError(NoteError):
    """A signature from a trusted key does not verify."""


class NoTrustedSignatureError(NoteError):
    """No signature on the note comes from a trusted key."""


class MalformedCheckpointError(NoteError):
    """The note text is not a valid tlog-checkpoint body."""


class CheckpointOriginError(NoteError):
    """A verified checkpoint comes from a different log than expected."""


# Keys ------------------------------------------------------------------------


def key_id(name: str, public_key: bytes) -> bytes:
    """Return SHA-256(name || 0x0A || 0x01 || public_key)[:4], the Ed25519 note key ID.

    The name and algorithm byte are hashed in so that one public key used under
    two names or two algorithms never produces signatures that can be confused.
    """
    data = name.encode() + b"\n" + bytes([ED25519_ALGORITHM]) + public_key
    return hashlib.sha256(data).digest()[:KEY_ID_SIZE]


def _name_problem(name: str) -> str | None:
    """Say why `name` is not a valid key name, or return None if it is.

    Names must be non-empty, without spaces, '+' or control characters: '+'
    separates the fields of key strings and a space ends the name in a
    signature line, so either would make the encoding ambiguous.
    """
    if not name:
        return "key name is empty"
    bad = next((c for c in name if c.isspace() or c == "+" or ord(c) < 0x20), None)
    if bad is not None:
        return f"key name {name!r} contains forbidden character U+{ord(bad):04X}"
    return None


def _check_key(name: str, stated_id: bytes, public_key: bytes) -> None:
    """Check a key's name, and that its key ID is the one its name and key imply."""
    problem = _name_problem(name)
    if problem is not None:
        raise MalformedKeyError(problem)
    actual = key_id(name, public_key)
    if stated_id != actual:
        raise MalformedKeyError(f"key ID {stated_id.hex()} does not match key {name}+{actual.hex()}")


def _decode_base64(text: str) -> bytes:
    """Decode standard base64, accepting only its canonical form.

    One value, one encoding: otherwise two different key or checkpoint texts
    could stand for the same bytes.
    """
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as e:  # binascii.Error, or non-ASCII text
        raise ValueError(f"{text!r} is not valid base64 ({e})") from None
    if base64.b64encode(raw).decode() != text:
        raise ValueError(f"{text!r} is not canonical base64")
    return raw


def _decode_key(id_hex: str, key_b64: str) -> tuple[bytes, bytes]:
    """Decode the key ID and key fields of a key string into (key ID, key bytes)."""
    if not _KEY_ID_HEX.fullmatch(id_hex):
        raise MalformedKeyError(f"key ID {id_hex!r} is not 8 lowercase hex digits")
    try:
        raw = _decode_base64(key_b64)
    except ValueError as e:
        raise MalformedKeyError(f"key {e}") from None
    if len(raw) != 1 + _HASH_SIZE:
        raise MalformedKeyError(f"key is {len(raw)} bytes, expected 1 algorithm byte and 32 key bytes")
    if raw[0] != ED25519_ALGORITHM:
        raise MalformedKeyError(f"key algorithm 0x{raw[0]:02x} is not Ed25519 (0x01)")
    return bytes.fromhex(id_hex), raw[1:]


@dataclass(frozen=True)
class Verifier:
    """A named Ed25519 public key that can check note signatures.

    Construction checks the key ID against the name and key, so a Verifier
    always identifies exactly the key it holds.
    """

    name: str
    key_id: bytes
    verify_key: nacl.signing.VerifyKey = field(repr=False, compare=False)
    public_key: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_key", bytes(self.verify_key))
        _check_key(self.name, self.key_id, self.public_key)

    @classmethod
    def from_key(cls, name: str, verify_key: nacl.signing.VerifyKey) -> Verifier:
        """Make a verifier for `verify_key` under `name`, computing its key ID."""
        return cls(name, key_id(name, bytes(verify_key)), verify_key)

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        """Parse a verifier key `<name>+<hex key ID>+<base64(0x01 || public key)>`."""
        fields = vkey.split("+", 2)
        if len(fields) != 3:
            raise MalformedKeyError(f"verifier key {vkey!r} is not <name>+<key ID>+<key>")
        stated_id, public_key = _decode_key(fields[1], fields[2])
        return cls(fields[0], stated_id, nacl.signing.VerifyKey(public_key))

    @property
    def vkey(self) -> str:
        """The verifier key string, as `parse` and Go's note.NewVerifier accept."""
        encoded = base64.b64encode(bytes([ED25519_ALGORITHM]) + self.public_key).decode()
        return f"{self.name}+{self.key_id.hex()}+{encoded}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Return whether `signature` is this key's Ed25519 signature of `message`."""
        try:
            self.verify_key.verify(message, signature)
        except nacl.exceptions.CryptoError:  # forged, corrupt or not 64 bytes
            return False
        return True


@dataclass(frozen=True)
class Signer:
    """A named Ed25519 private key that signs notes; its repr hides the key."""

    name: str
    key_id: bytes
    signing_key: nacl.signing.SigningKey = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_key(self.name, self.key_id, bytes(self.signing_key.verify_key))

    @classmethod
    def from_key(cls, name: str, signing_key: nacl.signing.SigningKey) -> Signer:
        """Make a signer for `signing_key` under `name`, computing its key ID."""
        return cls(name, key_id(name, bytes(signing_key.verify_key)), signing_key)

    @classmethod
    def parse(cls, skey: str) -> Signer:
        """Parse a signer key `PRIVATE+KEY+<name>+<hex key ID>+<base64(0x01 || seed)>`."""
        fields = skey.split("+", 4)
        if len(fields) != 5 or fields[:2] != ["PRIVATE", "KEY"]:
            raise MalformedKeyError("signer key is not PRIVATE+KEY+<name>+<key ID>+<key>")
        stated_id, seed = _decode_key(fields[3], fields[4])
        return cls(fields[2], stated_id, nacl.signing.SigningKey(seed))

    @property
    def skey(self) -> str:
        """The secret signer key string, as `parse` and Go's note.NewSigner accept."""
        encoded = base64.b64encode(bytes([ED25519_ALGORITHM]) + bytes(self.signing_key)).decode()
        return f"PRIVATE+KEY+{self.name}+{self.key_id.hex()}+{encoded}"

    @property
    def verifier(self) -> Verifier:
        """The matching verifier, to publish or to check our own notes."""
        return Verifier(self.name, self.key_id, self.signing_key.verify_key)

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of `message`."""
        return self.signing_key.sign(message).signature


# Notes -----------------------------------------------------------------------


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: key name, key ID and the signature bytes."""

    name: str
    key_id: bytes
    signature: bytes

    @property
    def line(self) -> str:
        """The signature line, without its newline."""
        encoded = base64.b64encode(self.key_id + self.signature).decode()
        return f"{SIGNATURE_PREFIX}{self.name} {encoded}"


@dataclass(frozen=True)
class VerifiedNote:
    """The text of a note whose signatures from trusted keys all verified."""

    text: str
    verified_by: tuple[Verifier, ...]
    """Trusted keys whose signatures verified, in note order; never empty."""
    unverified: tuple[NoteSignature, ...]
    """Signatures from keys not in the trusted list, ignored as the spec requires."""


def _check_text(text: str, error: type[NoteError]) -> None:
    """Notes must be UTF-8 without control characters other than newline."""
    bad = next((i for i, c in enumerate(text) if ord(c) < 0x20 and c != "\n"), None)
    if bad is not None:
        raise error(f"note contains control character U+{ord(text[bad]):04X} at position {bad}")


def sign_note(text: str, signers: Sequence[Signer]) -> bytes:
    """Return the signed note: `text`, a blank line, one signature line per signer.

    Each signer signs the UTF-8 bytes of `text`, which must end with a newline.
    """
    if not text.endswith("\n"):
        raise MalformedNoteError("note text does not end with a newline")
    _check_text(text, MalformedNoteError)
    try:
        message = text.encode()
    except UnicodeEncodeError as e:
        raise MalformedNoteError(f"note text is not encodable as UTF-8 ({e.reason} at position {e.start})") from None
    if not signers:
        raise MalformedNoteError("a signed note needs at least one signature, no signers given")
    lines = [NoteSignature(s.name, s.key_id, s.sign(message)).line for s in signers]
    return (text + "\n" + "".join(line + "\n" for line in lines)).encode()


def _parse_signature_line(number: int, line: str) -> NoteSignature:
    if not line.startswith(SIGNATURE_PREFIX):
        raise MalformedNoteError(f"signature line {number} does not start with an em dash and a space: {line!r}")
    name, _, encoded = line[len(SIGNATURE_PREFIX) :].partition(" ")
    problem = _name_problem(name)
    if problem is not None:
        raise MalformedNoteError(f"signature line {number}: {problem}")
    try:
        raw = _decode_base64(encoded)
    except ValueError as e:
        raise MalformedNoteError(f"signature line {number} ({name}): signature {e}") from None
    if len(raw) <= KEY_ID_SIZE:
        raise MalformedNoteError(
            f"signature line {number} ({name}): {len(raw)} bytes is too short for a key ID and a signature"
        )
    return NoteSignature(name, raw[:KEY_ID_SIZE], raw[KEY_ID_SIZE:])


def _split_note(note: bytes) -> tuple[str, list[NoteSignature]]:
    """Split a note into its text and parsed signature lines, checking the syntax."""
    try:
        decoded = note.decode()
    except UnicodeDecodeError as e:
        raise MalformedNoteError(f"note is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    _check_text(decoded, MalformedNoteError)
    # Signature lines never contain a blank line, so the last one separates.
    split = decoded.rfind("\n\n")
    if split < 0:
        raise MalformedNoteError("note has no blank line before its signatures")
    text, block = decoded[: split + 1], decoded[split + 2 :]
    if not block:
        raise MalformedNoteError("note has no signature lines")
    if not block.endswith("\n"):
        raise MalformedNoteError("note's last signature line does not end with a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise MalformedNoteError(f"note has {len(lines)} signature lines, more than the limit of {MAX_SIGNATURES}")
    return text, [_parse_signature_line(i, line) for i, line in enumerate(lines, 1)]


def _index_verifiers(verifiers: Sequence[Verifier]) -> dict[tuple[str, bytes], Verifier]:
    index: dict[tuple[str, bytes], Verifier] = {}
    for v in verifiers:
        known = index.setdefault((v.name, v.key_id), v)
        if known.public_key != v.public_key:
            raise AmbiguousKeyError(f"two trusted keys are named {v.name}+{v.key_id.hex()}")
    return index


def open_note(note: bytes, verifiers: Sequence[Verifier]) -> VerifiedNote:
    """Parse a signed note and verify it against the trusted `verifiers`.

    Per c2sp.org/signed-note, signatures from unknown keys are ignored (they
    allow key rotation and witness cosignatures), every signature from a
    trusted key must verify, and at least one must be present.
    """
    text, signatures = _split_note(note)
    trusted = _index_verifiers(verifiers)
    message = text.encode()
    verified: list[Verifier] = []
    unverified: list[NoteSignature] = []
    for sig in signatures:
        verifier = trusted.get((sig.name, sig.key_id))
        if verifier is None:
            if sig not in unverified:
                unverified.append(sig)
        elif not verifier.verify(message, sig.signature):
            raise InvalidSignatureError(f"invalid signature for key {sig.name}+{sig.key_id.hex()}")
        elif verifier not in verified:
            verified.append(verifier)
    if not verified:
        signed_by = ", ".join(f"{s.name}+{s.key_id.hex()}" for s in unverified)
        raise NoTrustedSignatureError(f"note has no signature from a trusted key (signed by {signed_by})")
    return VerifiedNote(text, tuple(verified), tuple(unverified))


# Checkpoints -----------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A log's signed statement of its tree size and root (c2sp.org/tlog-checkpoint)."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or "\n" in self.origin:
            raise MalformedCheckpointError(f"origin {self.origin!r} is empty or spans lines")
        if not 0 <= self.size <= _MAX_TREE_SIZE:
            raise MalformedCheckpointError(f"tree size {self.size} is not a 64-bit unsigned integer")
        if len(self.root_hash) != _HASH_SIZE:
            raise MalformedCheckpointError(f"root hash is {len(self.root_hash)} bytes, expected {_HASH_SIZE}")
        for i, line in enumerate(self.extensions, 1):
            if not line or "\n" in line:
                raise MalformedCheckpointError(f"extension line {i} {line!r} is empty or spans lines")
        _check_text(self.to_text(), MalformedCheckpointError)

    def to_text(self) -> str:
        """Format the note text: origin, size, base64 root, extensions, each ending in a newline."""
        root_b64 = base64.b64encode(self.root_hash).decode()
        return "".join(f"{line}\n" for line in (self.origin, str(self.size), root_b64, *self.extensions))

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Parse and strictly validate checkpoint note text."""
        if not text.endswith("\n"):
            raise MalformedCheckpointError("checkpoint does not end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise MalformedCheckpointError(f"checkpoint has {len(lines)} lines, expected at least 3")
        origin, size, root_b64, *extensions = lines
        if not _TREE_SIZE.fullmatch(size):
            raise MalformedCheckpointError(f"tree size {size!r} is not a decimal number without leading zeros")
        try:
            root_hash = _decode_base64(root_b64)
        except ValueError as e:
            raise MalformedCheckpointError(f"root hash {e}") from None
        return cls(origin, int(size), root_hash, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, signers: Sequence[Signer]) -> bytes:
    """Return the checkpoint as a signed note."""
    return sign_note(checkpoint.to_text(), signers)


def open_checkpoint(note: bytes, verifiers: Sequence[Verifier], *, origin: str) -> tuple[Checkpoint, VerifiedNote]:
    """Verify a signed checkpoint and check it comes from the log `origin`.

    The origin check stops a valid checkpoint of one log (or partition) from
    being passed off as another's when the same key signs both.
    """
    opened = open_note(note, verifiers)
    checkpoint = Checkpoint.parse(opened.text)
    if checkpoint.origin != origin:
        raise CheckpointOriginError(f"checkpoint origin {checkpoint.origin!r} is not the expected {origin!r}")
    return checkpoint, opened


# Cosignatures ----------------------------------------------------------------
#
# c2sp.org/tlog-cosignature: a witness's statement that, as of its timestamp, the
# checkpoint is the largest consistent tree it has seen for the origin. A
# cosignature is a note signature line whose bytes are key ID (4) || timestamp
# (u64, big-endian) || Ed25519 signature (64) over "cosignature/v1\ntime <t>\n"
# followed by the checkpoint's note text. Its key ID uses the type byte 0x04, so a
# witness key can never be mistaken for a log key (0x01) and vice versa.

COSIGNATURE_ALGORITHM = 0x04
"""Signature type byte for Ed25519 cosignatures (c2sp.org/tlog-cosignature) in key IDs and vkeys."""
COSIGNATURE_HEADER = "cosignature/v1\n"
_TIMESTAMP_SIZE = 8
_ED25519_SIGNATURE_SIZE = 64
_MAX_TIMESTAMP = 2**63 - 1


class MalformedCosignatureError(NoteError):
    """A signature line of a cosigner's name and key ID is not a timestamped Ed25519 signature."""


def cosignature_key_id(name: str, public_key: bytes) -> bytes:
    """SHA-256(name || 0x0A || 0x04 || public_key)[:4], the Ed25519 cosignature key ID."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([COSIGNATURE_ALGORITHM]) + public_key).digest()[:KEY_ID_SIZE]


def cosigned_message(checkpoint_text: str, timestamp: int) -> bytes:
    """The bytes a cosigner signs: the header line, the time line, then the whole checkpoint note text."""
    if not 0 <= timestamp <= _MAX_TIMESTAMP:
        raise MalformedCosignatureError(f"timestamp {timestamp} is not within 0..2^63-1")
    if not checkpoint_text.endswith("\n"):
        raise MalformedNoteError("checkpoint text does not end with a newline")
    return f"{COSIGNATURE_HEADER}time {timestamp}\n{checkpoint_text}".encode()


@dataclass(frozen=True)
class Cosignature:
    """One parsed cosignature: who (name, key ID), when (POSIX seconds) and the signature."""

    name: str
    key_id: bytes
    timestamp: int
    signature: bytes

    @classmethod
    def from_note_signature(cls, sig: NoteSignature) -> Cosignature:
        if len(sig.signature) != _TIMESTAMP_SIZE + _ED25519_SIGNATURE_SIZE:
            raise MalformedCosignatureError(
                f"cosignature by {sig.name}+{sig.key_id.hex()} is {len(sig.signature)} bytes after the key ID, "
                f"expected {_TIMESTAMP_SIZE} (timestamp) + {_ED25519_SIGNATURE_SIZE} (Ed25519)")
        timestamp = int.from_bytes(sig.signature[:_TIMESTAMP_SIZE], "big")
        if timestamp > _MAX_TIMESTAMP:
            raise MalformedCosignatureError(f"cosignature by {sig.name}: timestamp {timestamp} exceeds 2^63-1")
        return cls(sig.name, sig.key_id, timestamp, sig.signature[_TIMESTAMP_SIZE:])

    @classmethod
    def parse_line(cls, line: str) -> Cosignature:
        """Parse one signature line (with or without its newline)."""
        return cls.from_note_signature(_parse_signature_line(1, line.removesuffix("\n")))

    @property
    def note_signature(self) -> NoteSignature:
        return NoteSignature(self.name, self.key_id, self.timestamp.to_bytes(_TIMESTAMP_SIZE, "big") + self.signature)

    @property
    def line(self) -> str:
        """The signature line, without its newline."""
        return self.note_signature.line


@dataclass(frozen=True)
class CosignatureVerifier:
    """A witness's named Ed25519 public key, checking cosignatures (not log signatures: type byte 0x04)."""

    name: str
    verify_key: nacl.signing.VerifyKey = field(repr=False, compare=False)
    public_key: bytes = field(init=False, repr=False)
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        problem = _name_problem(self.name)
        if problem is not None:
            raise MalformedKeyError(problem)
        object.__setattr__(self, "public_key", bytes(self.verify_key))
        object.__setattr__(self, "key_id", cosignature_key_id(self.name, self.public_key))

    @classmethod
    def parse(cls, vkey: str) -> CosignatureVerifier:
        """Parse `<name>+<hex key ID>+<base64(0x04 || public key)>`."""
        fields = vkey.split("+", 2)
        if len(fields) != 3 or not _KEY_ID_HEX.fullmatch(fields[1]):
            raise MalformedKeyError(f"cosigner key {vkey!r} is not <name>+<8 hex key ID>+<key>")
        try:
            raw = _decode_base64(fields[2])
        except ValueError as e:
            raise MalformedKeyError(f"cosigner key {e}") from None
        if len(raw) != 1 + _HASH_SIZE or raw[0] != COSIGNATURE_ALGORITHM:
            raise MalformedKeyError("cosigner key is not 0x04 (Ed25519 cosignature/v1) and 32 key bytes")
        verifier = cls(fields[0], nacl.signing.VerifyKey(raw[1:]))
        if verifier.key_id.hex() != fields[1]:
            raise MalformedKeyError(f"key ID {fields[1]} does not match cosigner key {fields[0]}+{verifier.key_id.hex()}")
        return verifier

    @property
    def vkey(self) -> str:
        encoded = base64.b64encode(bytes([COSIGNATURE_ALGORITHM]) + self.public_key).decode()
        return f"{self.name}+{self.key_id.hex()}+{encoded}"

    def matches(self, sig: NoteSignature | Cosignature) -> bool:
        return sig.name == self.name and sig.key_id == self.key_id

    def verify(self, checkpoint_text: str, cosignature: Cosignature) -> bool:
        try:
            self.verify_key.verify(cosigned_message(checkpoint_text, cosignature.timestamp), cosignature.signature)
        except (nacl.exceptions.CryptoError, NoteError):
            return False
        return True


@dataclass(frozen=True)
class Cosigner:
    """A witness's named Ed25519 private key; its repr hides the key."""

    name: str
    signing_key: nacl.signing.SigningKey = field(repr=False, compare=False)

    @property
    def verifier(self) -> CosignatureVerifier:
        return CosignatureVerifier(self.name, self.signing_key.verify_key)

    @property
    def key_id(self) -> bytes:
        return self.verifier.key_id

    def cosign(self, checkpoint_text: str, timestamp: int) -> Cosignature:
        signature = self.signing_key.sign(cosigned_message(checkpoint_text, timestamp)).signature
        return Cosignature(self.name, self.key_id, timestamp, signature)


@dataclass(frozen=True)
class WitnessedNote:
    """A note's text and the valid cosignatures on it from trusted witnesses, one per witness (the newest)."""

    text: str
    cosignatures: tuple[tuple[CosignatureVerifier, Cosignature], ...]


def open_cosignatures(note: bytes, witnesses: Sequence[CosignatureVerifier]) -> WitnessedNote:
    """The cosignatures on `note` from trusted `witnesses`, each verified; lines of other keys are ignored.

    As with log signatures, a line that names a trusted witness but does not verify makes the note invalid
    (InvalidSignatureError): it is a forgery, not an absence.
    """
    text, signatures = _split_note(note)
    found: dict[bytes, tuple[CosignatureVerifier, Cosignature]] = {}
    for sig in signatures:
        witness = next((w for w in witnesses if w.matches(sig)), None)
        if witness is None:
            continue
        cosignature = Cosignature.from_note_signature(sig)
        if not witness.verify(text, cosignature):
            raise InvalidSignatureError(f"invalid cosignature for witness {sig.name}+{sig.key_id.hex()}")
        known = found.get(witness.public_key)
        if known is None or cosignature.timestamp > known[1].timestamp:
            found[witness.public_key] = (witness, cosignature)
    return WitnessedNote(text, tuple(found.values()))


def add_signature_lines(note: bytes, lines: Sequence[str]) -> bytes:
    """`note` with more signature lines appended (e.g. a witness's response to add-checkpoint), no duplicates."""
    text = note.decode()
    present = set(text.split("\n"))
    extra = "".join(f"{line}\n" for line in (l.removesuffix("\n") for l in lines) if line and line not in present)
    return (text + extra).encode()
