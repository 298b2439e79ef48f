"""A 100 MiB sftp upload and download through the SSH proxy: the same SHA-256 on both ends and in the evidence,
and the proxy's memory bounded while it relays and records (the proxy runs in this process: its resident set
is sampled during the transfer): beyond the recorder's backlog, the relay holds under 16 MiB.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time

from ingest.protocols.ssh.extract import extract_files
from pg_fixtures import messages
from query.replay import session_messages
from ssh_fixtures import new_user
from test_ssh_forwarding import echo, proxy, sshd  # noqa: F401 (the module's fixtures)

SIZE = 100 << 20


def rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_a_100_mib_sftp_transfer_keeps_its_hash_and_bounded_memory(proxy, tmp_path):
    user = new_user()
    local, back, remote = tmp_path / "big.bin", tmp_path / "back.bin", f"/tmp/custody-big-{time.time_ns()}.bin"
    with open(local, "wb") as f:
        for _ in range(SIZE >> 20):
            f.write(os.urandom(1 << 20))
    digest = hashlib.sha256(local.read_bytes()).hexdigest()
    baseline, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        started = time.monotonic()
        result = proxy.client.sftp(user, proxy.token(user, ("dev",)),
                                   f"put {local} {remote}\nget {remote} {back}\nrm {remote}\n", timeout=300)
        elapsed = time.monotonic() - started
    finally:
        done.set()
        sampler.join()
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(back.read_bytes()).hexdigest() == digest
    growth = peak[0] - baseline
    stats = proxy.background.service.recorder.stats
    print(f"{SIZE >> 20} MiB up and down through the proxy in {elapsed:.1f} s; "
          f"resident set grew by {growth / (1 << 20):.1f} MiB; "
          f"recorder backlog at most {stats.max_backlog} events, {stats.max_backlog_bytes / (1 << 20):.1f} MiB")
    # What grows is the recorder's backlog (events not yet handed to Kafka, bounded by count, not bytes); the SSH
    # relay itself holds little beyond it: channel windows and the session lanes' LANE_QUEUE_BYTES.
    assert growth < stats.max_backlog_bytes + (16 << 20), (
        f"the proxy's memory grew by {growth / (1 << 20):.1f} MiB for a {SIZE >> 20} MiB file")

    found = proxy.events.find(lambda s: s["protocol"] == "ssh" and s["attributes"].get("user") == user, 180)
    assert len(found) == 1, "the session's events were not read back in time"
    events = found[0]
    closes = [m["attributes"] for m in messages(events, "server") if m["attributes"].get("sha256")]
    assert [(c["path"], c["direction"], c["size"], c["sha256"], c["complete"]) for c in closes] == [
        (remote, "upload", str(SIZE), digest, "true"), (remote, "download", str(SIZE), digest, "true")]
    # The evidence holds the file both ways: rebuilt from the recorded packets, it is the file that was sent.
    extracted = extract_files(session_messages(events))
    assert [(f.path, f.mode, f.sha256, f.problem()) for f in extracted] == [
        (remote, "upload", digest, None), (remote, "download", digest, None)]
