"""A Kubernetes API *test stand-in*: no API server can be installed from the reachable registries, so the
Kubernetes proxy tests run the real kubectl binaries against this small server, which speaks the
documented wire protocol for what they use:

* discovery: `/version`, `/api` (APIVersions), `/apis` (an empty APIGroupList), `/api/v1`
  (APIResourceList) — the legacy discovery documents kubectl falls back to;
* JSON get, list (items without `kind`, as the API server sends them; a `meta.k8s.io/v1` Table when the
  client asks for one, as kubectl does), create, delete
  and `?watch=true` (a chunked stream of watch events) of pods, secrets and configmaps in memory, in the
  namespaces `default` and `prod` (one pod there, `api-1`, for policies by namespace);
* `pods/NAME/exec` over WebSocket (`v5.channel.k8s.io`, `v4.channel.k8s.io`: one byte of stream
  number before each message; status JSON on stream 3; `ws_protocols=` accepts fewer) and over SPDY/3.1
  (streams by `streamtype`, `X-Stream-Protocol-Version` negotiation), running a pretend `echo ARGS`, `cat`
  and `sh -c` of `echo WORDS`, `echo WORDS >&2` and `exit N` statements (stdout, stderr, exit status);
* `pods/NAME/attach`: as exec, echoing stdin (a pretend `cat` as the container's process);
* `exec -it` (`tty=true`, both transports): a pretend shell behind a terminal (`TtyShell`): it echoes
  what is typed, answers `echo ARGS` lines after a `$ ` prompt, ends on `exit` or Ctrl-D, and keeps
  the resize messages (channel 4 / the `resize` stream) in the exec record's `resize`;
* `pods/NAME/portforward` over SPDY/3.1 (`portforward.k8s.io`) and over SPDY tunnelled in WebSocket
  (`SPDY/3.1+portforward.k8s.io`, kubectl 1.30+: the binary messages carry the SPDY byte stream):
  each data stream answers `echo:` + what it gets, kept in the exec record's `forwarded` per port.

A get of one object asked for as `application/vnd.kubernetes.protobuf` is answered in the protobuf
envelope (`k8s\0`, runtime.Unknown around the object's metadata name/namespace and, for Secrets and
ConfigMaps, its `data` map: `protobuf()`), enough for the proxy to meet a protobuf body it cannot read.

It is not an API server: no admission, no RBAC, no resourceVersion semantics beyond a counter, no
field selectors, no protobuf beyond that one answer. It checks the bearer token it expects (the proxy's upstream credential)
and answers 401 otherwise, so tests see that the proxy injects its credential and never the client's.
The SPDY side uses the codec under test (`ingest.protocols.kubernetes.spdy`); what validates it is
kubectl's own Go implementation (moby/spdystream) on the other end.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import ssl
import threading
from urllib.parse import parse_qs, urlsplit

import h11
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, Request, TextMessage

from ingest.protocols.kubernetes import spdy

NOW = "2026-01-01T00:00:00Z"
WS_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
SPDY_PROTOCOLS = ("v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io")
SUCCESS = {"metadata": {}, "status": "Success"}
NAMESPACES = ("default", "prod")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2: strings, bytes, messages, map entries)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def protobuf(item: dict) -> bytes:
    """`item` as the API server's protobuf encoding: the `k8s\0` magic, then runtime.Unknown {typeMeta(1)
    {apiVersion(1), kind(2)}, raw(2), contentType(4) ""}; raw is the object: metadata(1) {name(1),
    namespace(3)}, and for a Secret or ConfigMap data(2) map entries {key(1), value(2)} (a Secret's values as
    the raw bytes, as protobuf carries them: no base64)."""
    meta = item["metadata"]
    raw = _field(1, _field(1, meta["name"].encode()) + _field(3, meta.get("namespace", "").encode()))
    for key, value in (item.get("data") or {}).items():
        value = base64.b64decode(value) if item.get("kind") == "Secret" else value.encode()
        raw += _field(2, _field(1, key.encode()) + _field(2, value))
    type_meta = _field(1, item.get("apiVersion", "v1").encode()) + _field(2, item["kind"].encode())
    return b"k8s\x00" + _field(1, type_meta) + _field(2, raw)


class TtyShell:
    """What `kubectl exec -it POD -- sh` meets: a terminal's line discipline (typed bytes echoed, CR as CRLF,
    DEL rubs out) in front of a shell that runs `echo ARGS` and ends on `exit` or Ctrl-D on an empty line."""

    PROMPT = b"$ "

    def __init__(self) -> None:
        self.line = b""
        self.typed = b""
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """The terminal output for what was typed."""
        out = b""
        for byte in data:
            char = bytes([byte])
            self.typed += char
            if char in (b"\r", b"\n"):
                words, self.line = self.line.decode("utf-8", "replace").split(), b""
                out += b"\r\n"
                if words[:1] == ["exit"]:
                    self.done = True
                    return out
                if words[:1] == ["echo"]:
                    out += " ".join(words[1:]).encode() + b"\r\n"
                elif words:
                    out += f"sh: {words[0]}: not found\r\n".encode()
                out += self.PROMPT
            elif char == b"\x04" and not self.line:
                self.done = True
                return out
            elif char == b"\x7f":
                if self.line:
                    self.line, out = self.line[:-1], out + b"\b \b"
            else:
                self.line, out = self.line + char, out + char
        return out

RESOURCES = [
    {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod", "shortNames": ["po"],
     "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]},
    {"name": "pods/exec", "singularName": "", "namespaced": True, "kind": "PodExecOptions", "verbs": ["create", "get"]},
    {"name": "pods/attach", "singularName": "", "namespaced": True, "kind": "PodAttachOptions", "verbs": ["create", "get"]},
    {"name": "pods/portforward", "singularName": "", "namespaced": True, "kind": "PodPortForwardOptions",
     "verbs": ["create", "get"]},
    {"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod", "verbs": ["get"]},
    {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret",
     "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]},
    {"name": "configmaps", "singularName": "configmap", "namespaced": True, "kind": "ConfigMap", "shortNames": ["cm"],
     "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]},
    {"name": "namespaces", "singularName": "namespace", "namespaced": False, "kind": "Namespace", "shortNames": ["ns"],
     "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]},
]
KINDS = {r["name"]: r["kind"] for r in RESOURCES}


def _meta(name: str, namespace: str, uid: int) -> dict:
    return {"name": name, "namespace": namespace, "uid": f"00000000-0000-0000-0000-{uid:012d}",
            "resourceVersion": str(uid), "creationTimestamp": NOW}


def initial_objects() -> dict[str, dict[str, dict]]:
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()
    pods = {name: {"kind": "Pod", "apiVersion": "v1", "metadata": _meta(name, "default", i + 1),
                   "spec": {"containers": [{"name": "app", "image": "busybox"}]},
                   "status": {"phase": "Running", "containerStatuses": [{"name": "app", "ready": True, "restartCount": 0}]}}
            for i, name in enumerate(["web-1", "web-2"])}
    secrets = {
        "db-creds": {"kind": "Secret", "apiVersion": "v1", "metadata": _meta("db-creds", "default", 10), "type": "Opaque",
                     "data": {"password": b64("hunter2-secret"), "contact": b64("ops.lead@example.org"),
                              "note": b64("rotated monthly")}},
        "old-token": {"kind": "Secret", "apiVersion": "v1", "metadata": _meta("old-token", "default", 11),
                      "type": "Opaque", "data": {"token": b64("abc")}},
    }
    configmaps = {"app-config": {"kind": "ConfigMap", "apiVersion": "v1", "metadata": _meta("app-config", "default", 20),
                                 "data": {"mode": "production"}}}
    pods["api-1"] = {**copy.deepcopy(pods["web-1"]), "metadata": _meta("api-1", "prod", 3)}
    return {"pods": pods, "secrets": secrets, "configmaps": configmaps}


def _script(command: list[str]) -> tuple[bytes, bytes, str] | None:
    """A pretend `sh -c 'STATEMENT; ...'` of `echo WORDS`, `echo WORDS >&2` and `exit N`: its (stdout, stderr,
    exit code); None for any other command."""
    if command[:2] != ["sh", "-c"] or len(command) != 3:
        return None
    stdout, stderr = b"", b""
    for statement in command[2].split(";"):
        words = statement.split()
        if words[:1] == ["exit"]:
            return stdout, stderr, words[1] if len(words) > 1 else "0"
        if words[:1] == ["echo"] and words[-1:] == [">&2"]:
            stderr += (" ".join(words[1:-1]) + "\n").encode()
        elif words[:1] == ["echo"]:
            stdout += (" ".join(words[1:]) + "\n").encode()
    return stdout, stderr, "0"


def _exit_status(command: list[str]) -> dict:
    """What the kubelet reports on the error channel: a pretend `sh -c` that exits N > 0 fails as
    NonZeroExitCode."""
    script = _script(command)
    if script is not None and script[2] != "0":
        code = script[2]
        return {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                "message": f"command terminated with non-zero exit code: exit status {code}",
                "details": {"causes": [{"reason": "ExitCode", "message": code}]}}
    return SUCCESS


def _list_item(item: dict) -> dict:
    """`item` as a list's item: the API server leaves out each item's `kind` and `apiVersion` (the list's own
    kind, `SecretList`, is all that says the items are Secrets)."""
    return {key: value for key, value in item.items() if key not in ("kind", "apiVersion")}


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


class KubeServer:
    """Runs on its own event loop thread; `url` is where it listens."""

    def __init__(self, token: str, tls: "ssl.SSLContext | None" = None,
                 ws_protocols: tuple[str, ...] = WS_PROTOCOLS) -> None:
        """`ws_protocols`: the exec/attach WebSocket subprotocols accepted, in preference order. Only
        `v4.channel.k8s.io` is a cluster kubectl 1.30+ cannot use on WebSocket (it offers v5 alone), so it
        falls back to SPDY/3.1."""
        self.token = token
        self.tls = tls
        self.ws_protocols = ws_protocols
        self.objects = initial_objects()
        self.requests: list[tuple[str, str, str | None]] = []  # (method, target, authorization) as received
        self.execs: list[dict] = []
        self.created: list[dict] = []  # objects created (POST), as the target got them
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._version = 100

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self) -> "KubeServer":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    # --- HTTP -----------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
                if not isinstance(event, h11.Request):
                    continue
                body = b""
                while True:
                    more = conn.next_event()
                    if more is h11.NEED_DATA:
                        conn.receive_data(await reader.read(65536))
                    elif isinstance(more, h11.Data):
                        body += more.data
                    else:
                        break
                upgraded = await self._handle(conn, event, body, reader, writer)
                if upgraded or conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _respond(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int, document: dict) -> None:
        body = json.dumps(document).encode()
        writer.write(conn.send(h11.Response(status_code=status, headers=[
            ("Content-Type", "application/json"), ("Content-Length", str(len(body)))])))
        writer.write(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        await writer.drain()

    async def _handle(self, conn, request: h11.Request, body: bytes, reader, writer) -> bool:
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        target = request.target.decode()
        method = request.method.decode()
        self.requests.append((method, target, headers.get("authorization")))
        if headers.get("authorization") != f"Bearer {self.token}":
            await self._respond(conn, writer, 401, _status(401, "Unauthorized", "Unauthorized"))
            return False
        url = urlsplit(target)
        query = parse_qs(url.query)
        parts = [p for p in url.path.split("/") if p]
        if url.path == "/version":
            await self._respond(conn, writer, 200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0-custody-test",
                                                    "platform": "linux/amd64"})
        elif url.path == "/api":
            await self._respond(conn, writer, 200, {"kind": "APIVersions", "versions": ["v1"],
                                                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                                                    "serverAddress": "127.0.0.1"}]})
        elif url.path == "/apis":
            await self._respond(conn, writer, 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
        elif url.path == "/api/v1":
            await self._respond(conn, writer, 200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
                                                    "resources": RESOURCES})
        elif len(parts) >= 5 and parts[:3] == ["api", "v1", "namespaces"]:
            namespace, resource, rest = parts[3], parts[4], parts[5:]
            return await self._resource(conn, request, headers, query, namespace, resource, rest, reader, writer,
                                         body)
        else:
            await self._respond(conn, writer, 404, _status(404, "NotFound", f"the server could not find {url.path}"))
        return False

    def _table(self, resource: str, items: list[dict]) -> dict:
        if resource == "pods":
            columns = ["Name", "Ready", "Status", "Restarts", "Age"]
            rows = [[o["metadata"]["name"], "1/1", o["status"]["phase"], 0, "1d"] for o in items]
        elif resource == "secrets":
            columns = ["Name", "Type", "Data", "Age"]
            rows = [[o["metadata"]["name"], o["type"], len(o.get("data", {})), "1d"] for o in items]
        else:
            columns = ["Name", "Data", "Age"]
            rows = [[o["metadata"]["name"], len(o.get("data", {})), "1d"] for o in items]
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": str(self._version)},
                "columnDefinitions": [{"name": c, "type": "string", "format": "name" if c == "Name" else "",
                                       "description": "", "priority": 0} for c in columns],
                "rows": [{"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                                     "metadata": o["metadata"]}} for cells, o in zip(rows, items)]}

    async def _resource(self, conn, request, headers, query, namespace, resource, rest, reader, writer,
                        body: bytes = b"") -> bool:
        stored = self.objects.get(resource)
        method = request.method.decode()
        if stored is None or namespace not in NAMESPACES:
            await self._respond(conn, writer, 404, _status(404, "NotFound", f"{resource} not found"))
            return False
        store = {name: item for name, item in stored.items() if item["metadata"]["namespace"] == namespace}
        if rest and len(rest) == 2 and resource == "pods" and rest[1] in ("exec", "attach", "portforward"):
            return await self._stream(conn, request, headers, query, rest[0], rest[1], reader, writer)
        if not rest and method == "POST":  # create: stored as sent (kept in `created` too), answered 201
            item = json.loads(body)  # JSON only: a protobuf body (kubectl create secret generic) is a 500
            item.setdefault("metadata", {}).update(_meta(item["metadata"]["name"], namespace, self._version))
            self._version += 1
            stored[item["metadata"]["name"]] = item
            self.created.append(item)
            await self._respond(conn, writer, 201, item)
            return False
        if not rest:
            items = list(store.values())
            if query.get("watch", [""])[0] in ("1", "true"):
                await self._watch(conn, reader, writer, resource, items)
                return True
            if "as=Table" in headers.get("accept", ""):
                await self._respond(conn, writer, 200, self._table(resource, items))
            else:
                await self._respond(conn, writer, 200, {"kind": f"{KINDS[resource]}List", "apiVersion": "v1",
                                                        "metadata": {"resourceVersion": str(self._version)},
                                                        "items": [_list_item(item) for item in items]})
            return False
        name = rest[0]
        item = store.get(name)
        if item is None:
            await self._respond(conn, writer, 404, _status(404, "NotFound", f'{resource} "{name}" not found'))
        elif method == "DELETE":
            del stored[name]
            self._version += 1
            await self._respond(conn, writer, 200, item)
        elif headers.get("accept", "").startswith("application/vnd.kubernetes.protobuf"):
            encoded = protobuf(item)
            writer.write(conn.send(h11.Response(status_code=200, headers=[
                ("Content-Type", "application/vnd.kubernetes.protobuf"), ("Content-Length", str(len(encoded)))])))
            writer.write(conn.send(h11.Data(data=encoded)) + conn.send(h11.EndOfMessage()))
            await writer.drain()
        else:
            await self._respond(conn, writer, 200, item)
        return False

    async def _watch(self, conn, reader, writer, resource: str, items: list[dict]) -> None:
        """ADDED for what exists, a MODIFIED a moment later (in two chunks, cut inside a Secret's `data`), then
        open until the client goes (at most 30 s)."""
        writer.write(conn.send(h11.Response(status_code=200, headers=[("Content-Type", "application/json"),
                                                                      ("Transfer-Encoding", "chunked")])))
        for item in items:
            writer.write(conn.send(h11.Data(data=json.dumps({"type": "ADDED", "object": item}).encode() + b"\n")))
        await writer.drain()
        await asyncio.sleep(0.3)
        if items:
            changed = copy.deepcopy(items[0])
            changed["metadata"]["resourceVersion"] = str(self._version + 1)
            event = json.dumps({"type": "MODIFIED", "object": changed}).encode() + b"\n"
            cut = event.find(b'"data"') + 12 if b'"data"' in event else len(event) // 2
            for part in (event[:cut], event[cut:]):  # in two chunks, cut inside: a proxy must wait for the line
                writer.write(conn.send(h11.Data(data=part)))
                await writer.drain()
                await asyncio.sleep(0.2)
        try:  # open until the client goes (a read at EOF), at most 30 s; then the stream ends cleanly
            await asyncio.wait_for(reader.read(65536), 30)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        if not writer.is_closing():
            writer.write(conn.send(h11.EndOfMessage()))

    # --- exec / portforward -----------------------------------------------------------------

    def _run(self, command: list[str], stdin: bytes) -> tuple[bytes, bytes]:
        """(stdout, stderr) of the pretend command."""
        script = _script(command)
        if script is not None:
            return script[0], script[1]
        if command[:1] == ["echo"]:
            return (" ".join(command[1:]) + "\n").encode(), b""
        if command[:1] == ["cat"]:
            return stdin, b""
        return f"{command[0] if command else ''}: not found\n".encode(), b""

    async def _stream(self, conn, request, headers, query, pod, kind, reader, writer) -> bool:
        upgrade = headers.get("upgrade", "").lower()
        command = ["cat"] if kind == "attach" else query.get("command", [])
        record = {"pod": pod, "kind": kind, "transport": upgrade, "command": command, "query": query}
        self.execs.append(record)
        if upgrade == "websocket" and kind == "portforward":
            await self._websocket_spdy(conn, request, record, reader, writer)
            return True
        if upgrade == "websocket":
            await self._websocket(conn, request, query, record, reader, writer)
            return True
        if upgrade.startswith("spdy/3.1"):
            offered = [v.decode().strip() for k, v in request.headers if k.lower() == b"x-stream-protocol-version"]
            offered = [p.strip() for v in offered for p in v.split(",")]
            choices = ("portforward.k8s.io",) if kind == "portforward" else SPDY_PROTOCOLS
            chosen = next((p for p in offered if p in choices), None)
            if chosen is None:
                await self._respond(conn, writer, 403, _status(403, "Forbidden", f"no supported protocol in {offered}"))
                return False
            writer.write(conn.send(h11.InformationalResponse(status_code=101, headers=[
                ("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"), ("X-Stream-Protocol-Version", chosen)])))
            await writer.drain()
            record["protocol"] = chosen
            await self._spdy(conn.trailing_data[0], query, record, kind, reader, writer)
            return True
        await self._respond(conn, writer, 400, _status(400, "BadRequest", "Upgrade request required"))
        return False

    async def _websocket(self, conn, request, query, record, reader, writer) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        ws.initiate_upgrade_connection(list(request.headers), request.target)
        offered = []
        stdin_wanted = query.get("stdin", [""])[0] in ("1", "true")
        for event in ws.events():
            if isinstance(event, Request):
                offered = event.subprotocols
        chosen = next((p for p in offered if p in self.ws_protocols), None)
        record["protocol"], record["offered"] = chosen, offered
        writer.write(ws.send(AcceptConnection(subprotocol=chosen)))
        await writer.drain()
        stdin = b""
        pending = bytes(conn.trailing_data[0])
        done = not stdin_wanted
        shell = TtyShell() if query.get("tty", [""])[0] in ("1", "true") else None
        if shell is not None:
            record["resize"] = []
            await asyncio.sleep(0.3)  # client-go registers its streams after the handshake returns
            writer.write(ws.send(BytesMessage(data=b"\x01" + shell.PROMPT)))
            await writer.drain()
        while not done:
            if pending:
                ws.receive_data(pending)
                pending = b""
            else:
                data = await reader.read(65536)
                ws.receive_data(data or None)
                if not data:
                    return
            for event in ws.events():
                if isinstance(event, BytesMessage) and event.data:
                    channel, payload = event.data[0], bytes(event.data[1:])
                    if channel == 0 and shell is not None:
                        writer.write(ws.send(BytesMessage(data=b"\x01" + shell.feed(payload))))
                        done = shell.done
                    elif channel == 0:
                        stdin += payload
                    elif channel == 4 and shell is not None:
                        record["resize"].append(json.loads(payload))
                    elif channel == 255 and payload[:1] == b"\x00":  # v5: the client closed stdin
                        done = True
                elif isinstance(event, Ping):
                    writer.write(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    return
                elif isinstance(event, TextMessage):
                    pass
            if chosen == "v4.channel.k8s.io" and stdin.endswith(b"\x04"):
                done = True
        if shell is None:
            output, errors = self._run(record["command"], stdin)
            record["stdin"] = stdin
            # client-go registers its streams after the handshake returns: a process starts later than that.
            await asyncio.sleep(0.3)
            writer.write(ws.send(BytesMessage(data=b"\x01" + output)))
            if errors:
                writer.write(ws.send(BytesMessage(data=b"\x02" + errors)))
        else:
            record["stdin"] = shell.typed
        writer.write(ws.send(BytesMessage(data=b"\x03" + json.dumps(_exit_status(record["command"])).encode())))
        writer.write(ws.send(CloseConnection(code=1000)))
        await writer.drain()
        try:
            await asyncio.wait_for(reader.read(65536), 2)
        except (asyncio.TimeoutError, ConnectionError):
            pass

    async def _websocket_spdy(self, conn, request, record, reader, writer) -> None:
        """Port-forward tunnelled in WebSocket: SPDY/3.1 bytes in binary messages, both ways."""
        ws = WSConnection(ConnectionType.SERVER)
        ws.initiate_upgrade_connection(list(request.headers), request.target)
        offered = next((e.subprotocols for e in ws.events() if isinstance(e, Request)), [])
        chosen = next((p for p in offered if p.lower() == "spdy/3.1+portforward.k8s.io"), None)
        record["protocol"], record["transport"] = chosen, "websocket/spdy"
        writer.write(ws.send(AcceptConnection(subprotocol=chosen)))
        await writer.drain()
        pending = [bytes(conn.trailing_data[0])] if conn.trailing_data[0] else []

        async def read() -> bytes:
            while True:
                data = pending.pop() if pending else await reader.read(65536)
                ws.receive_data(data or None)
                out = b""
                for event in ws.events():
                    if isinstance(event, BytesMessage):
                        out += bytes(event.data)
                    elif isinstance(event, Ping):
                        writer.write(ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        return b""
                if out or not data:
                    return out

        await self._spdy(b"", {}, record, "portforward", reader, writer, read=read,
                         write=lambda data: writer.write(ws.send(BytesMessage(data=data))))

    async def _spdy(self, early: bytes, query, record, kind, reader, writer, read=None, write=None) -> None:
        read = read or (lambda: reader.read(65536))
        write = write or writer.write
        frames_in, frames_out = spdy.FrameReader(), spdy.FrameWriter()
        streams: dict[str, int] = {}
        stdin = b""
        flags = {name: query.get(name, [""])[0] in ("1", "true") for name in ("stdin", "stdout", "stderr", "tty")}
        expected = {"error"} | {name for name in ("stdin", "stdout", "stderr") if flags[name]}
        if flags["tty"]:
            expected.add("resize")
        stdin_done = not flags["stdin"]
        shell = TtyShell() if flags["tty"] and kind == "exec" else None
        if shell is not None:
            record["resize"] = []
        pending = early
        forwards: dict[int, str] = {}
        ports: dict[int, str] = {}
        prompted = False
        while True:
            data = pending or await read()
            pending = b""
            if not data:
                return
            for frame, _ in frames_in.feed(data):
                if isinstance(frame, spdy.SynStream):
                    streamtype = spdy.header(frame.headers, "streamtype") or ""
                    streams[streamtype] = frame.stream_id
                    write(frames_out.syn_reply(frame.stream_id, []))
                    if kind == "portforward":
                        forwards[frame.stream_id] = streamtype
                        ports[frame.stream_id] = spdy.header(frame.headers, "port") or ""
                elif isinstance(frame, spdy.Ping):
                    write(frames_out.ping(frame.ping_id))
                elif isinstance(frame, spdy.DataFrame):
                    if kind == "portforward" and forwards.get(frame.stream_id) == "data":
                        if frame.data:
                            port = ports.get(frame.stream_id, "")
                            record.setdefault("forwarded", {}).setdefault(port, b"")
                            record["forwarded"][port] += frame.data
                            write(frames_out.data(frame.stream_id, b"echo:" + frame.data))
                        if frame.fin:
                            write(frames_out.data(frame.stream_id, b"", fin=True))
                    elif frame.stream_id == streams.get("stdin") and shell is not None:
                        if frame.data and not shell.done:
                            write(frames_out.data(streams["stdout"], shell.feed(frame.data)))
                        stdin_done = shell.done or frame.fin
                    elif frame.stream_id == streams.get("stdin"):
                        stdin += frame.data
                        stdin_done = stdin_done or frame.fin
                    elif frame.stream_id == streams.get("resize") and shell is not None and frame.data:
                        record["resize"] += [json.loads(line) for line in frame.data.splitlines() if line.strip()]
                elif isinstance(frame, spdy.GoAway):
                    return
            if shell is not None and not prompted and expected <= set(streams):
                prompted = True
                write(frames_out.data(streams["stdout"], shell.PROMPT))
            await writer.drain()
            if kind == "portforward":
                continue
            if expected <= set(streams) and stdin_done:
                break
        output, errors = self._run(record["command"], stdin) if shell is None else (b"", b"")
        record["stdin"] = stdin if shell is None else shell.typed
        if "stdout" in streams:
            write(frames_out.data(streams["stdout"], output) + frames_out.data(streams["stdout"], b"", fin=True))
        if "stderr" in streams:
            write(frames_out.data(streams["stderr"], errors) + frames_out.data(streams["stderr"], b"", fin=True))
        exit_status = _exit_status(record["command"])
        if record.get("protocol") == "v4.channel.k8s.io":
            status = json.dumps(exit_status).encode()
        else:  # the older protocols: the error's text, nothing on success
            status = b"" if exit_status is SUCCESS else exit_status["message"].encode()
        write(frames_out.data(streams["error"], status) + frames_out.data(streams["error"], b"", fin=True))
        await writer.drain()
        try:  # let the client close its streams, then end the connection as the kubelet does
            await asyncio.wait_for(read(), 1)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        write(frames_out.goaway(max(streams.values(), default=0)))
        await writer.drain()
