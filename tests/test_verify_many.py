"""`EventVerifier.check_many`: the outcomes `check` gives one by one, yielded while later records are still read."""

from __future__ import annotations

import random

from events_factory import frames, session_start
from ingest.events import SessionChain
from ingest.verify import CHUNK, LOOKAHEAD, EventVerifier, Rejection


def mixed_stream(proxy_key, count: int) -> list[tuple[bytes, bytes | None]]:
    """(value, Kafka key) of interleaved sessions with every kind of bad record among the good ones."""
    rng = random.Random(7)
    chains = [SessionChain(proxy_key, "p") for _ in range(5)]
    stream: list[tuple[bytes, bytes | None]] = []
    while len(stream) < count:
        chain = rng.choice(chains)
        event = chain.event("frames", frames(f"SELECT {chain.next_seq}")) if chain.next_seq else \
            chain.event("session_start", session_start())
        key = event.session_id.encode()
        damage = rng.random()
        if damage < 0.02:
            flipped = bytearray(event.value)
            flipped[-3] ^= 1
            stream.append((bytes(flipped), key))        # bad_signature
        elif damage < 0.04:
            stream.append((event.value[:-9], key))      # malformed
        elif damage < 0.06:
            stream.append((event.value, b"someone else"))  # key_mismatch
        elif damage < 0.08:
            stream += [(event.value, key), (event.value, key)]  # the second: duplicate
        elif damage < 0.09:
            chain.event("frames", frames("lost"))  # the next of this session: seq_gap (and its followers)
            stream.append((event.value, key))
        else:
            stream.append((event.value, key))
    return stream


def described(outcome) -> tuple:
    if isinstance(outcome, Rejection):
        return ("rejected", outcome.reason, outcome.detail)
    return ("accepted", outcome.session_id, outcome.seq, outcome.hash)


def test_check_many_gives_each_record_the_outcome_check_gives_it(proxy_key, keyring) -> None:
    stream = mixed_stream(proxy_key, CHUNK * (LOOKAHEAD + 3) + 17)
    one_by_one = []
    verifier = EventVerifier(keyring)
    for value, key in stream:
        try:
            one_by_one.append(described(verifier.check(value, key)))
        except Rejection as rejection:
            one_by_one.append(described(rejection))
    many = [described(o) for o in EventVerifier(keyring).check_many(stream)]
    assert many == one_by_one
    reasons = {o[1] for o in many if o[0] == "rejected"}
    assert reasons >= {"bad_signature", "malformed", "key_mismatch", "duplicate", "seq_gap"}


def test_outcomes_come_while_later_records_are_still_being_read(proxy_key, keyring) -> None:
    """The caller works on the first chunks while the verify threads check the next ones."""
    stream = mixed_stream(proxy_key, CHUNK * (LOOKAHEAD + 4))
    taken = 0

    def records():
        nonlocal taken
        for item in stream:
            taken += 1
            yield item

    outcomes = EventVerifier(keyring).check_many(records())
    next(outcomes)
    assert taken < len(stream)
    assert len(list(outcomes)) == len(stream) - 1
