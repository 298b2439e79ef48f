"""What every front end shares of the policy: the live policy file, per-session decisions, the mask plan.

How an operation that may not run is refused, and how results are masked,
is the front end's (a PostgreSQL stand-in statement, an SSH exit status, an
HTTP 403); which operations those are, and for whom, is decided here.
"""

from __future__ import annotations

from dataclasses import dataclass

from nacl.public import PublicKey

from proxy.identity import Identity
from ingest.sealing import Sealer
from proxy.policy import BoundPolicy, Decision, MaskPlan, PolicyHolder
from proxy.policy.operation import Operation


@dataclass(frozen=True)
class PolicyRuntime:
    """What one listener needs for policy: the live policy file and the key masked originals are sealed to."""

    holder: PolicyHolder
    custodian_key: PublicKey
    proxy_key_id: str


class PolicyGate:
    """One session's view of the policy: decisions for its identity and target, its current mask plan.

    A reloaded policy file applies from the next operation on; `plan_changed`
    tells the front end to rebuild its masker.
    """

    def __init__(self, runtime: PolicyRuntime, identity: Identity, target: str, sealer: Sealer | None = None) -> None:
        self.runtime, self.identity, self.target = runtime, identity, target
        self._sealer = sealer if sealer is not None else Sealer(runtime.custodian_key)
        self._policy = runtime.holder.policy
        self._bound = self._bind()
        self._plan = self._mask_plan()
        self.plan_changed = False

    def _bind(self) -> BoundPolicy:
        return self._policy.bind(self.identity.subject, self.identity.groups, self.target)

    def _mask_plan(self) -> MaskPlan | None:
        return self._policy.masking_for(self.identity.subject, self.identity.groups, self.target)

    def refresh(self) -> None:
        """Pick up a reloaded policy (the holder stats the file at most once a second)."""
        policy = self.runtime.holder.policy
        if policy is self._policy:
            return
        self._policy = policy
        self._bound = self._bind()
        plan = self._mask_plan()
        self.plan_changed = plan != self._plan
        self._plan = plan

    @property
    def mask_plan(self) -> MaskPlan | None:
        return self._plan

    @property
    def hold_timeout(self) -> float:
        return self._policy.hold_timeout_seconds

    def seal(self, data: bytes) -> bytes:
        """`data` sealed to the custodian key with the session's key pair (ingest.sealing): a masked original."""
        return self._sealer.seal(data)

    def decide(self, operation: Operation) -> Decision:
        self.refresh()
        return self._bound.decide(operation)
