"""The HTTP/1.1 and Kubernetes API front ends on the proxy core.

h11 on both sides: the proxy is an HTTP server to its client (`self.client`) and an HTTP client to
the target (`self.target`); each client connection has one upstream connection, opened after its
first request is identified. Requests are handled one at a time in order (keep-alive; pipelined
requests wait in h11's buffer until the response before them is complete).

Identity. There is no protocol user to compare the token with, so the token's username claim *is*
the user: the client sends its OIDC token as `Authorization: Bearer`; the first request's token is
verified and binds the identity to the connection (SessionStart); every later request must carry
the same token, or a token of the same subject (verified again: a refreshed token). Anything else —
no token, a bad one, another subject — is a 401 with a JSON reason, PolicyDecision(authentication,
deny) and the end of the session. The proxy removes the client's `Authorization` and sends the
upstream credential it holds instead, so the target never sees the client's token and the client
never sees the target's credential.

Per request: the Request record (credentials redacted), then the policy's verdict on its operation
(`proxy.policy.Operation`: protocol http/kubernetes, kind request — command for a Kubernetes exec,
forward for port-forward —, text `METHOD /path`, attributes method/path, and for Kubernetes
verb/resource/namespace/name/subresource from `ingest.protocols.kubernetes.requestinfo`); a
block is a 403 (Kubernetes `Status`, otherwise `application/problem+json`) and the target never
sees the request; a hold waits for the reviewers (the client just waits). The policy judges the path as
the target will route it (`_origin_form`, `_resolved`: absolute-form as origin-form, decoded, slashes merged, dot
segments refused), the Request record keeps the bytes as sent. Everything is recorded
before it is relayed: request and response heads, every body chunk, every tunnelled frame.

Masking: when the identity has a mask plan and a response is JSON or text, its body is buffered up to
`max_body_bytes`, masked (`proxy.http.masking`) and sent with a new Content-Length; the record holds
what the client saw and the original sealed. A body over the limit is never relayed unmasked: the
client gets 502, the original is recorded sealed, and the connection closes. A Kubernetes watch is
masked event by event (line by line) as it streams. Protobuf cannot be read: with a mask plan the
target is asked for JSON where the client's Accept allows it, and a protobuf response is refused (502,
recorded sealed, the connection goes on).

After `101 Switching Protocols` the connection is a tunnel (`proxy.http.tunnels`): WebSocket or
SPDY/3.1 frames are recorded per channel and relayed unchanged, except the streams of a port-forward
port the policy refuses (reset by the proxy; the tunnel's other streams go on).
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import h11

from ingest.protocols import ProtocolViolation
from ingest.protocols.http import records as rec
from ingest.protocols.kubernetes.requestinfo import RequestInfo, request_info
from proxy.approvals import ApprovalRequest
from proxy.core.commands import CLIENT, SERVER, OpenUpstream, Send, StartTLS, VerifyToken
from proxy.core.frontend import Ending, FrontEnd, Protocol, Said, Steps
from proxy.core.records import PROXY_ORIGIN
from proxy.core.session import Session
from proxy.identity import AuthenticationError
from proxy.policy import Decision
from proxy.policy.operation import Operation
from proxy.settings import ProxySettings

from .masking import BodyMasker, maskable, readable_accept, unreadable
from .redaction import HttpRedactor
from .settings import HttpSettings
from .tunnels import SpdyTunnel, Tunnel, WebSocketTunnel

log = logging.getLogger(__name__)

_HOP_BY_HOP = frozenset({b"authorization", b"host", b"proxy-authorization", b"proxy-connection", b"keep-alive",
                         b"accept-encoding"})
# accept-encoding: bodies come back uncompressed, so that they can be recorded readably and masked.
_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 413: "Payload Too Large",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
_K8S_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 502: "InternalError",
                503: "ServiceUnavailable"}
_ENDING_STATUS = {"auth_failed": 401, "identity_expired": 401, "protocol_error": 400,
                  "upstream_unavailable": 502, "shutdown": 503, "recorder_failure": 503, "policy": 502}


class HttpProtocol(Protocol):
    """One HTTP listener (any HTTP/1.1 API)."""

    name = "http"
    kubernetes = False

    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        self.listener = settings.listener
        self.upstream = settings.upstream.describe()

    @classmethod
    def from_settings(cls, proxy: ProxySettings, fail_open: bool) -> "HttpProtocol":
        return cls(HttpSettings.from_config(proxy, fail_open))

    def front_end(self, session: Session) -> "HttpFrontEnd":
        return HttpFrontEnd(session, self)


class KubernetesProtocol(HttpProtocol):
    """HTTP plus Kubernetes-aware decoding: verbs and resources, Status bodies, exec/attach/port-forward."""

    name = "kubernetes"
    kubernetes = True


@dataclass
class Exchange:
    """One request and its response."""

    method: str
    target: str
    info: RequestInfo | None
    refused: bool = False
    request_done: bool = False
    response_done: bool = False
    response_started: bool = False
    masker: BodyMasker | None = None
    mask_kind: str | None = None
    streaming: bool = False  # masked line by line (a watch), not buffered whole
    held: h11.Response | None = None  # a response head held back until its body is masked
    discard: bool = False  # refused in the target's place (unreadable where it must be masked): recorded, not relayed
    buffer: bytearray = field(default_factory=bytearray)

    @property
    def watch(self) -> bool:
        return self.info is not None and self.info.verb == "watch"


def _bearer(headers: rec.Headers) -> str | None:
    value = rec.header(headers, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class HttpFrontEnd(FrontEnd):
    def __init__(self, session: Session, protocol: HttpProtocol) -> None:
        super().__init__(session)
        self.settings = protocol.settings
        self.kubernetes = protocol.kubernetes
        self.phase = "request"
        self.client = h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_header)
        self.target = h11.Connection(h11.CLIENT, max_incomplete_event_size=self.settings.max_header)
        self.token: str | None = None
        self.exchange: Exchange | None = None
        self.tunnel: Tunnel | None = None
        self._tunnel_info: RequestInfo | None = None  # the request that opened the tunnel
        self._ports: set[str] = set()  # port-forward ports allowed in this tunnel
        self._pumping = False  # a client-event loop is running (perhaps paused on a blocking command)
        self.redactor = HttpRedactor(session, self)  # Secret data, detector findings in request bodies

    @property
    def is_idle(self) -> bool:
        return self.exchange is None and self.tunnel is None

    # --- client side ---------------------------------------------------------------------

    def started(self) -> Steps:
        """HTTPS to clients (tls_cert): the handshake comes first, before any byte is read."""
        if self.session.settings.tls is not None:
            self.phase = "tls"
            yield StartTLS(CLIENT, self.session.settings.tls)
            self.phase = "request"

    def client_data(self, data: bytes) -> Steps:
        if self.tunnel is not None:
            records, wire = self.tunnel.client(data)
            ports = self.tunnel.take_forwards()
            if ports:  # port-forward streams: recorded, then each new pod:port under policy, then relayed
                if records:
                    self.session.record_messages(CLIENT, records, len(records))
                    records = []
                refused = []
                for port in ports:
                    if not (yield from self._forward_allowed(port)):
                        refused.append(port)
                if self.session.is_closed:
                    return
                if refused:  # only those ports' streams: the tunnel's other streams go on
                    wire = self.tunnel.refuse(refused)
            yield from self._relay_frames(CLIENT, records, wire)
            return
        self.client.receive_data(data)
        yield from self._client_events()

    def client_closed(self) -> Steps:
        if self.tunnel is None and not self._pumping:
            self.client.receive_data(b"")
        yield from self.session.end("client_disconnect")

    def _client_events(self) -> Steps:
        if self._pumping:
            return  # the loop already running (paused on a token check or a hold) reads these events next
        self._pumping = True
        try:
            for event in self._events(self.client, "400", "request"):
                kind = type(event)
                if kind is h11.Request:
                    yield from self._request(event)
                elif kind is h11.Data:
                    yield from self._request_body(event)
                elif kind is h11.EndOfMessage:
                    yield from self._request_end(event)
                elif kind is h11.ConnectionClosed:
                    yield from self.session.end("client_disconnect")
                    return
        finally:
            self._pumping = False

    def _request(self, event: h11.Request) -> Steps:
        session = self.session
        headers = list(event.headers.raw_items())
        names = [name.lower() for name, _ in headers]
        if b"content-length" in names and b"transfer-encoding" in names:
            raise ProtocolViolation("400", "Content-Length together with Transfer-Encoding (a request smuggling shape)")
        method, raw_target = event.method.decode("ascii", "replace"), event.target.decode("latin-1")
        target = _origin_form(raw_target)  # what is relayed (after the base path)
        view = _resolved(target)  # what the policy and the evidence's text judge: the path as the target resolves it
        info = request_info(method, view) if self.kubernetes else None
        exchange = self.exchange = Exchange(method, view, info)
        operation = self._operation(exchange, headers)
        session.client_application = session.client_application or _text(rec.header(headers, b"user-agent"))
        session.record_messages(CLIENT, [rec.request_record(
            method, raw_target, event.http_version.decode(), headers, operation=operation.kind, text=operation.text,
            objects=operation.objects, attributes=dict(operation.attributes))], 1)
        token = _bearer(headers)
        if not (yield from self._identify(token)):
            return
        verdict = yield from session.check(operation)
        if not verdict.allowed:
            exchange.refused = True
            yield self.session.say(self._refusal(403, f"custody: {verdict.reason}", rule=verdict.rule))
            return
        upstream = self.settings.upstream
        out = [(b"Host", upstream.netloc.encode())]
        upgrade = (rec.header(headers, b"upgrade") or b"").lower()
        masks = session.gate is not None and session.gate.mask_plan is not None
        for name, value in headers:
            lowered = name.lower()
            if lowered in _HOP_BY_HOP or (upgrade == b"websocket" and lowered == b"sec-websocket-extensions"):
                continue  # no permessage-deflate: frames stay readable in the evidence
            if masks and lowered == b"accept" and (readable := readable_accept(value.decode("latin-1"))):
                value = readable.encode("latin-1")  # JSON rather than protobuf: what masking can read
            out.append((name, value))
        if self.settings.authorization is not None:
            out.append((b"Authorization", self.settings.authorization))
        path = upstream.base_path + target if target.startswith("/") else target
        yield Send(SERVER, self.target.send(h11.Request(method=event.method, target=path.encode("latin-1"),
                                                        headers=out)))

    def _identify(self, token: str | None) -> Steps:
        """True when the request carries the connection's identity (binding it on the first request)."""
        session = self.session
        if token is not None and token == self.token:
            return True
        if token is None:
            yield from session.deny("missing_token", "send the OIDC access token as Authorization: Bearer",
                                    said=self._closing(401, "custody: missing_token: send the OIDC access token as "
                                                            "Authorization: Bearer"))
            return False
        result = yield VerifyToken(token)
        if isinstance(result, AuthenticationError):
            yield from session.deny(str(result.reason_code), result.message,
                                    said=self._closing(401, f"custody: {result.reason_code}: {result.message}"))
            return False
        if session.identity is not None:
            if result.subject != session.identity.subject:
                detail = f"this connection is {session.identity.subject!r}, the token is for {result.subject!r}"
                yield from session.deny("subject_mismatch", detail, {"token_subject": result.subject},
                                        said=self._closing(401, f"custody: subject_mismatch: {detail}"))
                return False
            self.token = token  # a refreshed token of the same subject
            return True
        # No protocol user to compare: the token's own username is the user (see the module docstring).
        identity = yield from session.authenticate(token, result.username, start=False)
        if identity is None:
            return False
        self.token = token
        upstream, tls = self.settings.upstream, self.settings.upstream_tls
        self.phase = "connecting"
        yield OpenUpstream(upstream.host, upstream.port, tls=tls.context, server_hostname=tls.server_hostname)
        session.attributes["upstream_credential"] = self.settings.credential
        session.open(identity)
        yield session.ready()
        self.phase = "relay"
        return True

    def _operation(self, exchange: Exchange, headers: rec.Headers) -> Operation:
        protocol = "kubernetes" if self.kubernetes else "http"
        text = f"{exchange.method} {exchange.target}"
        info = exchange.info
        if info is None:
            path = exchange.target.split("?", 1)[0]
            return Operation(protocol, "request", text, (path,), {"method": exchange.method, "path": path})
        attributes = info.attributes()
        command = rec.header(headers, b"kubectl-command")
        if command:
            attributes["kubectl_command"] = command.decode("latin-1")
        kind = "request"
        if info.verb == "exec":
            kind, text = "command", shlex.join(info.command) or text
            attributes["request"] = f"{exchange.method} {exchange.target}"
        elif info.verb == "portforward":
            kind = "forward"
        return Operation(protocol, kind, text, info.objects, attributes)

    def _forward_allowed(self, port: str) -> Steps:
        """A port-forward stream to `pod:port`: operation kind forward, once per port per tunnel; a block
        (or a denied hold) refuses that port's streams before they reach the target (the policy decision
        is recorded by the check), not the tunnel: kubectl forwards several ports over one connection."""
        if port in self._ports:
            return True
        info = self._tunnel_info
        pod = info.name if info is not None else ""
        target = f"{pod}:{port}"
        attributes = {**(info.attributes() if info is not None else {}), "port": port, "transport": self.tunnel.kind}
        verdict = yield from self.session.check(Operation("kubernetes", "forward", target, (target,), attributes))
        if not verdict.allowed:
            return False
        self._ports.add(port)
        return True

    def _request_body(self, event: h11.Data) -> Steps:
        exchange = self.exchange
        data = bytes(event.data)
        if exchange is None:
            return
        self.session.record_messages(CLIENT, [rec.data_record(
            data, attributes={"unrelayed": "refused"} if exchange.refused else None)], 1)
        if not exchange.refused:
            yield Send(SERVER, self.target.send(h11.Data(data=data)))

    def _request_end(self, event: h11.EndOfMessage) -> Steps:
        exchange = self.exchange
        if exchange is None:
            return
        exchange.request_done = True
        if not exchange.refused:
            yield Send(SERVER, self.target.send(h11.EndOfMessage(headers=event.headers)))
        else:
            exchange.response_done = True
        # The response may have ended first (nginx's `return` answers on the head alone): then the exchange is
        # done only now.
        yield from self._next_cycle()

    # --- target side ---------------------------------------------------------------------

    def server_data(self, data: bytes) -> Steps:
        if self.tunnel is not None:
            records, wire = self.tunnel.server(data)
            yield from self._relay_frames(SERVER, records, wire)
            return
        self.target.receive_data(data)
        yield from self._server_events()

    def server_closed(self) -> Steps:
        if self.tunnel is None and self.exchange is not None and self.exchange.response_started:
            self.target.receive_data(b"")  # a close-delimited body ends here
            yield from self._server_events()
        yield from self.session.end("server_disconnect")

    def _events(self, connection: h11.Connection, status: str, what: str) -> Iterator[h11.Event]:
        """One side's complete h11 events, while the session is open and no tunnel has taken over (looked at
        again after each event is handled); a malformed message is a protocol error with `status`."""
        while not self.session.is_closed and self.tunnel is None:
            if connection is self.client and connection.their_state is h11.IDLE:
                # noqa: SLF001 - h11 accepts these leniently, so look at the head before it does
                _guard_head(bytes(connection._receive_buffer), self.settings.max_header)
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError as exc:
                raise ProtocolViolation(status, f"malformed HTTP {what}: {exc}") from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            yield event

    def _server_events(self) -> Steps:
        for event in self._events(self.target, "502", "response"):
            kind = type(event)
            if kind is h11.InformationalResponse:
                yield from self._informational(event)
            elif kind is h11.Response:
                yield from self._response(event)
            elif kind is h11.Data:
                yield from self._response_body(bytes(event.data))
            elif kind is h11.EndOfMessage:
                yield from self._response_end()
            elif kind is h11.ConnectionClosed:
                return

    def _head_record(self, event: h11.Response | h11.InformationalResponse, **attributes: str) -> rec.Record:
        return rec.response_record(event.status_code, event.reason, event.http_version.decode(),
                                   list(event.headers.raw_items()), attributes)

    def _informational(self, event: h11.InformationalResponse) -> Steps:
        self.session.record_messages(SERVER, [self._head_record(event)], 1)
        if event.status_code != 101:
            yield Send(CLIENT, self.client.send(event))
            return
        headers = list(event.headers.raw_items())
        upgrade = (rec.header(headers, b"upgrade") or b"").decode("latin-1").lower()
        subprotocol = _text(rec.header(headers, b"sec-websocket-protocol"))
        max_frame = max(self.settings.max_body, 1 << 20)
        if upgrade == "websocket":
            self.tunnel = WebSocketTunnel(subprotocol, max_frame)
        elif upgrade.startswith("spdy/3"):
            self.tunnel = SpdyTunnel(max_frame)
        else:
            self.tunnel = Tunnel()
        self._tunnel_info = self.exchange.info if self.exchange is not None else None
        yield Send(CLIENT, self.client.send(event))
        self.phase = f"tunnel ({self.tunnel.kind})"
        server_rest, client_rest = self.target.trailing_data[0], self.client.trailing_data[0]
        if server_rest:
            records, wire = self.tunnel.server(bytes(server_rest))
            yield from self._relay_frames(SERVER, records, wire)
        if client_rest:
            yield from self.client_data(bytes(client_rest))

    def _answer_client(self) -> Steps:
        """What the tunnel owes the client itself (resets of refused port-forward streams), recorded as
        the server side of the conversation with `by` = custody, then sent."""
        records, answer = self.tunnel.take_answers()
        if answer:
            self.session.record_messages(SERVER, records, len(records))
            yield Send(CLIENT, answer)

    def _relay_frames(self, side: str, records: list[rec.Record], wire: bytes) -> Steps:
        """Tunnelled frames: recorded, relayed, then whatever the tunnel owes the client itself."""
        if records:
            self.session.record_messages(side, records, len(records))
        if wire:
            yield Send(SERVER if side == CLIENT else CLIENT, wire)
        yield from self._answer_client()

    def _response(self, event: h11.Response) -> Steps:
        exchange = self.exchange
        if exchange is None:
            raise ProtocolViolation("502", "a response without a request")
        exchange.response_started = True
        gate = self.session.gate
        plan = gate.mask_plan if gate is not None else None
        content_type = _text(rec.header(list(event.headers.raw_items()), b"content-type")) or ""
        kind = maskable(content_type)
        has_body = exchange.method != "HEAD" and event.status_code not in (204, 304)
        if plan is not None and has_body and unreadable(content_type):
            # It must be masked and cannot be read: the client gets a 502 in its place; the body is recorded
            # sealed as it arrives, never relayed.
            self.session.record_messages(SERVER, [self._head_record(event, masked="unreadable")], 1)
            exchange.discard = True
            media = content_type.split(";", 1)[0].strip()
            yield self.session.say(self._refusal(502, f"custody: the response ({media}) must be masked and cannot "
                                                      f"be read by Custody: not relayed; ask for JSON"))
            return
        if plan is not None and kind is not None and has_body:
            exchange.masker, exchange.mask_kind = BodyMasker(plan), kind
            exchange.streaming = exchange.watch
            if not exchange.streaming:
                exchange.held = event
                self.session.record_messages(SERVER, [self._head_record(event, masked="pending")], 1)
                return
        self.session.record_messages(SERVER, [self._head_record(event)], 1)
        yield Send(CLIENT, self.client.send(event))

    def _response_body(self, data: bytes) -> Steps:
        exchange = self.exchange
        if exchange is None:
            return
        if exchange.discard:
            self.session.record_messages(SERVER, [rec.data_record(
                b"", sealed_original=self._seal(data), attributes={"unrelayed": "unreadable"})], 1)
            return
        if exchange.masker is None:
            self.session.record_messages(SERVER, [rec.data_record(data)], 1)
            yield Send(CLIENT, self.client.send(h11.Data(data=data)))
            return
        exchange.buffer += data
        if exchange.streaming:
            end = exchange.buffer.rfind(b"\n")
            if end >= 0:
                lines = bytes(exchange.buffer[:end + 1])
                del exchange.buffer[:end + 1]
                yield from self._send_masked(lines, lines=True)
            if len(exchange.buffer) > self.settings.max_body:
                yield from self._too_large(exchange)
            return
        if len(exchange.buffer) > self.settings.max_body:
            yield from self._too_large(exchange)

    def _send_masked(self, original: bytes, lines: bool = False) -> Steps:
        exchange = self.exchange
        assert exchange is not None and exchange.masker is not None and exchange.mask_kind is not None
        if lines:
            masked, findings = exchange.masker.mask_lines(exchange.mask_kind, original)
        else:
            masked, findings = exchange.masker.mask_body(exchange.mask_kind, original)
        sealed = self._seal(original) if findings else None
        attributes = {"masked": ",".join(sorted(set(findings)))} if findings else None
        self.session.record_messages(SERVER, [rec.data_record(masked, sealed_original=sealed,
                                                              attributes=attributes)], 1)
        if masked:
            yield Send(CLIENT, self.client.send(h11.Data(data=masked)))

    def _seal(self, data: bytes) -> bytes:
        gate = self.session.gate
        assert gate is not None, "masking without a policy gate"
        return gate.seal(data)

    def _too_large(self, exchange: Exchange) -> Steps:
        """A body that must be masked but is larger than max_body_bytes: never relayed unmasked."""
        detail = (f"the response body must be masked and is larger than max_body_bytes "
                  f"({self.settings.max_body:,} bytes): not relayed")
        self.session.record_messages(SERVER, [rec.data_record(
            b"", sealed_original=self._seal(bytes(exchange.buffer)), attributes={"unrelayed": "too_large"})], 1)
        exchange.buffer.clear()
        said = self._closing(502, f"custody: {detail}") if not exchange.streaming else None
        if exchange.streaming:
            yield from self.session.end("policy")
            return
        yield from self.session.end_with(Ending("policy", "502", detail), said)

    def _response_end(self) -> Steps:
        exchange = self.exchange
        if exchange is None:
            return
        if exchange.discard:  # the client had its whole (refusal) response already
            exchange.response_done = True
            yield from self._next_cycle()
            return
        if exchange.held is not None:
            body = bytes(exchange.buffer)
            exchange.buffer.clear()
            masked, findings = exchange.masker.mask_body(exchange.mask_kind, body)  # type: ignore[union-attr]
            event = exchange.held
            headers = [(n, v) for n, v in event.headers.raw_items()
                       if n.lower() not in (b"content-length", b"transfer-encoding")]
            headers.append((b"Content-Length", str(len(masked)).encode()))
            head = h11.Response(status_code=event.status_code, headers=headers, reason=event.reason,
                                http_version=event.http_version)
            sealed = self._seal(body) if findings else None
            attributes = {"masked": ",".join(sorted(set(findings)))} if findings else None
            self.session.record_messages(SERVER, [rec.data_record(masked, sealed_original=sealed,
                                                                  attributes=attributes)], 1)
            yield Send(CLIENT, self.client.send(head) + (self.client.send(h11.Data(data=masked)) if masked else b""))
        elif exchange.streaming and exchange.buffer:
            rest = bytes(exchange.buffer)
            exchange.buffer.clear()
            yield from self._send_masked(rest, lines=True)
        yield Send(CLIENT, self.client.send(h11.EndOfMessage()))
        exchange.response_done = True
        yield from self._next_cycle()

    def _next_cycle(self) -> Steps:
        """Both halves of the exchange are done: the next request (perhaps already buffered) may start."""
        exchange = self.exchange
        if exchange is None or not (exchange.request_done and exchange.response_done):
            return
        if self.client.our_state is h11.MUST_CLOSE or self.client.their_state is h11.MUST_CLOSE:
            yield from self.session.end("client_terminate")
            return
        if self.target.their_state in (h11.MUST_CLOSE, h11.CLOSED) or self.target.our_state is h11.MUST_CLOSE:
            yield from self.session.end("server_disconnect")
            return
        self.exchange = None
        self.client.start_next_cycle()
        if not exchange.refused:
            self.target.start_next_cycle()
        yield from self.session.between_operations()
        yield from self._client_events()

    # --- what only HTTP can say ----------------------------------------------------------

    def _body(self, status: int, detail: str, rule: str | None = None) -> tuple[bytes, bytes]:
        if self.kubernetes:
            document: dict = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                              "message": detail, "reason": _K8S_REASONS.get(status, "InternalError"), "code": status}
            info = self.exchange.info if self.exchange is not None else None
            if info is not None and info.resource:
                document["details"] = {"name": info.name, "kind": info.resource}
            if rule:
                document.setdefault("details", {})["causes"] = [{"reason": "CustodyPolicy", "message": rule,
                                                                 "field": "rule"}]
            return json.dumps(document).encode(), b"application/json"
        document = {"type": "about:blank", "title": _REASONS.get(status, "Error"), "status": status, "detail": detail}
        if rule:
            document["rule"] = rule
        return json.dumps(document).encode(), b"application/problem+json"

    def _records(self, data: bytes, status: int, headers: rec.Headers, body: bytes) -> list[rec.Record]:
        head = rec.response_record(status, _REASONS.get(status, "Error").encode(), "1.1", headers, dict(PROXY_ORIGIN))
        return [head, rec.data_record(body, attributes=dict(PROXY_ORIGIN))]

    def _refusal(self, status: int, detail: str, rule: str | None = None) -> Said:
        """A response the proxy gives in place of the target's; the connection goes on."""
        body, content_type = self._body(status, detail, rule)
        headers = [(b"Content-Type", content_type), (b"Content-Length", str(len(body)).encode())]
        data = self.client.send(h11.Response(status_code=status, headers=headers,
                                             reason=_REASONS.get(status, "Error").encode()))
        data += self.client.send(h11.Data(data=body)) + self.client.send(h11.EndOfMessage())
        return Said(data, self._records(data, status, headers, body), 2)

    def _closing(self, status: int, detail: str) -> Said:
        """The proxy's last response on this connection (h11's state may be broken): written by hand."""
        body, content_type = self._body(status, detail)
        headers = [(b"Content-Type", content_type), (b"Content-Length", str(len(body)).encode()),
                   (b"Connection", b"close")]
        if status == 401:
            headers.append((b"WWW-Authenticate", b'Bearer realm="custody"'))
        line = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}".encode()
        data = rec.head_bytes(line, headers) + body
        return Said(data, self._records(data, status, headers, body), 2)

    def goodbye(self, ending: Ending) -> Said | None:
        """The ending as a response, when a request waits for one and none has begun."""
        if self.tunnel is not None:
            return None
        exchange = self.exchange
        bad_request = ending.reason == "protocol_error" and ending.code == "400"
        if exchange is None and not bad_request:
            return None  # nothing was asked: a client between requests is just disconnected
        if exchange is not None and (exchange.response_started or exchange.refused and exchange.response_done):
            return None
        status = _ENDING_STATUS.get(ending.reason, 502)
        if ending.reason == "protocol_error" and ending.code != "400":
            status = 502  # the target broke HTTP
        return self._closing(status, f"custody: {ending.text}")

    def hold_notice(self, request: ApprovalRequest, decision: Decision) -> Said | None:
        log.info("session %s: %s %s waits for approval, request %s (approvers: %s)", self.session.session_id,
                 self.exchange.method if self.exchange else "", self.exchange.target if self.exchange else "",
                 request.request_id, ", ".join(request.approvers))
        return None  # HTTP/1.1 has no way to tell the waiting client; the request simply waits


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _origin_form(target: str) -> str:
    """An absolute-form target (RFC 9112 §3.2.2, `GET http://host/path`) as origin-form: the target is the
    proxy's upstream whatever host the client names, and relayed as it was, it would bypass the base path
    and the policy's view of the path (`^DELETE /admin/` does not match `DELETE http://x/admin/`)."""
    if target.startswith("/") or target == "*":
        return target
    parts = urlsplit(target)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ProtocolViolation("400", f"request target {target[:200]!r} is neither origin-form nor absolute-form")
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


_SLASHES = re.compile(r"/{2,}")


def _resolved(target: str) -> str:
    """The target as servers resolve its path before they route it (nginx: decoded, slashes merged, dot
    segments removed), so that a policy on `/admin/` also sees `//admin/`, `/%61dmin/`; the query stays as
    sent. Dot segments are refused instead (400): relayed, they would climb out of the base path, and
    clients remove them before sending (RFC 3986 §5.2.4)."""
    path, mark, query = target.partition("?")
    if "%" not in path and "//" not in path and "/." not in path:
        return target  # the usual case, unchanged
    decoded = unquote(path, errors="replace")
    if any(segment in (".", "..") for segment in decoded.split("/")):
        raise ProtocolViolation("400", "a dot segment in the request path (a policy evasion shape)")
    return _SLASHES.sub("/", decoded) + mark + query


def _guard_head(buffered: bytes, max_header: int) -> None:
    """Shapes h11 accepts leniently but a proxy must refuse (they smuggle requests past other parsers):
    a bare LF as line end, obs-fold continuation lines, a Content-Length given twice or as a list (h11
    merges equal values into one, RFC 9110 §8.6 lets a recipient do so, but a parser behind another proxy
    may not), and a head larger than max_header_bytes (h11 bounds only an incomplete one)."""
    if not buffered:
        return
    end = buffered.find(b"\r\n\r\n")
    head = buffered if end < 0 else buffered[:end + 2]
    if len(head) > max_header:
        raise ProtocolViolation("400", f"request head larger than max_header_bytes ({max_header:,} bytes)")
    _guard_content_length(head)
    lf = head.find(b"\n")
    while lf >= 0:
        if lf == 0 or head[lf - 1] != 0x0D:
            raise ProtocolViolation("400", "a bare LF line ending in the request head (a request smuggling shape)")
        if lf + 1 < len(head) and head[lf + 1] in (0x20, 0x09):
            raise ProtocolViolation("400", "an obs-fold header continuation line (a request smuggling shape)")
        lf = head.find(b"\n", lf + 1)


def _guard_content_length(head: bytes) -> None:
    """One Content-Length with one value; h11 refuses unequal ones itself, and merges equal ones silently."""
    if b"content-length" not in head.lower():
        return
    values = [line.partition(b":")[2] for line in head.split(b"\n")[1:]
              if line.partition(b":")[0].strip().lower() == b"content-length"]
    if len(values) > 1 or any(b"," in value for value in values):
        raise ProtocolViolation("400", "Content-Length given more than once (a request smuggling shape)")
