"""Avro single-object encoding of the event schemas.

Single-object encoding is `C3 01`, the writer schema's 8-byte little-endian
CRC-64-AVRO fingerprint, then the Avro binary body. The fingerprint lets any Avro
library find the writer schema, which is what makes the wire format independent
of this code.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Callable

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

def _frames_envelope(data: bytes) -> dict[str, Any] | None:
    """A custody.Envelope (contract v2, `FRAMES_READER_FINGERPRINT`) with a Frames body read by hand: the
    record fastavro's plain decoder returns for it, field for field. None for anything else (another body,
    bytes that do not decode, trailing bytes): then fastavro decodes it, or says why it does not."""
    pos = HEADER_LEN
    try:
        event_id, pos = _str(data, pos)
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
        if data[2:HEADER_LEN] == self.current.fingerprint:
            if self._fast and (record := _frames_envelope(data)) is not None:
                return record, True
            decoder = self._plain
            if decoder is None:
                decoder = self._plain = self.current.plain_decoder()
            return decoder(data), True
        return self.decode(data), False

    _plain = None

    @property
    def _fast(self) -> bool:
        """Whether the hand-written reader was written for the current schema (else fastavro reads everything)."""
        return self.current.fingerprint == FRAMES_READER_FINGERPRINT


ENVELOPE = Schema.from_json(schemas.load_json("event.avsc"))
"""custody.Envelope as written now (contract v2)."""
ENVELOPE_V1 = Schema.from_json(schemas.load_json("event.v1.avsc"))
"""custody.Envelope contract v1: no per-message direction, channel, offset or operation fields."""
ENVELOPES = SchemaVersions(ENVELOPE, ENVELOPE_V1)
SIGNED_EVENT = Schema.from_json(schemas.load_json("signed_event.avsc"))
