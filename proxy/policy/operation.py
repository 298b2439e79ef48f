"""What policy decides on: an *operation*, the protocol-neutral description of one thing a client asks for.

A front end turns what it relays into an `Operation` — a PostgreSQL Query, an
SSH exec request, a Kubernetes API call — and `Policy.decide` matches rules
against its fields. Each protocol may bring an analyzer (`proxy.policy.analyzers`)
that reads the operation's text more closely (the SQL parse tree for
PostgreSQL); a protocol without one is decided on these fields alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ingest.errors import CustodyError

__all__ = ["AnalysisError", "OPERATION_KINDS", "Operation", "PROTOCOLS"]

PROTOCOLS = ("postgres", "mysql", "ssh", "http", "kubernetes")
"""The protocols a front end may report; a policy naming another one is an error (typos would never match)."""

OPERATION_KINDS = ("statement", "command", "request", "transfer", "forward")
"""What an operation is: a SQL `statement`, a shell `command` (SSH exec, kubectl exec), an API `request`
(HTTP, Kubernetes), a file `transfer` (SFTP/SCP, COPY data), a port `forward`. A front end that needs
another kind adds it here, so that policy files can name it."""

_NO_ATTRIBUTES: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Operation:
    """One thing a client asks a target to do, as policy sees it.

    `text` is what was asked, as sent: the SQL, the command line, or
    `DELETE /api/v1/namespaces/x/secrets/y`. `objects` is what it touches
    (tables, paths, resources) as far as the front end knows; `attributes`
    are protocol facts (database, user, verb, resource, namespace, method…).
    Attributes are copied into a read-only mapping, so an operation cannot
    change after it was decided.
    """

    protocol: str
    kind: str
    text: str
    objects: tuple[str, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=lambda: _NO_ATTRIBUTES, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.objects, tuple):
            object.__setattr__(self, "objects", tuple(self.objects))
        if self.attributes is not _NO_ATTRIBUTES:
            object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))


class AnalysisError(CustodyError):
    """An analyzer could not read the operation's text; the policy's `on_parse_error` decides then.

    `what` names the language in the decision's message ("SQL not understood: …").
    """

    what = "text"
