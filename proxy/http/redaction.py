"""Where an HTTP or Kubernetes client's requests carry secrets (the core's input redaction: proxy/core/redaction.py).

The client's `Authorization` and cookies are already `[REDACTED]` in the Request record
(`ingest.protocols.http.records.redact`). Here, request bodies (`Data` records from the client):

* Kubernetes: a Secret's `data` and `stringData` values (a `kubectl create secret`, `apply`, `replace`,
  a patch of a Secret, Secrets inside a List), whatever the policy says: `[REDACTED:secret]`. A
  protobuf body (`application/vnd.kubernetes.protobuf`, kubectl 1.32's `create secret generic`) to
  the secrets resource is not decoded: the whole chunk becomes `[REDACTED:secret]`.
* Where the policy has `[[mask]]`s: every JSON string value (or a non-JSON text body) in which the
  masks' detectors find something (card numbers, private keys, tokens…), and inside Secret values
  before they are removed. Any mask's detectors count, whoever it applies to: the evidence is read
  by analysts, not by the caller.

The record's `data` is rebuilt (compact JSON) with the markers; the original is sealed by the core.
A body split across several reads is judged chunk by chunk, so a JSON body cut in two is read as
text (detectors only). What is relayed to the target is never touched.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from proxy.core.redaction import MaskDetectors, marker
from proxy.policy.detectors import Scanner

if TYPE_CHECKING:
    from proxy.core.session import Session

    from .frontend import HttpFrontEnd

Record = dict[str, Any]
_SECRET_FIELDS = ("data", "stringData")


class HttpRedactor:
    def __init__(self, session: "Session", front: "HttpFrontEnd") -> None:
        self.session = session
        self.front = front
        self._detectors = MaskDetectors(session).scanner


    def redact(self, record: Record) -> tuple[Record, tuple[str, ...]] | None:
        if record.get("type") != "Data" or not record.get("data"):
            return None
        exchange = self.front.exchange
        info = exchange.info if exchange is not None else None
        secrets = info is not None and info.resource == "secrets"
        detectors = self._detectors()
        if not secrets and detectors is None and b'"Secret"' not in record["data"]:
            return None
        if secrets and bytes(record["data"][:4]) == b"k8s\x00":  # a protobuf Secret: not decoded, kept whole sealed
            return {**record, "data": marker("secret").encode()}, ("secret",)
        text = bytes(record["data"]).decode("utf-8", "replace")
        kinds: list[str] = []
        try:
            document = json.loads(text)
        except ValueError:
            if detectors is None:
                return None
            shown, findings = detectors.mask(text)
            if not findings:
                return None
            return {**record, "data": shown.encode()}, tuple(f.kind for f in findings)
        document = _walk(document, secrets, detectors, kinds)
        if not kinds:
            return None
        return {**record, "data": json.dumps(document, separators=(",", ":")).encode()}, tuple(kinds)


def _walk(value: Any, secret: bool, detectors: Scanner | None, kinds: list[str]) -> Any:
    """`value` with Secret data and detector findings replaced by markers; what was found appended to kinds."""
    if isinstance(value, dict):
        is_secret = value.get("kind") == "Secret" or (secret and "kind" not in value and "items" not in value)
        out = {}
        for key, item in value.items():
            if is_secret and key in _SECRET_FIELDS and isinstance(item, dict):
                out[key] = {name: marker("secret") for name in item}
                if item:
                    kinds.append("secret")
            else:
                out[key] = _walk(item, secret and key == "items", detectors, kinds)
        return out
    if isinstance(value, list):
        return [_walk(item, secret, detectors, kinds) for item in value]
    if isinstance(value, str) and detectors is not None:
        shown, findings = detectors.mask(value)
        if findings:
            kinds.extend(f.kind for f in findings)
            return marker(findings[0].kind)
    return value


__all__ = ["HttpRedactor"]
