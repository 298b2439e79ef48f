"""The spool on a disk that fills up (a tmpfs of its own, so root, as CI runs): a write that meets the full disk
leaves nothing of its record behind, is a SpoolFull (which the recorder holds and retries), and appends resume in
order once there is room. Before, the partial record stayed in the segment and every later record followed it:
the reader stops at those bytes, so they were appended and never delivered."""

from __future__ import annotations

import os
import subprocess

import pytest

from ingest.spool import Spool, SpoolFull

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a tmpfs of its own needs root")


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"mount -t tmpfs was refused: {mounted.stderr}"
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def values(spool: Spool) -> list[bytes]:
    return [value for _end, _key, value in spool.read(0, max_bytes=1 << 30)]


def test_a_full_disk_is_a_full_spool_that_keeps_what_it_took_and_resumes(small_disk):
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (64 << 10))
    spool = Spool(small_disk / "spool", max_bytes=1 << 30)
    taken = []
    with pytest.raises(SpoolFull, match="no space left"):
        for n in range(10_000):
            value = f"{n:06d}".encode() * 170  # ~1 KiB, not a divisor of a page: the last write is cut short
            spool.append(b"k", value)
            taken.append(value)
    assert taken, "the disk was full before the first record"
    assert values(spool) == taken  # nothing of the refused record is left to stop the reader
    with pytest.raises(SpoolFull):
        spool.append(b"k", b"y" * 4096)
    assert values(spool) == taken

    ballast.unlink()
    spool.append(b"k", b"after")
    assert values(spool) == [*taken, b"after"]
    end = spool.end
    spool.close()
    again = Spool(small_disk / "spool", max_bytes=1 << 30)  # what a restarted proxy finds
    assert again.end == end and values(again) == [*taken, b"after"]
    again.close()
