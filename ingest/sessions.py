"""Who a session is and where it goes, read once from its SessionStart.

The ledger carries these fields onto every row of the session (they are its
identity columns, in this order) and violations report them; a named tuple so
that both read fields by name, never by position.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class SessionIdentity(NamedTuple):
    subject: str | None = None
    email: str | None = None
    groups: list[str] | None = None
    issuer: str | None = None
    source_address: str | None = None
    target: str | None = None
    protocol: str | None = None
    client_application: str | None = None

    @classmethod
    def from_session_start(cls, body: dict[str, Any]) -> SessionIdentity:
        who = body.get("identity") or {}
        return cls(who.get("subject"), who.get("email"), who.get("groups"), who.get("issuer"), body["source_address"],
                   body["target"], body["protocol"], body.get("client_application"))


NO_IDENTITY = SessionIdentity()
"""A session whose SessionStart the ledger has not seen: every identity column NULL."""
