"""How duet's processes live and die: restart backoff, and a child's tie to its parent.

The launcher restarts a dead engine core, the core restarts a dead worker; both wait
longer after each quick crash so a crash loop does not spin. A child never outlives the
process that started it: the kernel signals it when its parent exits (PR_SET_PDEATHSIG),
and a poll loop can double-check with `parent_gone`.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal

PR_SET_PDEATHSIG = 1


class Backoff:
    """Delays before restarting something that keeps crashing: 0, first, 2×first, ... max.

    A process that ran for `stable_after` seconds before dying starts the series again.
    """

    def __init__(self, first: float = 1.0, maximum: float = 30.0, stable_after: float = 60.0):
        self.first, self.maximum, self.stable_after = first, maximum, stable_after
        self.crashes = 0  # quick crashes in a row

    def next_delay(self, uptime: float) -> float:
        """Seconds to wait before restarting a process that died after `uptime` seconds."""
        if uptime >= self.stable_after:
            self.crashes = 0
        self.crashes += 1
        if self.crashes == 1:
            return 0.0
        return min(self.first * 2 ** (self.crashes - 2), self.maximum)


def multiprocessing_parent() -> int | None:
    """The pid of the process that started this one with multiprocessing, else None."""
    parent = multiprocessing.parent_process()
    return None if parent is None else parent.pid


def die_with_parent(parent_pid: int | None, signum: int = signal.SIGTERM) -> None:
    """Have the kernel send `signum` to this process when `parent_pid`, its parent, exits.

    No-op for None (a process started by hand has no parent to follow).
    """
    if parent_pid is None:
        return
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if parent_gone(parent_pid):  # it died before the prctl took effect
        os.kill(os.getpid(), signum)


def parent_gone(parent_pid: int | None) -> bool:
    """True once `parent_pid` is no longer our parent (it exited; we were re-parented)."""
    return parent_pid is not None and os.getppid() != parent_pid
