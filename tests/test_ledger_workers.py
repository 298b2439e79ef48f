"""Two ledger worker processes on one host, one consumer group, a topic of 3 partitions: every event is sealed
exactly once, by whichever worker owns its partition, and the ledger verifies clean.

Also folded (contract-v2) events of many messages each, so segment writing is exercised per message too."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from events_factory import frames, session_end, session_start
from ingest.events import SessionChain
from ingest.producer import EventProducer
from ingest.spool import Spool
from ledger.verify import verify_ledger
from test_ledger_crash import ROOT, sealed_values, write_config

SESSIONS = 24
FRAMES_PER_SESSION = 30
FOLDED_MESSAGES = 200


def folded_frames(seq: int) -> dict:
    """One event carrying FOLDED_MESSAGES messages, both directions (contract v2)."""
    messages = []
    for i in range(FOLDED_MESSAGES):
        if i % 2:
            messages.append({"type": "DataRow", "data": b"D" + i.to_bytes(4, "big"), "direction": "server",
                             "offset_us": i})
        else:
            messages.append({**frames(f"SELECT {seq}, {i}")["messages"][0], "direction": "client", "offset_us": i})
    return {"direction": "mixed", "messages": messages}


def start_worker(config: Path, log, instance: str, group: str) -> subprocess.Popen:
    """`custody ledger` as a static member of `group` (this test's own: no member of another test's group can
    fence it), logging (--debug) which partitions it resumes."""
    return subprocess.Popen([sys.executable, "-m", "custody", "--debug", "ledger", "--config", str(config),
                             "--group", group, "--instance", instance], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def test_two_worker_processes_seal_every_event_exactly_once(kafka_settings, proxy_key, keyring, tmp_path):
    config = write_config(tmp_path, kafka_settings, keyring)
    ledger_dir = tmp_path / "ledger"
    producer = EventProducer(kafka_settings, Spool(tmp_path / "spool"))
    values = []
    for n in range(SESSIONS):
        chain = SessionChain(proxy_key, "workers-proxy")
        events = [chain.event("session_start", session_start(f"user{n}@example.com"))]
        for seq in range(1, FRAMES_PER_SESSION):
            events.append(chain.event("frames", folded_frames(seq) if seq % 10 == 0 else frames(f"SELECT {seq}")))
        events.append(chain.event("session_end", session_end()))
        for event in events:
            producer.send(event)
            values.append(event.value)
    assert producer.wait_delivered(timeout=60)
    producer.close()
    produced = Counter(values)

    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    group = f"ledger-workers-{uuid.uuid4().hex[:8]}"
    workers = [start_worker(config, open(path, "ab"), f"worker-{i}", group) for i, path in enumerate(logs)]
    tails = lambda: "\n".join(path.read_text(errors="replace")[-1500:] for path in logs)  # noqa: E731
    try:
        deadline = time.monotonic() + 90
        while (found := sealed_values(ledger_dir)) != produced and time.monotonic() < deadline:
            assert all(w.poll() is None for w in workers), tails()
            time.sleep(0.5)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        codes = [worker.wait(timeout=30) for worker in workers]
    assert codes == [0, 0], tails()
    resumed = [{int(line.split("partition ")[1].split(":")[0]) for line in path.read_text(errors="replace").splitlines()
                if "ledger.service: partition" in line and "resuming" in line} for path in logs]
    assert all(resumed), f"a worker never owned a partition: {resumed}"
    assert set().union(*resumed) == {0, 1, 2}

    assert set(found) == set(produced), f"{len(set(produced) - set(found))} events missing"
    assert max(found.values()) == 1, "an event was sealed twice"
    chains = sorted(p.name for p in (ledger_dir / "seals").iterdir())
    assert chains == ["p0", "p1", "p2"]
    folded = sum(len(m) for path in ledger_dir.glob("segments/p*/*.parquet")
                 for m in pq.read_table(path, columns=["messages"]).column("messages").to_pylist() if m)
    assert folded == SESSIONS * ((FRAMES_PER_SESSION - 1) + (FOLDED_MESSAGES - 1) * 2)
    report = verify_ledger(ledger_dir, keyring, "custody.test/crash")
    assert report.ok, report.summary()
    assert report.events_valid == len(produced)
