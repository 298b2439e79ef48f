"""`custody kubeconfig`: a kubeconfig whose cluster is a Kubernetes proxy and whose user is `custody token`.

The user is a `client.authentication.k8s.io/v1` exec credential plugin: kubectl runs
`custody token --format exec-credential` for the token `custody login` cached (refreshed when it is about to
expire) and runs it again once the printed `expirationTimestamp` has passed, so no token is pasted into the
file. The cluster is the proxy's listener over https, with the certificate authority kubectl verifies it by
embedded as `certificate-authority-data`.

No YAML library is needed to write it: the document is maps, lists and strings, and every string is written
as a JSON string, which is a YAML double-quoted scalar.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["EXEC_API_VERSION", "kubeconfig", "to_yaml"]

EXEC_API_VERSION = "client.authentication.k8s.io/v1"


def kubeconfig(name: str, server: str, command: str, args: Sequence[str], ca_pem: bytes | None = None,
               namespace: str | None = None, install_hint: str | None = None) -> dict[str, Any]:
    """One cluster (`server`, `ca_pem` embedded; None: the system's roots), one exec-plugin user, one context."""
    cluster: dict[str, Any] = {"server": server}
    if ca_pem is not None:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode("ascii")
    exec_plugin: dict[str, Any] = {
        "apiVersion": EXEC_API_VERSION,
        "command": command,
        "args": list(args),
        "interactiveMode": "Never",  # `custody token` never prompts: not logged in, it says to run custody login
        "provideClusterInfo": False,
    }
    if install_hint:
        exec_plugin["installHint"] = install_hint
    context: dict[str, Any] = {"cluster": name, "user": name}
    if namespace:
        context["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [{"name": name, "user": {"exec": exec_plugin}}],
        "contexts": [{"name": name, "context": context}],
        "current-context": name,
        "preferences": {},
    }


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"cannot write {type(value).__name__} into a kubeconfig")


def _lines(value: Any, indent: int) -> list[str]:
    pad = "  " * indent
    if isinstance(value, Mapping):
        out = []
        for key, item in value.items():
            if isinstance(item, Mapping) and item:
                out += [f"{pad}{key}:", *_lines(item, indent + 1)]
            elif isinstance(item, list) and item:
                out += [f"{pad}{key}:", *_lines(item, indent)]
            else:
                out.append(f"{pad}{key}: {_empty(item) if isinstance(item, (Mapping, list)) else _scalar(item)}")
        return out
    if isinstance(value, list):
        out = []
        for item in value:
            inner = _lines(item, indent + 1) if isinstance(item, (Mapping, list)) and item else \
                [("  " * (indent + 1)) + (_empty(item) if isinstance(item, (Mapping, list)) else _scalar(item))]
            out.append(f"{pad}- {inner[0].lstrip()}")
            out += inner[1:]
        return out
    return [pad + _scalar(value)]


def _empty(value: Mapping | list) -> str:
    return "{}" if isinstance(value, Mapping) else "[]"


def to_yaml(document: Mapping[str, Any]) -> str:
    """Block-style YAML of maps, lists and scalars (strings JSON-quoted)."""
    return "\n".join(_lines(document, 0)) + "\n"
