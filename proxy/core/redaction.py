"""Input redaction: secrets a client sends are not kept in clear in the evidence.

A password in `ALTER ROLE … PASSWORD '…'`, a key passed to an encryption
function, a card number in a bound parameter: the target must get them as
sent, but the evidence — the broker, the spool, the sealed segments, every
analyst's replay — must not hold them in clear. So before the session records
a client `Message`, it hands the record to its front end's `Redactor`
(`FrontEnd.redactor`), which knows where the protocol carries secrets
(PostgreSQL: proxy/postgres/redaction.py; MySQL, SSH and Kubernetes front
ends bring their own). What the redactor returns replaces the record —
decoded fields *and* the wire bytes in `data`, rebuilt with a marker
(`[REDACTED:password]`) — and the original bytes are sealed to the evidence
custodian's key in `sealed_original`, as masked results are, so `custody
replay --reveal --custodian-key` shows what the client sent. Without a
custodian key the original is not kept at all, and `attributes.original`
says so. The bytes relayed to the target are never touched: only the
evidence is redacted.

`attributes.redacted` names what was removed (`password`, `key`, a detector
kind such as `credit_card`), as it already does for tokens and cancel keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from proxy.policy.detectors import Scanner, scanner_for

from .records import Record

if TYPE_CHECKING:
    from .session import Session

MARKER = "[REDACTED:{}]"
NOT_KEPT = "not kept: no custodian key to seal it to"

Seal = Callable[[bytes], bytes]


def marker(kind: str) -> str:
    return MARKER.format(kind)


Found = tuple[str, tuple[str, ...], frozenset[int]]
FindSecrets = Callable[[str, "Scanner | None"], Found]

_CLEAN_LIMIT = 4096  # texts remembered per protocol; cleared when full
_CLEAN_MAX_TEXT = 4096  # characters: a longer statement is rarely repeated, and costs its own size to keep


def remember_clean(find: FindSecrets) -> FindSecrets:
    """`find` (a protocol's `find_secrets(sql, detectors)`), skipping texts it already found clean.

    Clients repeat their statements (pgbench, an ORM, a job's loop), and the
    search is most of what input redaction costs a statement. Only clean
    texts are remembered: remembering the others would keep a copy of their
    secrets. Keys hold the scanner, so a reloaded policy's detectors search
    afresh. Cleared rather than evicted when full: sessions on several
    threads share it, and `dict.clear` is one atomic step under the GIL.
    """
    clean: dict[tuple[str, Scanner | None], None] = {}

    def find_remembering(sql: str, detectors: Scanner | None) -> Found:
        key = (sql, detectors)
        if key in clean:
            return sql, (), frozenset()
        found = find(sql, detectors)
        if not found[1] and not found[2] and len(sql) <= _CLEAN_MAX_TEXT:
            if len(clean) >= _CLEAN_LIMIT:
                clean.clear()
            clean[key] = None
        return found

    find_remembering.__doc__ = find.__doc__
    find_remembering.__name__ = find.__name__
    return find_remembering


class MaskDetectors:
    """The detectors of every `[[mask]]` in the session's current policy, whoever a mask applies to.

    Input redaction protects the evidence, which analysts read, not the
    caller: so it uses every mask's detectors. Rebuilt when the policy file
    reloads; `generation` counts the rebuilds, for redactors that cache by it.
    """

    def __init__(self, session: "Session") -> None:
        self.session = session
        self._policy: object | None = None
        self._scanner: Scanner | None = None
        self.generation = 0

    def scanner(self) -> Scanner | None:
        gate = self.session.gate
        if gate is None:
            return None
        policy = gate.runtime.holder.policy
        if policy is not self._policy:
            self._policy = policy
            kinds = frozenset().union(*(mask.detectors for mask in policy.masks))
            self._scanner = scanner_for(kinds) if kinds else None
            self.generation += 1
        return self._scanner


class Redactor(Protocol):
    """A protocol's knowledge of where its client messages carry secrets."""

    def redact(self, record: Record) -> tuple[Record, tuple[str, ...]] | None:
        """The record with its secrets replaced (fields and `data`) and the kinds removed; None: nothing to hide."""
        ...


def redact_messages(redactor: Redactor, messages: list[Record], seal: Seal | None) -> list[Record]:
    """The client records as they may be kept: redacted where the redactor says, the originals sealed.

    Returns `messages` itself when nothing was redacted (the common case costs one call per record).
    """
    out: list[Record] | None = None
    for index, record in enumerate(messages):
        found = redactor.redact(record)
        if found is None:
            continue
        redacted, kinds = found
        attributes = {**(redacted.get("attributes") or {}), "redacted": ",".join(dict.fromkeys(kinds))}
        original = record.get("data") or b""
        if seal is not None:
            redacted["sealed_original"] = seal(bytes(original))
        else:
            redacted["sealed_original"] = None
            attributes["original"] = NOT_KEPT
        redacted["attributes"] = attributes
        if out is None:
            out = list(messages)
        out[index] = redacted
    return messages if out is None else out
