"""A segment built a chunk of rows at a time (ledger.segments.CHUNK_ROWS) is the segment one conversion of all
its rows makes: the same table and the same Parquet bytes, whatever the number of rows around the boundary."""

from __future__ import annotations

import hashlib
import random

import pytest

from conftest import make_key
from ingest.events import SessionChain, open_event
from ingest.sessions import NO_IDENTITY, SessionIdentity
from ledger import segments


@pytest.fixture(scope="module")
def events():
    """Frames of varied messages (nulls and values in every optional field the row reads) over a few sessions."""
    rng = random.Random(7)
    chains = [SessionChain(make_key(), "test") for _ in range(5)]
    out = []
    for _ in range(70):
        messages = [{"type": rng.choice(["DataRow", "CommandComplete"]), "data": rng.randbytes(rng.randrange(40)),
                     "statement": rng.choice([None, "select 1"]), "rows": rng.choice([None, 0, 3]),
                     "command_tag": rng.choice([None, "SELECT 3"]), "offset_us": rng.choice([None, 12]),
                     "parameters": rng.choice([None, [], ["a", None]]), "error_code": rng.choice([None, "42P01"])}
                    for _ in range(rng.randrange(4))]
        out.append(open_event(rng.choice(chains).event("frames", {"direction": "server", "messages": messages}).value))
    return out


def build(events, n: int) -> segments.SegmentBuilder:
    builder = segments.SegmentBuilder(2)
    identity = SessionIdentity("alice", "a@example.com", ["dba"], "idp", "10.0.0.1", "db", "postgres", "psql")
    for i, event in enumerate(events[:n]):
        builder.add(i, 100 + i, event, hashlib.sha256(event.value).digest(), bytes([i % 256]) * 32,
                    identity if i % 3 else NO_IDENTITY)
    return builder


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 70])
def test_chunked_segment_is_the_one_conversion_segment(events, n, monkeypatch):
    monkeypatch.setattr(segments, "CHUNK_ROWS", 16)
    chunked = build(events, n)
    assert len(chunked) == n and len(chunked._chunks) == n // 16  # the chunked path is the one taken
    monkeypatch.setattr(segments, "CHUNK_ROWS", 1 << 30)
    whole = build(events, n)
    chunked_table, whole_table = chunked.table(), whole.table()
    assert chunked_table.num_rows == n and chunked_table.schema == segments.SCHEMA
    assert chunked_table.equals(whole_table)
    assert bytes(segments.encode_segment(chunked_table)) == bytes(segments.encode_segment(whole_table))
