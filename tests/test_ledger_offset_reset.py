"""A dead broker (issue 17): the dev broker keeps its log in memory, so killed and restarted it comes back
empty and its offsets start again at 0, below what the ledger read. The ledger must notice and say so, seal
what it read from the old log, seal the new log's events in a seal that states where the old offsets ended,
and `verify` must name the discontinuity, never report it as a forgery, and lose nothing the new log holds.

A broker with persistent storage (Tansu on PostgreSQL, a real cluster) keeps its offsets across a restart;
this is what happens when it does not, or when the topic is recreated.
"""

from __future__ import annotations

import time

from conftest import make_key
from events_factory import frames, session_end, session_start
from ingest import kafka
from ingest.broker import DevBroker
from ingest.events import SessionChain
from ingest.keys import Keyring, TrustedKey
from ingest.settings import KafkaSettings
from ledger.seals import Seal, seal_relpath
from ledger.service import LedgerService
from ledger.settings import LedgerSettings
from ledger.verify import verify_ledger

ORIGIN = "custody.test/offset-reset"


def test_offsets_that_go_back_are_sealed_said_and_verified(proxy_key, tmp_path, caplog):
    ledger_key = make_key("ledger")
    keyring = Keyring([TrustedKey(proxy_key.key_id, "proxy", proxy_key.public_key),
                       TrustedKey(ledger_key.key_id, "ledger", ledger_key.public_key)])
    before, after = SessionChain(proxy_key, "proxy-1"), SessionChain(proxy_key, "proxy-1")
    with DevBroker(log_path=tmp_path / "tansu.log") as broker:
        settings = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix="reset.", embedded_listen=broker.bootstrap,
                                 partitions=1)
        ledger_settings = LedgerSettings(dir=tmp_path / "ledger", origin=ORIGIN, segment_max_events=1000,
                                         segment_max_bytes=1 << 24, segment_max_seconds=0.3, idle_seal_seconds=3600)
        ledger = LedgerService(settings, ledger_settings, ledger_key, keyring, partitions=[0])
        writer = ledger.writers[0]

        def send(events) -> None:
            producer = kafka.producer(settings)
            for e in events:
                producer.send(settings.topic("events"), key=e.session_id.encode(), value=e.value, partition=0)
            producer.flush()
            producer.close()

        def run_until(done, seconds: float = 60.0) -> None:
            deadline = time.monotonic() + seconds
            while not done():
                assert time.monotonic() < deadline, (f"the ledger did not get there in time: next seal "
                                                     f"{writer.state.next_seal_number}, offset {writer.state.next_offset}")
                ledger.step(0.1)

        old_log = [before.event("session_start", session_start()), before.event("frames", frames("SELECT 1")),
                   before.event("session_end", session_end())]
        send(old_log)
        run_until(lambda: writer.state.next_seal_number == 2)  # seal 1: offsets 0..3 of the old log
        broker.restart()  # memory storage: an empty log, offsets from 0 again
        new_log = [after.event("session_start", session_start()), after.event("session_end", session_end())]
        send(new_log)
        run_until(lambda: writer.state.next_seal_number == 3)
        ledger.close()

    first, second = (Seal.load(tmp_path / "ledger" / seal_relpath(0, n)) for n in (1, 2))
    assert (first.record["kafka"]["first_offset"], first.next_offset) == (0, 3)
    assert second.record["kafka"] == {**second.record["kafka"], "first_offset": 0, "next_offset": 2,
                                      "offset_reset_from": 3}
    assert second.record["leaves"] == {"first": 3, "count": 2}  # the tree goes on: nothing lost, nothing twice
    assert any("offsets went back from 3 to 0" in r.getMessage() for r in caplog.records)

    from query.views import open_ledger  # the query layer reads a seal that says so, as any other
    con = open_ledger(tmp_path / "ledger")
    assert con.sql("SELECT first_offset, next_offset FROM seals ORDER BY number").fetchall() == [(0, 3), (0, 2)]
    assert con.sql("SELECT count(*) FROM events").fetchall() == [(5,)]
    con.close()

    report = verify_ledger(tmp_path / "ledger", keyring, ORIGIN)
    assert report.ok, report
    assert any("seal 2: the broker's offsets went back from 3 to 0" in note for note in report.notes), report.notes


def test_a_seal_that_claims_an_offset_reset_it_does_not_continue_from_fails_verify(proxy_key, tmp_path):
    """A forged discontinuity: the seal's `offset_reset_from` must be where the previous seal ended."""
    from ledger.verify import SealContext, SealRangeError, check_seal_ranges

    class Previous:
        tree_size, next_offset = 3, 3

    seal = Seal({"leaves": {"first": 3, "count": 2}, "tree": {"size": 5, "root": ""}, "segment": {"path": "x"},
                 "kafka": {"first_offset": 0, "next_offset": 2, "offset_reset_from": 7}}, b"", b"", ())
    try:
        check_seal_ranges(seal, SealContext("Seal seals/p0/000002.json", Keyring([]), Previous()))
    except SealRangeError as exc:
        assert "went back from 7 to 0, but the previous seal ended at 3" in str(exc)
    else:
        raise AssertionError("a forged offset reset verified")
