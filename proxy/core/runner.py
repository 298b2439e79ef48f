"""What every adapter does alike with a session's commands: timers, token checks, approvals, ceding the loop.

The byte adapter (`proxy.core.server`) and the glue of a library that owns
its sockets (`proxy.ssh.server`) differ in how they move bytes and reach the
target; how a timer fires, a token is checked off the loop, a reviewer's
decision is awaited and the loop is ceded is the same for both, and lives here.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from proxy.approvals import ApprovalOutcome, ApprovalRequest
from proxy.identity import AuthenticationError, TokenVerifier

from .commands import AwaitApproval, Cede, Command, SetTimer, VerifyToken
from .session import Session


class Approvals(Protocol):
    """What a listener needs of `proxy.approvals_gateway.ApprovalGateway`: a held operation's outcome."""

    async def decide(self, request: ApprovalRequest) -> ApprovalOutcome: ...


class CommandRunner:
    """Carries out the protocol-neutral commands of one session; `run` is the adapter's own."""

    session: Session

    def __init__(self, verifier: TokenVerifier, approvals: Approvals | None) -> None:
        self._verifier, self._approvals = verifier, approvals
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    def run(self, commands: list[Command]) -> None:
        raise NotImplementedError

    def run_shared(self, command: Command) -> bool:
        """Carry out `command` if it is one every adapter runs alike; False: the adapter's own."""
        kind = type(command)
        if kind is SetTimer:
            self._set_timer(command.name, command.seconds)
        elif kind is VerifyToken:
            self.spawn(self._verify(command))
        elif kind is AwaitApproval:
            self.spawn(self._await_approval(command))
        elif kind is Cede:
            # A timer due now, not call_soon: asyncio runs the callbacks already queued, then those of the sockets
            # that became ready, then the timers due. With call_soon the next slice ran ahead of what other sessions
            # had waiting, so each hop of their round trip waited for a slice more (~0.4 ms each, bench/policy.py).
            asyncio.get_running_loop().call_later(0, self._ceded, command)
        else:
            return False
        return True

    def spawn(self, coroutine: Any) -> None:
        """A task of this session's, cancelled when the session's connections are gone."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel_timers(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()

    def _set_timer(self, name: str, seconds: float | None) -> None:
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        if seconds is not None and not self._closed:
            self._timers[name] = asyncio.get_running_loop().call_later(seconds, self._timer_fired, name)

    def _timer_fired(self, name: str) -> None:
        self._timers.pop(name, None)
        self.run(self.session.timer(name))

    async def _verify(self, command: VerifyToken) -> None:
        try:
            result: Any = await asyncio.to_thread(self._verifier.verify, command.token)
        except AuthenticationError as error:
            result = error
        self.run(self.session.completed(command, result))

    async def _await_approval(self, command: AwaitApproval) -> None:
        assert self._approvals is not None, "a policy without an approvals gateway"
        self.run(self.session.completed(command, await self._approvals.decide(command.request)))

    def _ceded(self, command: Cede) -> None:
        if not self._closed:
            self.run(self.session.completed(command, self.others_await_replies()))

    def others_await_replies(self) -> bool:
        """Whether another session of this listener waits for its target's reply (what `Cede` completes with)."""
        return False
