"""A hand-written Avro encoder of the event envelope: the bytes `ENVELOPE.encode` returns, about 5x cheaper.

Why: a py-spy --gil profile of the recorder under pgbench put fastavro's `schemaless_writer` at 49% of the
recorder's CPU, ~7.5 µs per protocol message of a folded Frames event (40 messages: ~300 µs an event), on
the process that signs and sends every event. Most of it is fastavro's generic walk (a schema lookup, a
logical-type check and a union search per field); this writes the one schema it is for, field by field.

It is written for one writer schema, schemas/event.avsc of contract v2 (`ENVELOPE_WRITER_FINGERPRINT`;
against any other `ENVELOPE` every envelope goes to fastavro, and the tests that require the fast path fail),
and only for the hot case: a Frames body given as `SessionChain.event` gives every body, the tuple
`("custody.Frames", body)` that names the union's branch (a plain dict body makes fastavro validate it
against every branch, with rules of its own such as a "-type" key, so it stays fastavro's). Its values must
have exactly the types fastavro writes without converting them: str, bytes (prev_hash: 32 of them), int within 64 bits,
None for an optional field, dict for a record or map, list for an array. Anything else (the other bodies,
one event per session start or end; a UUID or datetime for a logical type; bytearray, tuple, bool, a long
beyond 64 bits, a missing field, a string that is not UTF-8 encodable) goes to `ENVELOPE.encode`, which
stays the reference: it writes what it accepts and raises its own error for what it refuses, so nothing
this module returns differs from it (tests/test_envelope_writer.py checks that byte for byte).
"""

from __future__ import annotations

from typing import Any

from ingest.avro import ENVELOPE, MAGIC

ENVELOPE_WRITER_FINGERPRINT = bytes.fromhex("88a4547fdfe53978")
"""The writer schema this module encodes: schemas/event.avsc as of contract v2."""

_WRITES_ENVELOPE = ENVELOPE.fingerprint == ENVELOPE_WRITER_FINGERPRINT
_HEADER = MAGIC + ENVELOPE.fingerprint
_FRAMES = "custody.Frames"
_FRAMES_BRANCH = b"\x02"  # union index 1 (zig-zag 1)
_NULL = b"\x00"  # union index 0, and also the end of an array or map
_SOME = b"\x02"  # union index 1: the value follows
_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1
_NO_ATTRIBUTES: dict[str, str] = {}  # the schema default of Message.attributes; never mutated


class _Fallback(Exception):
    """A value this encoder does not write itself: fastavro decides (encodes it, or says why not)."""


def _varint(n: int) -> bytes:
    """Zig-zag varint of a long in 64 bits (the caller checks the range, as fastavro's C long does)."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_TABLE = 4096
_SMALL = tuple(_varint(n) for n in range(_TABLE))
"""Precomputed varints of 0..4095: lengths of most strings and frames, rows, offsets, seq."""
_SOME_SMALL = tuple(_SOME + v for v in _SMALL)
"""The same behind the union index of an optional value, to save a concatenation."""


def _long(n: Any) -> bytes:
    """A long: an int only (fastavro truncates a float, writes a bool as 0/1: those stay its own)."""
    if type(n) is not int:
        raise _Fallback
    if 0 <= n < _TABLE:
        return _SMALL[n]
    if not _LONG_MIN <= n <= _LONG_MAX:
        raise _Fallback
    return _varint(n)


def _length(n: int) -> bytes:
    """The length or count before bytes, a string, an array block or a map block."""
    return _SMALL[n] if n < _TABLE else _varint(n)


def _string(s: Any) -> bytes:
    """A string: a str only (fastavro's `.encode()` would take anything that has one)."""
    if type(s) is not str:
        raise _Fallback
    b = s.encode()
    n = len(b)
    return (_SMALL[n] if n < _TABLE else _varint(n)) + b


def _bytes(b: Any) -> bytes:
    """Bytes: a bytes only (fastavro takes any buffer, but refuses a bytearray in a union it validates)."""
    if type(b) is not bytes:
        raise _Fallback
    n = len(b)
    return (_SMALL[n] if n < _TABLE else _varint(n)) + b


def _some_string(s: Any) -> bytes:
    """An optional string that is not null: union index 1, then the string."""
    if type(s) is not str:
        raise _Fallback
    b = s.encode()
    n = len(b)
    return (_SOME_SMALL[n] if n < _TABLE else _SOME + _varint(n)) + b


def _opt_string(s: Any) -> bytes:
    """A parameter: null (SQL NULL) or its text."""
    return _NULL if s is None else _some_string(s)


def _some_bytes(b: Any) -> bytes:
    """Message.sealed_original, not null."""
    return _SOME + _bytes(b)


def _some_long(n: Any) -> bytes:
    """Message.rows or offset_us, not null."""
    return _SOME + _long(n)


def _some_strings(items: Any) -> bytes:
    """Message.objects, not null: an array of strings, one block of all items, then the 0 that ends it (the
    layout fastavro writes)."""
    if type(items) is not list:
        raise _Fallback
    if not items:
        return _SOME + _NULL
    return b"".join((_SOME, _length(len(items)), *map(_string, items), _NULL))


def _some_opt_strings(items: Any) -> bytes:
    """Message.parameters, not null: an array of optional strings (a NULL parameter is None)."""
    if type(items) is not list:
        raise _Fallback
    if not items:
        return _SOME + _NULL
    return b"".join((_SOME, _length(len(items)), *map(_opt_string, items), _NULL))


def _map(d: Any) -> bytes:
    """A map of strings: one block of all pairs in the dict's order, then 0 (fastavro's layout)."""
    if type(d) is not dict:
        raise _Fallback
    if not d:
        return _NULL
    parts = [_length(len(d))]
    for k, v in d.items():
        parts.append(_string(k))
        parts.append(_string(v))
    parts.append(_NULL)
    return b"".join(parts)


def _message(m: Any) -> bytes:
    """One Message record, its fields in schema order; an absent optional field is its default (null, {}).
    Most of a message's fields are null: those cost a lookup and a comparison, not a call."""
    if type(m) is not dict:
        raise _Fallback
    get = m.get
    return b"".join((
        _string(m["type"]),
        _bytes(m["data"]),
        _NULL if (v := get("sealed_original")) is None else _some_bytes(v),
        _NULL if (v := get("statement")) is None else _some_string(v),
        _NULL if (v := get("parameters")) is None else _some_opt_strings(v),
        _NULL if (v := get("command_tag")) is None else _some_string(v),
        _NULL if (v := get("rows")) is None else _some_long(v),
        _NULL if (v := get("error_code")) is None else _some_string(v),
        _NULL if (v := get("error_message")) is None else _some_string(v),
        _NULL if (v := get("attributes", _NO_ATTRIBUTES)) is _NO_ATTRIBUTES else _map(v),
        _NULL if (v := get("direction")) is None else _some_string(v),
        _NULL if (v := get("channel")) is None else _some_string(v),
        _NULL if (v := get("offset_us")) is None else _some_long(v),
        _NULL if (v := get("operation")) is None else _some_string(v),
        _NULL if (v := get("text")) is None else _some_string(v),
        _NULL if (v := get("objects")) is None else _some_strings(v),
        _NULL if (v := get("outcome")) is None else _some_string(v),
    ))


def _frames(body: Any) -> bytes:
    """A Frames record: its direction, then its messages as one array block."""
    if type(body) is not dict:
        raise _Fallback
    messages = body["messages"]
    if type(messages) is not list:
        raise _Fallback
    if not messages:
        return _string(body["direction"]) + _NULL
    return b"".join((_string(body["direction"]), _length(len(messages)), *map(_message, messages), _NULL))


def _frames_body(body: Any) -> Any:
    """The Frames record of a body given as `(branch name, record)`; _Fallback for any other body."""
    if type(body) is tuple and len(body) == 2 and body[0] == _FRAMES:
        return body[1]
    raise _Fallback


def _fixed32(b: Any) -> bytes:
    """prev_hash, a fixed of 32 bytes: written as is, after the length check fastavro makes too."""
    if type(b) is not bytes or len(b) != 32:
        raise _Fallback
    return b


def _frames_envelope(envelope: Any) -> bytes:
    """The single-object encoding of an envelope with a Frames body; _Fallback (or KeyError) for any other."""
    if type(envelope) is not dict:
        raise _Fallback
    return b"".join((
        _HEADER,
        _string(envelope["event_id"]),
        _string(envelope["session_id"]),
        _long(envelope["seq"]),
        _long(envelope["ts"]),
        _string(envelope["producer"]),
        _string(envelope["key_id"]),
        _fixed32(envelope["prev_hash"]),
        _string(envelope["kind"]),
        _FRAMES_BRANCH,
        _frames(_frames_body(envelope["body"])),
    ))


def encode_envelope(envelope: dict[str, Any]) -> bytes:
    """`ENVELOPE.encode(envelope)`, byte for byte: a Frames envelope written here, anything else by fastavro
    (which also raises, as before, for an envelope it refuses)."""
    if _WRITES_ENVELOPE:
        try:
            return _frames_envelope(envelope)
        except (_Fallback, KeyError, UnicodeError):
            pass
    return ENVELOPE.encode(envelope)
