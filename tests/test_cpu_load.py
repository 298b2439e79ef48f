"""The recorder's test of whether the machine has CPU to spare (ingest/cpu_load.py), on /proc/stat-shaped files."""

from __future__ import annotations

import time

from ingest.cpu_load import LOAD_SAMPLE, CpuLoad


def _stat(path, idle: int, busy: int) -> None:
    """A /proc/stat first line: user nice system idle iowait irq softirq steal."""
    path.write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n")


def test_the_machine_reads_as_saturated_only_when_its_cpus_had_almost_no_idle_time(tmp_path):
    stat = tmp_path / "stat"
    _stat(stat, idle=1000, busy=1000)
    load = CpuLoad(str(stat))
    _stat(stat, idle=1050, busy=1950)  # 5 % idle since
    time.sleep(LOAD_SAMPLE)
    assert load.saturated()
    _stat(stat, idle=1550, busy=2450)  # 50 % idle since
    time.sleep(LOAD_SAMPLE)
    assert not load.saturated()
    assert not CpuLoad(str(tmp_path / "absent")).saturated()  # unreadable: never paces

