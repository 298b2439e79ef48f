"""Masking what a MySQL target sends back: text and binary result rows, and error messages.

The values themselves are `proxy.policy.masking`'s job (the same MaskPlan and
RowMasker as PostgreSQL). Here: the rows are cut into values against the
result's column definitions, masked, and re-encoded with the same sequence id.

* Text rows: every value is text; a masked column's value becomes
  `[MASKED:column]`.
* Binary rows (COM_STMT_EXECUTE / FETCH): string-typed values (VARCHAR, TEXT,
  BLOB, JSON, ENUM, DECIMAL...) are length-encoded text, so they are masked
  as text, in either protocol alike; a masked column of another type (an
  INT, a DATE) becomes NULL, since other bytes would not decode as its type.
* Column names: a column is hidden when its name *or* its original name
  matches, so `SELECT password AS p` hides it too.
* ERR messages echo data (`Duplicate entry 'alice@…' for key …`): masked by the detectors.
"""

from __future__ import annotations

from ingest.protocols.mysql import messages as m
from ingest.protocols.mysql.packets import Packet, packet
from proxy.core.policy import PolicyGate
from proxy.policy import MaskPlan, RowMasker

TEXT, BINARY = 0, 1


class RowMasking:
    def __init__(self, gate: PolicyGate) -> None:
        self.gate = gate
        self.plan: MaskPlan | None = gate.mask_plan
        self._key: tuple[int, bool] | None = None
        self._masker: RowMasker | None = None
        self._columns: list[m.Column] = []

    def refresh(self) -> None:
        """Follow a reloaded policy's mask plan, even mid-result."""
        self.gate.refresh()
        if self.gate.plan_changed:
            self.gate.plan_changed = False
            self.plan = self.gate.mask_plan
            self._key = None

    def seal(self, data: bytes) -> bytes:
        return self.gate.seal(data)

    def _row_masker(self, columns: list[m.Column], binary: bool) -> RowMasker | None:
        key = (id(columns), binary)
        if key != self._key or self._columns is not columns:
            plan = self.plan
            self._key, self._columns = key, columns
            if plan is None:
                self._masker = None
            else:
                names = [c.org_name if c.org_name and plan.masks_column(c.org_name) else c.name for c in columns]
                formats = [TEXT if not binary or c.type in m.STRING_TYPES else BINARY for c in columns]
                self._masker = RowMasker(plan, names, formats)
        return self._masker

    def row(self, p: Packet, columns: list[m.Column], binary: bool) -> bytes | None:
        """The row's wire bytes as the client may see them; None: unchanged."""
        masker = self._row_masker(columns, binary)
        if masker is None:
            return None
        if not binary:
            values = m.decode_text_row(p.payload, len(columns))
            masked = masker.mask_values(values)
            return None if masked is None else packet(p.seq, m.text_row(masked))
        raw = m.decode_binary_row(p.payload, columns)
        values: list[bytes | None] = []
        for column, value in zip(columns, raw):
            if value is not None and column.type in m.STRING_TYPES:
                values.append(m.Reader(value, "binary string").lenenc_bytes())
            else:
                values.append(value)
        masked = masker.mask_values(values)
        if masked is None:
            return None
        encoded = [None if v is None else (m.binary_string(v) if c.type in m.STRING_TYPES else v)
                   for c, v in zip(columns, masked)]
        return packet(p.seq, m.binary_row(encoded))

    def error(self, p: Packet) -> bytes | None:
        plan = self.plan
        if plan is None:
            return None
        error = m.decode_err(p.payload)
        text, found = plan.scanner.mask(error.message)
        if not found:
            return None
        return packet(p.seq, m.err(error.code, error.sqlstate or "HY000", text))
