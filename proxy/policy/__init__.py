"""Policy for the proxies' data path: decide (allow / block / hold) and mask, with no I/O.

`Policy.decide` reads SQL through `sql.analyze` (pglast, the PostgreSQL
grammar); `Policy.masking_for` gives a `MaskPlan` that `masking.RowMasker`
and `masking.mask_fields` apply to result values. `PolicyHolder` keeps a
proxy's policy current as its file changes.
"""

from .detectors import DETECTORS, Finding, mask_text
from .masking import MaskPlan, Masked, RowMasker, mask_fields, open_sealed, seal_original
from .rules import Decision, Policy, PolicyError, PolicyHolder
from .sql import KINDS, SqlParseError, StatementInfo, analyze

__all__ = [
    "DETECTORS", "Decision", "Finding", "KINDS", "MaskPlan", "Masked", "Policy", "PolicyError", "PolicyHolder",
    "RowMasker", "SqlParseError", "StatementInfo", "analyze", "mask_fields", "mask_text", "open_sealed",
    "seal_original",
]
