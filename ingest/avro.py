"""Avro single-object encoding of the event schemas.

Single-object encoding is `C3 01`, the writer schema's 8-byte little-endian
CRC-64-AVRO fingerprint, then the Avro binary body. The fingerprint lets any Avro
library find the writer schema, which is what makes the wire format independent
of this code.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

try:  # fastavro's reader without schemaless_reader's per-call re-parse of the schema (most of its cost)
    from fastavro._read import _default_named_schemas, _read_data
    from fastavro._read import parse_schema as _parse_for_read
except ImportError:  # pragma: no cover - a fastavro without the Cython reader
    _read_data = None

_READ_OPTIONS = {"return_record_name": False, "return_record_name_override": False, "handle_unicode_errors": "strict",
                 "return_named_type": False, "return_named_type_override": False}

import schemas

MAGIC = b"\xc3\x01"
HEADER_LEN = len(MAGIC) + 8


class DecodeError(ValueError):
    """Bytes that are not a single-object encoding of a schema we know."""


@dataclass(frozen=True)
class Schema:
    """A parsed writer schema and its CRC-64-AVRO fingerprint."""

    parsed: Any
    fingerprint: bytes
    plain: Any = field(default=None, compare=False, repr=False)
    """The same schema without logical types (same canonical form, same bytes): strings, longs."""

    @classmethod
    def from_json(cls, schema_json: dict[str, Any]) -> "Schema":
        parsed = fastavro.parse_schema(schema_json)
        # fastavro's hex is already the little-endian byte order the spec puts on the wire.
        fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
        return cls(parsed, fp, fastavro.parse_schema(_without_logical_types(schema_json)))

    def encode(self, record: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(self.fingerprint)
        fastavro.schemaless_writer(buf, self.parsed, record)
        return buf.getvalue()

    def decode(self, data: bytes, reader: "Schema | None" = None) -> dict[str, Any]:
        """Decode `data` written with this schema, resolved to `reader` if given."""
        if data[:2] != MAGIC:
            raise DecodeError("not an Avro single-object encoding (no C3 01 marker)")
        if data[2:HEADER_LEN] != self.fingerprint:
            raise DecodeError(f"schema fingerprint {data[2:HEADER_LEN].hex()} is not {self.fingerprint.hex()}")
        buf = io.BytesIO(data)
        buf.seek(HEADER_LEN)
        try:
            record = fastavro.schemaless_reader(
                buf, self.parsed, reader.parsed if reader else None
            )
        except Exception as exc:  # fastavro raises EOFError, ValueError, IndexError... on bad bytes
            raise DecodeError(f"Avro body does not decode: {type(exc).__name__}: {exc}") from None
        if buf.tell() != len(data):
            raise DecodeError(f"{len(data) - buf.tell()} trailing bytes after the Avro body")
        return record

    def plain_decoder(self) -> Callable[[bytes], dict[str, Any]]:
        """A decoder of `data` written with this schema that leaves logical types as written (uuid: the string,
        timestamp-micros: the long), and parses the schema once instead of per call. Same checks as `decode`."""
        schema, expected = self.plain, MAGIC + self.fingerprint
        if _read_data is None:  # pragma: no cover
            return lambda data: Schema(schema, self.fingerprint).decode(data)
        named = _default_named_schemas()
        parsed = _parse_for_read(schema, named["writer"])

        def decode(data: bytes) -> dict[str, Any]:
            if data[:HEADER_LEN] != expected:
                self.decode(data)  # raises the DecodeError that says why
            buf = io.BytesIO(data)
            buf.seek(HEADER_LEN)
            try:
                record = _read_data(buf, parsed, named, None, _READ_OPTIONS)
            except Exception as exc:
                raise DecodeError(f"Avro body does not decode: {type(exc).__name__}: {exc}") from None
            if buf.tell() != len(data):
                raise DecodeError(f"{len(data) - buf.tell()} trailing bytes after the Avro body")
            return record

        return decode


def _without_logical_types(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _without_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [_without_logical_types(v) for v in schema]
    return schema


def read_bytes_field(data: bytes, pos: int) -> tuple[bytes, int]:
    """One Avro `bytes` value at `pos` (zig-zag varint length, then the bytes) and the position after it."""
    if pos + 1 < len(data):  # the common lengths: one or two varint bytes (< 8 KiB)
        b = data[pos]
        if b < 0x80:
            n, pos = b, pos + 1
        elif data[pos + 1] < 0x80:
            n, pos = (b & 0x7F) | data[pos + 1] << 7, pos + 2
        else:
            n = -1
        if n >= 0:
            length = (n >> 1) ^ -(n & 1)
            end = pos + length
            if 0 <= length and end <= len(data):
                return data[pos:end], end
            raise DecodeError(f"Avro body does not decode: a {length}-byte value at {pos} overruns {len(data)} bytes")
    n = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise DecodeError("Avro body does not decode: truncated length")
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
    length = (n >> 1) ^ -(n & 1)
    end = pos + length
    if length < 0 or end > len(data):
        raise DecodeError(f"Avro body does not decode: a {length}-byte value at {pos} overruns {len(data)} bytes")
    return data[pos:end], end


# --- a hand-written reader of the one envelope the ledger reads at line rate -------------------------------
#
# fastavro's generic reader costs ~13 µs for a one-message Frames event (a dict lookup per field); this reads
# the same bytes in about half that. It is written for one schema, named by its fingerprint: an envelope of any
# other fingerprint, any other body, or any bytes it does not fully accept, goes to fastavro, which stays the
# reference (tests/test_event_contract.py checks the two agree, on events and on damaged bytes).

FRAMES_READER_FINGERPRINT = bytes.fromhex("88a4547fdfe53978")
"""The writer schema `_frames_envelope` reads: schemas/event.avsc as of contract v2."""


class _Bad(Exception):
    pass

def _long(data, pos):
    b = data[pos]
    if b < 0x80:
        return (b >> 1) ^ -(b & 1), pos + 1
    n = b & 0x7F
    shift = 7
    pos += 1
    while True:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            if n >> 64:
                raise _Bad("varint beyond 64 bits")
            return (n >> 1) ^ -(n & 1), pos
        shift += 7
        if shift > 63:
            raise _Bad("varint too long")

def _bytes(data, pos):
    b = data[pos]
    if b < 0x80:
        n, pos = (b >> 1) ^ -(b & 1), pos + 1
    else:
        n, pos = _long(data, pos)
    end = pos + n
    if n < 0 or end > len(data):
        raise _Bad("overrun")
    return data[pos:end], end

def _str(data, pos):
    b = data[pos]
    if b < 0x80:
        n, pos = (b >> 1) ^ -(b & 1), pos + 1
    else:
        n, pos = _long(data, pos)
    end = pos + n
    if n < 0 or end > len(data):
        raise _Bad("overrun")
    return data[pos:end].decode(), end

def _opt_str(data, pos):
    b = data[pos]
    if b == 0:
        return None, pos + 1
    if b == 2:
        return _str(data, pos + 1)
    raise _Bad("union index")

def _map(data, pos):
    out = {}
    while True:
        count, pos = _long(data, pos)
        if count == 0:
            return out, pos
        if count < 0:
            count = -count
            _, pos = _long(data, pos)
        for _ in range(count):
            k, pos = _str(data, pos)
            out[k], pos = _str(data, pos)

def _str_array(data, pos, opt_items):
    out = []
    while True:
        count, pos = _long(data, pos)
        if count == 0:
            return out, pos
        if count < 0:
            count = -count
            _, pos = _long(data, pos)
        for _ in range(count):
            if opt_items:
                v, pos = _opt_str(data, pos)
            else:
                v, pos = _str(data, pos)
            out.append(v)

def _message(data, pos):
    type_, pos = _str(data, pos)
    payload, pos = _bytes(data, pos)
    b = data[pos]
    if b == 0:
        sealed, pos = None, pos + 1
    elif b == 2:
        sealed, pos = _bytes(data, pos + 1)
    else:
        raise _Bad("union")
    statement, pos = _opt_str(data, pos)
    b = data[pos]
    if b == 0:
        parameters, pos = None, pos + 1
    elif b == 2:
        parameters, pos = _str_array(data, pos + 1, True)
    else:
        raise _Bad("union")
    command_tag, pos = _opt_str(data, pos)
    b = data[pos]
    if b == 0:
        rows, pos = None, pos + 1
    elif b == 2:
        rows, pos = _long(data, pos + 1)
    else:
        raise _Bad("union")
    error_code, pos = _opt_str(data, pos)
    error_message, pos = _opt_str(data, pos)
    if data[pos] == 0:
        attributes, pos = {}, pos + 1
    else:
        attributes, pos = _map(data, pos)
    direction, pos = _opt_str(data, pos)
    channel, pos = _opt_str(data, pos)
    b = data[pos]
    if b == 0:
        offset_us, pos = None, pos + 1
    elif b == 2:
        offset_us, pos = _long(data, pos + 1)
    else:
        raise _Bad("union")
    operation, pos = _opt_str(data, pos)
    text, pos = _opt_str(data, pos)
    b = data[pos]
    if b == 0:
        objects, pos = None, pos + 1
    elif b == 2:
        objects, pos = _str_array(data, pos + 1, False)
    else:
        raise _Bad("union")
    outcome, pos = _opt_str(data, pos)
    return {"type": type_, "data": payload, "sealed_original": sealed, "statement": statement,
            "parameters": parameters, "command_tag": command_tag, "rows": rows, "error_code": error_code,
            "error_message": error_message, "attributes": attributes, "direction": direction, "channel": channel,
            "offset_us": offset_us, "operation": operation, "text": text, "objects": objects,
            "outcome": outcome}, pos

def _envelope_head(data: bytes) -> tuple[str, str, int, int, str, str, bytes, str, int]:
    """The envelope's fields before its body (event_id ... kind) and the body's position: read alike by the
    whole reader and the partial one."""
    event_id, pos = _str(data, HEADER_LEN)
    session_id, pos = _str(data, pos)
    seq, pos = _long(data, pos)
    ts, pos = _long(data, pos)
    producer, pos = _str(data, pos)
    key_id, pos = _str(data, pos)
    end = pos + 32
    if end > len(data):
        raise _Bad("overrun")
    prev_hash, pos = data[pos:end], end
    kind, pos = _str(data, pos)
    return event_id, session_id, seq, ts, producer, key_id, prev_hash, kind, pos


def _frames_envelope(data: bytes) -> dict[str, Any] | None:
    """A custody.Envelope (contract v2, `FRAMES_READER_FINGERPRINT`) with a Frames body read by hand: the
    record fastavro's plain decoder returns for it, field for field. None for anything else (another body,
    bytes that do not decode, trailing bytes): then fastavro decodes it, or says why it does not."""
    try:
        event_id, session_id, seq, ts, producer, key_id, prev_hash, kind, pos = _envelope_head(data)
        if data[pos] != 2:  # union index 1: Frames
            return None
        direction, pos = _str(data, pos + 1)
        messages = []
        while True:
            count, pos = _long(data, pos)
            if count == 0:
                break
            if count < 0:
                count = -count
                _, pos = _long(data, pos)
            for _ in range(count):
                m, pos = _message(data, pos)
                messages.append(m)
    except (_Bad, IndexError, UnicodeDecodeError):
        return None  # let fastavro say why
    if pos != len(data):
        return None
    return {"event_id": event_id, "session_id": session_id, "seq": seq, "ts": ts, "producer": producer,
            "key_id": key_id, "prev_hash": prev_hash, "kind": kind,
            "body": {"direction": direction, "messages": messages}}


class EnvelopeHead(NamedTuple):
    """The fields of an envelope before its body, as the plain reader returns them (uuids as written, ts in µs)."""

    event_id: str
    session_id: str
    seq: int
    ts: int
    producer: str
    key_id: str
    prev_hash: bytes
    kind: str


def _bytes_end(data, pos):
    """Where the Avro `bytes` (or string) value at `pos` ends, the value not copied."""
    b = data[pos]
    if b < 0x80:
        n, pos = (b >> 1) ^ -(b & 1), pos + 1
    else:
        n, pos = _long(data, pos)
    end = pos + n
    if n < 0 or end > len(data):
        raise _Bad("overrun")
    return end

def _skip_str(data, pos):
    """`_str` without keeping the text: it must still be UTF-8, as the readers require."""
    b = data[pos]
    if b < 0x80:
        n, pos = (b >> 1) ^ -(b & 1), pos + 1
    else:
        n, pos = _long(data, pos)
    end = pos + n
    if n < 0 or end > len(data):
        raise _Bad("overrun")
    data[pos:end].decode()
    return end

def _skip_strs(data, pos, opt_items):
    """`_str_array`, nothing kept."""
    while True:
        count, pos = _long(data, pos)
        if count == 0:
            return pos
        if count < 0:
            count = -count
            _, pos = _long(data, pos)
        for _ in range(count):
            if opt_items:
                b = data[pos]
                if b == 0:
                    pos += 1
                    continue
                if b != 2:
                    raise _Bad("union index")
                pos += 1
            pos = _skip_str(data, pos)

def _skip_map(data, pos):
    """`_map`, nothing kept."""
    while True:
        count, pos = _long(data, pos)
        if count == 0:
            return pos
        if count < 0:
            count = -count
            _, pos = _long(data, pos)
        for _ in range(count):
            pos = _skip_str(data, _skip_str(data, pos))

_OPT_STR, _OPT_BYTES, _OPT_LONG, _OPT_STRS, _OPT_OPT_STRS, _MAP = range(6)
_MESSAGE_TAIL = (_OPT_BYTES, _OPT_STR, _OPT_OPT_STRS, _OPT_STR, _OPT_LONG, _OPT_STR, _OPT_STR, _MAP, _OPT_STR, _OPT_STR,
                 _OPT_LONG, _OPT_STR, _OPT_STR, _OPT_STRS, _OPT_STR)
"""The fields of a Message after `type` and `data`, in `_message`'s order: sealed_original ... outcome."""
_NULLS_AFTER = tuple(bytes(len(_MESSAGE_TAIL) - i - 1) for i in range(len(_MESSAGE_TAIL)))
"""Per field, the encoding of every later field null (the map empty): a message's fields are mostly null."""
_TAILS_SEEN: dict[bytes, list[bytes]] = {}
"""Per message type (its encoded bytes, so their UTF-8 checked once), tails of its messages read before (the
fields after `data`). The reader is deterministic and reads only the bytes it takes, so a tail read once reads
again the same, wherever it stands: a ReadyForQuery's or a CommandComplete's is read once per process."""
_TYPES_KEPT, _TAILS_KEPT = 256, 8

def _skip_tail(data, pos):
    """The fields of a message after `data`, nothing kept: the position after them."""
    for i, field in enumerate(_MESSAGE_TAIL):
        b = data[pos]
        if b == 0:
            pos += 1
            continue
        if field == _MAP:
            pos = _skip_map(data, pos)
        elif b != 2:
            raise _Bad("union index")
        elif field == _OPT_STR:
            pos = _skip_str(data, pos + 1)
        elif field == _OPT_BYTES:
            pos = _bytes_end(data, pos + 1)
        elif field == _OPT_LONG:
            _, pos = _long(data, pos + 1)
        else:
            pos = _skip_strs(data, pos + 1, field == _OPT_OPT_STRS)
        if data.startswith(_NULLS_AFTER[i], pos):
            return pos + len(_NULLS_AFTER[i])
    return pos

def _skip_message(data, pos):
    """`_message`, nothing kept: the position after the message, `_Bad` (or IndexError) where `_message` fails."""
    b = data[pos]  # a type, then data, of under 64 bytes: their length is one byte, read here
    end = pos + 1 + (b >> 1) if b < 0x80 and not b & 1 else _bytes_end(data, pos)
    tails = _TAILS_SEEN.get(type_ := data[pos:end])  # a type cut short is no key: its first byte says its length
    if tails is None:
        _skip_str(data, pos)
        tails = _TAILS_SEEN.setdefault(type_, []) if len(_TAILS_SEEN) < _TYPES_KEPT else []
    b = data[end]
    pos = end + 1 + (b >> 1) if b < 0x80 and not b & 1 else _bytes_end(data, end)
    if pos > len(data):
        raise _Bad("overrun")
    for tail in tails:
        if data.startswith(tail, pos):
            return pos + len(tail)
    end = _skip_tail(data, pos)
    tails.insert(0, data[pos:end])
    del tails[_TAILS_KEPT:]
    return end

def _skip_frames(data, pos):
    """A Frames body (`_frames_envelope`'s), nothing kept: the position after it."""
    pos = _skip_str(data, pos)
    while True:
        count, pos = _long(data, pos)
        if count == 0:
            return pos
        if count < 0:
            count = -count
            _, pos = _long(data, pos)
        for _ in range(count):
            pos = _skip_message(data, pos)


def _skipper(schema: Any, names: dict[str, Callable], namespace: str = "") -> Callable[[bytes, int], int]:
    """A reader of `schema`'s values that keeps nothing: the position after the value, `_Bad` (or IndexError,
    UnicodeDecodeError) for bytes it does not take. It takes no bytes fastavro refuses: strings are UTF-8, a union
    index and a long within their range, nothing read past the end."""
    if isinstance(schema, list):
        branches = [_skipper(branch, names, namespace) for branch in schema]

        def union(data, pos):
            index, pos = _long(data, pos)
            if not 0 <= index < len(branches):
                raise _Bad("union index")
            return branches[index](data, pos)
        return union
    if isinstance(schema, str):
        if schema in _PRIMITIVE_SKIPPERS:
            return _PRIMITIVE_SKIPPERS[schema]
        name = schema if "." in schema or not namespace else f"{namespace}.{schema}"
        return lambda data, pos: names[name](data, pos)  # defined before use, maybe further up (a recursive type)
    kind = schema["type"]
    if kind == "record":
        namespace = schema.get("namespace", namespace)
        fields: list[Callable] = []
        names[schema["name"] if "." in schema["name"] else f"{namespace}.{schema['name']}"] = record = \
            lambda data, pos: _skip_fields(data, pos, fields)
        fields += [_skipper(f["type"], names, namespace) for f in schema["fields"]]
        return record
    if kind in ("array", "map"):
        item = _skipper(schema["items"] if kind == "array" else schema["values"], names, namespace)
        key = _skip_str if kind == "map" else None
        return lambda data, pos: _skip_blocks(data, pos, key, item)
    if kind == "fixed":
        size = schema["size"]
        return lambda data, pos: _skip_fixed(data, pos, size)
    if kind in _PRIMITIVE_SKIPPERS:  # a primitive with attributes, e.g. a logical type
        return _PRIMITIVE_SKIPPERS[kind]
    raise ValueError(f"no skipper for Avro type {kind!r}")

def _skip_fields(data, pos, fields):
    for field in fields:
        pos = field(data, pos)
    return pos

def _skip_blocks(data, pos, key, item):
    while True:
        count, pos = _long(data, pos)
        if count == 0:
            return pos
        if count < 0:
            count = -count
            _, pos = _long(data, pos)
        for _ in range(count):
            if key is not None:
                pos = key(data, pos)
            pos = item(data, pos)

def _skip_fixed(data, pos, size):
    if pos + size > len(data):
        raise _Bad("overrun")
    return pos + size

_PRIMITIVE_SKIPPERS: dict[str, Callable[[bytes, int], int]] = {
    "null": lambda data, pos: pos, "string": _skip_str, "bytes": _bytes_end,
    "long": lambda data, pos: _long(data, pos)[1]}
"""The primitive types the envelope schemas use (any other makes `_skipper` refuse the schema)."""


def _body_skippers(schema_json: dict[str, Any]) -> tuple[Callable[[bytes, int], int], ...]:
    """Per branch of the envelope's body union, its skipper: the hand-written one for Frames (index 1)."""
    body = next(f["type"] for f in schema_json["fields"] if f["name"] == "body")
    names: dict[str, Callable] = {}  # one for all branches: a later one may name a type an earlier one defines
    skippers = [_skipper(branch, names, schema_json.get("namespace", "")) for branch in body]
    skippers[1] = _skip_frames
    return tuple(skippers)


def _envelope_head_only(data: bytes, bodies: tuple[Callable[[bytes, int], int], ...]) -> EnvelopeHead | None:
    """What `_envelope_head` reads, for exactly the bytes the plain reader decodes (else None), the body only
    checked (`bodies`: `_body_skippers`): a verifier that needs no message is spared a dict per message and a str
    per field."""
    try:
        head = _envelope_head(data)
        index, pos = _long(data, head[-1])
        if not 0 <= index < len(bodies):
            return None
        pos = bodies[index](data, pos)
    except (_Bad, IndexError, UnicodeDecodeError):
        return None
    if pos != len(data):
        return None
    return EnvelopeHead(*head[:-1])


class SchemaVersions:
    """Every published writer schema of one record, keyed by fingerprint; decodes to the current one.

    schemas/README.md's evolution rule: events written with any earlier version
    stay readable. A reader looks the writer schema up by the fingerprint in the
    bytes and resolves it to `current` (new fields get their defaults).
    """

    def __init__(self, current: Schema, *earlier: Schema):
        self.current = current
        self.by_fingerprint = {s.fingerprint: s for s in (current, *earlier)}

    def writer(self, data: bytes) -> Schema:
        """The writer schema named by `data`'s single-object header."""
        if data[:2] != MAGIC:
            raise DecodeError("not an Avro single-object encoding (no C3 01 marker)")
        schema = self.by_fingerprint.get(data[2:HEADER_LEN])
        if schema is None:
            known = ", ".join(fp.hex() for fp in self.by_fingerprint)
            raise DecodeError(f"schema fingerprint {data[2:HEADER_LEN].hex()} is none of {known}")
        return schema

    def decode(self, data: bytes) -> dict[str, Any]:
        """`data` as a record of the current schema, whichever published version wrote it."""
        writer = self.writer(data)
        return writer.decode(data, None if writer is self.current else self.current)

    def decode_plain(self, data: bytes) -> tuple[dict[str, Any], bool]:
        """`data` decoded, and whether logical types are left as written (`Schema.plain_decoder`): true when
        the current schema wrote it (the fast path, one parse of the schema per process), else it is
        `decode`d with resolution to the current schema, logical types converted."""
        if data[:HEADER_LEN] == self._current_header:  # the marker too: decode() says why anything else is refused
            if self._fast and (record := _frames_envelope(data)) is not None:
                return record, True
            decoder = self._plain
            if decoder is None:
                decoder = self._plain = self.current.plain_decoder()
            return decoder(data), True
        return self.decode(data), False

    def head(self, data: bytes) -> EnvelopeHead | None:
        """The head of an envelope of the current schema that `decode_plain` decodes, its body checked but not
        built (`_envelope_head_only`); None for anything else, which `decode_plain` then decodes or refuses."""
        if data[:HEADER_LEN] == self._current_header and self._fast:
            return _envelope_head_only(data, _BODIES)
        return None

    _plain = None

    @property
    def _current_header(self) -> bytes:
        return MAGIC + self.current.fingerprint

    @property
    def _fast(self) -> bool:
        """Whether the hand-written reader was written for the current schema (else fastavro reads everything)."""
        return self.current.fingerprint == FRAMES_READER_FINGERPRINT


ENVELOPE = Schema.from_json(schemas.load_json("event.avsc"))
"""custody.Envelope as written now (contract v2)."""
ENVELOPE_V1 = Schema.from_json(schemas.load_json("event.v1.avsc"))
"""custody.Envelope contract v1: no per-message direction, channel, offset or operation fields."""
ENVELOPES = SchemaVersions(ENVELOPE, ENVELOPE_V1)
_BODIES = _body_skippers(schemas.load_json("event.avsc"))
SIGNED_EVENT = Schema.from_json(schemas.load_json("signed_event.avsc"))
