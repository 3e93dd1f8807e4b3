"""How many CPU threads a run uses: framework-free, so the driver and every command agree.

Why: torch's default (one intra-op thread per *online* core) ignores both the
process's CPU affinity (``taskset``, cgroup cpusets, a batch scheduler's
allocation) and ``OMP_NUM_THREADS``, and oversubscribes a shared machine, where it
can run many times slower than one thread (OpenMP's threads spin at every barrier
waiting for the one another process holds up). The default here is the number of cores this process
may run on, less the cores other processes keep busy (the 1-minute load average,
rounded), at least one; ``OMP_NUM_THREADS``, when the user set it, caps it.
"""

from __future__ import annotations

import os

from mixc.core.errors import MixcError

__all__ = ["default_threads", "resolve_threads", "ThreadsError"]


class ThreadsError(MixcError):
    """A bad ``--threads`` value or ``OMP_NUM_THREADS``."""


def _affinity() -> int:
    """Cores this process may run on (``os.sched_getaffinity`` where the OS has it, else the CPU
    count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _busy_cores() -> int:
    """Cores other processes keep busy now: the 1-minute load average, rounded (0 where the OS has
    none)."""
    try:
        return int(os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):
        return 0


def default_threads() -> int:
    """Affinity cores less busy ones (at least 1), capped by ``OMP_NUM_THREADS`` if set: what a run
    uses without ``--threads``."""
    n = max(1, _affinity() - _busy_cores())
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp:
        try:
            n = min(n, max(1, int(omp.split(",")[0])))
        except ValueError:
            raise ThreadsError(
                f"OMP_NUM_THREADS={omp!r} is not a whole number; hint: unset it, or pass "
                "--threads N"
            ) from None
    return n


def resolve_threads(requested: int | None) -> int:
    """``requested`` (``--threads``) checked, or the default; a count above the affinity is allowed
    (the user's call)."""
    if requested is None:
        return default_threads()
    if requested < 1:
        raise ThreadsError(
            f"--threads must be 1 or more, not {requested}; hint: leave it out for "
            f"the default ({default_threads()} here)"
        )
    return requested
