"""DSSE envelopes (Dead Simple Signing Envelope, v1) with Ed25519 keys.

The signature is over PAE(payloadType, payload), never over the JSON, so the
envelope's JSON formatting cannot matter and the payload type cannot be swapped:

    PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body

with LEN the ASCII decimal byte length. Used for the bundle manifest (an
in-toto Statement) and for chain-of-custody transfer records.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import BadSignatureError

from ingest.keys import Keyring, KeyLookupError, PrivateKey

IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"


class DsseError(ValueError):
    """An envelope that is malformed or whose signature does not verify."""


def pae(payload_type: str, payload: bytes) -> bytes:
    type_bytes = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


def sign(payload: bytes, payload_type: str, key: PrivateKey) -> dict[str, Any]:
    return {
        "payload": base64.b64encode(payload).decode(),
        "payloadType": payload_type,
        "signatures": [{"keyid": key.key_id, "sig": base64.b64encode(key.sign(pae(payload_type, payload))).decode()}],
    }


@dataclass(frozen=True)
class Verified:
    payload: bytes
    payload_type: str
    key_id: str

    def json(self) -> Any:
        try:
            return json.loads(self.payload)
        except ValueError as exc:
            raise DsseError(f"payload is not JSON: {exc}") from None


def _b64(value: Any, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise DsseError(f"{what} is not base64") from None


def verify(envelope: Any, keyring: Keyring, role: str, expected_type: str) -> Verified:
    """The payload, if some signature verifies with a trusted `role` key; the first trusted signature wins.

    The key's validity window is the caller's to check, against the time the
    payload claims (an export time), which is only known once it verified.

    Raises DsseError naming why: malformed, wrong payload type, no signature by a
    trusted key, or a trusted key's signature that does not verify.
    """
    if not isinstance(envelope, dict) or not isinstance(envelope.get("signatures"), list):
        raise DsseError("not a DSSE envelope (payload, payloadType, signatures)")
    payload_type = envelope.get("payloadType")
    if payload_type != expected_type:
        raise DsseError(f"payloadType is {payload_type!r}, expected {expected_type!r}")
    payload = _b64(envelope.get("payload"), "payload")
    message = pae(payload_type, payload)
    untrusted = []
    for signature in envelope["signatures"]:
        key_id = signature.get("keyid") if isinstance(signature, dict) else None
        try:
            trusted = keyring.get(str(key_id))
        except KeyLookupError as exc:
            untrusted.append(f"{key_id} ({exc.reason})")
            continue
        if trusted.role != role:
            untrusted.append(f"{key_id} (a {trusted.role} key)")
            continue
        try:
            trusted.verify_key.verify(message, _b64(signature.get("sig"), "signature"))
        except (BadSignatureError, ValueError):
            raise DsseError(f"signature by {key_id} does not verify") from None
        return Verified(payload, payload_type, str(key_id))
    raise DsseError(f"no signature by a trusted {role} key (found: {', '.join(untrusted) or 'none'})")

