"""The recorder between a proxy's data path and the spool: ordered, bounded, failing closed."""

from __future__ import annotations

import time

import pytest

from events_factory import frames, session_end, session_start
from ingest.consumer import Accepted, EventConsumer
from ingest.recorder import Pressure, Recorder, RecorderUnavailable, SpoolOptions
from ingest.verify import EventVerifier
from proxy.core.server import heaviest


def consume_sessions(kafka_settings, keyring, sessions: int, timeout: float = 30) -> list:
    """Verified events until `sessions` SessionEnds arrived. No consumer group: this test's topic is its own and
    is read from the start; joining a group costs the dev broker about 3 s, and what is tested is the recorder."""
    consumer = EventConsumer(kafka_settings, EventVerifier(keyring), group_id=None)
    outcomes, deadline = [], time.monotonic() + timeout
    while sum(o.event.kind == "session_end" for o in outcomes if isinstance(o, Accepted)) < sessions \
            and time.monotonic() < deadline:
        outcomes.extend(consumer.poll(0.5))
    consumer.close()
    assert all(isinstance(o, Accepted) for o in outcomes)
    return [o.event for o in outcomes]


def stop_orphan(pid: int) -> None:
    """SIGKILL the orphaned recorder child `pid` once it has delivered (it would outlive the test by seconds),
    after checking that the pid is still that multiprocessing child and not a process that reused the number."""
    import os
    import signal
    from pathlib import Path

    try:
        if pid > 1 and b"multiprocessing" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass  # it ended on its own


def statements_of(events) -> list[str]:
    return [m["statement"] for e in events if e.kind == "frames" for m in e.body["messages"]]


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

    events = consume_sessions(kafka_settings, keyring, 3)
    first = [e for e in events if e.session_id == sessions[0].session_id]
    assert [e.seq for e in first] == list(range(len(first)))
    assert first[0].kind == "session_start" and first[-1].kind == "session_end"
    assert statements_of(first) == [f"SELECT {i}" for i in range(0, 20, 3)]
    assert recorder.stats.recorded == 26 and recorder.stats.frames == 20


def test_frames_that_wait_together_become_one_event_and_keep_their_order(kafka_settings, proxy_key, keyring,
                                                                          tmp_path):
    """Under load one event carries many frames: events/s stop growing, frames/s do not."""
    recorder = Recorder(kafka_settings, SpoolOptions(tmp_path / "spool"), proxy_key, "proxy-test")
    session = recorder.open_session()
    session.record("session_start", session_start())
    for i in range(3000):
        session.record("frames", frames(f"SELECT {i}"))
    session.record("session_end", session_end())
    assert recorder.flush(timeout=30)
    recorder.close()
    events = consume_sessions(kafka_settings, keyring, 1)
    assert statements_of(events) == [f"SELECT {i}" for i in range(3000)]
    assert len(events) < 1000 and recorder.stats.events_written == len(events)
    folded = max((e for e in events if e.kind == "frames"), key=lambda e: len(e.body["messages"]))
    offsets = [m.get("offset_us") or 0 for m in folded.body["messages"]]
    assert offsets == sorted(offsets) and offsets[-1] > 0


def test_a_backlog_slows_the_proxy_down_instead_of_refusing(kafka_settings, proxy_key, tmp_path):
    recorder = Recorder(kafka_settings, SpoolOptions(tmp_path / "spool"), proxy_key, "p", max_queue=20)
    pressure: list[Pressure] = []
    recorder.on_pressure(pressure.append)
    session = recorder.open_session()
    for _ in range(5000):  # a proxy stops reading when told; this one stops recording
        session.record("frames", frames())
        if pressure:
            break
    assert pressure == [Pressure.HEAVY] and recorder.stats.refused == 0 and recorder.backlog >= 20
    for _ in range(20):  # a proxy that goes on recording after HEAVY is told to stop reading from everyone
        session.record("frames", frames())
    assert pressure[-1] is Pressure.ALL
    assert recorder.flush(timeout=30)
    deadline = time.monotonic() + 10
    while pressure[-1] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pressure[-1] is Pressure.NONE and recorder.stats.throttled >= 2
    assert recorder.stats.max_backlog >= 20 and recorder.stats.max_backlog_frames >= 20
    recorder.close()


def test_a_dead_recorder_process_refuses_the_frame(kafka_settings, proxy_key, tmp_path):
    recorder = Recorder(kafka_settings, SpoolOptions(tmp_path / "spool"), proxy_key, "p")
    recorder._process.kill()
    recorder._process.join(10)
    with pytest.raises(RecorderUnavailable, match="recorder process exited"):
        recorder.open_session().record("frames", frames())
    assert recorder.stats.refused == 1
    recorder.close(timeout=0.1)


def test_a_proxy_waits_for_its_recorder_to_start_and_hears_of_one_that_cannot(kafka_settings, proxy_key, tmp_path):
    recorder = Recorder(kafka_settings, SpoolOptions(tmp_path / "spool"), proxy_key, "p")
    recorder.wait_ready(timeout=60)
    recorder.close(timeout=0.1)
    (tmp_path / "not-a-dir").write_text("a file where the spool directory should be")
    broken = Recorder(kafka_settings, SpoolOptions(tmp_path / "not-a-dir" / "spool"), proxy_key, "p")
    with pytest.raises(RecorderUnavailable, match=r"^the recorder process exited with code 1 while starting$"):
        broken.wait_ready(timeout=60)
    broken.close(timeout=0.1)


def test_spool_failure_fails_closed_and_ends_the_session(proxy_key, tmp_path, kafka_settings):
    unreachable = type(kafka_settings)(bootstrap="127.0.0.1:1", topic_prefix="x.", embedded_listen="127.0.0.1:1", partitions=1)
    recorder = Recorder(unreachable, SpoolOptions(tmp_path / "spool", max_bytes=1 << 16), proxy_key, "p")
    session = recorder.open_session()
    deadline = time.monotonic() + 60  # bounded in time, not count: a loaded machine starts the child slowly
    with pytest.raises(RecorderUnavailable):
        while time.monotonic() < deadline:
            session.record("frames", frames(payload=b"x" * 512))
            time.sleep(0.0005)
    deadline = time.monotonic() + 10  # the child says "failed" (spool full), then "broken" for the session: the
    while (recorder._failure is None or not session.broken) and time.monotonic() < deadline:  # first may stop us
        time.sleep(0.05)
    assert session.broken and recorder._failure is not None
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
        print(recorder._process.pid, flush=True)
        time.sleep(3)  # the recorder has started (off an event loop each hand-over was in the pipe at once)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    # Not subprocess.run(capture_output=True): the orphaned recorder inherits the pipes, and waiting for their end
    # waited for the orphan's own exit, some 15 s after it had delivered everything.
    log = tmp_path / "doomed.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=stderr)
    orphan = int(process.stdout.readline() or 0)
    process.stdout.close()
    assert process.wait(timeout=60) == -signal.SIGKILL, log.read_text()

    consumer = EventConsumer(kafka_settings, EventVerifier(keyring), group_id=None)
    events, deadline = [], time.monotonic() + 40
    while len(statements_of(events)) < 49 and time.monotonic() < deadline:
        events.extend(o.event for o in consumer.poll(0.5) if isinstance(o, Accepted))
    consumer.close()
    stop_orphan(orphan)
    assert [e.seq for e in events] == list(range(len(events))) and events[0].kind == "session_start"
    assert statements_of(events) == [f"SELECT {i}" for i in range(49)]


def test_the_bulk_session_not_the_chatty_one_is_slowed_when_bytes_fill_the_backlog(kafka_settings, proxy_key,
                                                                                    tmp_path):
    """Whom HEAVY pauses: the sessions that filled the most of the bounds. Counted in events, a chatty session of
    many small frames outweighed a bulk transfer of few large ones whose bytes were what filled the backlog."""
    recorder = Recorder(kafka_settings, SpoolOptions(tmp_path / "spool"), proxy_key, "p", max_queue=10_000,
                        max_queue_bytes=1 << 20)
    chatty, bulk = recorder.open_session(), recorder.open_session()
    for i in range(300):
        chatty.record("frames", frames(payload=b"SELECT 1"))
        if i % 30 == 0:
            bulk.record("frames", frames(payload=b"x" * (64 << 10)))
    assert heaviest([chatty.recent, bulk.recent]) == [False, True]
    assert bulk.recent > 10 * 64 * 1024 / (1 << 20)  # 10 frames of 64 KiB: over half of the byte bound
    recorder.close()


def test_a_backlog_of_few_large_frames_slows_the_proxy_down_too(kafka_settings, proxy_key, tmp_path):
    """A bulk transfer's events are few but large: the byte bound throttles it before memory runs away."""
    recorder = Recorder(kafka_settings, SpoolOptions(tmp_path / "spool"), proxy_key, "p", max_queue=10_000,
                        max_queue_bytes=1 << 20)
    pressure: list[Pressure] = []
    recorder.on_pressure(pressure.append)
    session = recorder.open_session()
    for _ in range(200):
        session.record("frames", frames(payload=b"x" * (64 << 10)))
        if pressure:
            break
    assert pressure == [Pressure.HEAVY] and recorder.backlog < 100 and recorder.backlog_bytes >= 1 << 20
    assert recorder.flush(timeout=30)
    deadline = time.monotonic() + 10
    while pressure[-1] is not Pressure.NONE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pressure[-1] is Pressure.NONE and recorder.stats.max_backlog_bytes >= 1 << 20
    recorder.close()
