"""Detectors for sensitive values in free text, and `mask_text` that hides them.

Each detector is a regular expression that finds candidates plus a validator
that confirms them (Luhn, ISO 13616 mod-97, SSN area rules, a JWT header that
decodes), so that ids, timestamps and amounts are not masked by accident: a
masked value is a value the client can no longer use, so a false positive is
a bug, not caution.

This runs on every DataRow value, so the scanner first skips values that
cannot hold a finding: too short, or PostgreSQL's rendering of a number,
date, timestamp or uuid. A detector's pattern then only runs on text that has
what every finding of its kind has: enough digits (counted once, in C), or a
marker such as "@", "eyJ", "AKIA". Most values never reach a pattern.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["DETECTORS", "Finding", "Scanner", "UnknownDetectorError", "mask_text", "scanner_for"]

_MIN_FINDING_LENGTH = 6  # the shortest finding of any detector ("a@b.co")
_WITHOUT_DIGITS = str.maketrans("", "", "0123456789")
# How PostgreSQL prints integers, numerics (at most 12 digits a side: no room for a
# 13-digit card), dates, timestamps and uuids: none of these can hold a finding.
_PLAIN_VALUE = re.compile(
    r"-?\d{1,12}(?:\.\d{1,12})?"
    r"|\d{4}-\d\d-\d\d(?:[ T]\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:[+-]\d\d(?::\d\d)?|Z)?)?"
    r"|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
)


class UnknownDetectorError(ValueError):
    """A detector name that does not exist (a typo in a policy file)."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One detected value: its kind and its span in the scanned text."""

    kind: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class _Detector:
    """A pattern, its validator and placeholder, and what a text needs before the pattern is worth running.

    Every detector needs some digits or one of its markers; that is what lets
    the scanner turn most text away before looking at any detector.
    """

    kind: str
    pattern: re.Pattern[str]
    is_valid: Callable[[re.Match[str]], bool]
    placeholder: Callable[[re.Match[str]], str]
    min_length: int
    min_digits: int = 0
    needs_any_of: tuple[str, ...] = ()

    def could_match(self, text: str, digits: int) -> bool:
        return (
            len(text) >= self.min_length
            and digits >= self.min_digits
            and (not self.needs_any_of or any(needle in text for needle in self.needs_any_of))
        )


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _opaque(kind: str) -> Callable[[re.Match[str]], str]:
    placeholder = f"[MASKED:{kind}]"
    return lambda match: placeholder


def _always(match: re.Match[str]) -> bool:
    return True


# --- credit cards: brand prefix + length, then Luhn -------------------------

_CARD = re.compile(
    r"(?<![\d-])(?:"
    r"\d{4}([ -]?)\d{4}\1\d{4}\1\d{1,7}"  # 4-4-4-x (Visa, Mastercard, Discover, JCB, UnionPay)
    r"|\d{4}([ -]?)\d{6}\2\d{4,5}"  # 4-6-5 (Amex) and 4-6-4 (Diners)
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


def luhn_ok(digits: str) -> bool:
    """The Luhn mod-10 check every payment card number satisfies."""
    total = 0
    for position, ch in enumerate(reversed(digits)):
        value = ord(ch) - 48
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card_valid(match: re.Match[str]) -> bool:
    digits = _digits(match.group())
    brand_ok = any(low <= digits[: len(low)] <= high and len(digits) in lengths for low, high, lengths in _CARD_BRANDS)
    return brand_ok and luhn_ok(digits)


def _card_placeholder(match: re.Match[str]) -> str:
    return "**** **** **** " + _digits(match.group())[-4:]


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
        _Detector("private_key", _PRIVATE_KEY, _always, _opaque("private_key"), 27, needs_any_of=("PRIVATE KEY",)),
        _Detector("jwt", _JWT, _jwt_valid, _opaque("jwt"), 10, needs_any_of=("eyJ",)),
        _Detector("aws_access_key", _AWS_KEY, _always, _opaque("aws_access_key"), 20, needs_any_of=("AKIA", "ASIA")),
        _Detector("iban", _IBAN, lambda m: iban_ok(m.group()), _opaque("iban"), 15, min_digits=2),
        _Detector("credit_card", _CARD, _card_valid, _card_placeholder, 13, min_digits=13),
        _Detector("email", _EMAIL, _always, _email_placeholder, 6, needs_any_of=("@",)),
        _Detector("us_ssn", _SSN, _ssn_valid, _ssn_placeholder, 11, min_digits=9, needs_any_of=("-",)),
        _Detector("phone", _PHONE, _phone_valid, _opaque("phone"), 9, min_digits=8),
    )
}


class Scanner:
    """A fixed set of detectors, resolved once (per mask plan), applied to many values."""

    def __init__(self, kinds: Iterable[str]):
        wanted = set(kinds)
        unknown = wanted - DETECTORS.keys()
        if unknown:
            raise UnknownDetectorError(f"unknown detector {sorted(unknown)[0]!r}; known: {', '.join(DETECTORS)}")
        self.detectors = tuple(d for kind, d in DETECTORS.items() if kind in wanted)
        self._fewest_digits = min((d.min_digits for d in self.detectors if d.min_digits), default=sys.maxsize)
        self._markers = tuple(marker for d in self.detectors if not d.min_digits for marker in d.needs_any_of)

    def _find(self, text: str) -> list[tuple[Finding, re.Match[str], _Detector]]:
        """Validated, non-overlapping findings in text order (earliest first, then longest)."""
        if len(text) < _MIN_FINDING_LENGTH or _PLAIN_VALUE.fullmatch(text):
            return []
        digits = len(text) - len(text.translate(_WITHOUT_DIGITS))
        if digits < self._fewest_digits and not any(marker in text for marker in self._markers):
            return []
        candidates = [
            (match.start(), -match.end(), index, match, detector)
            for index, detector in enumerate(self.detectors)
            if detector.could_match(text, digits)
            for match in detector.pattern.finditer(text)
            if detector.is_valid(match)
        ]
        if not candidates:
            return []
        candidates.sort(key=lambda c: c[:3])
        chosen, covered_until = [], 0
        for start, negative_end, _, match, detector in candidates:
            if start >= covered_until:
                chosen.append((Finding(detector.kind, start, -negative_end), match, detector))
                covered_until = -negative_end
        return chosen

    def mask(self, text: str) -> tuple[str, tuple[Finding, ...]]:
        """`text` with every finding replaced by its placeholder, and the findings (spans in `text`).

        Placeholders keep a little shape (last four card digits, the email's
        domain). Overlapping findings are masked once, so the rest of a
        dropped overlap, or a placeholder's shape, can combine with its
        neighbours into a new finding (`4111 1111 1111 1111a@example.com`);
        then the whole text is masked instead, so the output never holds a
        detectable value.
        """
        found = self._find(text)
        if not found:
            return text, ()
        pieces, cursor = [], 0
        for finding, match, detector in found:
            pieces.append(text[cursor : finding.start])
            pieces.append(detector.placeholder(match))
            cursor = finding.end
        pieces.append(text[cursor:])
        masked = "".join(pieces)
        findings = tuple(f for f, _, _ in found)
        leftover = self._find(masked)
        if leftover:
            return f"[MASKED:{leftover[0][0].kind}]", findings + (Finding(leftover[0][0].kind, 0, len(text)),)
        return masked, findings


@lru_cache(maxsize=64)
def scanner_for(kinds: frozenset[str]) -> Scanner:
    """The shared Scanner for a set of detector names."""
    return Scanner(kinds)


def mask_text(text: str, detectors: Iterable[str]) -> tuple[str, tuple[Finding, ...]]:
    """Mask every finding of the named detectors in `text`; see `Scanner.mask`."""
    return scanner_for(frozenset(detectors)).mask(text)
