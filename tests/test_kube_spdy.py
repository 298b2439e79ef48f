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


def test_a_refused_port_loses_only_its_streams_and_the_header_stream_stays_in_step():
    """proxy.http.tunnels.SpdyTunnel: a refused port's SYN_STREAM reaches the target as HEADERS (so the target
    inflates every later header block), its data is dropped, the client gets RST_STREAM REFUSED_STREAM."""
    from proxy.http.tunnels import SpdyTunnel

    tunnel, client = SpdyTunnel(1 << 20), spdy.FrameWriter()
    target = spdy.FrameReader()
    blocked = [("streamtype", "error"), ("port", "9999"), ("requestid", "0")]
    allowed = [("streamtype", "data"), ("port", "8080"), ("requestid", "1")]
    opened = client.syn_stream(1, blocked) + client.data(1, b"secret") + client.syn_stream(3, allowed)
    records, _ = tunnel.client(opened)
    assert tunnel.take_forwards() == ["9999", "8080"] and len(records) == 3
    relayed = [frame for frame, _ in target.feed(tunnel.refuse(["9999"]))]
    assert relayed == [spdy.HeadersFrame(1, blocked), spdy.SynStream(3, allowed)]
    answer_records, answer = tunnel.take_answers()
    assert [f for f, _ in spdy.FrameReader().feed(answer)] == [spdy.RstStream(1, spdy.REFUSED_STREAM)]
    assert answer_records[0]["attributes"]["by"] == "custody" and answer_records[0]["channel"] == "9999/error"
    _, wire = tunnel.client(client.syn_stream(5, blocked) + client.data(3, b"ok"))  # 9999 again: no new decision
    assert tunnel.take_forwards() == []
    assert [f for f, _ in target.feed(wire)] == [spdy.HeadersFrame(5, blocked), spdy.DataFrame(3, b"ok")]
    assert tunnel.take_answers()[1] == client.rst_stream(5, spdy.REFUSED_STREAM)
