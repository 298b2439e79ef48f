"""Durable, atomic file writes: a reader sees the old file or the whole new one, never a torn one.

The ledger's crash safety rests on this order: write a temp file, fsync it,
rename it over the target, fsync the directory (so the rename itself survives a
power cut). Only after that may anything that depends on the file be written.
"""

from __future__ import annotations

import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Replace `path` with `data`, durably: temp file, fsync, rename, fsync directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)  # a full disk's partial file would keep the space a retry needs
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_durably(paths: list[Path]) -> None:
    """Delete files (a crash's leftovers) and make the deletions survive a crash too."""
    for directory in {p.parent for p in paths}:
        for p in paths:
            if p.parent == directory:
                p.unlink(missing_ok=True)
        fsync_dir(directory)
