"""Sans-I/O framing of the PostgreSQL frontend/backend protocol (version 3).

The proxy moves bytes; this module only cuts them into messages. Each
direction gets its own `MessageReader`: feed it whatever a network read
returned and it hands back every message completed so far, each with its
exact wire bytes, so that the recorder can store what was relayed bit for bit.

Anything that does not frame as PostgreSQL raises `ProtocolViolation` and
nothing else: the caller turns it into a FATAL ErrorResponse and a
`ProtocolError` event, and must never see a stray IndexError from a hostile
peer.
"""

from __future__ import annotations

import struct
from typing import Literal, NamedTuple

from .. import ProtocolViolation as _ProtocolViolation

PROTOCOL_VIOLATION = "08P01"
FEATURE_NOT_SUPPORTED = "0A000"

Direction = Literal["client", "server"]

CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
PROTOCOL_MAJOR = 3

DEFAULT_MAX_CLIENT_MESSAGE = 1 << 20
DEFAULT_MAX_SERVER_MESSAGE = 64 << 20
# PostgreSQL's MAX_STARTUP_PACKET_LENGTH and PQ_SMALL_MESSAGE_LIMIT.
DEFAULT_MAX_STARTUP_PACKET = 10_000
SMALL_MESSAGE_LIMIT = 10_000
# A cancel key is 4 to 256 bytes (4 in protocol 3.0, longer from 3.2 on).
MIN_CANCEL_KEY, MAX_CANCEL_KEY = 4, 256

_TYPED_HEADER = 5  # type byte + Int32 length
_STARTUP_HEADER = 8  # Int32 length + Int32 request code
_COPY_VIA_VIEW = 64 << 10  # messages at least this long are copied through a memoryview
_LENGTH = struct.Struct(">I")
_STARTUP = struct.Struct(">iI")


class ProtocolViolation(_ProtocolViolation):
    """The peer broke the PostgreSQL wire protocol; `code` is the SQLSTATE to report."""


def violation(message: str) -> ProtocolViolation:
    """The common case: SQLSTATE 08P01 protocol_violation."""
    return ProtocolViolation(PROTOCOL_VIOLATION, message)


class Message(NamedTuple):
    """One framed message: its protocol name and its exact wire bytes.

    A tuple rather than a dataclass because one is built per message on the
    proxy's hot path, and tuples are the cheapest object CPython makes.

    `count` > 1 only from a reader that coalesces runs: then `data` is that
    many consecutive messages of `type`, back to back, each one checked as
    it would have been alone (`single_messages` cuts them apart again).
    """

    type: str
    data: bytes
    count: int = 1

    @property
    def payload(self) -> bytes:
        """The body after the header (type byte, if any, and length); of a single message only."""
        return self.data[4 if self.type in UNTYPED_MESSAGES else 5 :]


UNTYPED_MESSAGES = frozenset({"StartupMessage", "SSLRequest", "GSSENCRequest", "CancelRequest"})
_ENCRYPTION_REQUESTS = frozenset({"SSLRequest", "GSSENCRequest"})

# type byte -> (name, minimum length, maximum length or None for the reader's
# limit). Lengths count the length field itself, as on the wire. The limits
# mirror the server: fixed-size messages must be exactly their size, and the
# client's small control messages are capped as PostgreSQL caps them.
_Spec = dict[bytes, tuple[str, int, int | None]]

CLIENT_MESSAGES: _Spec = {
    b"B": ("Bind", 12, None),
    b"C": ("Close", 6, SMALL_MESSAGE_LIMIT),
    b"d": ("CopyData", 4, None),
    b"c": ("CopyDone", 4, 4),
    b"f": ("CopyFail", 5, SMALL_MESSAGE_LIMIT),
    b"D": ("Describe", 6, SMALL_MESSAGE_LIMIT),
    b"E": ("Execute", 9, SMALL_MESSAGE_LIMIT),
    b"H": ("Flush", 4, 4),
    b"F": ("FunctionCall", 14, None),
    b"P": ("Parse", 8, None),
    # PasswordMessage, SASLInitialResponse, SASLResponse and GSSResponse all
    # use 'p'; only the authentication exchange tells them apart.
    b"p": ("PasswordMessage", 4, None),
    b"Q": ("Query", 5, None),
    b"S": ("Sync", 4, 4),
    b"X": ("Terminate", 4, 4),
}

SERVER_MESSAGES: _Spec = {
    b"R": ("AuthenticationRequest", 8, None),
    b"K": ("BackendKeyData", 8 + MIN_CANCEL_KEY, 8 + MAX_CANCEL_KEY),
    b"2": ("BindComplete", 4, 4),
    b"3": ("CloseComplete", 4, 4),
    b"C": ("CommandComplete", 5, None),
    b"d": ("CopyData", 4, None),
    b"c": ("CopyDone", 4, 4),
    b"G": ("CopyInResponse", 7, None),
    b"H": ("CopyOutResponse", 7, None),
    b"W": ("CopyBothResponse", 7, None),
    b"D": ("DataRow", 6, None),
    b"I": ("EmptyQueryResponse", 4, 4),
    b"E": ("ErrorResponse", 5, None),
    b"V": ("FunctionCallResponse", 8, None),
    b"v": ("NegotiateProtocolVersion", 12, None),
    b"n": ("NoData", 4, 4),
    b"N": ("NoticeResponse", 5, None),
    b"A": ("NotificationResponse", 10, None),
    b"t": ("ParameterDescription", 6, None),
    b"S": ("ParameterStatus", 6, None),
    b"1": ("ParseComplete", 4, 4),
    b"s": ("PortalSuspended", 4, 4),
    b"Z": ("ReadyForQuery", 5, 5),
    b"T": ("RowDescription", 6, None),
}

_Entry = tuple[str, int, int, bool] | None


def _dispatch_table(spec: _Spec, max_size: int, runs: frozenset[str]) -> list[_Entry]:
    """A 256-slot list indexed by type byte: one list index per message, which also says whether its
    messages come in runs."""
    table: list[_Entry] = [None] * 256
    for code, (name, low, high) in spec.items():
        table[code[0]] = (name, low, max_size if high is None else min(high, max_size), name in runs)
    return table


class MessageReader:
    """Incremental parser for one direction of one connection.

    `max_message_size` bounds the length field, which counts itself but not
    the type byte; `max_startup_size` bounds startup packets.

    The client direction starts in the startup phase, whose packets have no
    type byte, and leaves it by itself after the StartupMessage (the only
    startup packet after which the client speaks typed messages);
    `start_typed` forces the switch for callers that know better.

    Bytes accumulate in one bytearray; parsing walks it with an offset and
    drops the consumed prefix once per `feed` (a cheap pointer move in
    CPython), so a message arriving in many chunks costs O(its size).
    """

    def __init__(
        self,
        direction: Direction,
        *,
        max_message_size: int | None = None,
        max_startup_size: int = DEFAULT_MAX_STARTUP_PACKET,
        runs: frozenset[str] = frozenset(),
    ) -> None:
        if direction == "client":
            spec, default_max = CLIENT_MESSAGES, DEFAULT_MAX_CLIENT_MESSAGE
        elif direction == "server":
            spec, default_max = SERVER_MESSAGES, DEFAULT_MAX_SERVER_MESSAGE
        else:
            raise ValueError(f"direction must be 'client' or 'server', not {direction!r}")
        self.direction = direction
        self.max_message_size = default_max if max_message_size is None else max_message_size
        self.max_startup_size = max_startup_size
        self._table = _dispatch_table(spec, self.max_message_size, runs)
        self._buffer = bytearray()
        self._needed = _STARTUP_HEADER if direction == "client" else _TYPED_HEADER
        self._startup = direction == "client"
        self._error: ProtocolViolation | None = None

    @property
    def in_startup(self) -> bool:
        """True while the reader expects untyped startup packets."""
        return self._startup

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete message."""
        return len(self._buffer)

    def start_typed(self) -> None:
        """Leave the startup phase: from now on every message has a type byte."""
        self._startup = False
        self._needed = _TYPED_HEADER

    def feed(self, data: bytes) -> list[Message]:
        """Add bytes from the peer; return the messages they complete, in order.

        After a `ProtocolViolation` the stream has lost its framing for good,
        so every later call raises the same error.
        """
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        buffer += data
        if len(buffer) < self._needed:
            return []
        messages: list[Message] = []
        try:
            consumed = self._parse_startup(messages) if self._startup else 0
            if not self._startup:
                consumed = self._parse_typed(messages, consumed)
        except ProtocolViolation as error:
            self._error = error
            raise
        del buffer[:consumed]
        return messages

    def eof(self) -> None:
        """The peer closed its side: leftover bytes mean a truncated message."""
        if self._error is not None:
            raise self._error
        if self._buffer:
            kind = "startup packet" if self._startup else "message"
            self._error = violation(
                f"incomplete {kind} at end of stream ({len(self._buffer)} bytes buffered)"
            )
            raise self._error

    def _parse_typed(self, out: list[Message], position: int) -> int:
        """Cut typed messages from `position`; return the offset consumed up to."""
        buffer, table, unpack = self._buffer, self._table, _LENGTH.unpack_from
        new = tuple.__new__  # Message's own __new__ is a Python function: ~100 ns more a message
        end = len(buffer)
        needed = _TYPED_HEADER
        while end - position >= _TYPED_HEADER:
            code = buffer[position]
            entry = table[code]
            if entry is None:
                raise violation(f"invalid {self.direction} message type {chr(code)!r}")
            name, low, high, run = entry
            length = unpack(buffer, position + 1)[0]
            if length < low or length > high:
                raise violation(f"invalid length {length} for {name} (allowed {low}..{high})")
            stop = position + 1 + length
            if stop > end:
                needed = stop - position
                break
            if run and end - stop >= _TYPED_HEADER and buffer[stop] == code:  # a run of two or more
                stop, count, incomplete = self._run_end(entry, code, stop, end)
                out.append(new(Message, (name, _copy(buffer, position, stop), count)))
                if incomplete:
                    position, needed = stop, incomplete
                    break
            elif length < _COPY_VIA_VIEW:  # inline: most messages, a call fewer each
                out.append(new(Message, (name, bytes(buffer[position:stop]), 1)))
            else:
                out.append(new(Message, (name, _copy(buffer, position, stop), 1)))
            position = stop
        self._needed = needed
        return position

    def _run_end(self, entry: tuple[str, int, int, bool], code: int, position: int, end: int) -> tuple[int, int, int]:
        """Where the run of `code` messages that has one complete message before `position` ends: its end, its
        message count, and the bytes the incomplete message of the run after it needs (0 if there is none).
        One comparison, one unpack and one bounds check a message, no object: a million-row result is a
        million DataRows, and a Message each was most of the relay's CPU per row."""
        buffer, unpack = self._buffer, _LENGTH.unpack_from
        name, low, high, _ = entry
        count = 1
        while end - position >= _TYPED_HEADER and buffer[position] == code:
            length = unpack(buffer, position + 1)[0]
            if length < low or length > high:
                raise violation(f"invalid length {length} for {name} (allowed {low}..{high})")
            stop = position + 1 + length
            if stop > end:
                return position, count, stop - position
            position, count = stop, count + 1
        return position, count, 0

    def _parse_startup(self, out: list[Message]) -> int:
        """Cut startup packets until the StartupMessage or the data runs out."""
        buffer = self._buffer
        end = len(buffer)
        position = 0
        self._needed = _STARTUP_HEADER
        while end - position >= _STARTUP_HEADER:
            length, code = _STARTUP.unpack_from(buffer, position)
            if length < _STARTUP_HEADER or length > self.max_startup_size:
                raise violation(f"invalid length of startup packet: {length}")
            name = _startup_packet_name(code, length)
            stop = position + length
            if stop > end:
                self._needed = length
                break
            out.append(Message(name, bytes(buffer[position:stop])))
            position = stop
            if name == "StartupMessage":
                self.start_typed()
                break
            if name in _ENCRYPTION_REQUESTS and stop < end:
                # The client must wait for our answer; bytes sent before it
                # could be a man-in-the-middle's plaintext (CVE-2021-23214).
                raise violation(f"received unencrypted data after {name}")
        return position


def _copy(buffer: bytearray, start: int, stop: int) -> bytes:
    """Bytes of the buffer: a large span copied once, through a view; a small
    one sliced twice (bytearray, then bytes), cheaper than setting up a view."""
    if stop - start < _COPY_VIA_VIEW:
        return bytes(buffer[start:stop])
    with memoryview(buffer) as view:
        return bytes(view[start:stop])


def single_messages(messages: list[Message]) -> list[Message]:
    """The messages one by one: each run cut at its boundaries (the reader checked them)."""
    out: list[Message] = []
    new, unpack = tuple.__new__, _LENGTH.unpack_from
    for message in messages:
        if message.count == 1:
            out.append(message)
            continue
        kind, data, position = message.type, message.data, 0
        for _ in range(message.count):
            stop = position + 1 + unpack(data, position + 1)[0]
            out.append(new(Message, (kind, data[position:stop], 1)))
            position = stop
    return out


def _startup_packet_name(code: int, length: int) -> str:
    """Name a startup packet by its request code, checking its length fits."""
    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
        if length != _STARTUP_HEADER:
            raise violation(f"invalid length {length} of encryption request")
        return "SSLRequest" if code == SSL_REQUEST_CODE else "GSSENCRequest"
    if code == CANCEL_REQUEST_CODE:
        if not _STARTUP_HEADER + 4 + MIN_CANCEL_KEY <= length <= _STARTUP_HEADER + 4 + MAX_CANCEL_KEY:
            raise violation(f"invalid length {length} of cancel request")
        return "CancelRequest"
    major, minor = code >> 16, code & 0xFFFF
    if major != PROTOCOL_MAJOR:
        raise ProtocolViolation(
            FEATURE_NOT_SUPPORTED,
            f"unsupported frontend protocol {major}.{minor}: only protocol 3 is supported",
        )
    return "StartupMessage"
