"""Masking HTTP response bodies by the policy's mask plan: JSON by field name and by the detectors.

* JSON (`application/json`, `*+json`): every string value is scanned by the plan's detectors; a
  field whose name matches the plan's column patterns (`*password*`) has its value replaced whole
  (`[MASKED:column]`). Kubernetes Secrets (`kind: Secret`, the items of a `SecretList`, the object
  of a watch event) keep their `data` values base64-encoded: each is decoded, masked (by its key
  name, then by the detectors) and encoded again, so the client still gets a valid Secret.
* Other text (`text/*`): the detectors over the whole text.
* Protobuf (`application/vnd.kubernetes.protobuf`, `application/x-protobuf`, `application/protobuf`):
  there is no decoder here, and it carries what JSON would (a Secret's data as raw bytes), so a body
  the plan must mask cannot be read: `unreadable()`; the front end asks the target for JSON instead
  when the client accepts it too (`readable_accept()`), and refuses (502) a protobuf answer it must
  mask rather than relay it.
* Anything else is not masked (binary: detectors read text).

Pure functions; the front end decides what to buffer and seals the originals.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from proxy.policy import MaskPlan

COLUMN = "[MASKED:column]"

Findings = list[str]


def maskable(content_type: str) -> str | None:
    """`json`, `text` or None: how a body of this media type is masked."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json" or media.endswith("+json") or media == "application/json-seq":
        return "json"
    if media.startswith("text/"):
        return "text"
    return None


PROTOBUF = ("application/vnd.kubernetes.protobuf", "application/x-protobuf", "application/protobuf")


def unreadable(content_type: str) -> bool:
    """A structured body the masker cannot read (protobuf, its watch stream too): to be refused, not relayed,
    where the policy masks."""
    return content_type.split(";", 1)[0].strip().lower() in PROTOBUF


def readable_accept(accept: str) -> str | None:
    """The client's Accept without its protobuf types, when it offers something else too (client-go's typed
    clients send `application/vnd.kubernetes.protobuf, application/json`): where the policy masks, the target is
    asked for what the masker can read. None: nothing to change, or protobuf is all the client takes."""
    offered = [part.strip() for part in accept.split(",") if part.strip()]
    readable = [part for part in offered if not unreadable(part)]
    return ", ".join(readable) if readable and len(readable) < len(offered) else None


class BodyMasker:
    def __init__(self, plan: MaskPlan) -> None:
        self.plan = plan
        self.scanner = plan.scanner

    def mask_body(self, kind: str, body: bytes) -> tuple[bytes, Findings]:
        """The masked body and what was found; a body that is not valid JSON is masked as text."""
        if kind == "json":
            try:
                document = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                return self._text(body)
            findings: Findings = []
            masked = self._value(document, findings, None, False)
            if not findings:
                return body, findings
            return json.dumps(masked, separators=(",", ":"), ensure_ascii=False).encode(), findings
        return self._text(body)

    def mask_lines(self, kind: str, data: bytes) -> tuple[bytes, Findings]:
        """A watch stream's complete lines (each one JSON event), masked one by one."""
        out, findings = [], []
        for line in data.split(b"\n"):
            if line.strip():
                masked, found = self.mask_body(kind, line)
                out.append(masked)
                findings += found
            else:
                out.append(line)
        return b"\n".join(out), findings

    def _text(self, body: bytes) -> tuple[bytes, Findings]:
        text = body.decode("utf-8", "surrogateescape")
        masked, found = self.scanner.mask(text)
        if not found:
            return body, []
        return masked.encode("utf-8", "surrogateescape"), [f.kind for f in found]

    def _string(self, value: str, findings: Findings) -> str:
        masked, found = self.scanner.mask(value)
        findings.extend(f.kind for f in found)
        return masked

    def _value(self, value: Any, findings: Findings, key: str | None, secret: bool) -> Any:
        if key is not None and not isinstance(value, (dict, list)) and value is not None \
                and self.plan.masks_column(key):
            findings.append("column")
            return COLUMN
        if isinstance(value, str):
            return self._string(value, findings)
        if isinstance(value, list):
            return [self._value(item, findings, None, secret) for item in value]
        if not isinstance(value, dict):
            return value
        kind = value.get("kind")
        is_secret = secret or kind == "Secret"
        out = {}
        for name, item in value.items():
            if name == "data" and is_secret and isinstance(item, dict):
                out[name] = {k: self._secret_value(k, v, findings) for k, v in item.items()}
            elif name == "items" and kind == "SecretList":
                out[name] = [self._value(x, findings, None, True) for x in item] if isinstance(item, list) else item
            else:
                out[name] = self._value(item, findings, name, False)
        return out

    def _secret_value(self, key: str, value: Any, findings: Findings) -> Any:
        if not isinstance(value, str):
            return value
        if self.plan.masks_column(key):
            findings.append("column")
            return base64.b64encode(COLUMN.encode()).decode()
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return self._string(value, findings)
        text = raw.decode("utf-8", "surrogateescape")
        masked, found = self.scanner.mask(text)
        if not found:
            return value
        findings.extend(f.kind for f in found)
        return base64.b64encode(masked.encode("utf-8", "surrogateescape")).decode()
