"""Masking what the target sends back, message by message, with the originals sealed for the evidence.

Sans-I/O: `ResultMasker.mask` takes the server messages of one read and
returns what the client may see; `sealed_records` turns that into the event
contract's `Message` records, each masked record carrying its original wire
bytes sealed to the custodian key (`sealed_original`).

What is masked, and how (the values themselves are `proxy.policy.masking`'s job):

* DataRow — against the columns of the last RowDescription (names and
  formats), so column-name rules and text/binary formats are known; lengths
  are rewritten by re-encoding the row.
* CopyData of a text-format COPY TO STDOUT (CopyOutResponse format 0) — one
  row per message, as PostgreSQL sends it. COPY sends no column names, so
  when the plan has column-name rules the proxy cannot tell which field is
  the password: it fails closed and hides every field ([MASKED:column]).
  Without column rules, detectors apply field by field. Binary COPY output
  is not parsed, so under a mask plan it ends the session (fail closed,
  SQLSTATE 0A000) rather than pass unmasked.
* NoticeResponse / ErrorResponse — message, detail, hint, context and the
  other free-text fields, which echo data (`Key (email)=(…) already exists`).

Speed: the DataRows of one read are walked once over their wire bytes
(`_row_edits`): only the values to scan are sliced out, and they are scanned
together, column by column (`Scanner.masked_many`: a few C-level scans of
the joined values instead of Python per value). Only a row that masking
changed is rebuilt (`_spliced`: joined from the original's unchanged
stretches and the new fields), and an unchanged message is returned as the
same object, its bytes untouched. What to do with each column (scan it,
hide it whole, pass it) is decided once per RowDescription, not per value.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from ingest.protocols.postgres import messages as m
from ingest.protocols.postgres.protocol import FEATURE_NOT_SUPPORTED, Message, ProtocolViolation
from proxy.policy import MaskPlan, RowMasker, mask_fields
from proxy.policy.masking import COLUMN_PLACEHOLDER, HIDE_TEXT, PASS, SCAN

Record = dict
Seal = Callable[[bytes], bytes]

_DIAGNOSTIC_TYPES = {"ErrorResponse": b"E", "NoticeResponse": b"N"}
# Types whose binary format is their UTF-8 text, as in text format: text, varchar, bpchar, name, json, xml,
# unknown. Masked as text in either format, so that asking for binary results is no way around a mask.
_TEXT_AS_BINARY_OIDS = frozenset({25, 1043, 1042, 19, 114, 142, 705})


def _diagnostic_fields(payload: bytes) -> dict[str, str]:
    """ErrorResponse/NoticeResponse fields by their one-letter code (what `mask_fields` takes)."""
    fields = {}
    for item in payload.rstrip(b"\x00").split(b"\x00"):
        if item:
            fields[chr(item[0])] = item[1:].decode("utf-8", "surrogateescape")
    return fields


def _diagnostic(type_byte: bytes, fields: dict[str, str]) -> bytes:
    body = b"".join(code.encode("latin-1") + text.encode("utf-8", "surrogateescape") + b"\x00"
                    for code, text in fields.items()) + b"\x00"
    return type_byte + (len(body) + 4).to_bytes(4, "big") + body


def _copy_data(payload: bytes) -> bytes:
    return b"d" + (len(payload) + 4).to_bytes(4, "big") + payload


_INT32 = struct.Struct(">i")
_NULL = _INT32.pack(-1)
_HIDDEN_TEXT = _INT32.pack(len(COLUMN_PLACEHOLDER)) + COLUMN_PLACEHOLDER  # a hidden text column's field
_ROWS_SCANNED_TOGETHER = 8  # fewer rows are scanned value by value: a shared scan's setup would cost more
_ROWS_SCANNED_TOGETHER_AT_MOST = 512  # a long result is scanned in such chunks: what is alive at once stays small


def _data_row_values(payload: bytes) -> list[bytes | None]:
    """A DataRow's values (None = NULL): one tight loop; a malformed row goes to the codec for its error."""
    unpack, size = _INT32.unpack_from, len(payload)
    values: list[bytes | None] = []
    position = 2
    if size >= 2:
        for _ in range(int.from_bytes(payload[:2], "big")):
            if position + 4 > size:
                break
            length = unpack(payload, position)[0]
            position += 4
            if length == -1:
                values.append(None)
                continue
            end = position + length
            if length < 0 or end > size:
                break
            values.append(payload[position:end])
            position = end
        else:
            if position == size:
                return values
    return list(m.decode_data_row(payload).values)  # raises the codec's ProtocolViolation


def _data_row(count: bytes, values: list[bytes | None]) -> bytes:
    """A whole DataRow message; `count` is the original's Int16 column count (masking keeps every column).

    Built in a bytearray, which the garbage collector does not track (a list of
    parts per row would make it run more often over a large result).
    """
    pack = _INT32.pack
    out = bytearray(b"D\0\0\0\0")
    out += count
    for value in values:
        if value is None:
            out += _NULL
        else:
            out += pack(len(value))
            out += value
    out[1:5] = pack(len(out) - 1)
    return bytes(out)


_Edit = tuple[int, int, int, bytes]  # a field's start (its length), its end, its action, and its value or new field


def _row_edits(rows: list[bytes], masker: RowMasker) -> tuple[list[_Edit], list[int], list[list[bytes]]]:
    """One walk over DataRow messages: the fields that masking may change, and the values to scan by column.

    `edits` are each row's fields to scan (the value to look up) or to hide
    (the field that replaces it, encoded), in order; `ends[i]` is where row
    i's edits end in it, -1 for a row that does not parse or has another
    column count than the RowDescription's (`_mask_data_row_values` handles
    it, and raises the codec's error for a malformed row). NULLs stay NULL,
    binary columns pass, and a value shorter than any finding is not looked at.
    """
    actions, shortest, unpack = masker.actions, masker.shortest, _INT32.unpack_from
    columns = [[] if action == SCAN else None for action in actions]
    plan = [(action, None if values is None else values.append) for action, values in zip(actions, columns)]
    count = len(actions).to_bytes(2, "big")
    edits: list[_Edit] = []
    ends: list[int] = []
    for data in rows:
        size, position, first, parsed = len(data), 7, len(edits), data[5:7] == count
        try:
            for action, scanned in plan if parsed else ():
                length = unpack(data, position)[0]  # struct.error past the end
                end = position + 4 + length
                if length < 0 or end > size:  # NULL (-1) stays NULL; below -1, or past the end, is malformed
                    parsed = length == -1
                    if not parsed:
                        break
                    position += 4
                    continue
                if scanned is not None:
                    if length >= shortest:
                        value = data[position + 4:end]
                        scanned(value)
                        edits.append((position, end, SCAN, value))
                elif action != PASS:
                    edits.append((position, end, action, _HIDDEN_TEXT if action == HIDE_TEXT else _NULL))
                position = end
        except struct.error:
            parsed = False
        if parsed and position == size:
            ends.append(len(edits))
        else:
            del edits[first:]
            ends.append(-1)
    return edits, ends, [values for values in columns if values]


def _spliced(data: bytes, edits: list[_Edit], masked_or_none: Callable[[bytes], bytes | None]) -> bytes | None:
    """A DataRow message with its edits made (`_row_edits`), or None when masking changes nothing.

    The new message is joined from the original's unchanged stretches
    (lengths and values as they are) and the new fields, its length the
    original's plus what the fields grew by: one join, no buffer grown field
    by field. `masked_or_none` gives a scanned value's masked bytes (None:
    unchanged).
    """
    out: list[bytes] | None = None  # the new message's parts; out[0] is its type and length, set last
    copied, grown, pack = 7, 0, _INT32.pack  # what `out` holds of `data` ends at `copied`
    for start, end, action, value in edits:
        if action == SCAN:
            masked = masked_or_none(value)
            if masked is None:
                continue
            value = pack(len(masked)) + masked
        if out is None:
            out = [b"", data[5:start], value]
        else:
            out.append(data[copied:start])
            out.append(value)
        grown += len(value) - end + start
        copied = end
    if out is None:
        return None
    out.append(data[copied:])
    out[0] = b"D" + pack(len(data) - 1 + grown)
    return b"".join(out)


def _masked_data_row(data: bytes, rows: RowMasker,
                     masked_or_none: Callable[[bytes], bytes | None] | None = None) -> bytes | None:
    """A whole DataRow message masked by `rows`, or None when masking changes nothing.

    A row that does not parse or has another column count than the
    RowDescription's takes the general path (`_mask_data_row_values`, which
    raises the codec's error). `masked_or_none` gives a scanned value's
    masked bytes, by default `rows.masked_or_none`.
    """
    edits, ends, _ = _row_edits([data], rows)
    if ends[0] < 0:
        return _mask_data_row_values(data, rows)
    return _spliced(data, edits, rows.masked_or_none if masked_or_none is None else masked_or_none)


def _mask_data_row_values(data: bytes, rows: RowMasker) -> bytes | None:
    """`_masked_data_row` by values: decoded (or the codec's ProtocolViolation), masked, re-encoded."""
    values = _data_row_values(data[5:])
    return _data_row(data[5:7], values) if rows.mask_in_place(values) else None


class ResultMasker:
    """One session's masking state: the plan, and the columns of the result being relayed.

    Thread-safe in the sense the proxy needs: `mask` depends only on its
    messages, the plan, and the columns of the last RowDescription /
    CopyOutResponse this instance saw (state of this session alone); what
    instances share (Scanners, compiled patterns, tables) is immutable. So
    different sessions' maskers may run at the same time in worker threads,
    off the event loop. One instance must see its session's reads in order
    and one call at a time (`mask` and `replan` from one thread, or awaited),
    since a read's DataRows are masked against the RowDescription before them.
    """

    def __init__(self, plan: MaskPlan) -> None:
        self.plan = plan
        self._names: tuple[str, ...] = ()
        self._formats: tuple[int, ...] = ()
        self._rows = RowMasker(plan)
        self._copy: RowMasker | None = None
        self._copy_response = m.CopyResponse(0, ())

    def replan(self, plan: MaskPlan) -> None:
        """A reloaded policy: the next value is masked by the new plan, even mid-result."""
        self.plan = plan
        self._rows = RowMasker(plan, self._names, self._formats)
        self._copy = None if self._copy is None else self._copy_masker(self._copy_response)

    def _copy_masker(self, response: m.CopyResponse) -> RowMasker:
        if response.format != 0:
            raise ProtocolViolation(FEATURE_NOT_SUPPORTED, "binary COPY output cannot be masked; use text COPY or SELECT")
        if not self.plan.columns:
            return RowMasker(self.plan)
        hide_all = MaskPlan(self.plan.detectors, ("*",), self.plan.rules)
        return RowMasker(hide_all, [""] * len(response.column_formats))

    def mask(self, messages: list[Message]) -> tuple[list[Message], list[bool]]:
        """The messages as the client may see them, and which of them masking changed.

        Unchanged messages are returned as the same objects.
        """
        out: list[Message] = []
        changed: list[bool] = []
        index, count = 0, len(messages)
        while index < count:
            message = messages[index]
            if message.type != "DataRow":
                masked = self._mask(message)
                out.append(masked)
                changed.append(masked is not message)
                index += 1
                continue
            end = index + 1
            while end < count and messages[end].type == "DataRow":
                end += 1
            self._mask_data_rows(messages[index:end], out, changed)
            index = end
        return out, changed

    def _mask_data_rows(self, messages: list[Message], out: list[Message], changed: list[bool]) -> None:
        """Consecutive DataRows (one RowDescription's): one walk, their values scanned together, rows spliced.

        A few rows are scanned value by value (a shared scan's setup would
        cost more); a long result in chunks, so that what is alive at once
        stays small.
        """
        rows = self._rows
        for first in range(0, len(messages), _ROWS_SCANNED_TOGETHER_AT_MOST):
            chunk = messages[first:first + _ROWS_SCANNED_TOGETHER_AT_MOST]
            edits, ends, columns = _row_edits([message.data for message in chunk], rows)
            if len(chunk) < _ROWS_SCANNED_TOGETHER:
                masked_or_none = rows.masked_or_none
            else:
                masked: dict[bytes, bytes] = {}
                for values in columns:
                    masked.update(rows.scanner.masked_many(values))
                masked_or_none = masked.get
            begin = 0
            for message, end in zip(chunk, ends):
                if end < 0:
                    masked_row = _mask_data_row_values(message.data, rows)
                else:
                    masked_row = _spliced(message.data, edits[begin:end], masked_or_none) if end > begin else None
                    begin = end
                if masked_row is None:
                    out.append(message)
                    changed.append(False)
                else:
                    out.append(Message("DataRow", masked_row))
                    changed.append(True)

    def _mask(self, message: Message) -> Message:
        kind = message.type
        if kind == "DataRow":
            masked_row = _masked_data_row(message.data, self._rows)
            return message if masked_row is None else Message(kind, masked_row)
        if kind == "CopyData":
            if self._copy is None:
                return message
            copied = self._copy.mask_copy_row(message.payload)
            return Message(kind, _copy_data(copied.value)) if copied.changed else message
        if kind == "RowDescription":
            fields = m.decode_row_description(message.payload).fields
            self._names = tuple(f.name for f in fields)
            self._formats = tuple(0 if f.type_oid in _TEXT_AS_BINARY_OIDS else f.format for f in fields)
            self._rows = RowMasker(self.plan, self._names, self._formats)
        elif kind == "CopyOutResponse" or kind == "CopyBothResponse":
            self._copy_response = m.decode_copy_response(message.payload)
            self._copy = self._copy_masker(self._copy_response)
        elif kind == "CopyDone":
            self._copy = None
        elif kind in _DIAGNOSTIC_TYPES:
            result = mask_fields(self.plan, _diagnostic_fields(message.payload))
            return Message(kind, _diagnostic(_DIAGNOSTIC_TYPES[kind], result.value)) if result.changed else message
        return message


def sealed_records(records: list[Record], originals: list[Message], changed: list[bool], seal: Seal) -> list[Record]:
    """Give each record that masking touched the sealed bytes of the original messages it stands for.

    `records` are the masked messages' records (`recording.message_records`),
    in order; a run record stands for `attributes["messages"]` messages.
    """
    index = 0
    for record in records:
        count = int(record["attributes"].get("messages", "1"))
        if any(changed[index:index + count]):
            record["sealed_original"] = seal(b"".join(x.data for x in originals[index:index + count]))
        index += count
    return records
