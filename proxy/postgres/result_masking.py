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

Speed: a DataRow is masked in one walk over its wire bytes (`_masked_data_row`):
only the values to scan are sliced out, only a row that masking changed is
rebuilt (spliced from the original's unchanged stretches and the masked
values), and an unchanged message is returned as the same object, its bytes
untouched. What to do with each column (scan it, hide it whole, pass it) is
decided once per RowDescription, not per value.
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


def _scanned_values(rows: list[bytes], masker: RowMasker) -> list[list[bytes]]:
    """Per column to scan, the values of these DataRow messages that a detector could find something in.

    A walk like `_masked_data_row`'s without the rebuild, so that the values
    of many rows are scanned together (`Scanner.masked_many`). A malformed
    row stops its own walk here; `_masked_data_row` raises its error.
    """
    unpack, shortest = _INT32.unpack_from, masker.shortest
    columns = [[] if action == SCAN else None for action in masker.actions]
    appends = [None if values is None else values.append for values in columns]
    count = len(appends).to_bytes(2, "big")
    for data in rows:
        if data[5:7] != count:
            continue
        size, position = len(data), 7
        for append in appends:
            if position + 4 > size:
                break
            length = unpack(data, position)[0]
            position += 4
            if length > 0:
                if append is not None and length >= shortest:
                    append(data[position:position + length])
                position += length
    return [values for values in columns if values]


def _masked_data_row(data: bytes, rows: RowMasker,
                     masked_or_none: Callable[[bytes], bytes | None] | None = None) -> bytes | None:
    """A whole DataRow message masked by `rows`, or None when masking changes nothing: the hot path.

    One walk over the wire bytes, column by column: only scanned values are
    sliced out, and the new message is joined from the original's unchanged
    stretches (lengths and values as they are) and the masked fields, its
    length the original's plus what the fields grew by (one join instead of
    a buffer grown field by field). A row with another column count than the
    RowDescription's, or malformed, takes the general path
    (`_mask_data_row_values`, which raises the codec's error).
    `masked_or_none` gives a scanned value's masked bytes (None: unchanged),
    by default `rows.masked_or_none`; the rows of one read pass their values
    masked beforehand, all at once (`ResultMasker.mask`).
    """
    actions = rows.actions
    size = len(data)
    if size < 7 or int.from_bytes(data[5:7], "big") != len(actions):
        return _mask_data_row_values(data, rows)
    if masked_or_none is None:
        masked_or_none = rows.masked_or_none
    unpack, pack, shortest = _INT32.unpack_from, _INT32.pack, rows.shortest
    out: list[bytes] | None = None  # the new message's parts; out[0] is its type and length, set last
    copied = position = 7  # what `out` holds of `data` ends at `copied`
    grown = 0
    try:
        for action in actions:
            length = unpack(data, position)[0]  # struct.error past the end
            start = position + 4
            if length < 0:  # NULL (-1) stays NULL; below -1 is malformed
                if length != -1:
                    return _mask_data_row_values(data, rows)
                position = start
                continue
            end = start + length
            if end > size:
                return _mask_data_row_values(data, rows)
            if action == SCAN:
                if length < shortest:
                    position = end
                    continue
                masked = masked_or_none(data[start:end])
                if masked is None:
                    position = end
                    continue
                field = pack(len(masked)) + masked
            elif action == PASS:
                position = end
                continue
            else:
                field = _HIDDEN_TEXT if action == HIDE_TEXT else _NULL
            if out is None:
                out = [b"", data[5:position], field]
            else:
                out.append(data[copied:position])
                out.append(field)
            grown += len(field) - 4 - length
            copied = position = end
    except struct.error:
        return _mask_data_row_values(data, rows)
    if position != size:
        return _mask_data_row_values(data, rows)
    if out is None:
        return None
    out.append(data[copied:])
    out[0] = b"D" + pack(size - 1 + grown)
    return b"".join(out)


def _mask_data_row_values(data: bytes, rows: RowMasker) -> bytes | None:
    """`_masked_data_row` by values: decoded (or the codec's ProtocolViolation), masked, re-encoded."""
    values = _data_row_values(data[5:])
    return _data_row(data[5:7], values) if rows.mask_in_place(values) else None


def _append_masked_row(message: Message, rows: RowMasker, masked_or_none: Callable[[bytes], bytes | None],
                       out: list[Message], changed: list[bool]) -> None:
    masked_row = _masked_data_row(message.data, rows, masked_or_none)
    if masked_row is None:
        out.append(message)
        changed.append(False)
    else:
        out.append(Message("DataRow", masked_row))
        changed.append(True)


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
        """Consecutive DataRows (one RowDescription's): their values are scanned together, then each row rebuilt."""
        rows = self._rows
        if len(messages) < _ROWS_SCANNED_TOGETHER:
            masked_or_none = rows.masked_or_none
            for message in messages:
                _append_masked_row(message, rows, masked_or_none, out, changed)
            return
        for first in range(0, len(messages), _ROWS_SCANNED_TOGETHER_AT_MOST):
            chunk = messages[first:first + _ROWS_SCANNED_TOGETHER_AT_MOST]
            masked: dict[bytes, bytes] = {}
            for values in _scanned_values([message.data for message in chunk], rows):
                masked.update(rows.scanner.masked_many(values))
            for message in chunk:
                _append_masked_row(message, rows, masked.get, out, changed)

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
