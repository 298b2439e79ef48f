"""What flows after a `101 Switching Protocols`: WebSocket, SPDY/3.1, or raw bytes, recorded per frame.

A tunnel is fed one side's bytes and returns the records of the complete frames in them and those
frames' exact bytes; a partial frame is kept back until it is complete, so nothing is relayed that
was not recorded first (record before relay). Frames are relayed unchanged.

* WebSocket: frame boundaries from the frame header (RFC 6455 §5.2), each frame decoded and
  validated by wsproto's `FrameProtocol` (masking, opcodes, close codes, UTF-8). For the Kubernetes
  channel protocols (`v5.channel.k8s.io`, `v4.channel.k8s.io`, …, `portforward.k8s.io`) a
  message's first byte is its stream number: it becomes the record's `channel`.
* SPDY/3.1 (`ingest.protocols.kubernetes.spdy`): each stream's `streamtype` header names its
  channel (stdin 0, stdout 1, stderr 2, error 3, resize 4; port-forward `PORT/data`, `PORT/error`).
* SPDY tunnelled in WebSocket (`SPDY/3.1+portforward.k8s.io`, kubectl 1.30+'s port-forward): the
  binary messages carry a SPDY/3.1 byte stream; it is decoded as above and recorded per stream
  (records `spdy.*` with `transport` = `websocket`), while the WebSocket frames are relayed whole.
* Port-forward streams: each client SYN_STREAM naming a `port` is collected (`take_forwards()`), so
  the front end can put `pod:port` under policy before the frame is relayed. A refused port
  (`refuse()`) refuses only its streams: their SYN_STREAMs reach the target as HEADERS frames on a
  stream it never opened (the header block must pass, header compression is one zlib stream per
  direction), their other frames are dropped, and the client is answered with RST_STREAM
  REFUSED_STREAM for each (`take_answers()`); the connection's other streams go on.
* Anything else: raw bytes, one record per read.
"""

from __future__ import annotations

import json
import struct

from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

from ingest.protocols import ProtocolViolation
from ingest.protocols.http.records import STREAM_CHANNELS, frame_record
from ingest.protocols.kubernetes import spdy
from ingest.protocols.kubernetes.status import ERROR_CHANNEL, exec_outcome

Record = dict

CHANNEL_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io",
                     "channel.k8s.io", "portforward.k8s.io", "v2.portforward.k8s.io")
_WS_NAMES = {Opcode.BINARY: "ws.binary", Opcode.TEXT: "ws.text", Opcode.CLOSE: "ws.close",
             Opcode.PING: "ws.ping", Opcode.PONG: "ws.pong", Opcode.CONTINUATION: "ws.continuation"}


class Tunnel:
    kind = "raw"

    def take_forwards(self) -> list[str]:
        """The ports the client opened port-forward streams to since the last call."""
        return []

    def refuse(self, ports: list[str]) -> bytes:
        """Policy refused these ports: the last client bytes again, without their streams."""
        return b""

    def take_answers(self) -> tuple[list[Record], bytes]:
        """What the proxy itself owes the client (refused streams' resets) and their records."""
        return [], b""

    def client(self, data: bytes) -> tuple[list[Record], bytes]:
        return [frame_record("tunnel", data, None)], data

    def server(self, data: bytes) -> tuple[list[Record], bytes]:
        return [frame_record("tunnel", data, None)], data


def _ws_frame_length(buffer: bytearray | bytes, offset: int) -> int | None:
    """The whole length of the frame at `offset`, or None when its header is not complete yet."""
    if len(buffer) - offset < 2:
        return None
    second = buffer[offset + 1]
    length, header = second & 0x7F, 2
    if length == 126:
        if len(buffer) - offset < 4:
            return None
        (length,) = struct.unpack_from(">H", buffer, offset + 2)
        header = 4
    elif length == 127:
        if len(buffer) - offset < 10:
            return None
        (length,) = struct.unpack_from(">Q", buffer, offset + 2)
        header = 10
    if second & 0x80:
        header += 4
    return header + length


class _WebSocketSide:
    def __init__(self, from_client: bool, channels: bool, max_frame: int,
                 inner: "SpdyTunnel | None" = None, statuses: bool = False) -> None:
        self.side = "client" if from_client else "server"
        self.statuses = statuses  # an exec/attach's server side: its error channel says how the command ended
        self.inner = inner  # SPDY/3.1 carried in the binary messages
        self.protocol = FrameProtocol(client=not from_client, extensions=[])
        self.buffer = bytearray()
        self.channels = channels
        self.max_frame = max_frame
        self.channel: str | None = None  # of the message whose fragments are arriving
        self.message_start = True
        # SPDY carried from the client is re-framed: its streams may be refused, so the binary payloads
        # relayed are the SPDY frames let through (`pieces`: raw WebSocket frames or SPDY frame lists).
        self.reframe = inner is not None and from_client
        self.pieces: list[bytes | list] = []
        self.out = FrameProtocol(client=True, extensions=[]) if self.reframe else None

    def feed(self, data: bytes) -> tuple[list[Record], bytes]:
        self.buffer += data
        offset, records = 0, []
        self.pieces = []
        while True:
            length = _ws_frame_length(self.buffer, offset)
            if length is None or len(self.buffer) - offset < length:
                if length is not None and length > self.max_frame:
                    raise ProtocolViolation("400", f"WebSocket frame of {length} bytes exceeds {self.max_frame}")
                break
            frame_bytes = bytes(self.buffer[offset:offset + length])
            offset += length
            records += self._decode(frame_bytes)
        wire = bytes(self.buffer[:offset])
        del self.buffer[:offset]
        return records, self.rewire() if self.reframe else wire

    def rewire(self) -> bytes:
        """The last batch's bytes to relay, re-framed: control frames as they came, SPDY as let through."""
        out = []
        for piece in self.pieces:
            if isinstance(piece, bytes):
                out.append(piece)
            elif payload := self.inner.relayable(piece):
                out.append(self.out.send_data(payload, fin=True))
        return b"".join(out)

    def _decode(self, frame_bytes: bytes) -> list[Record]:
        self.protocol.receive_bytes(frame_bytes)
        out = []
        try:
            for frame in self.protocol.received_frames():
                if self.inner is not None and frame.opcode in (Opcode.BINARY, Opcode.CONTINUATION):
                    records, frames = self.inner.parse(self.side, bytes(frame.payload))
                    if self.reframe:
                        self.pieces.append(frames)
                    self.message_start = bool(frame.message_finished)
                    out += [_over_websocket(r) for r in records]
                    continue
                if self.reframe:
                    self.pieces.append(frame_bytes)
                out.append(self._record(frame))
        except ParseFailed as exc:
            raise ProtocolViolation("400", f"WebSocket: {exc}") from None
        return out

    def _record(self, frame) -> Record:
        opcode = frame.opcode
        name = _WS_NAMES.get(opcode, f"ws.{opcode}")
        attributes: dict[str, str] = {}
        if opcode == Opcode.CLOSE:
            code, reason = frame.payload
            attributes = {"code": str(int(code))}
            return frame_record(name, (reason or "").encode(), None, attributes)
        payload = frame.payload
        if isinstance(payload, str):
            payload = payload.encode()
        channel = None
        if opcode in (Opcode.BINARY, Opcode.TEXT, Opcode.CONTINUATION):
            if self.channels:
                if self.message_start and payload:
                    self.channel = str(payload[0])
                    payload = payload[1:]
                channel = self.channel
            whole = self.message_start and frame.message_finished
            if not frame.message_finished:
                attributes["fragment"] = "true"
            self.message_start = bool(frame.message_finished)
            if self.statuses and whole and channel == ERROR_CHANNEL:
                record = frame_record(name, bytes(payload), channel, attributes)
                record.update(exec_outcome(record["data"]))
                return record
        return frame_record(name, bytes(payload), channel, attributes)


def _over_websocket(record: Record) -> Record:
    return {**record, "attributes": {**(record.get("attributes") or {}), "transport": "websocket"}}


class WebSocketTunnel(Tunnel):
    kind = "websocket"

    def __init__(self, subprotocol: str | None, max_frame: int) -> None:
        channels = subprotocol in CHANNEL_PROTOCOLS
        statuses = channels and "portforward" not in (subprotocol or "")  # exec and attach: not a port's channels
        self.inner = SpdyTunnel(max_frame) if (subprotocol or "").lower().startswith("spdy/3.1+") else None
        self._client = _WebSocketSide(True, channels, max_frame, self.inner)
        self._server = _WebSocketSide(False, channels, max_frame, self.inner, statuses)
        self._answer = FrameProtocol(client=False, extensions=[])

    def take_forwards(self) -> list[str]:
        return self.inner.take_forwards() if self.inner is not None else []

    def refuse(self, ports: list[str]) -> bytes:
        if self.inner is None:
            return b""
        self.inner.refuse(ports)
        return self._client.rewire()

    def take_answers(self) -> tuple[list[Record], bytes]:
        """The resets, as one server-to-client binary message, once the server's side is between messages
        and between SPDY frames (a message may not be put inside another, nor a frame inside a frame)."""
        if self.inner is None or not self._server.message_start or self.inner.buffered("server"):
            return [], b""
        records, payload = self.inner.take_answers()
        if not payload:
            return [], b""
        return [_over_websocket(r) for r in records], self._answer.send_data(payload, fin=True)

    def client(self, data: bytes) -> tuple[list[Record], bytes]:
        return self._client.feed(data)

    def server(self, data: bytes) -> tuple[list[Record], bytes]:
        return self._server.feed(data)


class SpdyTunnel(Tunnel):
    kind = "spdy"

    def __init__(self, max_frame: int) -> None:
        self._readers = {"client": spdy.FrameReader(max_frame), "server": spdy.FrameReader(max_frame)}
        self._channels: dict[int, str] = {}
        self._forwards: list[str] = []
        self._stream_ports: dict[int, str] = {}  # client stream id -> the port it forwards to
        self._refused_ports: set[str] = set()
        self._refused: set[int] = set()  # client streams never opened on the target
        self._owed: list[int] = []  # refused streams whose RST_STREAM the client has not had yet
        self._last: list[tuple[spdy.Frame, bytes]] = []  # the last client batch, for refuse()

    def client(self, data: bytes) -> tuple[list[Record], bytes]:
        records, self._last = self.parse("client", data)
        return records, self.relayable(self._last)

    def server(self, data: bytes) -> tuple[list[Record], bytes]:
        records, frames = self.parse("server", data)
        return records, b"".join(wire for _, wire in frames)

    def take_forwards(self) -> list[str]:
        ports, self._forwards = self._forwards, []
        return ports

    def refuse(self, ports: list[str]) -> bytes:
        self._refused_ports.update(ports)
        return self.relayable(self._last)

    def buffered(self, side: str) -> int:
        return self._readers[side].buffered

    def take_answers(self) -> tuple[list[Record], bytes]:
        owed, self._owed = self._owed, []
        records = [frame_record("spdy.rst_stream", b"", self._channels.get(stream),
                                {"stream": str(stream), "status": str(spdy.REFUSED_STREAM), "by": "custody"})
                   for stream in owed]
        return records, b"".join(spdy.FrameWriter().rst_stream(stream, spdy.REFUSED_STREAM) for stream in owed)

    def parse(self, side: str, data: bytes) -> tuple[list[Record], list[tuple[spdy.Frame, bytes]]]:
        """The records of the complete frames in one side's bytes, and those frames."""
        frames = self._readers[side].feed(data)
        if side == "client":
            for frame, _ in frames:
                if isinstance(frame, spdy.SynStream):
                    port = spdy.header(frame.headers, "port")
                    if port is not None:
                        self._stream_ports[frame.stream_id] = port
                        if port not in self._forwards and port not in self._refused_ports:
                            self._forwards.append(port)
        return [self._record(frame, side) for frame, _ in frames], frames

    def relayable(self, frames: list[tuple[spdy.Frame, bytes]]) -> bytes:
        """The client frames' bytes for the target, without the streams of refused ports."""
        out = []
        for frame, wire in frames:
            stream = getattr(frame, "stream_id", None)
            if isinstance(frame, spdy.SynStream) and self._stream_ports.get(stream) in self._refused_ports:
                if stream not in self._refused:
                    self._refused.add(stream)
                    self._owed.append(stream)
                out.append(spdy.syn_stream_as_headers(wire))
            elif stream in self._refused:
                if isinstance(frame, spdy.HeadersFrame):
                    out.append(wire)  # its header block keeps the target's decompression in step; ignored there
            else:
                out.append(wire)
        return b"".join(out)

    def _channel_of(self, headers: spdy.Headers) -> str | None:
        kind = spdy.header(headers, "streamtype")
        port = spdy.header(headers, "port")
        if port is not None and kind is not None:
            return f"{port}/{kind}"
        return STREAM_CHANNELS.get(kind or "", kind)

    def _record(self, frame: spdy.Frame, side: str) -> Record:
        name = f"spdy.{spdy.frame_name(frame)}"
        if isinstance(frame, spdy.DataFrame):
            attributes = {"stream": str(frame.stream_id)}
            if frame.fin:
                attributes["fin"] = "true"
            channel = self._channels.get(frame.stream_id)
            record = frame_record(name, frame.data, channel, attributes)
            if side == "server" and channel == ERROR_CHANNEL:  # an exec's error stream ("PORT/error" for a port)
                record.update(exec_outcome(frame.data))
            return record
        if isinstance(frame, (spdy.SynStream, spdy.SynReply, spdy.HeadersFrame)):
            if isinstance(frame, spdy.SynStream):
                channel = self._channel_of(frame.headers)
                if channel is not None:
                    self._channels[frame.stream_id] = channel
            attributes = {"stream": str(frame.stream_id), "headers": json.dumps(frame.headers)}
            if frame.fin:
                attributes["fin"] = "true"
            return frame_record(name, b"", self._channels.get(frame.stream_id), attributes)
        if isinstance(frame, spdy.RstStream):
            return frame_record(name, b"", self._channels.get(frame.stream_id),
                                {"stream": str(frame.stream_id), "status": str(frame.status)})
        if isinstance(frame, spdy.WindowUpdate):
            return frame_record(name, b"", None, {"stream": str(frame.stream_id), "delta": str(frame.delta)})
        if isinstance(frame, spdy.Ping):
            return frame_record(name, b"", None, {"id": str(frame.ping_id)})
        if isinstance(frame, spdy.GoAway):
            return frame_record(name, b"", None, {"last_stream": str(frame.last_stream_id), "status": str(frame.status)})
        if isinstance(frame, spdy.Settings):
            return frame_record(name, b"", None, {"entries": json.dumps(frame.entries)})
        return frame_record(name, getattr(frame, "body", b""), None)
