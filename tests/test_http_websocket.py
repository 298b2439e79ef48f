"""A WebSocket upgrade through the HTTP proxy, relayed by real nginx (`proxy_http_version 1.1`, Upgrade and
Connection passed on, as nginx's documentation configures it) to a small aiohttp echo app; the client is
aiohttp's `ws_connect`. Text and binary messages (one larger than a socket read) come back echoed, and the
evidence holds each message both ways, decoded frame by frame (`ws.text`, `ws.binary`, `ws.close`), with
permessage-deflate kept off so that the frames stay readable; to an http and to an https (verified) nginx.
wsproto, as a second client, sends a fragmented message with a ping after it: each frame is recorded as
it passed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import uuid

import aiohttp
import pytest
from aiohttp import web
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Pong, Request, TextMessage

from nginx_server import Nginx, free_port
from pg_fixtures import EventLog, make_tls, messages, start_proxy

TEXT = "hello through custody ✓"
BINARY = bytes(range(256))
LARGE = os.urandom(200_000)  # several socket reads: the tunnel must wait for the whole frame


class EchoApp:
    """aiohttp's WebSocket server on its own event loop thread; it echoes each message and keeps what it got."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[str | bytes] = []
        self.extensions: list[str | None] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        app = web.Application()
        app.router.add_get("/ws/echo", self.echo)
        self.runner = web.AppRunner(app)

    async def echo(self, request: web.Request) -> web.WebSocketResponse:
        self.extensions.append(request.headers.get("Sec-WebSocket-Extensions"))
        ws = web.WebSocketResponse(max_msg_size=1 << 20)
        await ws.prepare(request)
        async for message in ws:
            self.received.append(message.data)
            if message.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    def _call(self, coroutine) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def __enter__(self) -> "EchoApp":
        self.thread.start()
        self._call(self.runner.setup())
        self._call(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def app():
    with EchoApp() as running:
        yield running


@pytest.fixture(scope="module")
def nginx(tmp_path_factory, app):
    with Nginx(tmp_path_factory.mktemp("nginx"), websocket=f"127.0.0.1:{app.port}") as server:
        yield server


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def nginx_tls(tmp_path_factory, app, tls):
    with Nginx(tmp_path_factory.mktemp("nginx-tls"), tls=tls, websocket=f"127.0.0.1:{app.port}") as server:
        yield server


@pytest.fixture(scope="module")
def proxy(broker, tmp_path_factory, nginx, nginx_tls, tls):
    extra = f"""
[[proxy]]
name = "ws"
protocol = "http"
listen = "127.0.0.1:0"
upstream = "{nginx.url}"

[[proxy]]
name = "wss"
protocol = "http"
listen = "127.0.0.1:0"
upstream = "{nginx_tls.url}"
upstream_ca = "{tls["ca"]}"
"""
    running = start_proxy(tmp_path_factory.mktemp("custody"), broker, extra_proxies=extra)
    running.events = EventLog.open(running)
    yield running
    running.events.close()
    running.background.stop()


def converse(proxy, index: int, user_agent: str) -> tuple[list, str | None]:
    """Through the proxy: text, binary and a large binary message, each answered in turn; then a clean close."""
    host, port = proxy.address(index)

    async def run() -> tuple[list, str | None]:
        headers = {"Authorization": f"Bearer {proxy.token()}", "User-Agent": user_agent}
        async with aiohttp.ClientSession(headers=headers) as client:
            async with client.ws_connect(f"http://{host}:{port}/ws/echo", max_msg_size=1 << 20) as ws:
                echoed = []
                for message in (TEXT, BINARY, LARGE):
                    await (ws.send_str(message) if isinstance(message, str) else ws.send_bytes(message))
                    echoed.append((await ws.receive(timeout=10)).data)
                extensions = ws._response.headers.get("Sec-WebSocket-Extensions")  # noqa: SLF001
                await ws.close()
        return echoed, extensions
    return asyncio.run(run())


@pytest.mark.parametrize("index", [1, 2], ids=["http-upstream", "https-upstream"])
def test_websocket_messages_are_relayed_through_nginx_and_recorded_both_ways(proxy, app, nginx, nginx_tls, index):
    user_agent = f"aiohttp-ws-{uuid.uuid4().hex[:10]}"
    echoed, extensions = converse(proxy, index, user_agent)
    assert echoed == [TEXT, BINARY, LARGE] and app.received[-3:] == [TEXT, BINARY, LARGE]
    assert extensions is None and app.extensions[-1] is None  # no permessage-deflate, though aiohttp offered it

    found = proxy.events.find(lambda start: start["client_application"] == user_agent)
    assert len(found) == 1, f"expected one session of {user_agent}, got {len(found)}"
    events = found[0]
    assert events[0].body["upstream"] == (nginx.url, nginx_tls.url)[index - 1]
    client, server = messages(events, "client"), messages(events, "server")
    assert [m["text"] for m in client if m["type"] == "Request"] == ["GET /ws/echo"]
    assert [m["attributes"]["status"] for m in server if m["type"] == "Response"] == ["101"]

    def frames(records: list[dict]) -> list[tuple[str, bytes]]:
        return [(m["type"], m["data"]) for m in records if m["type"] in ("ws.text", "ws.binary")]
    sent = [("ws.text", TEXT.encode()), ("ws.binary", BINARY), ("ws.binary", LARGE)]
    assert frames(client) == sent and frames(server) == sent  # each message, whole, in each direction
    assert all(m["channel"] is None for m in client + server if m["type"].startswith("ws."))  # not Kubernetes'
    assert [m["attributes"]["code"] for m in client + server if m["type"] == "ws.close"] == ["1000", "1000"]
    # after the closing handshake the server closes the TCP connection first (RFC 6455 §7.1.1), as a rule
    assert events[-1].body["reason"] in ("server_disconnect", "client_disconnect")



def test_fragments_and_control_frames_between_them_are_recorded_frame_by_frame(proxy, app):
    """wsproto as the client, on a plain socket: a text message in two fragments with a ping written after them
    in one write; the app gets the message whole, the evidence holds each frame as it passed."""
    host, port = proxy.address(1)
    user_agent = f"wsproto-{uuid.uuid4().hex[:10]}"
    ws = WSConnection(ConnectionType.CLIENT)
    received: list = []
    with socket.create_connection((host, port), 10) as sock:
        sock.settimeout(10)

        def until(done) -> None:
            while not done():
                ws.receive_data(sock.recv(65536) or None)
                received.extend(ws.events())
        sock.sendall(ws.send(Request(host="x", target="/ws/echo", extra_headers=[
            (b"authorization", f"Bearer {proxy.token()}".encode()), (b"user-agent", user_agent.encode())])))
        until(lambda: any(isinstance(e, AcceptConnection) for e in received))
        sock.sendall(ws.send(TextMessage("first half, ", message_finished=False))
                     + ws.send(TextMessage("second half", message_finished=True)) + ws.send(Ping(b"are you there")))
        until(lambda: any(isinstance(e, Pong) for e in received) and any(isinstance(e, TextMessage) for e in received))
        sock.sendall(ws.send(CloseConnection(1000)))
        until(lambda: any(isinstance(e, CloseConnection) for e in received))
    assert [e.data for e in received if isinstance(e, TextMessage)] == ["first half, second half"]
    assert app.received[-1] == "first half, second half"

    found = proxy.events.find(lambda start: start["client_application"] == user_agent)
    assert len(found) == 1, f"expected one session of {user_agent}, got {len(found)}"
    client = [(m["type"], m["data"], m["attributes"]) for m in messages(found[0], "client") if m["type"] != "Request"]
    assert client == [("ws.text", b"first half, ", {"fragment": "true"}), ("ws.text", b"second half", {}),
                      ("ws.ping", b"are you there", {}), ("ws.close", b"", {"code": "1000"})]
    server = [(m["type"], m["data"]) for m in messages(found[0], "server") if m["type"].startswith("ws.")]
    assert server == [("ws.text", b"first half, second half"), ("ws.pong", b"are you there"), ("ws.close", b"")]


def test_a_malformed_frame_ends_the_tunnel_with_a_protocol_error_and_never_reaches_the_app(proxy, app):
    """A client frame without its mask (RFC 6455 §5.1: the server must close the connection) is not relayed."""
    host, port = proxy.address(1)
    user_agent = f"wsproto-bad-{uuid.uuid4().hex[:10]}"
    payload = uuid.uuid4().hex.encode()
    ws = WSConnection(ConnectionType.CLIENT)
    with socket.create_connection((host, port), 10) as sock:
        sock.settimeout(10)
        sock.sendall(ws.send(Request(host="x", target="/ws/echo", extra_headers=[
            (b"authorization", f"Bearer {proxy.token()}".encode()), (b"user-agent", user_agent.encode())])))
        accepted: list = []
        while not any(isinstance(e, AcceptConnection) for e in accepted):
            ws.receive_data(sock.recv(65536))
            accepted.extend(ws.events())
        sock.sendall(bytes([0x81, len(payload)]) + payload)  # FIN + text, unmasked
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
    assert payload not in rest

    found = proxy.events.find(lambda start: start["client_application"] == user_agent)
    assert len(found) == 1, f"expected one session of {user_agent}, got {len(found)}"
    events = found[0]
    (error,) = [e.body for e in events if e.kind == "protocol_error"]
    assert error["code"] == "400" and "WebSocket" in error["message"] and payload in error["sample"]
    assert events[-1].body["reason"] == "protocol_error"
    assert payload.decode() not in app.received
