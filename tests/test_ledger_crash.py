"""SIGKILL the ledger at random moments while a producer writes: afterwards every event is sealed exactly once.

CI kills it 14 times (~85 s); `CUSTODY_SYSTEM=long` (the long form of the fault tests, tests/system) 23 times,
as before (~110 s: each group-mode kill waits out the dead member's 15 s group session before the next owns a
partition, and the suite must stay well under CI's 20 minutes)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from events_factory import frames, session_end, session_start
from ingest.events import SessionChain
from ingest.keys import Keyring, TrustedKey, generate_key_file
from ingest.producer import EventProducer
from ingest.spool import Spool

KILLS = 23 if os.environ.get("CUSTODY_SYSTEM", "short") == "long" else 14
ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp_path: Path, kafka_settings, keyring: Keyring) -> Path:
    ledger_key = generate_key_file(tmp_path / "keys" / "ledger.key", "ledger")
    keyring.add(TrustedKey(ledger_key.key_id, "ledger", ledger_key.public_key))
    keyring.save(tmp_path / "keys" / "keyring.toml")
    config = tmp_path / "custody.toml"
    config.write_text(f"""
[kafka]
bootstrap = "{kafka_settings.bootstrap}"
topic_prefix = "{kafka_settings.topic_prefix}"
partitions = {kafka_settings.partitions}

[keys]
ledger_key = "keys/ledger.key"
keyring = "keys/keyring.toml"

[ledger]
dir = "ledger"
origin = "custody.test/crash"
segment_max_events = 150
segment_max_seconds = 0.25
idle_seal_seconds = 2
""")
    return config


class Writer(threading.Thread):
    """Sessions that start, run statements and end, sent through the spool-first producer."""

    def __init__(self, producer: EventProducer, key, rate: float = 400.0):
        super().__init__(daemon=True)
        self.producer, self.key, self.interval = producer, key, 1 / rate
        self.stop, self.values = threading.Event(), []

    def run(self) -> None:
        chains = [SessionChain(self.key, "crash-proxy") for _ in range(12)]
        rng = random.Random(7)
        while not self.stop.is_set():
            i = rng.randrange(len(chains))
            chain = chains[i]
            if chain.next_seq == 0:
                event = chain.event("session_start", session_start(f"user{i}@example.com"))
            elif chain.next_seq > 40 and rng.random() < 0.1:
                event = chain.event("session_end", session_end())
                chains[i] = SessionChain(self.key, "crash-proxy")
            else:
                event = chain.event("frames", frames(f"SELECT {chain.next_seq}"))
            self.producer.send(event)
            self.values.append(event.value)
            time.sleep(self.interval)


GROUP = ("--instance", "crash-test-ledger")
PINNED = ("--partitions", "0,1,2")
GROUP_JOIN_TIMEOUT = 60.0
"""A group member's (re)join takes the dev broker 6-9 s; a group-mode kill comes only once the member owns a
partition. Killed at a fixed 7-9 s, two of the three group members of a loaded run had not joined yet."""


def start_ledger(config: Path, log, mode: tuple[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "custody", "ledger", "--config", str(config), *mode],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def owns_a_partition(ledger: subprocess.Popen, ledger_dir: Path) -> bool:
    """Whether the worker holds a partition's lock (ledger.state.PartitionLock, an flock), read from /proc/locks
    so that looking cannot take the lock from it."""
    inodes = {str(path.stat().st_ino) for path in (ledger_dir / "state").glob("p*.lock")}
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[4] == str(ledger.pid) \
                and fields[5].rsplit(":", 1)[-1] in inodes:
            return True
    return False


def wait_owning(ledger: subprocess.Popen, ledger_dir: Path, log: Path) -> None:
    deadline = time.monotonic() + GROUP_JOIN_TIMEOUT
    while not owns_a_partition(ledger, ledger_dir):
        assert ledger.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, f"no partition after {GROUP_JOIN_TIMEOUT:.0f}s:\n{log.read_text()[-2000:]}"
        time.sleep(0.1)


def kill_schedule(rng: random.Random) -> list[tuple[tuple[str, str], float]]:
    """A few kills of a group member once it has partitions (the delay counts from then), then many of a pinned
    worker at any moment."""
    group = [(GROUP, rng.uniform(0, 2)) for _ in range(3)]
    # A worker needs about a second to start (the `custody` command and its imports, the consumer, resume):
    # killed earlier than that it never seals, and the kills would test nothing.
    pinned = [(PINNED, rng.uniform(1.5, 3.5)) for _ in range(KILLS - len(group))]
    return group + pinned


def sealed_values(ledger_dir: Path) -> Counter:
    return Counter(v for path in ledger_dir.glob("segments/p*/*.parquet")
                   for v in pq.read_table(path, columns=["event"]).column("event").to_pylist())


def test_sigkill_at_random_moments_loses_nothing_and_doubles_nothing(kafka_settings, proxy_key, keyring, tmp_path):
    config = write_config(tmp_path, kafka_settings, keyring)
    ledger_dir = tmp_path / "ledger"
    producer = EventProducer(kafka_settings, Spool(tmp_path / "spool"))
    writer = Writer(producer, proxy_key)
    writer.start()
    rng = random.Random(2024)
    with open(tmp_path / "ledger.log", "ab") as log:
        for mode, lifetime in kill_schedule(rng):
            ledger = start_ledger(config, log, mode)
            if mode == GROUP:
                wait_owning(ledger, ledger_dir, tmp_path / "ledger.log")
            time.sleep(lifetime)
            assert ledger.poll() is None, (tmp_path / "ledger.log").read_text()[-2000:]
            ledger.send_signal(signal.SIGKILL)
            ledger.wait()
        writer.stop.set()
        writer.join()
        assert producer.wait_delivered(timeout=30)
        producer.close()

        ledger = start_ledger(config, log, GROUP)
        produced = Counter(writer.values)
        deadline = time.monotonic() + 30
        while (found := sealed_values(ledger_dir)) != produced and time.monotonic() < deadline:
            time.sleep(0.5)
        ledger.send_signal(signal.SIGTERM)
        assert ledger.wait(timeout=20) == 0

    assert set(found) == set(produced), f"{len(set(produced) - set(found))} events missing"
    assert max(found.values()) == 1, "an event was sealed twice"
    assert len(list(ledger_dir.glob("segments/p*/*.parquet"))) > KILLS / 2
    result = subprocess.run([sys.executable, "-m", "custody", "verify", "--config", str(config)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(produced):,}/{len(produced):,} events valid, 0 session gaps" in result.stdout
