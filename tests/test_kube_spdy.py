"""The sans-I/O SPDY/3.1 codec (ingest/protocols/kubernetes/spdy.py) on its own: every frame kind the writer
makes is read back as written, byte-split anywhere; one zlib header stream per direction; bad input is a
ProtocolViolation (wrong version, truncated frames, a header block that inflates past the bound)."""

from __future__ import annotations

import struct
import zlib

import pytest

from ingest.protocols import ProtocolViolation
from ingest.protocols.kubernetes import spdy


def frames_of(wire: bytes, step: int) -> list[spdy.Frame]:
    reader, out, seen = spdy.FrameReader(), [], b""
    for index in range(0, len(wire), step):
        for frame, raw in reader.feed(wire[index:index + step]):
            out.append(frame)
            seen += raw
    assert seen == wire and reader.buffered == 0  # exact wire bytes back, nothing kept
    return out


@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_every_frame_kind_round_trips_split_anywhere(step):
    writer = spdy.FrameWriter()
    headers = [("streamtype", "data"), ("port", "8080"), ("requestid", "0")]
    wire = b"".join([
        writer.syn_stream(1, headers, priority=3), writer.syn_reply(1, [("status", "200")]),
        writer.headers(1, headers, fin=True), writer.data(1, b"payload", fin=True), writer.rst_stream(3, 5),
        writer.settings([(0, 7, 65536)]), writer.ping(2), writer.window_update(1, 1024), writer.goaway(1, 0),
        writer.syn_stream(3, headers),  # a second block on the same zlib stream
    ])
    got = frames_of(wire, step)
    assert got == [spdy.SynStream(1, headers, 0, 3), spdy.SynReply(1, [("status", "200")]),
                   spdy.HeadersFrame(1, headers, spdy.FLAG_FIN), spdy.DataFrame(1, b"payload", spdy.FLAG_FIN),
                   spdy.RstStream(3, 5), spdy.Settings([(0, 7, 65536)]), spdy.Ping(2), spdy.WindowUpdate(1, 1024),
                   spdy.GoAway(1, 0), spdy.SynStream(3, headers)]
    assert got[2].fin and got[3].fin and not got[0].fin and not got[1].fin
    assert spdy.SynReply(1, []) != spdy.HeadersFrame(1, [])  # one body, two frame kinds
    assert [spdy.frame_name(f) for f in got[:4]] == ["syn_stream", "syn_reply", "headers", "data"]


def test_a_header_block_is_read_only_on_its_own_directions_stream():
    first, second = spdy.FrameWriter(), spdy.FrameWriter()
    reader = spdy.FrameReader()
    reader.feed(first.syn_stream(1, [("a", "b")]))
    with pytest.raises(ProtocolViolation):  # the second writer's dictionary-primed start is not a continuation
        reader.feed(second.syn_stream(3, [("a", "b")]))


def control(kind: int, body: bytes, version: int = spdy.VERSION) -> bytes:
    return struct.pack(">HHI", 0x8000 | version, kind, len(body)) + body


def test_bad_input_is_a_protocol_violation():
    with pytest.raises(ProtocolViolation, match="version 2"):
        spdy.FrameReader().feed(control(spdy.PING, b"\0\0\0\1", version=2))
    with pytest.raises(ProtocolViolation, match="truncated"):
        spdy.FrameReader().feed(control(spdy.RST_STREAM, b"\0\0\0\1"))
    with pytest.raises(ProtocolViolation, match="larger than"):
        spdy.FrameReader(max_frame=16).feed(struct.pack(">II", 1, 17))
    deflate = zlib.compressobj(zdict=spdy.DICTIONARY)
    bomb = deflate.compress(b"\0" * (spdy.MAX_HEADER_BLOCK + 10)) + deflate.flush(zlib.Z_SYNC_FLUSH)
    with pytest.raises(ProtocolViolation, match="header block larger"):
        spdy.FrameReader().feed(control(spdy.SYN_REPLY, b"\0\0\0\1" + bomb))
    with pytest.raises(ProtocolViolation, match="truncated"):
        spdy.decode_header_block(struct.pack(">II", 1, 50) + b"short")
