"""Detectors for sensitive values in free text, and `mask_text` that hides them.

Each detector is a regular expression that finds candidates plus a validator
that confirms them (Luhn, ISO 13616 mod-97, SSN area rules, a JWT header that
decodes), so that ids, timestamps and amounts are not masked by accident: a
masked value is a value the client can no longer use, so a false positive is
a bug, not caution.

This runs on every DataRow value, so a detector's pattern only runs on text
that has what every finding of its kind has: enough characters and digits,
or a marker such as an "@" between an address's characters, "eyJ", "AKIA",
an upper-case letter (IBAN). Those features are read off the value's bytes
with a handful of C-level calls (`bytes.translate`, `in`), before the value
is even decoded, and looked up in a table the Scanner builds once: most
values never reach a pattern, and a masked value's re-check (see
`Scanner.mask`) usually stops at the table. Values that PostgreSQL prints
for numbers, dates, timestamps and uuids are skipped before the
digit-counting detectors run.

Every gate is a necessary condition of a valid finding, never a guess, so
gating decides only how fast the answer comes, not what it is. (A pattern's
digit class takes every script's digits: a value that is not all ASCII counts its
size as its digits.)
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import accumulate, repeat
from operator import add, itemgetter

__all__ = ["DETECTORS", "Finding", "Scanner", "UnknownDetectorError", "mask_text", "scanner_for"]

# How PostgreSQL prints integers, numerics (at most 12 digits a side: no room for a
# 13-digit card), dates, timestamps and uuids: none of these can hold a finding.
_PLAIN_VALUE = re.compile(
    r"-?\d{1,12}(?:\.\d{1,12})?"
    r"|\d{4}-\d\d-\d\d(?:[ T]\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:[+-]\d\d(?::\d\d)?|Z)?)?"
    r"|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
)


_PLAIN_FIRST = frozenset("-0123456789abcdef")  # how every _PLAIN_VALUE starts


class UnknownDetectorError(ValueError):
    """A detector name that does not exist (a typo in a policy file)."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One detected value: its kind and its span in the scanned text."""

    kind: str
    start: int
    end: int


# Features of a value's bytes that detectors need (one bit each), besides length and digit count.
_AT = 1  # an "@" with an address character on each side and a "." after it (email)
_DASH = 2  # a "-", and digits around separators as in an SSN (shape dddsddsdddd), or text not all ASCII
_EYJ = 4  # "eyJ" and a "." (JWT: a base64url JSON header, then a dot)
_AWS = 8  # "AKIA" or "ASIA"
_PEM = 16  # "PRIVATE KEY"
_UPPER = 32  # maybe an ASCII upper-case letter (IBAN's country code): `not bytes.islower()`
_DIALABLE = 64  # a "+", text not all ASCII, or the shape of what _PHONE_HINT needs (phone; `_phone_bytes_possible`)
_CARD_RUN = 128  # four digits, four more after at most a separator (shape ddddsdddd or dddddddd), or not all ASCII
_FEATURES = 256
# An "@" that an email finding could be built around: `x@y` then a "." later on (one C-level search). The
# pattern starts with the literal "@" (the "x" is a lookbehind) so that the engine skips from "@" to "@" in C.
_ADDRESS_AT = re.compile(rb"@(?<=[A-Za-z0-9._%+-]@)[A-Za-z0-9-][^.]*\.")


def _has_address_at(raw: bytes) -> bool:
    """An "@" that an email finding could be built around: `x@y` then a "." later on."""
    return _ADDRESS_AT.search(raw) is not None


@dataclass(frozen=True, slots=True)
class _Detector:
    """A pattern, its validator and placeholder, and what a text needs before the pattern is worth running.

    `min_length`, `min_digits` (ASCII digits), `feature` (one of the feature
    bits above) and `possible` are necessary conditions of a valid finding;
    every detector needs some digits or a marker, which is what lets the
    scanner turn most text away before looking at any detector.
    `needs_any_of` names the markers `feature` stands for.
    """

    kind: str
    pattern: re.Pattern[str]
    is_valid: Callable[[re.Match[str]], bool]
    placeholder: Callable[[re.Match[str]], str]
    min_length: int
    min_digits: int = 0
    needs_any_of: tuple[str, ...] = ()
    feature: int = 0
    possible: Callable[[str], bool] | None = None  # a quick test on the text the pattern needs to pass
    crosses_nul: bool = False  # a match may run past a NUL, so NUL-joined values cannot share one scan
    ascii_pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # `pattern` for text that is all ASCII: there \d, \w and \b match what their ASCII forms match (no
        # pattern uses \s but in [\s\S]), and the engine skips the Unicode look-up per character (a card scan
        # takes less than half the time).
        flags = self.pattern.flags & ~re.UNICODE | re.ASCII
        object.__setattr__(self, "ascii_pattern", re.compile(self.pattern.pattern, flags))


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _opaque(kind: str) -> Callable[[re.Match[str]], str]:
    placeholder = f"[MASKED:{kind}]"
    return lambda match: placeholder


def _always(match: re.Match[str]) -> bool:
    return True


# --- credit cards: brand prefix + length, then Luhn -------------------------

# Starts with a plain \d (the "not after a digit or -" check follows it) so that the regex engine
# skips to the next digit in C instead of trying the lookbehind at every character.
_CARD = re.compile(
    r"\d(?<![\d-]\d)\d{3}(?:"
    r"([ -]?)\d{4}\1\d{4}\1\d{1,7}"  # 4-4-4-x (Visa, Mastercard, Discover, JCB, UnionPay)
    r"|([ -]?)\d{6}\2\d{4,5}"  # 4-6-5 (Amex) and 4-6-4 (Diners)
    r")(?![\d-])"
)
_CARD_BRANDS = (  # (prefix range low, high, allowed lengths)
    ("4", "4", (13, 16, 19)),
    ("51", "55", (16,)),
    ("2221", "2720", (16,)),
    ("34", "34", (15,)),
    ("37", "37", (15,)),
    ("300", "305", (14,)),
    ("36", "36", (14,)),
    ("38", "39", (14, 16)),
    ("6011", "6011", (16, 19)),
    ("644", "659", (16, 19)),
    ("3528", "3589", (16, 17, 18, 19)),
    ("62", "62", (16, 17, 18, 19)),
)


# Luhn doubles every second digit from the right and sums the digits of the result: 0246813579.
_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")


def luhn_ok(digits: str) -> bool:
    """The Luhn mod-10 check every payment card number satisfies."""
    if digits.isascii() and digits.isdigit():  # the usual case, in C; the loop gives the same total
        raw = digits.encode()
        return (sum(raw[::-2]) + sum(raw[-2::-2].translate(_DOUBLED)) - 48 * len(raw)) % 10 == 0
    total = 0
    for position, ch in enumerate(reversed(digits)):
        value = ord(ch) - 48
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _brand_ok(digits: str) -> bool:
    return any(low <= digits[: len(low)] <= high and len(digits) in lengths for low, high, lengths in _CARD_BRANDS)


@functools.cache
def _brand_prefixes(length: int) -> frozenset[bytes]:
    """For ASCII digits `_brand_ok` depends only on the length and the first four digits: the four-digit prefixes
    of the brands of this length, tabled on first use from each brand's range (a brand's low and high have one
    length, so its prefixes are a range of numbers). Testing all 10,000 prefixes with `_brand_ok` instead took
    ~30 ms per length: a stall of the proxy's event loop at the first card number of each length it masked."""
    prefixes: set[bytes] = set()
    for low, high, lengths in _CARD_BRANDS:
        if length in lengths:
            scale = 10 ** (4 - len(low))
            prefixes.update(b"%04d" % n for n in range(int(low) * scale, (int(high) + 1) * scale))
    return frozenset(prefixes)


_CARD_LENGTHS = frozenset(length for _, _, lengths in _CARD_BRANDS for length in lengths)


def _card_digits(match: re.Match[str]) -> str:
    """The digits of a card match, which holds only digits and its " " or "-" separators."""
    return match.group().replace(" ", "").replace("-", "")


def _card_valid(match: re.Match[str]) -> bool:
    group = match.group()
    if group.isascii():  # all 0-9: the brand is in the table, and luhn_ok's loop is done in C
        raw = group.encode().translate(None, b" -")
        if len(raw) not in _CARD_LENGTHS or raw[:4] not in _brand_prefixes(len(raw)):
            return False
        return (sum(raw[::-2]) + sum(raw[-2::-2].translate(_DOUBLED)) - 48 * len(raw)) % 10 == 0
    digits = _card_digits(match)
    return _brand_ok(digits) and luhn_ok(digits)


def _card_placeholder(match: re.Match[str]) -> str:
    last = match.group()[-4:]
    if " " in last or "-" in last:  # a last group of fewer than four digits
        last = _card_digits(match)[-4:]
    return "**** **** **** " + last


# --- IBAN: ISO 13616, mod-97 == 1 -------------------------------------------

_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")


def iban_ok(iban: str) -> bool:
    """ISO 13616 / ISO 7064 mod 97-10: move the first four characters to the end, letters to numbers."""
    iban = iban.replace(" ", "")
    if not 15 <= len(iban) <= 34:
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


# --- US SSN: AAA-GG-SSSS with the SSA's never-issued values excluded --------

_SSN = re.compile(r"(?<![\d-])(\d{3})-(\d{2})-(\d{4})(?![\d-])")


def _ssn_valid(match: re.Match[str]) -> bool:
    area, group, serial = match.groups()
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _ssn_placeholder(match: re.Match[str]) -> str:
    return "***-**-" + match.group(3)


# --- email -------------------------------------------------------------------

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")


def _email_placeholder(match: re.Match[str]) -> str:
    local, _, domain = match.group().partition("@")
    return f"{local[0]}***@{domain}"


# --- phone: North American with separators, or E.164 with a leading + --------
# Without separators or a "+", a run of digits is an id or a timestamp, not a phone.

_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"(?:\+?1[ .-]?)?(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[ .-])[2-9]\d{2}[ .-]\d{4}"
    r"|\+[1-9]\d{0,3}(?:[ .-]?\d{2,4}){2,5}"
    r")(?![\w-])"
)


# What every phone match contains, found much faster than the pattern itself: a "+" (E.164), or
# the North American exchange and line after their separator (after ")", " ", "." or "-").
_PHONE_HINT = re.compile(r"[ .)-][2-9]\d\d[ .-]\d{4}(?![\w-])")


# ASCII text's shape for `_PHONE_HINT`: a digit is "d", a separator (" ", ".", "-", ")") "s", anything else "x".
_PHONE_SHAPE = bytes(
    ord("d") if byte in b"0123456789" else ord("s") if byte in b" .-)" else ord("x") for byte in range(256)
)


def _phone_bytes_possible(raw: bytes) -> bool:
    """Necessary for a phone in `raw`'s text: a "+", or text that is not all ASCII, or the shape of what
    _PHONE_HINT needs ("sdddsdddd"), found by one translate and find in C."""
    return 43 in raw or not raw.isascii() or raw.translate(_PHONE_SHAPE).find(b"sdddsdddd") >= 0


def _phone_possible(text: str) -> bool:
    if "+" in text:
        return True
    if text.isascii() and not _phone_bytes_possible(text.encode()):
        return False
    return _PHONE_HINT.search(text) is not None


def _phone_valid(match: re.Match[str]) -> bool:
    return 8 <= len(_digits(match.group())) <= 15


# --- JWT: three base64url parts, the header is JSON naming an "alg" ----------

_JWT = re.compile(r"(?<![\w-])eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*(?![\w.-])")


def _jwt_valid(match: re.Match[str]) -> bool:
    header = match.group().partition(".")[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (binascii.Error, ValueError):
        return False
    return isinstance(decoded, dict) and "alg" in decoded


# --- AWS access key ids and PEM private keys ---------------------------------

_AWS_KEY = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")
_PRIVATE_KEY = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*?)PRIVATE KEY((?: BLOCK)?)-----[\s\S]*?(?:-----END \1PRIVATE KEY\2-----|\Z)"
)


DETECTORS: dict[str, _Detector] = {
    detector.kind: detector
    for detector in (
        # Order is priority when two findings overlap at the same start.
        _Detector("private_key", _PRIVATE_KEY, _always, _opaque("private_key"), 27, needs_any_of=("PRIVATE KEY",),
                  feature=_PEM, crosses_nul=True),  # [\s\S]*? up to its END line or \Z
        _Detector("jwt", _JWT, _jwt_valid, _opaque("jwt"), 10, needs_any_of=("eyJ",), feature=_EYJ),
        _Detector("aws_access_key", _AWS_KEY, _always, _opaque("aws_access_key"), 20, needs_any_of=("AKIA", "ASIA"),
                  feature=_AWS),
        _Detector("iban", _IBAN, lambda m: iban_ok(m.group()), _opaque("iban"), 15, min_digits=2, feature=_UPPER),
        _Detector("credit_card", _CARD, _card_valid, _card_placeholder, 13, min_digits=13, feature=_CARD_RUN),
        _Detector("email", _EMAIL, _always, _email_placeholder, 6, needs_any_of=("@",), feature=_AT),
        _Detector("us_ssn", _SSN, _ssn_valid, _ssn_placeholder, 11, min_digits=9, needs_any_of=("-",), feature=_DASH),
        _Detector("phone", _PHONE, _phone_valid, _opaque("phone"), 9, min_digits=8, feature=_DIALABLE,
                  possible=_phone_possible),
    )
}

# (start, -end, priority): earliest first, then longest, then the detector listed first.
_ORDER = itemgetter(0, 1, 2)
_Run = tuple[tuple[int, _Detector], ...]  # the detectors worth running on a value, with their priority
_NO_RUN: tuple[_Run, bool] = ((), False)
_Candidate = tuple[int, int, int, re.Match[str], _Detector]  # (start, -end, priority, match, detector)
_JOINED_VALUES = 512  # values per shared scan in `masked_many`: what a few reads of rows hold


def _chosen(candidates: list[_Candidate]) -> list[_Candidate]:
    """The findings to mask among validated candidates: in text order, an overlapped one dropped."""
    candidates.sort(key=_ORDER)
    chosen, covered_until = [], 0
    for candidate in candidates:
        if candidate[0] >= covered_until:
            chosen.append(candidate)
            covered_until = -candidate[1]
    return chosen


class Scanner:
    """A fixed set of detectors, resolved once (per mask plan), applied to many values.

    Immutable once built, and nothing it calls keeps state: one Scanner may
    serve any number of sessions and threads at once.
    """

    def __init__(self, kinds: Iterable[str]):
        wanted = set(kinds)
        unknown = wanted - DETECTORS.keys()
        if unknown:
            raise UnknownDetectorError(f"unknown detector {sorted(unknown)[0]!r}; known: {', '.join(DETECTORS)}")
        self.detectors = tuple(d for kind, d in DETECTORS.items() if kind in wanted)
        self._features = 0
        for detector in self.detectors:
            self._features |= detector.feature
        # Which detectors may run, by (how many length thresholds, how many digit thresholds the value
        # reaches, its feature bits); each entry is (detectors with priority, whether to skip plain values).
        self._lengths = tuple(sorted({d.min_length for d in self.detectors}))
        self._digit_counts = tuple(sorted({d.min_digits for d in self.detectors if d.min_digits}))
        self.shortest = self._lengths[0] if self._lengths else 1 << 62  # no finding is shorter (in bytes too)
        stride = (len(self._digit_counts) + 1) * _FEATURES
        # Offsets into the table by a value's length and by its digit count (the last entry covers all beyond).
        self._by_length = tuple(bisect_right(self._lengths, n) * stride for n in range((self._lengths or (0,))[-1] + 1))
        self._by_digits = tuple(bisect_right(self._digit_counts, n) * _FEATURES
                                for n in range((self._digit_counts or (0,))[-1] + 1))
        self._longest, self._most_digits = len(self._by_length) - 1, len(self._by_digits) - 1  # the last entries cover all beyond
        # Entry = the detectors whose thresholds the ranks reach and whose feature bit is set, as a bit set;
        # the table repeats few distinct runs, so each is built once.
        with_features = [sum(1 << index for index, d in enumerate(self.detectors) if d.feature & features == d.feature)
                         for features in range(_FEATURES)]
        entries: dict[int, tuple[_Run, bool]] = {}
        self._table = tuple(
            entries.get(eligible & with_feature) or self._entry(eligible & with_feature, entries)
            for eligible in (self._reaching(length_rank, digit_rank)
                             for length_rank in range(len(self._lengths) + 1)
                             for digit_rank in range(len(self._digit_counts) + 1))
            for with_feature in with_features
        )

    def _reaching(self, length_rank: int, digit_rank: int) -> int:
        """The detectors (bit set by index) whose length and digit thresholds these ranks reach."""
        length = self._lengths[length_rank - 1] if length_rank else 0
        digits = self._digit_counts[digit_rank - 1] if digit_rank else 0
        return sum(1 << index for index, d in enumerate(self.detectors) if d.min_length <= length and d.min_digits <= digits)

    def _entry(self, eligible: int, entries: dict[int, tuple[_Run, bool]]) -> tuple[_Run, bool]:
        run = tuple((index, d) for index, d in enumerate(self.detectors) if eligible >> index & 1)
        # PostgreSQL's numbers, dates, timestamps and uuids hold no finding. Only the digit-counting
        # detectors need to be told: the others' markers never occur in such a value.
        entry = entries[eligible] = run, any(d.min_digits for _, d in run)
        return entry

    def _run_for(self, raw: bytes) -> tuple[_Run, bool]:
        """The detectors whose necessary conditions `raw` (a value's UTF-8 bytes) meets."""
        size = len(raw)
        if size < self.shortest:
            return _NO_RUN
        # ASCII digits; a pattern's digit class also takes other scripts' digits, which UTF-8 writes in two bytes or more:
        # for a value that is not all ASCII, its size is what bounds its digits.
        # One translate gives the ASCII digits and the shapes of phones, cards and SSNs (digits around separators).
        shape, ascii = raw.translate(_PHONE_SHAPE), raw.isascii()
        digits = shape.count(100) if ascii else size
        wanted, features = self._features, 0
        if wanted & _DIALABLE and (43 in raw or not ascii or shape.find(b"sdddsdddd") >= 0):
            features = _DIALABLE
        # Single bytes are looked up as ints: `b"@" in raw` would first try (and fail) to read b"@" as one.
        if wanted & _AT and 64 in raw and _has_address_at(raw):
            features |= _AT
        if wanted & _DASH and 45 in raw and (not ascii or shape.find(b"dddsddsdddd") >= 0):
            features |= _DASH
        if wanted & _CARD_RUN and (not ascii or shape.find(b"ddddsdddd") >= 0 or shape.find(b"dddddddd") >= 0):
            features |= _CARD_RUN
        if not raw.islower():  # an upper-case letter, or no letter at all; every other marker has one
            features |= _UPPER & wanted
            if wanted & _EYJ and raw.find(b"eyJ") >= 0 and 46 in raw:
                features |= _EYJ
            if wanted & _AWS and (raw.find(b"AKIA") >= 0 or raw.find(b"ASIA") >= 0):
                features |= _AWS
            if wanted & _PEM and raw.find(b"PRIVATE KEY") >= 0:
                features |= _PEM
        return self._table[self._by_length[min(size, self._longest)] + self._by_digits[min(digits, self._most_digits)]
                           + features]

    @staticmethod
    def _find(text: str, run: _Run, skip_plain: bool) -> list[_Candidate]:
        """Validated, non-overlapping findings of `run` in text order (earliest first, then longest)."""
        if skip_plain and text[0] in _PLAIN_FIRST and _PLAIN_VALUE.fullmatch(text):
            return []
        candidates, ascii = [], text.isascii()
        for index, detector in run:
            if detector.possible is not None and not detector.possible(text):
                continue
            search, is_valid = (detector.ascii_pattern if ascii else detector.pattern).search, detector.is_valid
            match = search(text)
            while match is not None:  # finditer, without building an iterator (see masked_or_none)
                end = match.end()
                if is_valid is _always or is_valid(match):
                    candidates.append((match.start(), -end, index, match, detector))
                match = search(text, end)
        return candidates if len(candidates) < 2 else _chosen(candidates)

    @staticmethod
    def _replace(text: str, found: list[_Candidate]) -> str:
        if len(found) == 1:
            start, negative_end, _, match, detector = found[0]
            return text[:start] + detector.placeholder(match) + text[-negative_end:]
        pieces, cursor = [], 0
        for start, negative_end, _, match, detector in found:
            pieces.append(text[cursor:start])
            pieces.append(detector.placeholder(match))
            cursor = -negative_end
        pieces.append(text[cursor:])
        return "".join(pieces)

    def mask(self, text: str) -> tuple[str, tuple[Finding, ...]]:
        """`text` with every finding replaced by its placeholder, and the findings (spans in `text`).

        Placeholders keep a little shape (last four card digits, the email's
        domain). Overlapping findings are masked once, so the rest of a
        dropped overlap, or a placeholder's shape, can combine with its
        neighbours into a new finding (`4111 1111 1111 1111a@example.com`);
        then the whole text is masked instead, so the output never holds a
        detectable value.
        """
        run, skip_plain = self._run_for(text.encode("utf-8", "surrogatepass"))
        found = self._find(text, run, skip_plain) if run else ()
        if not found:
            return text, ()
        masked = self._replace(text, found)
        findings = tuple(Finding(detector.kind, start, -negative_end) for start, negative_end, _, _, detector in found)
        run, skip_plain = self._run_for(masked.encode("utf-8", "surrogatepass"))
        leftover = self._find(masked, run, skip_plain) if run else ()
        if leftover:
            kind = leftover[0][4].kind
            return f"[MASKED:{kind}]", findings + (Finding(kind, 0, len(text)),)
        return masked, findings

    def mask_bytes(self, value: bytes) -> tuple[bytes, tuple[str, ...]]:
        """`mask` for a value's bytes (UTF-8; others survive via surrogateescape): masked bytes and finding kinds.

        The same answer as `mask` on the decoded text, without decoding the
        values that no detector could match, and without Finding objects.
        Returns `value` itself when nothing was found.
        """
        run, skip_plain = self._run_for(value)
        if not run:
            return value, ()
        text = value.decode("utf-8", "surrogateescape")
        found = self._find(text, run, skip_plain)
        if not found:
            return value, ()
        masked = self._replace(text, found)
        out = masked.encode("utf-8", "surrogateescape")
        kinds = (found[0][4].kind,) if len(found) == 1 else tuple([candidate[4].kind for candidate in found])
        run, skip_plain = self._run_for(out)
        if run:
            leftover = self._find(masked, run, skip_plain)
            if leftover:
                kind = leftover[0][4].kind
                return f"[MASKED:{kind}]".encode(), kinds + (kind,)
        return out, kinds

    def masked_or_none(self, value: bytes) -> bytes | None:
        """`mask_bytes(value)[0]` when something was found, else None: the per-value hot path.

        `_run_for` and the common cases of `_find` and `_replace`, inline: no tuples built for a value
        the gate turns away, and none beyond the findings for one it does not.
        """
        size = len(value)
        if size < self.shortest:
            return None
        shape, ascii = value.translate(_PHONE_SHAPE), value.isascii()
        digits = shape.count(100) if ascii else size
        wanted, features = self._features, 0
        if wanted & _DIALABLE and (43 in value or not ascii or shape.find(b"sdddsdddd") >= 0):
            features = _DIALABLE
        if wanted & _AT and 64 in value and _ADDRESS_AT.search(value) is not None:
            features |= _AT
        if wanted & _DASH and 45 in value and (not ascii or shape.find(b"dddsddsdddd") >= 0):
            features |= _DASH
        if wanted & _CARD_RUN and (not ascii or shape.find(b"ddddsdddd") >= 0 or shape.find(b"dddddddd") >= 0):
            features |= _CARD_RUN
        if not value.islower():
            features |= _UPPER & wanted
            if wanted & _EYJ and value.find(b"eyJ") >= 0 and 46 in value:
                features |= _EYJ
            if wanted & _AWS and (value.find(b"AKIA") >= 0 or value.find(b"ASIA") >= 0):
                features |= _AWS
            if wanted & _PEM and value.find(b"PRIVATE KEY") >= 0:
                features |= _PEM
        by_length, by_digits, longest, most_digits = self._by_length, self._by_digits, self._longest, self._most_digits
        run, skip_plain = self._table[by_length[size if size < longest else longest]
                                      + by_digits[digits if digits < most_digits else most_digits] + features]
        if not run:
            return None
        text = value.decode("utf-8", "surrogateescape")
        if len(run) == 1:
            if skip_plain and text[0] in _PLAIN_FIRST and _PLAIN_VALUE.fullmatch(text):
                return None
            index, detector = run[0]
            if detector.possible is not None and not detector.possible(text):
                return None
            # One pattern: its matches are in order and none overlap. `search` from the last match's end is
            # what `finditer` does (no pattern matches empty text; lookbehinds see before `pos`), without
            # building an iterator.
            search, is_valid = (detector.ascii_pattern if ascii else detector.pattern).search, detector.is_valid
            found = []
            match = search(text)
            while match is not None:
                end = match.end()
                if is_valid is _always or is_valid(match):
                    found.append((match.start(), -end, index, match, detector))
                match = search(text, end)
        else:
            found = self._find(text, run, skip_plain)
        if not found:
            return None
        if len(found) == 1:
            start, negative_end, _, match, detector = found[0]
            masked = text[:start] + detector.placeholder(match) + text[-negative_end:]
        else:
            masked = self._replace(text, found)
        out = masked.encode("utf-8", "surrogateescape")
        # The masked value's gate (`_run_for`), inline: what the placeholders left may combine into a finding.
        size = len(out)
        if size < self.shortest:
            return out
        # Placeholders are ASCII, and the rest is the value's own text: `out` is ASCII when `value` is.
        shape = out.translate(_PHONE_SHAPE)
        digits = shape.count(100) if ascii else size
        features = _DIALABLE if wanted & _DIALABLE and (43 in out or not ascii or shape.find(b"sdddsdddd") >= 0) else 0
        if wanted & _AT and 64 in out and _ADDRESS_AT.search(out) is not None:
            features |= _AT
        if wanted & _DASH and 45 in out and (not ascii or shape.find(b"dddsddsdddd") >= 0):
            features |= _DASH
        if wanted & _CARD_RUN and (not ascii or shape.find(b"ddddsdddd") >= 0 or shape.find(b"dddddddd") >= 0):
            features |= _CARD_RUN
        if not out.islower():
            features |= _UPPER & wanted
            if wanted & _EYJ and out.find(b"eyJ") >= 0 and 46 in out:
                features |= _EYJ
            if wanted & _AWS and (out.find(b"AKIA") >= 0 or out.find(b"ASIA") >= 0):
                features |= _AWS
            if wanted & _PEM and out.find(b"PRIVATE KEY") >= 0:
                features |= _PEM
        run, skip_plain = self._table[by_length[size if size < longest else longest]
                                      + by_digits[digits if digits < most_digits else most_digits] + features]
        if run:
            leftover = self._find(masked, run, skip_plain)
            if leftover:
                return f"[MASKED:{leftover[0][4].kind}]".encode()
        return out

    def masked_many(self, values: Iterable[bytes]) -> dict[bytes, bytes]:
        """The values that masking changes, each mapped to `masked_or_none(value)`: many values, few scans.

        On the per-value path most of a value's cost is the Python around the
        patterns, not the patterns. Here values are joined by NUL, a few
        hundred at a time, and the gate and each pattern it lets through run
        once over the joined text, in C; Python runs per finding, not per
        value. A NUL is where every pattern but the PEM block's stops, and
        their lookarounds and word boundaries read it as they read the text's edge (it is
        no word character, digit, separator or marker), so each value's findings
        are the ones it has alone. Values that hold a NUL themselves (text
        never does) take the per-value path. Equal values are scanned once.
        """
        distinct = list(dict.fromkeys(values))
        out: dict[bytes, bytes] = {}
        for first in range(0, len(distinct), _JOINED_VALUES):
            chunk = distinct[first:first + _JOINED_VALUES]
            joined = b"\0".join(chunk)
            if joined.count(0) != len(chunk) - 1:
                out.update((value, masked) for value in chunk if (masked := self.masked_or_none(value)) is not None)
            else:
                out.update(self._masked_joined(chunk, joined))
        return out

    def _masked_joined(self, values: list[bytes], joined: bytes) -> dict[bytes, bytes]:
        """`masked_many` for values that hold no NUL, joined by NUL: (value, masked) for those that change."""
        text = joined.decode("utf-8", "surrogateescape")
        indices, found = self._joined_findings(text, joined)
        if not found:
            return {}
        masked = self._replace(text, found).split("\0")
        changed = list(dict.fromkeys(indices))
        # The masked values' re-check (see `mask`): what the placeholders left may combine into a finding.
        rechecked = [masked[index] for index in changed]
        positions, leftovers = self._joined_findings("\0".join(rechecked))
        hidden: set[int] = set()
        for position, leftover in zip(positions, leftovers):
            if position not in hidden:  # the value's first leftover names what hides it whole
                hidden.add(position)
                rechecked[position] = f"[MASKED:{leftover[4].kind}]"
        return dict(zip([values[index] for index in changed],
                        [value.encode("utf-8", "surrogateescape") for value in rechecked]))

    def _joined_findings(self, text: str, raw: bytes | None = None) -> tuple[list[int], list[_Candidate]]:
        """What `_find` gives each of NUL-joined values, in text order, and the index of the value each is in.

        `raw` is `text` encoded, when the caller has it. Spans are the joined
        text's: findings never cross a NUL, and neither does the overlap rule
        (text order across values is value order).
        """
        run, _ = self._run_for(text.encode("utf-8", "surrogateescape") if raw is None else raw)
        if not run:
            return [], []
        if any(detector.crosses_nul for _, detector in run):
            return self._findings_one_by_one(text)
        candidates: list[_Candidate] = []
        patterns = 0  # how many patterns found something: one pattern's findings are in order and never overlap
        ascii = raw.isascii() if raw is not None else text.isascii()
        for index, detector in run:
            if detector.possible is not None and not detector.possible(text):
                continue  # a necessary condition of one value's finding holds on the joined text too
            matches = (detector.ascii_pattern if ascii else detector.pattern).finditer(text)
            is_valid, before = detector.is_valid, len(candidates)
            if is_valid is not _always:
                matches = filter(is_valid, matches)
            candidates += [(match.start(), -match.end(), index, match, detector) for match in matches]
            patterns += len(candidates) > before
        if patterns > 1:
            candidates = _chosen(candidates)
        indices, found = [], []
        if candidates:
            ends = list(accumulate(map(add, map(len, text.split("\0")), repeat(1))))  # each value's end and NUL
            plain, last = False, -1
            for candidate in candidates:
                index = bisect_right(ends, candidate[0])
                if index != last:  # PostgreSQL's numbers, dates and uuids hold no finding (see `_find`)
                    last = index
                    start = ends[index - 1] if index else 0
                    plain = text[start] in _PLAIN_FIRST and _PLAIN_VALUE.fullmatch(text, start, ends[index] - 1) is not None
                if not plain:
                    indices.append(index)
                    found.append(candidate)
        return indices, found

    def _findings_one_by_one(self, text: str) -> tuple[list[int], list[_Candidate]]:
        """`_joined_findings` value by value, for a run with a pattern that may cross a NUL (a PEM block)."""
        indices, found, start = [], [], 0
        for index, value in enumerate(text.split("\0")):
            run, skip_plain = self._run_for(value.encode("utf-8", "surrogateescape"))
            for begin, negative_end, priority, match, detector in self._find(value, run, skip_plain) if run else ():
                indices.append(index)
                found.append((begin + start, negative_end - start, priority, match, detector))
            start += len(value) + 1
        return indices, found

@lru_cache(maxsize=64)
def scanner_for(kinds: frozenset[str]) -> Scanner:
    """The shared Scanner for a set of detector names (Scanners are immutable: safe to share across threads)."""
    return Scanner(kinds)


def mask_text(text: str, detectors: Iterable[str]) -> tuple[str, tuple[Finding, ...]]:
    """Mask every finding of the named detectors in `text`; see `Scanner.mask`."""
    return scanner_for(frozenset(detectors)).mask(text)
