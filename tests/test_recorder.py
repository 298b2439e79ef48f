"""The recorder between a proxy's data path and the spool: ordered, bounded, failing closed."""

from __future__ import annotations

import time

import pytest

from events_factory import frames, session_end, session_start
from ingest.consumer import Accepted, EventConsumer
from ingest.recorder import Recorder, RecorderUnavailable, SpoolOptions
from ingest.verify import EventVerifier


def test_recorded_sessions_arrive_signed_and_in_order(kafka_settings, proxy_key, keyring, tmp_path):
    recorder = Recorder(kafka_settings, SpoolOptions(tmp_path / "spool"), proxy_key, "proxy-test")
    sessions = [recorder.open_session() for _ in range(3)]
    for s in sessions:
        s.record("session_start", session_start())
    for i in range(20):
        sessions[i % 3].record("frames", frames(f"SELECT {i}"))
    for s in sessions:
        s.record("session_end", session_end())
    assert recorder.flush(timeout=30)
    recorder.close()

    consumer = EventConsumer(kafka_settings, EventVerifier(keyring), group_id="recorder-test")
    outcomes, deadline = [], time.monotonic() + 30
    while len(outcomes) < 26 and time.monotonic() < deadline:
        outcomes.extend(consumer.poll(0.5))
    consumer.close()
    assert all(isinstance(o, Accepted) for o in outcomes) and len(outcomes) == 26
    first = [o.event for o in outcomes if o.event.session_id == sessions[0].session_id]
    assert [e.kind for e in first][0] == "session_start" and first[-1].kind == "session_end"
    assert [m["statement"] for e in first[1:-1] for m in e.body["messages"]] == [f"SELECT {i}" for i in range(0, 20, 3)]


def test_full_queue_refuses_the_frame(kafka_settings, proxy_key, tmp_path):
    recorder = Recorder(kafka_settings, SpoolOptions(tmp_path / "spool"), proxy_key, "p", max_queue=5)
    session = recorder.open_session()
    with pytest.raises(RecorderUnavailable, match="queue full"):
        for _ in range(100_000):
            session.record("frames", frames())
    assert recorder.stats.refused == 1
    recorder.close()


def test_spool_failure_fails_closed_and_ends_the_session(proxy_key, tmp_path, kafka_settings):
    unreachable = type(kafka_settings)(bootstrap="127.0.0.1:1", topic_prefix="x.", embedded_listen="127.0.0.1:1", partitions=1)
    recorder = Recorder(unreachable, SpoolOptions(tmp_path / "spool", max_bytes=1 << 16), proxy_key, "p")
    session = recorder.open_session()
    with pytest.raises(RecorderUnavailable):
        for _ in range(10_000):
            session.record("frames", frames(payload=b"x" * 512))
            time.sleep(0.0005)
    assert session.broken
    with pytest.raises(RecorderUnavailable):
        recorder.open_session().record("session_start", session_start())
    recorder.close(timeout=0.1)


def test_when_the_proxy_process_dies_the_recorder_still_delivers_what_reached_it(kafka_settings, proxy_key, keyring,
                                                                                 tmp_path):
    """SIGKILL the process holding the Recorder: what it handed over is spooled and sent, not stranded."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    seed_file = tmp_path / "seed"
    seed_file.write_bytes(bytes(proxy_key.signing_key))
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path[:0] = {[str(p) for p in sys.path if p]!r}
        from nacl.signing import SigningKey
        from events_factory import frames, session_start
        from ingest.keys import PrivateKey
        from ingest.recorder import Recorder, SpoolOptions
        from ingest.settings import KafkaSettings
        settings = KafkaSettings(bootstrap={kafka_settings.bootstrap!r}, topic_prefix={kafka_settings.topic_prefix!r},
                                 embedded_listen={kafka_settings.bootstrap!r}, partitions=3)
        key = PrivateKey({proxy_key.key_id!r}, SigningKey(open({str(seed_file)!r}, "rb").read()))
        recorder = Recorder(settings, SpoolOptions({str(tmp_path / "spool")!r}), key, "doomed-proxy")
        session = recorder.open_session()
        session.record("session_start", session_start())
        for i in range(49):
            session.record("frames", frames(f"SELECT {{i}}"))
        time.sleep(3)  # the queue's feeder has written everything to the pipe
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert process.returncode == -signal.SIGKILL, process.stderr

    consumer = EventConsumer(kafka_settings, EventVerifier(keyring), group_id="doomed-test")
    outcomes, deadline = [], time.monotonic() + 40
    while len(outcomes) < 50 and time.monotonic() < deadline:
        outcomes.extend(consumer.poll(0.5))
    consumer.close()
    assert [o.event.seq for o in outcomes if isinstance(o, Accepted)] == list(range(50))
