"""The policy in a PostgreSQL session's data path: which statements pass, what replaces the others, what is masked.

Sans-I/O, called by `Session`. Decisions are made per Query and per Parse
(the extended protocol's statement text), by `Policy.decide`.

How a refused statement (blocked, or a hold that was denied or expired) is
answered: the proxy never sends it; it sends the target, in its place, a
statement that fails at once — `SELECT FROM "custody-refused-<random>"`, as a
Query or as a Parse with the same statement name — and replaces the target's
error about that relation with its own 42501 ErrorResponse. The target
therefore does what it does after any error, in order with everything the
client pipelined before and after: in the extended protocol it skips to Sync
and rolls back the implicit transaction; inside a transaction block it
marks the block failed ('E'); and it answers ReadyForQuery with the real
transaction status. The proxy keeps no copy of that state machine, and so
cannot get it wrong. Inside an already failed block the target answers with
25P02 (current transaction is aborted), as it would to the statement itself;
that error is passed through unchanged. The cost is one round trip to the
target per refused statement.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nacl.public import PublicKey

from ingest.protocols.postgres import messages as m
from ingest.protocols.postgres.protocol import Message
from proxy.identity import Identity
from proxy.policy import Decision, Operation, PolicyHolder, seal_original

from . import recording as rec
from .result_masking import ResultMasker, sealed_records

INSUFFICIENT_PRIVILEGE = "42501"
_STATEMENT_TYPES = frozenset({"Query", "Parse"})
_MAX_PENDING_REFUSALS = 64  # a refusal the target skipped (earlier error in its batch) is forgotten eventually


@dataclass(frozen=True)
class PolicyRuntime:
    """What one proxy listener needs for policy: the live policy file and the key originals are sealed to."""

    holder: PolicyHolder
    custodian_key: PublicKey
    proxy_key_id: str

    def seal(self, data: bytes) -> bytes:
        return seal_original(data, self.custodian_key)


def statement_text(message: Message) -> str | None:
    """The SQL of a Query or Parse; None for every other message."""
    if message.type == "Query":
        return m.decode_query(message.payload).sql
    if message.type == "Parse":
        return m.decode_parse(message.payload).sql
    return None


def decision_record(rule: str, action: str, reason: str | None, statement: str | None, *,
                    request_id: str | None = None, approver: dict[str, Any] | None = None,
                    attributes: dict[str, str] | None = None) -> rec.Record:
    """A PolicyDecision event body (schemas/event.avsc)."""
    return {"rule": rule, "action": action, "reason": reason, "statement": statement,
            "request_id": request_id, "approver": approver, "attributes": attributes or {}}


def refusal_error(reason: str) -> bytes:
    return m.error_response(severity="ERROR", code=INSUFFICIENT_PRIVILEGE, message=f"custody: {reason}")


class PolicyGate:
    """One session's policy: decides its statements, tracks its refusals, masks its results."""

    def __init__(self, runtime: PolicyRuntime, identity: Identity, target: str,
                 marker: Callable[[], str] = lambda: secrets.token_hex(8)) -> None:
        self.runtime, self.identity, self.target = runtime, identity, target
        self._marker = marker
        self._refusals: OrderedDict[str, bytes] = OrderedDict()  # marker -> the error the client gets
        self._policy = runtime.holder.policy
        self._masker = self._new_masker()

    def _new_masker(self) -> ResultMasker | None:
        plan = self._policy.masking_for(self.identity.subject, self.identity.groups, self.target)
        return ResultMasker(plan) if plan is not None else None

    def _current(self) -> None:
        """Pick up a reloaded policy for what comes next (the holder stats the file at most once a second)."""
        policy = self.runtime.holder.policy
        if policy is self._policy:
            return
        self._policy = policy
        plan = policy.masking_for(self.identity.subject, self.identity.groups, self.target)
        if plan is None:
            self._masker = None
        elif self._masker is None:
            self._masker = ResultMasker(plan)
        else:
            self._masker.replan(plan)

    @property
    def hold_timeout(self) -> float:
        return self._policy.hold_timeout_seconds

    def decide(self, message: Message) -> tuple[Decision, str] | None:
        """The decision on a Query or Parse that may not simply pass, with its SQL; None: relay it."""
        if message.type not in _STATEMENT_TYPES:
            return None
        sql = statement_text(message)
        assert sql is not None
        self._current()
        decision = self._policy.decide(self.identity.subject, self.identity.groups, self.target, Operation("postgres", "statement", sql))
        return None if decision.action == "allow" else (decision, sql)

    def refuse(self, message: Message, reason: str) -> bytes:
        """What to send the target instead of `message`; the client will get 42501 with `reason`."""
        marker = f"custody-refused-{self._marker()}"
        self._refusals[marker] = refusal_error(reason)
        if len(self._refusals) > _MAX_PENDING_REFUSALS:
            self._refusals.popitem(last=False)
        sql = f'SELECT FROM "{marker}"'
        if message.type == "Query":
            return m.query(sql)
        return m.parse(m.decode_parse(message.payload).name, sql)

    def server(self, messages: list[Message]) -> tuple[list[Message], list[rec.Record]] | None:
        """What the client may see of these server messages, and their records; None: all unchanged."""
        self._current()
        if not self._refusals and self._masker is None:
            return None
        out, changed = self._masker.mask(messages) if self._masker is not None else (messages, [False] * len(messages))
        if self._refusals:  # the proxy's own answers are not masked: they hold no data, only the reason
            answers = [self._answer_refusal(x) for x in messages]
            out = [answer if answer is not original else shown for answer, original, shown in zip(answers, messages, out)]
            changed = [flag and answer is original for flag, answer, original in zip(changed, answers, messages)]
        records = rec.message_records(out)
        if any(changed):
            sealed_records(records, messages, changed, self.runtime.seal)
        return out, records

    def _answer_refusal(self, message: Message) -> Message:
        if message.type != "ErrorResponse":
            return message
        text = m.decode_error_response(message.payload).message
        for marker in self._refusals:
            if marker in text:
                return Message("ErrorResponse", self._refusals.pop(marker))
        return message
