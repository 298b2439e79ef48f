"""Detectors, masking of rows / COPY / notices, and sealed originals."""

from __future__ import annotations

import base64
import json
import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey

from proxy.policy.detectors import DETECTORS, Scanner, luhn_ok, mask_text
from ingest.sealing import Sealer, open_sealed
from proxy.policy.masking import MaskPlan, RowMasker, mask_fields

ALL = tuple(DETECTORS)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def json_part(value: dict) -> str:
    return b64url(json.dumps(value).encode())


JWT = ".".join([json_part({"alg": "HS256", "typ": "JWT"}), json_part({"sub": "alice"}), "c2lnbmF0dXJl_-x"])
NOT_A_JWT = ".".join([json_part({"typ": "JWT"}), json_part({}), "sig"])  # header without alg
PEM = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nBKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----"
OPENSSH = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU=\n-----END OPENSSH PRIVATE KEY-----"


@pytest.mark.parametrize("kind, text, masked", [
    ("credit_card", "paid with 4111 1111 1111 1111.", "paid with **** **** **** 1111."),
    ("credit_card", "5555555555554444", "**** **** **** 4444"),
    ("credit_card", "amex 3782-822463-10005", "amex **** **** **** 0005"),
    ("iban", "to DE89 3704 0044 0532 0130 00 today", "to [MASKED:iban] today"),
    ("iban", "GB82WEST12345698765432", "[MASKED:iban]"),
    ("us_ssn", "ssn: 123-45-6789", "ssn: ***-**-6789"),
    ("email", "Alice.Smith+tag@mail.example.co.uk wrote", "A***@mail.example.co.uk wrote"),
    ("phone", "call (415) 555-2671 now", "call [MASKED:phone] now"),
    ("phone", "tel 415.555.2671", "tel [MASKED:phone]"),
    ("phone", "+44 20 7946 0958", "[MASKED:phone]"),
    ("phone", "+14155552671", "[MASKED:phone]"),
    ("jwt", f"Bearer {JWT}", "Bearer [MASKED:jwt]"),
    ("aws_access_key", "key=AKIAIOSFODNN7EXAMPLE;", "key=[MASKED:aws_access_key];"),
    ("aws_access_key", "ASIAY34FZKBOKMUTVV7A", "[MASKED:aws_access_key]"),
    ("private_key", f"key:\n{PEM}\nend", "key:\n[MASKED:private_key]\nend"),
    ("private_key", OPENSSH, "[MASKED:private_key]"),
    ("private_key", "-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQOY\n-----END PGP PRIVATE KEY BLOCK-----\nafter",
     "[MASKED:private_key]\nafter"),
    ("private_key", PEM[:60], "[MASKED:private_key]"),  # a truncated block is still a key
])
def test_detectors_find_and_mask_true_positives(kind, text, masked):
    result, findings = mask_text(text, [kind])
    assert result == masked
    assert [f.kind for f in findings] == [kind]
    assert mask_text(text, ALL)[0] == masked


@pytest.mark.parametrize("text", [
    "4111 1111 1111 1112",              # bad Luhn
    "1234 5678 9012 3452",              # Luhn ok, no card brand starts with 1
    "DE89 3704 0044 0532 0130 01",      # bad IBAN checksum
    "000-12-3456", "666-12-3456", "900-12-3456", "123-00-4567", "123-45-0000",  # never-issued SSNs
    "12345678901", "4155552671",        # plain integers (ids), no separators
    "1700000000", "1700000000123",      # unix timestamps
    "2024-01-15 10:00:00.123456+05:30", "2024-01-15T10:00:00Z",
    "192.168.100.200", "v1.2.3-rc.4", "-12345.6789", "id=123456789012345",
    "alice@localhost", "not an @ email",
    NOT_A_JWT, "eyJhbGciOi.not-base64-json.x",
    "AKIAIOSFODNN7EXAMPL", "AKIAIOSFODNN7EXAMPLEX", "akiaiosfodnn7example",
    "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----",
    "", "short",
])
def test_detectors_leave_near_misses_alone(text):
    assert mask_text(text, ALL) == (text, ())


def test_unknown_detector_is_an_error():
    with pytest.raises(ValueError, match="unknown detector 'emial'"):
        Scanner(["emial"])


def test_overlapping_findings_mask_once():
    text = f"{JWT} 4111111111111111 bob@example.com 123-45-6789"
    masked, findings = mask_text(text, ALL)
    assert masked == "[MASKED:jwt] **** **** **** 1111 b***@example.com ***-**-6789"
    assert [f.kind for f in findings] == ["jwt", "credit_card", "email", "us_ssn"]
    assert [text[f.start:f.end] for f in findings][1:] == ["4111111111111111", "bob@example.com", "123-45-6789"]


def test_what_overlaps_leave_behind_is_masked_with_the_whole_text():
    masked, findings = mask_text("4111 1111 1111 1111a@example.com", ALL)
    assert masked == "[MASKED:email]"
    assert [(f.kind, f.start, f.end) for f in findings] == [("credit_card", 0, 19), ("email", 0, 32)]


PLAN = MaskPlan(detectors=frozenset(ALL), columns=("*ssn*", "card_number"), rules=("pii",))


def data_row_body(values: list[bytes | None]) -> bytes:
    """A DataRow payload as PostgreSQL writes it: Int16 count, then Int32 length (-1 = NULL) + bytes each."""
    parts = [struct.pack("!h", len(values))]
    for value in values:
        parts.append(struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value)
    return b"".join(parts)


def read_data_row_body(body: bytes) -> list[bytes | None]:
    (count,), offset, values = struct.unpack_from("!h", body), 2, []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", body, offset)
        offset += 4
        values.append(None if length < 0 else body[offset:offset + length])
        offset += max(length, 0)
    assert offset == len(body)
    return values


def test_data_row_values_are_masked_and_the_row_reencodes_with_right_lengths():
    masker = RowMasker(PLAN, ["id", "email", "Customer_SSN", "note", "created"])
    row = [b"42", b"alice@example.com", b"123-45-6789", None, b"2024-01-15 10:00:00+00"]
    result = masker.mask_row(row)
    assert result.value == [b"42", b"a***@example.com", b"[MASKED:column]", None, b"2024-01-15 10:00:00+00"]
    assert result.changed and result.findings == ((1, "email"), (2, "column"))
    body = data_row_body(result.value)
    assert read_data_row_body(body) == result.value
    assert len(body) == 2 + 5 * 4 + sum(len(v) for v in result.value if v is not None)


def test_unchanged_rows_pass_through_as_the_same_objects():
    row = [b"1", b"Widget", b"2024-01-15", b"19.99"]
    result = RowMasker(PLAN, ["id", "name", "day", "price"]).mask_row(row)
    assert not result.changed and all(a is b for a, b in zip(result.value, row))


def test_binary_columns_are_hidden_by_column_rule_only():
    masker = RowMasker(PLAN, ["card_number", "blob", "email"], formats=[1, 1, 0])
    result = masker.mask_row([b"\x00\x00\x00\x07", b"alice@example.com", b"bob@example.com"])
    assert result.value == [None, b"alice@example.com", b"b***@example.com"]
    assert result.findings == ((0, "column"), (2, "email"))


def test_a_single_format_code_applies_to_every_column():
    result = RowMasker(PLAN, ["a", "b"], formats=[1]).mask_row([b"alice@example.com", b"x"])
    assert not result.changed


def test_non_utf8_bytes_survive_masking():
    value = b"\xff\xfe bob@example.com \xc3"
    assert RowMasker(PLAN, ["x"]).mask_row([value]).value == [b"\xff\xfe b***@example.com \xc3"]


def test_copy_text_row_is_unescaped_masked_and_reescaped():
    masker = RowMasker(PLAN, ["id", "contact", "ssn", "note"])
    line = b"7\tline1\\nmail: carol@example.com\\tx\t123-45-6789\t\\N\n"
    result = masker.mask_copy_row(line)
    assert result.value == b"7\tline1\\nmail: c***@example.com\\tx\t[MASKED:column]\t\\N\n"
    assert result.findings == ((1, "email"), (2, "column"))


def test_copy_escapes_do_not_hide_findings():
    # \\100 is octal for "@", \\x2e hex for ".": the server would print an email.
    line = b"dave\\100example\\x2ecom\tback\\\\slash\n"
    result = RowMasker(PLAN, []).mask_copy_row(line)
    assert result.value == b"d***@example.com\tback\\\\slash\n"


def test_copy_row_without_findings_is_returned_unchanged():
    line = b"1\tplain\\ttext\t\\N\n"
    assert RowMasker(PLAN, []).mask_copy_row(line).value is line


def test_notice_and_error_fields_that_echo_data_are_masked():
    fields = {"S": "ERROR", "C": "23505", "M": "duplicate key value violates unique constraint \"users_email_key\"",
              "D": "Key (email)=(erin@example.com) already exists.", "P": "12"}
    result = mask_fields(PLAN, fields)
    assert result.value == {**fields, "D": "Key (email)=(e***@example.com) already exists."}
    assert result.findings == (("D", "email"),)


def test_sealed_original_opens_with_the_custodian_key_and_appears_nowhere_in_the_output():
    custodian = PrivateKey.generate()
    original = [b"42", b"4111 1111 1111 1111", b"frank@example.com"]
    masked = RowMasker(PLAN, ["id", "pan", "email"]).mask_row(original)
    sealed = Sealer(custodian.public_key).seal(data_row_body(original))
    assert open_sealed(sealed, custodian) == data_row_body(original)
    client_bytes = data_row_body(masked.value)
    for secret in (b"4111 1111 1111 1111", b"frank@example.com", b"frank"):
        assert secret not in client_bytes and secret not in sealed
    with pytest.raises(Exception, match="(?i)decrypt"):
        open_sealed(sealed, PrivateKey.generate())


# --- properties ---------------------------------------------------------------------

FINDINGS = ["4111 1111 1111 1111", "5555555555554444", "DE89370400440532013000", "123-45-6789", "a@example.com",
            "(415) 555-2671", "+44 20 7946 0958", JWT, "AKIAIOSFODNN7EXAMPLE", PEM]
GLUE = ["", " ", "-", ".", "@", "+", "\n", "\t", "0", "12", "1234", "x", "AKIA", "eyJ", "-----BEGIN "]
fragments = st.one_of(st.sampled_from(FINDINGS), st.sampled_from(GLUE), st.text(max_size=12),
                      st.text(alphabet="0123456789 -+.()@", max_size=20))


@settings(max_examples=400, deadline=None)
@given(st.lists(fragments, max_size=8).map("".join))
def test_mask_text_never_raises_and_leaves_no_finding(text):
    masked, findings = mask_text(text, ALL)
    assert mask_text(masked, ALL) == (masked, ())
    assert (masked == text) == (not findings)
    for finding in findings:
        assert 0 <= finding.start < finding.end <= len(text)


def test_every_detector_needs_digits_or_a_marker_so_the_scanner_can_reject_text_early():
    assert all(d.min_digits or d.needs_any_of for d in DETECTORS.values())


@pytest.mark.parametrize("text", ["-1234567.25", "2024-01-15 10:00:00.123456+05:30", "550e8400-e29b-41d4-a716-446655440000"])
def test_plain_numbers_dates_and_uuids_are_left_alone(text):
    assert Scanner(ALL).mask(text) == (text, ())


# --- the fast paths give the answers of the plain algorithm -----------------------------

def test_the_brand_prefix_table_is_the_brand_rule_for_every_length_and_prefix():
    """`_card_valid` looks the first four digits up in a table made from the brands' ranges; `_brand_ok` is
    the rule as written. Every length a brand allows, every four-digit prefix."""
    from proxy.policy.detectors import _CARD_LENGTHS, _brand_ok, _brand_prefixes

    for length in range(12, 21):
        table = _brand_prefixes(length)
        expected = {f"{n:04d}".encode() for n in range(10_000) if _brand_ok(f"{n:04d}" + "0" * (length - 4))}
        assert table == expected, length
        assert bool(table) == (length in _CARD_LENGTHS)


# The card pattern as first written (lookbehind first); DETECTORS' is reordered for speed, same matches.
ORIGINAL_CARD = re.compile(
    r"(?<![\d-])(?:\d{4}([ -]?)\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -]?)\d{6}\2\d{4,5})(?![\d-])"
)
PLAIN = re.compile(
    r"-?\d{1,12}(?:\.\d{1,12})?"
    r"|\d{4}-\d\d-\d\d(?:[ T]\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:[+-]\d\d(?::\d\d)?|Z)?)?"
    r"|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
)


def reference_find(text):
    """Every detector's pattern on the whole text, no gates: what the Scanner's shortcuts must not change."""
    if len(text) < 6 or PLAIN.fullmatch(text):
        return []
    candidates = []
    for index, detector in enumerate(DETECTORS.values()):
        pattern = ORIGINAL_CARD if detector.kind == "credit_card" else detector.pattern
        candidates += [(mt.start(), -mt.end(), index, mt, detector) for mt in pattern.finditer(text) if detector.is_valid(mt)]
    candidates.sort(key=lambda c: c[:3])
    chosen, covered = [], 0
    for start, negative_end, _, mt, detector in candidates:
        if start >= covered:
            chosen.append((start, -negative_end, mt, detector))
            covered = -negative_end
    return chosen


def reference_mask(text):
    found = reference_find(text)
    if not found:
        return text, []
    pieces, cursor = [], 0
    for start, end, mt, detector in found:
        pieces += [text[cursor:start], detector.placeholder(mt)]
        cursor = end
    masked = "".join(pieces + [text[cursor:]])
    spans = [(d.kind, s, e) for s, e, _, d in found]
    leftover = reference_find(masked)
    if leftover:
        kind = leftover[0][3].kind
        return f"[MASKED:{kind}]", spans + [(kind, 0, len(text))]
    return masked, spans


EDGE_FRAGMENTS = FINDINGS + ["4111-1111-1111-1111", "378282246310005", "(415)555-2671", "415 555 2671", "+1 415 555 2671",
                             "x@y.co", "a.b@c-d.example", "DE89370400440532013000", "GB82 WEST 1234 5698 7654 32",
                             "-----BEGIN RSA PRIVATE KEY-----\nabc\n", "\u0664\u0661\u0661\u0661" * 4, "\xe9", "A", "Z9"]


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(EDGE_FRAGMENTS), st.sampled_from(GLUE), st.text(max_size=12),
                          st.text(alphabet="0123456789 -+.()@AKIeyJ", max_size=24)), max_size=8).map("".join))
def test_scanner_gives_what_every_pattern_on_the_whole_text_gives(text):
    masked, findings = mask_text(text, ALL)
    assert (masked, [(f.kind, f.start, f.end) for f in findings]) == reference_mask(text)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="0123456789 -x", max_size=40))
def test_reordered_card_pattern_matches_what_the_original_matches(text):
    card = DETECTORS["credit_card"].pattern
    assert [mt.span() for mt in card.finditer(text)] == [mt.span() for mt in ORIGINAL_CARD.finditer(text)]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(FINDINGS), st.sampled_from(GLUE), st.binary(max_size=6)), max_size=6)
       .map(lambda parts: b"".join(p if isinstance(p, bytes) else p.encode() for p in parts)))
def test_mask_bytes_is_mask_on_the_decoded_text(value):
    masked, kinds = Scanner(ALL).mask_bytes(value)
    text_masked, findings = Scanner(ALL).mask(value.decode("utf-8", "surrogateescape"))
    assert masked == text_masked.encode("utf-8", "surrogateescape")
    assert kinds == tuple(f.kind for f in findings)
    assert (masked is value) == (not kinds)


@pytest.mark.parametrize("digits", ["4111111111111111", "4111111111111112", "79927398713", "0", "18", "\u0664\u0661\u0661"])
def test_luhn_fast_path_agrees_with_the_loop(digits):
    total = 0
    for position, ch in enumerate(reversed(digits)):
        value = ord(ch) - 48
        total += (value * 2 - 9 if value > 4 else value * 2) if position % 2 else value
    assert luhn_ok(digits) == (total % 10 == 0)


def test_mask_values_is_mask_row_without_findings_and_none_when_unchanged():
    masker = RowMasker(PLAN, ["id", "email", "Customer_SSN", "note"], formats=[0, 0, 0, 1])
    row = [b"42", b"alice@example.com", b"123-45-6789", b"bob@example.com"]
    assert masker.mask_values(row) == masker.mask_row(row).value == [b"42", b"a***@example.com", b"[MASKED:column]",
                                                                      b"bob@example.com"]
    assert masker.mask_values([b"1", b"Widget", None, b"x"]) is None


def test_result_masker_passes_unchanged_rows_through_and_rebuilds_changed_ones():
    from ingest.protocols.postgres import messages as m
    from ingest.protocols.postgres.protocol import Message, ProtocolViolation
    from proxy.postgres.result_masking import ResultMasker

    body = struct.pack("!h", 2) + b"".join(name + b"\0" + struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0)
                                           for name in (b"id", b"contact"))
    description = Message("RowDescription", b"T" + struct.pack("!I", len(body) + 4) + body)
    plain = Message("DataRow", m.data_row([b"1", b"nothing to see"]))
    secret = Message("DataRow", m.data_row([b"2", b"mail carol@example.com"]))
    with_null = Message("DataRow", m.data_row([None, b"dave@example.com"]))
    out, changed = ResultMasker(PLAN).mask([description, plain, secret, with_null])
    assert changed == [False, False, True, True]
    assert out[0] is description and out[1] is plain
    assert out[2].data == m.data_row([b"2", b"mail c***@example.com"])
    assert out[3].data == m.data_row([None, b"d***@example.com"])
    truncated = Message("DataRow", plain.data[:-3])
    with pytest.raises(ProtocolViolation):
        ResultMasker(PLAN).mask([description, truncated])


# --- the inline hot path (masked_or_none) against mask_bytes, and digits of other scripts --------------------

@settings(max_examples=1000, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(EDGE_FRAGMENTS), st.sampled_from(GLUE), st.binary(max_size=6),
                          st.text(alphabet="0123456789 -+.()@AKIeyJ\u0664\u0661", max_size=24)), max_size=8)
       .map(lambda parts: b"".join(p if isinstance(p, bytes) else p.encode() for p in parts)))
def test_masked_or_none_is_mask_bytes(value):
    scanner = Scanner(ALL)
    masked, kinds = scanner.mask_bytes(value)
    assert scanner.masked_or_none(value) == (masked if kinds else None)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(["+1 ", "+44 ", "(415) ", "555-", " 2671", "\u0664\u0661\u0661\u0661",
                                           "\u0664\u0661\u0661", "4111 ", "-", " ", "."]),
                          st.text(alphabet="0123456789 -+.()\u0664\u0661\u0663", max_size=16)), max_size=8).map("".join))
def test_digits_of_other_scripts_count_as_digits_in_the_gates(text):
    # Patterns' \d takes every script's digits; a gate counting only ASCII ones would let such a phone through.
    masked, findings = mask_text(text, ALL)
    assert (masked, [(f.kind, f.start, f.end) for f in findings]) == reference_mask(text)


def test_a_phone_number_in_arabic_indic_digits_is_masked():
    text = "+1 \u0664\u0661\u0661\u0661 \u0664\u0661\u0661\u0661"
    assert mask_text(text, ALL)[0] == "[MASKED:phone]"
    assert Scanner(ALL).masked_or_none(text.encode()) == b"[MASKED:phone]"


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="0123456789 .-)(+x\u0664", max_size=30))
def test_phone_shape_check_is_a_necessary_condition_of_the_hint(text):
    from proxy.policy.detectors import _PHONE_HINT, _phone_possible
    assert _phone_possible(text) == ("+" in text or _PHONE_HINT.search(text) is not None)


# --- the DataRow walk (result_masking._masked_data_row) against decode, mask_in_place, re-encode -------------

ROW_VALUES = st.one_of(st.none(), st.sampled_from([f.encode() for f in FINDINGS] + [b"", b"42", b"x" * 7]),
                       st.binary(max_size=24))


@settings(max_examples=400, deadline=None)
@given(st.lists(ROW_VALUES, min_size=0, max_size=6), st.integers(0, 5), st.integers(0, 3))
def test_data_row_walk_is_decode_mask_reencode(values, columns, cut):
    from ingest.protocols.postgres import messages as m
    from proxy.postgres.result_masking import _mask_data_row_values, _masked_data_row

    names = ["id", "email", "customer_ssn", "note", "blob", "x"][:columns]
    masker = RowMasker(PLAN, names, formats=[0, 0, 0, 0, 1, 0][:columns])
    data = m.data_row(values)
    assert _masked_data_row(data, masker) == _mask_data_row_values(data, masker)
    if cut and len(data) > 7:  # malformed: the walk hands it to the codec, which raises
        with pytest.raises(Exception) as walked:
            _masked_data_row(data[:-cut], masker)
        with pytest.raises(type(walked.value)):
            _mask_data_row_values(data[:-cut], masker)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="0123456789 .-)(+x\u0664", max_size=30))
def test_phone_bytes_check_is_a_necessary_condition_of_the_text_check(text):
    from proxy.policy.detectors import _phone_bytes_possible, _phone_possible
    assert _phone_bytes_possible(text.encode()) or not _phone_possible(text)


def test_masked_leftovers_that_combine_into_a_finding_are_still_caught_on_the_row_path():
    # The card hides the overlapping email but its placeholder keeps "1111", which with "a@example.com" is an
    # email again: the masked value's re-check must hide the whole value, on the DataRow walk too.
    from ingest.protocols.postgres import messages as m
    from proxy.postgres.result_masking import _masked_data_row

    text = b"4111 1111 1111 1111a@example.com"
    assert Scanner(ALL).masked_or_none(text) == b"[MASKED:email]" == mask_text(text.decode(), ALL)[0].encode()
    masker = RowMasker(PLAN, ["id", "note"])
    assert _masked_data_row(m.data_row([b"7", text]), masker) == m.data_row([b"7", b"[MASKED:email]"])


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="ab9.@*-_%+ \n\xe9", max_size=24).map(lambda t: t.encode()))
def test_address_at_gate_is_the_plain_x_at_y_dot_search(raw):
    from proxy.policy.detectors import _ADDRESS_AT
    plain = re.compile(rb"[A-Za-z0-9._%+-]@[A-Za-z0-9-][^.]*\.")  # as first written: the literal "@" moved first
    assert (_ADDRESS_AT.search(raw) is None) == (plain.search(raw) is None)


# --- many values in one scan (Scanner.masked_many, the DataRows of one read) against one value at a time ----------

JOINED_VALUES = st.lists(st.one_of(st.sampled_from(EDGE_FRAGMENTS), st.sampled_from(GLUE), st.binary(max_size=6),
                                   st.sampled_from(["\x00", "\xe2\x82", "\u20ac", "\U0001f600", "eyJ", "4111 1111 1111 111",
                                                    "123-45-678", "a@b.c", "2024-01-15", "-1234567.25"]),
                                   st.text(alphabet="0123456789 -+.()@AKIeyJ\u0664\u0661", max_size=24)), max_size=5)


SCANNER = Scanner(ALL)  # one for all examples: a Scanner's table takes a while to build


def as_bytes(parts: list) -> bytes:
    return b"".join(p if isinstance(p, bytes) else p.encode("utf-8", "surrogateescape") for p in parts)


@settings(max_examples=400, deadline=None)
@given(st.lists(JOINED_VALUES.map(as_bytes), max_size=12))
def test_masked_many_is_masked_or_none_of_each_value(values):
    # Values are joined by NUL for one scan: a finding at a value's edge, a value holding a NUL, a multibyte
    # character cut at a value's end, plain numbers beside findings and near misses must all come out as alone.
    expected = {value: masked for value in values if (masked := SCANNER.masked_or_none(value)) is not None}
    assert SCANNER.masked_many(values) == expected


ONE_DETECTOR = {kind: Scanner({kind}) for kind in ALL}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ALL), st.lists(JOINED_VALUES.map(as_bytes), max_size=12))
def test_masked_many_of_one_pattern_in_one_pass_is_masked_or_none_of_each_value(kind, values):
    # A column only one detector applies to (the usual case): one pattern's findings need no overlap rule,
    # and the same answers come out as value by value.
    scanner = ONE_DETECTOR[kind]
    expected = {value: masked for value in values if (masked := scanner.masked_or_none(value)) is not None}
    assert scanner.masked_many(values) == expected


def test_masked_many_values_that_touch_across_the_join_are_masked_as_alone():
    # Alone, neither value holds a finding; joined without a boundary they would ("4111 1111" + " 1111 1111").
    scanner = SCANNER
    halves = [b"4111 1111", b" 1111 1111", b"415", b"-555-2671", b"a@", b"example.com", b"123-45", b"-6789"]
    assert scanner.masked_many(halves) == {}
    assert scanner.masked_many([b"x", PEM.encode(), b"after"]) == {PEM.encode(): b"[MASKED:private_key]"}
    leftover = b"4111 1111 1111 1111a@example.com"  # the card's placeholder and the rest make an email again
    assert scanner.masked_many([b"a@example.com", leftover, b"123-45-6789"]) == {
        b"a@example.com": b"a***@example.com", leftover: b"[MASKED:email]", b"123-45-6789": b"***-**-6789"}
    many = [f"user{i}@mail.example".encode() for i in range(1200)]  # more than one joined chunk
    assert scanner.masked_many(many + many[:3]) == {value: scanner.masked_or_none(value) for value in many}


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="0123456789 -.)x\u0664", max_size=40))
def test_card_and_ssn_shape_gates_are_necessary_conditions(text):
    # The gate reads digit runs around separators off the value's shape; the patterns decide.
    masked, findings = mask_text(text, ALL)
    assert (masked, [(f.kind, f.start, f.end) for f in findings]) == reference_mask(text)


BATCH_ROW = st.one_of(st.none(), st.sampled_from([f.encode() for f in FINDINGS] + [b"", b"42", b"x" * 7, b"2024-01-15"]),
                      JOINED_VALUES.map(as_bytes))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(BATCH_ROW, min_size=3, max_size=3), min_size=8, max_size=40), st.integers(0, 3))
def test_data_rows_of_one_read_masked_together_are_masked_as_one_by_one(rows, other):
    # A read's DataRows are scanned together; each must come out as alone: NULLs, a binary column (passed),
    # a hidden column, and a row of another column count among them.
    from ingest.protocols.postgres import messages as m
    from ingest.protocols.postgres.protocol import Message
    from proxy.postgres.result_masking import ResultMasker, _masked_data_row

    fields = [(b"note", 25, 0), (b"blob", 17, 1), (b"customer_ssn", 25, 0)]
    body = struct.pack("!h", 3) + b"".join(name + b"\0" + struct.pack("!IhIhih", 0, 0, oid, -1, -1, fmt)
                                           for name, oid, fmt in fields)
    description = Message("RowDescription", b"T" + struct.pack("!I", len(body) + 4) + body)
    messages = [Message("DataRow", m.data_row(values)) for values in rows]
    messages[other] = Message("DataRow", m.data_row(rows[other][:2]))
    out, changed = ResultMasker(PLAN).mask([description, *messages])
    masker = RowMasker(PLAN, ["note", "blob", "customer_ssn"], [0, 1, 0])
    for message, got, was_changed in zip(messages, out[1:], changed[1:]):
        alone = _masked_data_row(message.data, masker)
        assert (got.data, was_changed) == ((message.data, False) if alone is None else (alone, True))
        assert (got is message) == (alone is None)


def test_a_malformed_row_among_many_is_still_the_codecs_error():
    from ingest.protocols.postgres import messages as m
    from ingest.protocols.postgres.protocol import Message, ProtocolViolation
    from proxy.postgres.result_masking import ResultMasker

    body = struct.pack("!h", 1) + b"note\0" + struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0)
    description = Message("RowDescription", b"T" + struct.pack("!I", len(body) + 4) + body)
    rows = [Message("DataRow", m.data_row([b"mail carol@example.com"])) for _ in range(20)]
    rows[9] = Message("DataRow", rows[9].data[:-3])
    with pytest.raises(ProtocolViolation):
        ResultMasker(PLAN).mask([description, *rows])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.sampled_from([f for f in EDGE_FRAGMENTS if f.isascii()]), st.sampled_from(GLUE),
                          st.text(alphabet=st.characters(max_codepoint=127), max_size=16)), max_size=8).map("".join))
def test_ascii_patterns_match_what_the_unicode_ones_match_on_ascii_text(text):
    # On ASCII text \d, \w and \b mean the same with or without re.ASCII (\x1c-\x1f are Unicode spaces, but no
    # pattern uses \s outside [\s\S]); the ASCII forms only skip the Unicode look-ups.
    for detector in DETECTORS.values():
        assert [(mt.span(), mt.groups()) for mt in detector.ascii_pattern.finditer(text)] == \
               [(mt.span(), mt.groups()) for mt in detector.pattern.finditer(text)]
