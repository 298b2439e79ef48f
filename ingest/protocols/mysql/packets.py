"""Sans-I/O framing of the MySQL/MariaDB client/server protocol: packets with sequence ids.

Every packet is a 3-byte little-endian payload length, a 1-byte sequence id,
then the payload. A payload of 16 MiB - 1 or more is split into packets of
exactly 0xFFFFFF bytes, followed by one shorter (possibly empty) packet; the
pieces carry consecutive sequence ids. `PacketReader` hands back *logical*
packets — the pieces joined — each with its exact wire bytes, so the recorder
keeps what was relayed bit for bit.

Anything that does not frame as MySQL raises `ProtocolViolation` (code
`08S01`, MySQL's SQLSTATE for communication errors) and nothing else.
"""

from __future__ import annotations

from typing import NamedTuple

from .. import ProtocolViolation as _ProtocolViolation

COMMUNICATION_ERROR = "08S01"
MAX_PIECE = 0xFFFFFF
DEFAULT_MAX_PACKET = 64 << 20


class ProtocolViolation(_ProtocolViolation):
    """The peer broke the MySQL protocol; `code` is the SQLSTATE to report (08S01 by default)."""


def violation(message: str) -> ProtocolViolation:
    return ProtocolViolation(COMMUNICATION_ERROR, message)


class Packet(NamedTuple):
    """One logical packet: the sequence id of its first piece, its payload, and its exact wire bytes."""

    seq: int
    payload: bytes
    data: bytes

    @property
    def last_seq(self) -> int:
        """The sequence id of its last piece (a continued packet spans several ids)."""
        return (self.seq + len(self.payload) // MAX_PIECE) & 0xFF


def packet(seq: int, payload: bytes) -> bytes:
    """The wire bytes of one logical packet (split into 16 MiB pieces as the protocol requires)."""
    if len(payload) < MAX_PIECE:
        return len(payload).to_bytes(3, "little") + bytes((seq & 0xFF,)) + payload
    parts = []
    position = 0
    while True:
        piece = payload[position:position + MAX_PIECE]
        parts.append(len(piece).to_bytes(3, "little") + bytes((seq & 0xFF,)) + piece)
        seq += 1
        position += MAX_PIECE
        if len(piece) < MAX_PIECE:
            return b"".join(parts)


def make(seq: int, payload: bytes) -> Packet:
    return Packet(seq & 0xFF, payload, packet(seq, payload))


class PacketReader:
    """Cuts one direction's bytes into logical packets; `max_packet` bounds a logical payload."""

    def __init__(self, direction: str, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        self.direction = direction
        self.max_packet = max_packet
        self._buffer = bytearray()
        self._pieces: list[bytes] = []  # payload pieces of a continued packet
        self._raw: list[bytes] = []
        self._first_seq = 0
        self._expect_seq = 0
        self._size = 0

    @property
    def buffered(self) -> bool:
        return bool(self._buffer) or bool(self._pieces)

    def feed(self, data: bytes) -> list[Packet]:
        buffer = self._buffer
        buffer += data
        out: list[Packet] = []
        position = 0
        size = len(buffer)
        while size - position >= 4:
            length = buffer[position] | buffer[position + 1] << 8 | buffer[position + 2] << 16
            seq = buffer[position + 3]
            if self._size + length > self.max_packet:
                raise violation(f"{self.direction} packet of more than {self.max_packet} bytes")
            end = position + 4 + length
            if end > size:
                break
            raw = bytes(buffer[position:end])
            position = end
            if self._pieces:
                if seq != self._expect_seq:
                    raise violation(f"{self.direction} packet out of order: sequence id {seq}, expected "
                                    f"{self._expect_seq} in a continued packet")
            else:
                self._first_seq = seq
            if length == MAX_PIECE:
                self._pieces.append(raw[4:])
                self._raw.append(raw)
                self._size += length
                self._expect_seq = (seq + 1) & 0xFF
                continue
            if self._pieces:
                payload = b"".join(self._pieces) + raw[4:]
                whole = b"".join(self._raw) + raw
                self._pieces, self._raw, self._size = [], [], 0
                out.append(Packet(self._first_seq, payload, whole))
            else:
                out.append(Packet(seq, raw[4:], raw))
        if position:
            del buffer[:position]
        return out

    def take_unread(self) -> bytes:
        """The bytes fed that are not part of a packet yet, which the reader forgets: where the stream stops being
        packets (a client's TLS handshake right behind its SSLRequest)."""
        if self._pieces:
            raise violation(f"the {self.direction} changed streams in the middle of a continued packet")
        unread = bytes(self._buffer)
        self._buffer.clear()
        return unread

    def eof(self) -> None:
        """The peer closed: a packet cut off by the close is a protocol error."""
        if self._buffer or self._pieces:
            raise violation(f"the {self.direction} closed the connection in the middle of a packet")
