"""A small sans-I/O SPDY/3.1 framing codec: what kubectl 1.27–1.29 (and any client that falls back)
speaks for exec, attach and port-forward after `Upgrade: SPDY/3.1`.

There is no maintained Python SPDY library, so this is the part of the SPDY/3.1 draft
(draft-mbelshe-httpbis-spdy-00 + the 3.1 flow-control change) that those streams use:

* Frames. A control frame is `1 | version(15) | type(16) | flags(8) | length(24)` then its body; a
  data frame is `0 | stream-id(31) | flags(8) | length(24)` then its payload. FLAG_FIN (0x01) ends a
  stream's side; SYN_STREAM may also be FLAG_UNIDIRECTIONAL (0x02).
* Control frames: SYN_STREAM (1), SYN_REPLY (2), RST_STREAM (3), SETTINGS (4), PING (6), GOAWAY (7),
  HEADERS (8), WINDOW_UPDATE (9); others are kept as `Unknown` (a receiver must ignore them).
* Header blocks (SYN_STREAM, SYN_REPLY, HEADERS): `count(32)` then `len(32) name len(32) value`
  pairs (several values of one name NUL-separated), compressed with zlib using the spec's
  dictionary, one zlib stream per direction for the whole connection, each block ended with a
  sync flush. So a decoder must see every header block of its direction, in order: `FrameReader`
  keeps that stream; `FrameWriter` keeps the compressing one.

`FrameReader.feed(data)` returns `(frame, wire_bytes)` pairs for every complete frame, so a relay
can pass on exactly the frames it has recorded (record before relay) and keep a partial one back.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from .. import ProtocolViolation

VERSION = 3
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, NOOP, PING, GOAWAY, HEADERS, WINDOW_UPDATE = range(1, 10)
CONTROL_NAMES = {SYN_STREAM: "syn_stream", SYN_REPLY: "syn_reply", RST_STREAM: "rst_stream",
                 SETTINGS: "settings", PING: "ping", GOAWAY: "goaway", HEADERS: "headers",
                 WINDOW_UPDATE: "window_update"}
REFUSED_STREAM = 3  # RST_STREAM status: the stream was not opened
MAX_FRAME = 1 << 24  # the 24-bit length field's bound
MAX_HEADER_BLOCK = 1 << 20  # a decompressed header block larger than this is refused (zlib bomb)

_WORDS = (
    "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset", "accept-encoding",
    "accept-language", "accept-ranges", "age", "allow", "authorization", "cache-control", "connection",
    "content-base", "content-encoding", "content-language", "content-length", "content-location",
    "content-md5", "content-range", "content-type", "date", "etag", "expect", "expires", "from", "host",
    "if-match", "if-modified-since", "if-none-match", "if-range", "if-unmodified-since", "last-modified",
    "location", "max-forwards", "pragma", "proxy-authenticate", "proxy-authorization", "range", "referer",
    "retry-after", "server", "te", "trailer", "transfer-encoding", "upgrade", "user-agent", "vary", "via",
    "warning", "www-authenticate", "method", "get", "status", "200 OK", "version", "HTTP/1.1", "url",
    "public", "set-cookie", "keep-alive", "origin",
)
_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
    "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
    "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY = b"".join(struct.pack(">I", len(w)) + w.encode() for w in _WORDS) + _TAIL.encode()
"""The SPDY/3 header compression dictionary (spec section 2.6.10.1), 1423 bytes."""

Headers = list[tuple[str, str]]


class _Ends:
    """A frame that may carry FLAG_FIN: its sender's side of the stream ends with it."""

    flags: int

    @property
    def fin(self) -> bool:
        return bool(self.flags & FLAG_FIN)


@dataclass(frozen=True)
class DataFrame(_Ends):
    stream_id: int
    data: bytes
    flags: int = 0


@dataclass(frozen=True)
class SynStream(_Ends):
    stream_id: int
    headers: Headers
    associated_to: int = 0
    priority: int = 0
    flags: int = 0


@dataclass(frozen=True)
class _StreamHeaders(_Ends):
    """SYN_REPLY and HEADERS have one body: a stream id and a header block."""

    stream_id: int
    headers: Headers
    flags: int = 0


class SynReply(_StreamHeaders):
    """The answer to a SYN_STREAM (kubectl's streams are accepted with one)."""


class HeadersFrame(_StreamHeaders):
    """More headers on an open stream."""


@dataclass(frozen=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True)
class Settings:
    entries: list[tuple[int, int, int]] = field(default_factory=list)  # (flags, id, value)
    flags: int = 0


@dataclass(frozen=True)
class Ping:
    ping_id: int


@dataclass(frozen=True)
class GoAway:
    last_stream_id: int
    status: int = 0


@dataclass(frozen=True)
class WindowUpdate:
    stream_id: int
    delta: int


@dataclass(frozen=True)
class Unknown:
    type: int
    flags: int
    body: bytes


Frame = (DataFrame | SynStream | SynReply | HeadersFrame | RstStream | Settings | Ping | GoAway
         | WindowUpdate | Unknown)


def frame_name(frame: Frame) -> str:
    """`data`, `syn_stream`, …: the record type's suffix."""
    return {DataFrame: "data", SynStream: "syn_stream", SynReply: "syn_reply", HeadersFrame: "headers",
            RstStream: "rst_stream", Settings: "settings", Ping: "ping", GoAway: "goaway",
            WindowUpdate: "window_update"}.get(type(frame), "unknown")


def header(headers: Headers, name: str) -> str | None:
    name = name.lower()
    return next((value for key, value in headers if key.lower() == name), None)


def _violation(text: str) -> ProtocolViolation:
    return ProtocolViolation("spdy", text)


def encode_header_block(headers: Headers) -> bytes:
    """The uncompressed header block; names are lower-cased as SPDY/3 requires."""
    out = [struct.pack(">I", len(headers))]
    for name, value in headers:
        raw_name, raw_value = name.lower().encode(), value.encode()
        out += [struct.pack(">I", len(raw_name)), raw_name, struct.pack(">I", len(raw_value)), raw_value]
    return b"".join(out)


def decode_header_block(block: bytes) -> Headers:
    try:
        (count,) = struct.unpack_from(">I", block, 0)
        offset, headers = 4, []
        for _ in range(count):
            (length,) = struct.unpack_from(">I", block, offset)
            name = block[offset + 4:offset + 4 + length]
            offset += 4 + length
            (length,) = struct.unpack_from(">I", block, offset)
            value = block[offset + 4:offset + 4 + length]
            offset += 4 + length
            if offset > len(block):
                raise _violation("header block truncated")
            headers.append((name.decode("utf-8", "replace"), value.decode("utf-8", "replace")))
    except struct.error:
        raise _violation("header block truncated") from None
    return headers


def syn_stream_as_headers(wire: bytes) -> bytes:
    """A SYN_STREAM's exact header block moved into a HEADERS frame on the same (never opened) stream id.

    A relay that must not open a stream still has to pass its header block on: the receiver's header
    decompression is one zlib stream for the whole connection, so dropping a block would garble every
    later one. A HEADERS frame for a stream the receiver does not know is inflated and then ignored."""
    if len(wire) < 18 or not wire[0] & 0x80 or struct.unpack_from(">H", wire, 2)[0] != SYN_STREAM:
        raise _violation("not a SYN_STREAM frame")
    return FrameWriter.control(HEADERS, 0, wire[8:12] + wire[18:])


class FrameReader:
    """One direction's frames: bytes in, complete frames (with their exact wire bytes) out."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)
        self._max_frame = max_frame

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[Frame, bytes]]:
        self._buffer += data
        out: list[tuple[Frame, bytes]] = []
        buffer = self._buffer
        offset = 0
        while len(buffer) - offset >= 8:
            word, flags_length = struct.unpack_from(">II", buffer, offset)
            flags, length = flags_length >> 24, flags_length & 0xFFFFFF
            if length > self._max_frame:
                raise _violation(f"frame of {length} bytes is larger than {self._max_frame}")
            end = offset + 8 + length
            if end > len(buffer):
                break
            wire = bytes(buffer[offset:end])
            body = wire[8:]
            if word & 0x80000000:
                version, kind = (word >> 16) & 0x7FFF, word & 0xFFFF
                if version != VERSION:
                    raise _violation(f"SPDY version {version}, expected {VERSION}")
                frame = self._control(kind, flags, body)
            else:
                frame = DataFrame(word & 0x7FFFFFFF, body, flags)
            out.append((frame, wire))
            offset = end
        del buffer[:offset]
        return out

    def _headers(self, compressed: bytes) -> Headers:
        try:
            block = self._inflate.decompress(compressed, MAX_HEADER_BLOCK)
        except zlib.error as exc:
            raise _violation(f"header block does not decompress: {exc}") from None
        if self._inflate.unconsumed_tail:
            raise _violation(f"header block larger than {MAX_HEADER_BLOCK} bytes")
        return decode_header_block(block)

    def _control(self, kind: int, flags: int, body: bytes) -> Frame:
        try:
            if kind == SYN_STREAM:
                stream_id, associated, priority = struct.unpack_from(">IIB", body, 0)
                return SynStream(stream_id & 0x7FFFFFFF, self._headers(body[10:]), associated & 0x7FFFFFFF,
                                 priority >> 5, flags)
            if kind in (SYN_REPLY, HEADERS):
                (stream_id,) = struct.unpack_from(">I", body, 0)
                shape = SynReply if kind == SYN_REPLY else HeadersFrame
                return shape(stream_id & 0x7FFFFFFF, self._headers(body[4:]), flags)
            if kind == RST_STREAM:
                stream_id, status = struct.unpack_from(">II", body, 0)
                return RstStream(stream_id & 0x7FFFFFFF, status)
            if kind == SETTINGS:
                (count,) = struct.unpack_from(">I", body, 0)
                entries = []
                for index in range(count):
                    id_flags, value = struct.unpack_from(">II", body, 4 + 8 * index)
                    entries.append((id_flags >> 24, id_flags & 0xFFFFFF, value))
                return Settings(entries, flags)
            if kind == PING:
                return Ping(struct.unpack_from(">I", body, 0)[0])
            if kind == GOAWAY:
                last, *status = struct.unpack_from(">II" if len(body) >= 8 else ">I", body, 0)
                return GoAway(last & 0x7FFFFFFF, status[0] if status else 0)
            if kind == WINDOW_UPDATE:
                stream_id, delta = struct.unpack_from(">II", body, 0)
                return WindowUpdate(stream_id & 0x7FFFFFFF, delta & 0x7FFFFFFF)
        except struct.error:
            raise _violation(f"control frame {CONTROL_NAMES.get(kind, kind)} truncated") from None
        return Unknown(kind, flags, body)


class FrameWriter:
    """One direction's frames out: it keeps the header-compression stream."""

    def __init__(self) -> None:
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY,
                                         zdict=DICTIONARY)

    def _compress(self, headers: Headers) -> bytes:
        block = encode_header_block(headers)
        return self._deflate.compress(block) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    @staticmethod
    def control(kind: int, flags: int, body: bytes) -> bytes:
        """One control frame's bytes around `body`."""
        return struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(body)) + body

    def data(self, stream_id: int, data: bytes, fin: bool = False) -> bytes:
        return struct.pack(">II", stream_id & 0x7FFFFFFF, ((FLAG_FIN if fin else 0) << 24) | len(data)) + data

    def syn_stream(self, stream_id: int, headers: Headers, *, fin: bool = False, priority: int = 0,
                   associated_to: int = 0) -> bytes:
        body = struct.pack(">IIBB", stream_id, associated_to, (priority & 7) << 5, 0) + self._compress(headers)
        return self.control(SYN_STREAM, FLAG_FIN if fin else 0, body)

    def _stream_headers(self, kind: int, stream_id: int, headers: Headers, fin: bool) -> bytes:
        return self.control(kind, FLAG_FIN if fin else 0, struct.pack(">I", stream_id) + self._compress(headers))

    def syn_reply(self, stream_id: int, headers: Headers, *, fin: bool = False) -> bytes:
        return self._stream_headers(SYN_REPLY, stream_id, headers, fin)

    def headers(self, stream_id: int, headers: Headers, *, fin: bool = False) -> bytes:
        return self._stream_headers(HEADERS, stream_id, headers, fin)

    def rst_stream(self, stream_id: int, status: int) -> bytes:
        return self.control(RST_STREAM, 0, struct.pack(">II", stream_id, status))

    def settings(self, entries: list[tuple[int, int, int]]) -> bytes:
        body = struct.pack(">I", len(entries)) + b"".join(struct.pack(">II", (f << 24) | i, v) for f, i, v in entries)
        return self.control(SETTINGS, 0, body)

    def ping(self, ping_id: int) -> bytes:
        return self.control(PING, 0, struct.pack(">I", ping_id))

    def goaway(self, last_stream_id: int, status: int = 0) -> bytes:
        return self.control(GOAWAY, 0, struct.pack(">II", last_stream_id, status))

    def window_update(self, stream_id: int, delta: int) -> bytes:
        return self.control(WINDOW_UPDATE, 0, struct.pack(">II", stream_id, delta))


__all__ = [
    "DICTIONARY", "DataFrame", "FLAG_FIN", "Frame", "FrameReader", "FrameWriter", "GoAway", "HeadersFrame",
    "Ping", "RstStream", "Settings", "SynReply", "SynStream", "Unknown", "WindowUpdate", "frame_name", "header",
    "syn_stream_as_headers",
]
