"""What a protocol brings to the core: a listener-wide `Protocol` and a per-connection `FrontEnd`.

A front end is its sans-I/O codec plus a thin state machine: handlers that
turn a side's bytes into records and commands, and the few words only the
protocol can say (how to tell the client the session ends, how to say
goodbye to the target, how to tell it an operation waits for approval).
Everything else — identity binding, the backlog before SessionStart,
recording and fail closed/open, holds, timeouts, counters, the single end —
is the core's `Session`, which the front end is given.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .commands import Command
from .records import Record

if TYPE_CHECKING:
    from proxy.approvals import ApprovalRequest
    from proxy.policy import Decision
    from proxy.settings import ProxySettings

    from ingest.recorder import Recorder
    from proxy.identity import TokenVerifier

    from .policy import PolicyRuntime
    from .redaction import Redactor
    from .runner import Approvals
    from .server import Listener
    from .session import Session
    from .settings import ListenerSettings

Steps = Generator[Command, Any, Any]


@dataclass(frozen=True, slots=True)
class Said:
    """Bytes the proxy itself sends the client, with their records (marked as the proxy's).

    `channel`: on which of the client's channels, for a protocol that has several (`Send.channel`).
    """

    data: bytes
    records: list[Record]
    count: int = 1
    channel: str | None = None


@dataclass(frozen=True, slots=True)
class Ending:
    """Why the core ends a session: SessionEnd's `reason`, a reason code, a sentence for the client."""

    reason: str  # auth_failed | protocol_error | shutdown | recorder_failure | upstream_unavailable | identity_expired
    code: str
    text: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the policy finally says of one operation (after a hold: after the reviewers)."""

    allowed: bool
    reason: str = ""
    rule: str | None = None


ALLOWED = Verdict(True)


class FrontEnd:
    """One connection's protocol state machine; its handlers are generators of commands."""

    def __init__(self, session: "Session") -> None:
        self.session = session

    phase: str = "startup"  # named in the startup-timeout message
    redactor: "Redactor | None" = None  # where this protocol's client messages carry secrets (proxy.core.redaction)

    def started(self) -> Steps:
        """The client connected (a protocol whose server speaks first greets here)."""
        yield from ()

    @property
    def is_idle(self) -> bool:
        """Nothing in flight: the core may end the session now (its identity expired).

        A protocol whose operations take time says False while one runs, and
        yields from `session.between_operations()` when it completes.
        """
        return True

    def client_data(self, data: bytes) -> Steps:
        raise NotImplementedError

    def server_data(self, data: bytes) -> Steps:
        raise NotImplementedError

    def client_event(self, item: Any) -> Steps:
        """A protocol event from the client that is not bytes (`Session.event`; asyncssh's channel requests…)."""
        raise NotImplementedError

    def server_event(self, item: Any) -> Steps:
        """A protocol event from the target that is not bytes."""
        raise NotImplementedError

    def client_closed(self) -> Steps:
        """The client closed its side: by default the session ends."""
        yield from self.session.end("client_disconnect")

    def server_closed(self) -> Steps:
        """The target closed its side: by default the session ends."""
        yield from self.session.end("server_disconnect")

    def goodbye(self, ending: Ending) -> Said | None:
        """What to tell the client when the core ends the session (None: nothing can be said)."""
        return None

    def farewell_upstream(self, reason: str) -> bytes | None:
        """What to send the target before closing (e.g. PostgreSQL's Terminate)."""
        return None

    def hold_notice(self, request: "ApprovalRequest", decision: "Decision") -> Said | None:
        """What to tell the client while an operation waits for a reviewer."""
        return None

    def closed(self) -> None:
        """The session ended: release listener-wide state (cancel keys…)."""


class Protocol:
    """One listener's protocol: its settings and listener-wide state, and a front end per connection.

    The registry (`proxy.core.registry`) builds it with `from_settings` from
    the `[[proxy]]` entry; the adapter asks it for a FrontEnd per connection.
    """

    name: ClassVar[str]
    listener: "ListenerSettings"
    upstream: str  # where it connects, for events and logs: never credentials

    @classmethod
    def from_settings(cls, proxy: "ProxySettings", fail_open: bool) -> "Protocol":
        raise NotImplementedError

    def front_end(self, session: "Session") -> FrontEnd:
        raise NotImplementedError

    def make_listener(self, verifier: "TokenVerifier", recorder: "Recorder", policy: "PolicyRuntime | None",
                      approvals: "Approvals | None", identity_leeway: float | None) -> "Listener":
        """What accepts this protocol's clients: by default the byte adapter, `proxy.core.server.Listener`.

        A protocol whose library owns its sockets and framing (asyncssh)
        returns its own glue instead, with the same face (`start`, `stop`,
        `throttle`, `settings`, `address`), which feeds the core's `Session`
        and carries out its commands.
        """
        from .server import Listener

        return Listener(self, verifier, recorder, policy, approvals, identity_leeway)
