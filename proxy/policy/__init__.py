"""Policy for the proxies' data path: decide (allow / block / hold) and mask, with no I/O.

`Policy.decide` decides on an `Operation` (protocol, kind, text, objects,
attributes), read by its protocol's analyzer (`analyzers.ANALYZERS`; for
PostgreSQL `sql.analyze`, pglast and the PostgreSQL grammar);
`Policy.masking_for` gives a `MaskPlan` that `masking.RowMasker`
and `masking.mask_fields` apply to result values. `PolicyHolder` keeps a
proxy's policy current as its file changes.
"""

from .detectors import DETECTORS, Finding, mask_text
from .analyzers import ANALYZERS, Part
from .masking import MaskPlan, Masked, RowMasker, mask_fields
from .operation import OPERATION_KINDS, PROTOCOLS, AnalysisError, Operation
from .rules import BoundPolicy, Decision, Policy, PolicyError, PolicyHolder
from .sql import KINDS, SqlParseError, StatementInfo, analyze

__all__ = [
    "ANALYZERS", "AnalysisError", "BoundPolicy", "DETECTORS", "Decision", "Finding", "KINDS", "MaskPlan", "Masked",
    "OPERATION_KINDS", "Operation", "PROTOCOLS", "Part", "Policy", "PolicyError", "PolicyHolder", "RowMasker",
    "SqlParseError", "StatementInfo", "analyze", "mask_fields", "mask_text",
]
