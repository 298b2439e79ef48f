"""The spool drainer outlives a broker that hangs longer than it waits (issue 17's 20 s broker hang, shortened).

The drainer is the only way events leave a proxy's spool. After a hang past its flush wait, kafka-python's
close of the failed producer raised the same timeout again and the drainer thread died: the proxy went on
spooling, nothing was delivered until it restarted, and the long form of the system test found 68 of 85
sessions never sealed. Here the broker (a dev broker of this test's own) is SIGSTOPped past the drainer's
flush wait and the producer's delivery timeout, then resumed: every event arrives, in order per session.
"""

from __future__ import annotations

import os
import signal
import time

from events_factory import frames, session_start
from ingest import kafka
from ingest.broker import DevBroker
from ingest.events import SessionChain, open_event
from ingest.producer import EventProducer
from ingest.settings import KafkaSettings
from ingest.spool import Spool

SHORT = {"request_timeout_ms": 1000, "delivery_timeout_ms": 2000, "max_block_ms": 1000}
HANG_SECONDS = 5.0


def test_the_drainer_delivers_everything_after_a_hang_past_its_flush_wait(proxy_key, tmp_path):
    chain = SessionChain(proxy_key, "proxy-1")
    with DevBroker(log_path=tmp_path / "tansu.log") as broker:
        settings = KafkaSettings(bootstrap=broker.bootstrap, topic_prefix="drain.", embedded_listen=broker.bootstrap,
                                 partitions=1)
        producer = EventProducer(settings, Spool(tmp_path / "spool", fsync_interval=0.005),
                                 producer_options=SHORT, flush_seconds=1.0)
        producer.send(chain.event("session_start", session_start()))
        assert producer.wait_delivered(timeout=30)
        os.kill(broker._process.pid, signal.SIGSTOP)
        try:
            for _ in range(50):  # into the hang: the drainer's window waits, fails, its producer's close fails
                producer.send(chain.event("frames", frames("SELECT 1")))
                time.sleep(HANG_SECONDS / 50)
        finally:
            os.kill(broker._process.pid, signal.SIGCONT)
        assert producer._drainer.is_alive(), "the drainer died in the hang"
        assert producer.wait_delivered(timeout=60), "what was spooled in the hang was never delivered"
        assert producer.stats.resent_windows >= 1  # the hang was felt
        producer.close()

        consumer = kafka.consumer(settings, settings.topic("events"), group_id=None)
        seqs: list[int] = []
        deadline = time.monotonic() + 30
        while len(set(seqs)) < 51 and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                seqs += [open_event(r.value).seq for r in batch]
        consumer.close()
    assert sorted(set(seqs)) == list(range(51)), "every event delivered"
    # a window the broker had taken before it stopped is sent again by the new producer: the ledger quarantines
    # such a copy as a duplicate (never sealed twice); the order per session holds
    first = {seq: i for i, seq in reversed(list(enumerate(seqs)))}
    assert [seq for seq, _ in sorted(first.items(), key=lambda kv: kv[1])] == list(range(51))
