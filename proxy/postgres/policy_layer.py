"""The policy in a PostgreSQL session's data path: which messages are operations, how a refused one is
replaced, what is masked.

Sans-I/O, called by the front end. Each Query and Parse (the extended
protocol's statement text) is an operation the core decides (`Session.check`).

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

from ingest.protocols.postgres import messages as m
from ingest.protocols.postgres.protocol import Message
from proxy.core.policy import PolicyGate
from proxy.policy import Operation

from . import recording as rec
from .result_masking import ResultMasker, sealed_records

INSUFFICIENT_PRIVILEGE = "42501"
_MAX_PENDING_REFUSALS = 64  # a refusal the target skipped (earlier error in its batch) is forgotten eventually


def refusal_error(reason: str) -> bytes:
    return m.error_response(severity="ERROR", code=INSUFFICIENT_PRIVILEGE, message=f"custody: {reason}")


class StatementPolicy:
    """One session's statements under policy: which are operations, their stand-ins, the masked results."""

    def __init__(self, gate: PolicyGate, database: str | None = None,
                 marker: Callable[[], str] = lambda: secrets.token_hex(8)) -> None:
        self.gate = gate
        self._attributes = {"database": database} if database is not None else {}  # rules match it
        self._marker = marker
        self._refusals: OrderedDict[str, bytes] = OrderedDict()  # marker -> the error the client gets
        plan = gate.mask_plan
        self._masker = ResultMasker(plan) if plan is not None else None

    def operation(self, sql: str) -> Operation:
        """The operation a Query or Parse (`rec.STATEMENT_TYPES`) with this SQL asks for."""
        return Operation("postgres", "statement", sql, attributes=self._attributes)

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

    def _current_masker(self) -> ResultMasker | None:
        """Follow a reloaded policy's mask plan, even mid-result."""
        gate = self.gate
        gate.refresh()
        if gate.plan_changed:
            gate.plan_changed = False
            plan = gate.mask_plan
            if plan is None:
                self._masker = None
            elif self._masker is None:
                self._masker = ResultMasker(plan)
            else:
                self._masker.replan(plan)
        return self._masker

    def changes_results(self) -> bool:
        """Whether server messages may be rewritten (a mask applies, or a refusal's stand-in is being answered)."""
        return bool(self._refusals) or self._current_masker() is not None

    def shown(self, messages: list[Message]) -> tuple[list[Message], list[bool]] | None:
        """What the client may see of these server messages, and which of them that changed; None: all unchanged."""
        masker = self._current_masker()
        if not self._refusals and masker is None:
            return None
        out, changed = masker.mask(messages) if masker is not None else (messages, [False] * len(messages))
        if self._refusals:  # the proxy's own answers are not masked: they hold no data, only the reason
            answers = [self._answer_refusal(x) for x in messages]
            out = [answer if answer is not original else shown for answer, original, shown in zip(answers, messages, out)]
            changed = [flag and answer is original for flag, answer, original in zip(changed, answers, messages)]
        return out, changed

    def records(self, shown: list[Message], originals: list[Message], changed: list[bool]) -> list[rec.Record]:
        """The records of what the client was shown (`shown`'s answers, in order), each that masking changed with
        its original messages sealed to the custodian. Built for many slices at once: a run record and a seal
        for all the rows of one send, not one per slice."""
        records = rec.message_records(shown)
        if any(changed):
            sealed_records(records, originals, changed, self.gate.seal)
        return records

    def _answer_refusal(self, message: Message) -> Message:
        if message.type != "ErrorResponse":
            return message
        text = m.decode_error_response(message.payload).message
        for marker in self._refusals:
            if marker in text:
                return Message("ErrorResponse", self._refusals.pop(marker))
        return message
