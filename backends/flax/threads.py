"""Apply mixc's thread count to XLA's CPU client, which sizes itself once, when jax first starts.

XLA has no "N threads" flag for the CPU backend: its intra-op pool is sized by the cores the
process may run on (its CPU affinity) when the client starts, and with jax 0.10 the old
single-thread flags (``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``) no
longer keep it to one thread (docs/execution.md has the measurement). So ``--threads N``
below the allowed cores starts jax's CPU client while the calling thread may run on only N of them
(the pool's threads inherit that mask and keep it), then gives the thread its cores back, so data
loader workers started later are not squeezed onto N cores. Once jax has started, its pool cannot
change: the function says so in what it returns (and config.json records it).
"""

from __future__ import annotations

import os
import sys

__all__ = ["set_threads"]

_SINGLE = (  # still honoured by older jax
    "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)


def _started() -> bool:
    """Whether jax's backends already exist (its CPU client sized)."""
    xb = sys.modules.get("jax._src.xla_bridge")
    return bool(xb is not None and getattr(xb, "_backends", None))


def set_threads(n: int) -> dict[str, object]:
    """Size XLA's CPU pool for ``n`` threads if jax has not started; returns what holds, for
    config.json."""
    if _started():
        return {"threads": n, "xla_threads": "fixed: jax had started before --threads applied"}
    if n == 1 and "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_SINGLE}".strip()
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not allowed or n >= len(allowed):
        return {
            "threads": n,
            "xla_threads": f"XLA's pool on every allowed core ({len(allowed) or 'unknown'})",
        }
    import jax

    os.sched_setaffinity(0, allowed[:n])
    try:
        jax.devices("cpu")  # the CPU client starts now: its pool's threads inherit this mask
    finally:
        os.sched_setaffinity(0, allowed)
    return {"threads": n, "xla_threads": f"XLA's pool on {n} of {len(allowed)} cores"}
