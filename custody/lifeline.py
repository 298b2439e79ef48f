"""Children of `custody up` that die with their supervisor, however it dies.

The supervisor holds the write end of a pipe ("the lifeline") that only it
holds; each child gets the read end and `CUSTODY_LIFELINE=<supervisor pid>:<fd>:<bound>`
in its environment. When the supervisor dies — Ctrl-C, a crash, SIGKILL — the
kernel closes its end, and each child notices in two ways:

- on Linux, `prctl(PR_SET_PDEATHSIG, SIGHUP)`: the kernel signals the child the
  moment its parent dies;
- everywhere, a watchdog thread blocked on the read end gets EOF.

Either way the child is *orphaned*: its output goes to /dev/null (nobody reads
the pipe any more), it gets SIGTERM, so that it stops the way it always stops
(a proxy ends its sessions and its recorder spools what it holds, the ledger
seals what it read, the broker stops Tansu), and if it is still running after
`bound` seconds it ends itself with os._exit.
"""

from __future__ import annotations

import os
import signal
import threading

from ingest.orphans import set_parent_death_signal

ENV = "CUSTODY_LIFELINE"


class Lifeline:
    """The supervisor's end: `child_env` and `pass_fds` for each child it starts."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()  # both non-inheritable: no child holds the write end

    def child_env(self, bound: float) -> dict[str, str]:
        return {ENV: f"{os.getpid()}:{self.read_fd}:{bound}"}

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self.read_fd,)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


_orphaned = threading.Event()


def _orphan(bound: float) -> None:
    """The supervisor is gone: stop as on SIGTERM, and be gone within `bound` seconds whatever happens."""
    if _orphaned.is_set():
        return
    _orphaned.set()
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
    except OSError:
        pass
    timer = threading.Timer(bound, os._exit, (1,))
    timer.daemon = True
    timer.start()
    os.kill(os.getpid(), signal.SIGTERM)


def adopt() -> bool:
    """In a child of `custody up`: tie this process's life to the supervisor's. False when not supervised."""
    value = os.environ.pop(ENV, None)  # not for our own children: they watch us, not the supervisor
    if not value:
        return False
    pid_text, fd_text, bound_text = value.split(":")
    supervisor, fd, bound = int(pid_text), int(fd_text), float(bound_text)
    os.set_inheritable(fd, False)
    if set_parent_death_signal(signal.SIGHUP):
        signal.signal(signal.SIGHUP, lambda *_: _orphan(bound))

    def watch() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        _orphan(bound)

    threading.Thread(target=watch, name="custody-lifeline", daemon=True).start()
    if os.getppid() != supervisor:  # it died before we could watch it
        _orphan(bound)
    return True
