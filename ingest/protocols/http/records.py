"""The `Message` records (schemas/event.avsc) of an HTTP or Kubernetes session.

* `Request` (client): the head as the client sent it, with credentials replaced by `[REDACTED]`
  (`attributes.redacted` says which); `statement`/`text` is the request line (`GET /api/v1/pods`),
  `operation` its kind (`request`; `command` for a Kubernetes exec, `forward` for port-forward),
  `objects` what it touches, attributes method, path, host and, for Kubernetes, verb, resource,
  namespace, name, subresource, kubectl_command.
* `Response` (server): status line and headers; `outcome` ok (< 400) or error, `error_code` the status.
* `Data`: body bytes as relayed, one record per read (masked: what the client saw, the original
  sealed in `sealed_original`).
* After a 101: `ws.binary`, `ws.text`, `ws.close`, `ws.ping`, `ws.pong` (a WebSocket message
  frame's payload; for Kubernetes' channel protocols `channel` is the stream number and the
  channel byte is removed) and `spdy.syn_stream`, `spdy.data`, … (SPDY/3.1 frames; `channel` is the
  Kubernetes stream number of the stream's `streamtype`: 0 stdin, 1 stdout, 2 stderr, 3 error,
  4 resize; port-forward streams `PORT/data`, `PORT/error`).
"""

from __future__ import annotations

from typing import Any

Record = dict[str, Any]
Headers = list[tuple[bytes, bytes]]

REDACTED = b"[REDACTED]"
SECRET_HEADERS = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})
# Secret headers whose value is redacted in the evidence: the client's token, cookies.
STREAM_CHANNELS = {"stdin": "0", "stdout": "1", "stderr": "2", "error": "3", "resize": "4"}
CHANNEL_NAMES = {"0": "stdin", "1": "stdout", "2": "stderr", "3": "error", "4": "resize", "255": "close"}


def redact(headers: Headers) -> tuple[Headers, list[str]]:
    """Headers with secret values replaced, and the names that were."""
    out, redacted = [], []
    for name, value in headers:
        if name.lower() in SECRET_HEADERS:
            out.append((name, REDACTED))
            redacted.append(name.lower().decode("latin-1"))
        else:
            out.append((name, value))
    return out, redacted


def head_bytes(first_line: bytes, headers: Headers) -> bytes:
    return first_line + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"


def header(headers: Headers, name: bytes) -> bytes | None:
    name = name.lower()
    return next((v for n, v in headers if n.lower() == name), None)


def request_record(method: str, target: str, version: str, headers: Headers, *, operation: str, text: str,
                   objects: tuple[str, ...], attributes: dict[str, str]) -> Record:
    shown, redacted = redact(headers)
    attributes = dict(attributes)
    if redacted:
        attributes["redacted"] = ",".join(redacted)
    host = header(headers, b"host")
    if host:
        attributes["host"] = host.decode("latin-1")
    content_type = header(headers, b"content-type")
    if content_type:
        attributes["content_type"] = content_type.decode("latin-1")
    line = f"{method} {target} HTTP/{version}".encode("latin-1", "replace")
    return {"type": "Request", "data": head_bytes(line, shown), "statement": f"{method} {target}",
            "operation": operation, "text": text, "objects": list(objects), "attributes": attributes}


def response_record(status: int, reason: bytes, version: str, headers: Headers,
                    attributes: dict[str, str] | None = None) -> Record:
    shown, redacted = redact(headers)
    attributes = {"status": str(status), **(attributes or {})}
    if redacted:
        attributes["redacted"] = ",".join(redacted)
    content_type = header(headers, b"content-type")
    if content_type:
        attributes["content_type"] = content_type.decode("latin-1")
    line = f"HTTP/{version} {status} ".encode() + reason
    record: Record = {"type": "Response", "data": head_bytes(line, shown), "attributes": attributes}
    if status >= 200:
        record["outcome"] = "ok" if status < 400 else "error"
        if status >= 400:
            record["error_code"] = str(status)
    return record


def data_record(data: bytes, *, sealed_original: bytes | None = None,
                attributes: dict[str, str] | None = None) -> Record:
    record: Record = {"type": "Data", "data": data, "attributes": attributes or {}}
    if sealed_original is not None:
        record["sealed_original"] = sealed_original
    return record


def frame_record(kind: str, data: bytes, channel: str | None, attributes: dict[str, str] | None = None) -> Record:
    """A tunnelled frame: `ws.binary`, `spdy.data`, … with its channel (None outside Kubernetes' channels)."""
    record: Record = {"type": kind, "data": data, "attributes": attributes or {}}
    if channel is not None:
        record["channel"] = channel
    return record


__all__ = ["CHANNEL_NAMES", "REDACTED", "STREAM_CHANNELS", "data_record", "frame_record", "header",
           "redact", "request_record", "response_record"]
