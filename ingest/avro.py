"""Avro single-object encoding of the event schemas.

Single-object encoding is `C3 01`, the writer schema's 8-byte little-endian
CRC-64-AVRO fingerprint, then the Avro binary body. The fingerprint lets any Avro
library find the writer schema, which is what makes the wire format independent
of this code.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

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

    @classmethod
    def from_json(cls, schema_json: dict[str, Any]) -> "Schema":
        parsed = fastavro.parse_schema(schema_json)
        # fastavro's hex is already the little-endian byte order the spec puts on the wire.
        fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
        return cls(parsed, fp)

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


ENVELOPE = Schema.from_json(schemas.load_json("event.avsc"))
"""custody.Envelope as written now (contract v2)."""
ENVELOPE_V1 = Schema.from_json(schemas.load_json("event.v1.avsc"))
"""custody.Envelope contract v1: no per-message direction, channel, offset or operation fields."""
ENVELOPES = SchemaVersions(ENVELOPE, ENVELOPE_V1)
SIGNED_EVENT = Schema.from_json(schemas.load_json("signed_event.avsc"))
