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
  the front end can put `pod:port` under policy before the frame is relayed.
* Anything else: raw bytes, one record per read.
"""

from __future__ import annotations

import json
import struct

from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

from ingest.protocols import ProtocolViolation
from ingest.protocols.http.records import STREAM_CHANNELS, frame_record
from ingest.protocols.kubernetes import spdy

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
                 inner: "SpdyTunnel | None" = None) -> None:
        self.side = "client" if from_client else "server"
        self.inner = inner  # SPDY/3.1 carried in the binary messages
        self.protocol = FrameProtocol(client=not from_client, extensions=[])
        self.buffer = bytearray()
        self.channels = channels
        self.max_frame = max_frame
        self.channel: str | None = None  # of the message whose fragments are arriving
        self.message_start = True

    def feed(self, data: bytes) -> tuple[list[Record], bytes]:
        self.buffer += data
        offset, records = 0, []
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
        return records, wire

    def _decode(self, frame_bytes: bytes) -> list[Record]:
        self.protocol.receive_bytes(frame_bytes)
        out = []
        try:
            for frame in self.protocol.received_frames():
                if self.inner is not None and frame.opcode in (Opcode.BINARY, Opcode.CONTINUATION):
                    records = self.inner.feed(self.side, bytes(frame.payload))
                    out += [{**r, "attributes": {**(r.get("attributes") or {}), "transport": "websocket"}}
                            for r in records]
                    continue
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
            if not frame.message_finished:
                attributes["fragment"] = "true"
            self.message_start = bool(frame.message_finished)
        return frame_record(name, bytes(payload), channel, attributes)


class WebSocketTunnel(Tunnel):
    kind = "websocket"

    def __init__(self, subprotocol: str | None, max_frame: int) -> None:
        channels = subprotocol in CHANNEL_PROTOCOLS
        self.inner = SpdyTunnel(max_frame) if (subprotocol or "").lower().startswith("spdy/3.1+") else None
        self._client = _WebSocketSide(True, channels, max_frame, self.inner)
        self._server = _WebSocketSide(False, channels, max_frame, self.inner)

    def take_forwards(self) -> list[str]:
        return self.inner.take_forwards() if self.inner is not None else []

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

    def client(self, data: bytes) -> tuple[list[Record], bytes]:
        return self._feed("client", data)

    def server(self, data: bytes) -> tuple[list[Record], bytes]:
        return self._feed("server", data)

    def take_forwards(self) -> list[str]:
        ports, self._forwards = self._forwards, []
        return ports

    def feed(self, side: str, data: bytes) -> list[Record]:
        """The records of the complete frames in one side's bytes."""
        return self._feed(side, data)[0]

    def _feed(self, side: str, data: bytes) -> tuple[list[Record], bytes]:
        frames = self._readers[side].feed(data)
        if side == "client":
            for frame, _ in frames:
                if isinstance(frame, spdy.SynStream):
                    port = spdy.header(frame.headers, "port")
                    if port is not None and port not in self._forwards:
                        self._forwards.append(port)
        records = [self._record(frame) for frame, _ in frames]
        return records, b"".join(wire for _, wire in frames)

    def _channel_of(self, headers: spdy.Headers) -> str | None:
        kind = spdy.header(headers, "streamtype")
        port = spdy.header(headers, "port")
        if port is not None and kind is not None:
            return f"{port}/{kind}"
        return STREAM_CHANNELS.get(kind or "", kind)

    def _record(self, frame: spdy.Frame) -> Record:
        name = f"spdy.{spdy.frame_name(frame)}"
        if isinstance(frame, spdy.DataFrame):
            attributes = {"stream": str(frame.stream_id)}
            if frame.fin:
                attributes["fin"] = "true"
            return frame_record(name, frame.data, self._channels.get(frame.stream_id), attributes)
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
