"""Apply mixc's thread count to XLA's CPU client, which reads its flags once, when jax first starts.

XLA has no "N threads" flag for the CPU backend: it can run single-threaded
(``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``) or
use its own pool sized by the cores the process may run on (which already
respects CPU affinity). So ``--threads 1`` is exact; more threads leave XLA
its affinity-sized pool. Once jax has started, the flags cannot change: the
function says so in what it returns (and config.json records it).
"""

from __future__ import annotations

import os
import sys

__all__ = ["set_threads"]

_SINGLE = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _started() -> bool:
    """Whether jax's backends already exist (flags read)."""
    xb = sys.modules.get("jax._src.xla_bridge")
    return bool(xb is not None and getattr(xb, "_backends", None))


def set_threads(n: int) -> dict[str, object]:
    """Set XLA_FLAGS for ``n`` threads if jax has not started; returns what holds, for config.json."""
    if _started():
        return {"threads": n, "xla_threads": "fixed: jax had started before --threads applied"}
    flags = os.environ.get("XLA_FLAGS", "")
    if n == 1:
        if "xla_cpu_multi_thread_eigen" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {_SINGLE}".strip()
        return {"threads": 1, "xla_threads": "1 (single-threaded eigen)"}
    return {"threads": n, "xla_threads": "XLA's pool (sized by the CPU affinity)"}
