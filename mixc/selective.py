"""Selective prediction: how the error falls when the model may abstain on its least confident
inputs (risk-coverage, AURC, AUGRC, risk at 80% coverage, coverage at 5% risk).

Our own because no dependency computes AURC/AUGRC; ties are spread evenly so the result does not
depend on the order of tied inputs. The definitions: docs/evaluation.md.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["risk_coverage", "selective_metrics", "LEGEND"]

LEGEND = {
    "aurc": (
        "mean error rate over all coverages, rejecting the least confident first (lower is better)"
    ),
    "augrc": (
        "mean share of inputs that are accepted and wrong, over all coverages (lower is better)"
    ),
    "risk_at_80": "error rate on the 80% most confident inputs",
    "coverage_at_5": "largest share of inputs that can be answered with at most 5% errors",
}


def _cumulative_errors(confidence: np.ndarray, wrong: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Errors among the ``k`` most confident, ``k = 1..N`` (ties spread evenly), and the tie groups'
    ends."""
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    err = np.asarray(wrong, dtype=np.float64).reshape(-1)
    if conf.shape != err.shape:
        raise ValueError(
            f"confidence {list(conf.shape)} and wrong {list(err.shape)} differ in shape"
        )
    if len(conf) == 0:
        raise ValueError("no predictions")
    order = np.argsort(-conf, kind="mergesort")
    c, e = conf[order], err[order]
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    ends = np.r_[starts[1:], len(c)]  # exclusive
    sizes = ends - starts
    group_err = np.add.reduceat(e, starts)
    before = np.r_[0.0, np.cumsum(group_err)[:-1]]  # errors in the groups above
    g = np.repeat(np.arange(len(starts)), sizes)
    j = np.arange(1, len(c) + 1) - starts[g]  # position inside its group, 1-based
    cum = before[g] + j * group_err[g] / sizes[g]
    return cum, ends


def risk_coverage(confidence: np.ndarray, wrong: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The risk-coverage curve: coverage ``k / N`` and selective risk ``risk(k)`` for ``k =
    1..N``."""
    cum, _ = _cumulative_errors(confidence, wrong)
    k = np.arange(1, len(cum) + 1)
    return k / len(cum), cum / k


def selective_metrics(confidence: np.ndarray, wrong: np.ndarray) -> dict[str, Any]:
    """AURC, AUGRC, risk at 80% coverage and coverage at 5% risk (module doc); JSON-ready floats."""
    cum, ends = _cumulative_errors(confidence, wrong)
    n = len(cum)
    k = np.arange(1, n + 1)
    risk = cum / k
    k80 = max(1, math.ceil(0.8 * n - 1e-9))
    at_ends = risk[ends - 1] <= 0.05 + 1e-12
    return {
        "aurc": float(risk.mean()),
        "augrc": float((cum / n).mean()),
        "risk_at_80": float(risk[k80 - 1]),
        "coverage_at_5": float(ends[at_ends].max() / n) if at_ends.any() else 0.0,
        "risk_full": float(cum[-1] / n),
        "samples": int(n),
    }
