"""Processes that do not outlive their parent.

`set_parent_death_signal` is Linux's prctl(PR_SET_PDEATHSIG): the kernel
signals this process the moment the thread that started it ends, however its
process ends (SIGKILL included). Elsewhere it does nothing and says so, and the
callers' portable fallbacks (a pipe only the parent holds, multiprocessing's
parent sentinel) are what notices.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

PR_SET_PDEATHSIG = 1


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.restype = ctypes.c_int
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return prctl


_PRCTL = _prctl()  # looked up once, here: a preexec_fn between fork and exec must not load libraries


def set_parent_death_signal(signum: int) -> bool:
    """Have the kernel send `signum` to this process when its parent dies; False where that is not supported."""
    return _PRCTL is not None and _PRCTL(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
