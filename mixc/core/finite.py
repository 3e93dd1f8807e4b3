"""Non-finite checks: NaN or infinity in tensors (refused when saving or loading a checkpoint) or in
an epoch's metrics (a diverged run, stopped before it replaces the last good checkpoint)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["NonFiniteError", "non_finite_tensors", "non_finite_metrics"]


class NonFiniteError(ValueError):
    """Tensors or metrics that are NaN or infinite: a diverged run, or a damaged file."""


def non_finite_tensors(arrays: dict[str, Any]) -> list[str]:
    """A description of every floating-point array in ``arrays`` holding NaN or infinity (``[]`` if
    none)."""
    bad = []
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        if not np.issubdtype(a.dtype, np.floating):
            continue
        mask = ~np.isfinite(a)
        n = int(mask.sum())
        if n:
            first = a.reshape(-1)[int(np.argmax(mask.reshape(-1)))]
            bad.append(f"{name} ({n} of {a.size} values non-finite, e.g. {first})")
    return bad


def non_finite_metrics(rec: dict[str, Any]) -> list[str]:
    """``name = value`` for every NaN or infinite number in an epoch's record (lists item by
    item)."""
    bad = []
    for key, value in rec.items():
        items = value if isinstance(value, list) else [value]
        for i, x in enumerate(items):
            if isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isfinite(x):
                bad.append(f"{key}[{i}] = {x}" if isinstance(value, list) else f"{key} = {x}")
    return bad
