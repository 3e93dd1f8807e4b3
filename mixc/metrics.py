"""Ensemble metrics (accuracy, NLL, the three ECEs, Brier, disagreement, diversity), numpy only,
so every backend reports the same numbers. Each is computed on the mean of the members'
probabilities; the definitions: docs/evaluation.md.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np

__all__ = [
    "accuracy",
    "nll",
    "ece",
    "adaptive_ece",
    "classwise_ece",
    "brier",
    "disagreement",
    "diversity",
    "evaluate",
    "reliability",
    "member_summary",
    "ECE_BINS",
    "NLL_CLIP",
]

ECE_BINS = 15
NLL_CLIP = 1e-12


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(
            f"expected probs [N, C] and labels [N], got {list(probs.shape)} and"
            f" {list(labels.shape)}"
        )
    return probs, labels


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``probs [N, C]``."""
    probs, labels = _check(probs, labels)
    return float(np.mean(probs.argmax(axis=1) == labels)) if len(labels) else 0.0


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true class (probabilities clipped at 1e-12)."""
    probs, labels = _check(probs, labels)
    p = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(p, NLL_CLIP, None)))) if len(labels) else 0.0


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over ``bins`` equal-width confidence bins, empty bins skipped."""
    probs, labels = _check(probs, labels)
    n = len(labels)
    if n == 0:
        return 0.0
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # searchsorted on the inner edges, side="left": a confidence equal to an edge
    # falls in the bin that edge closes, i.e. bins are (lo, hi].
    idx = np.searchsorted(edges[1:-1], conf, side="left")
    total = 0.0
    for b in range(bins):
        m = idx == b
        k = int(m.sum())
        if k:
            total += k / n * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def adaptive_ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE over ``bins`` equal-mass confidence bins (sizes differ by at most one; see the module
    doc)."""
    probs, labels = _check(probs, labels)
    n = len(labels)
    if n == 0:
        return 0.0
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    order = np.argsort(conf, kind="mergesort")
    # sizes differ by at most one
    bounds = np.linspace(0, n, min(bins, n) + 1).round().astype(np.int64)[:-1]
    gap = np.add.reduceat(correct[order] - conf[order], bounds)
    return float(np.sum(np.abs(gap)) / n)


def classwise_ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean over classes of the ECE of each class's probability (equal-width bins as
    :func:`ece`)."""
    probs, labels = _check(probs, labels)
    n, c = probs.shape
    if n == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.searchsorted(edges[1:-1], probs, side="left")  # [N, C], bins (lo, hi] like ece
    hit = np.zeros_like(probs)
    hit[np.arange(n), labels] = 1.0
    key = (np.arange(c)[None, :] * bins + idx).reshape(-1)
    gap = np.bincount(key, weights=(hit - probs).reshape(-1), minlength=c * bins)
    return float(np.sum(np.abs(gap)) / n / c)


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over samples of the squared distance to the one-hot label."""
    probs, labels = _check(probs, labels)
    if len(labels) == 0:
        return 0.0
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def disagreement(member_probs: np.ndarray) -> float | None:
    """Mean over member pairs of the fraction of samples where their top-1 predictions differ."""
    preds = np.asarray(member_probs).argmax(axis=2)  # [N, M]
    pairs = list(combinations(range(preds.shape[1]), 2))
    if not pairs or preds.shape[0] == 0:
        return None
    return float(np.mean([np.mean(preds[:, i] != preds[:, j]) for i, j in pairs]))


def diversity(member_probs: np.ndarray, labels: np.ndarray) -> float | None:
    """Fort et al. (2019) diversity: pairwise disagreement / mean member error rate (see module
    doc)."""
    member_probs = np.asarray(member_probs)
    d = disagreement(member_probs)
    if d is None:
        return None
    err = float(np.mean(member_probs.argmax(axis=2) != np.asarray(labels)[:, None]))
    if err == 0.0:
        return 0.0  # all members always right, so they never disagree either
    return d / err


def evaluate(member_probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """All metrics for member probabilities ``[N, M, C]``; plain floats and lists, JSON-ready."""
    member_probs = np.asarray(member_probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if member_probs.ndim != 3 or labels.shape != (member_probs.shape[0],):
        raise ValueError(
            f"expected member_probs [N, M, C] and labels [N], got {list(member_probs.shape)} and"
            f" {list(labels.shape)}"
        )
    ens = member_probs.mean(axis=1)
    members = range(member_probs.shape[1])
    return {
        "accuracy": accuracy(ens, labels),
        "nll": nll(ens, labels),
        "ece": ece(ens, labels),
        "brier": brier(ens, labels),
        "member_accuracy": [accuracy(member_probs[:, m], labels) for m in members],
        "member_nll": [nll(member_probs[:, m], labels) for m in members],
        "member_ece": [ece(member_probs[:, m], labels) for m in members],
        "disagreement": disagreement(member_probs),
        "diversity": diversity(member_probs, labels),
        "samples": int(len(labels)),
    }


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, list]:
    """Per-bin counts, accuracy and mean confidence, binned exactly as :func:`ece` bins them.

    For reliability diagrams: ``edges`` has ``bins + 1`` entries; an empty bin
    has count 0 and accuracy/confidence ``None``. ``sum(count/N * |acc - conf|)``
    over non-empty bins equals ``ece``.
    """
    probs, labels = _check(probs, labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    conf = probs.max(axis=1) if len(labels) else np.zeros(0)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64) if len(labels) else np.zeros(0)
    idx = np.searchsorted(edges[1:-1], conf, side="left")
    count, acc, mean_conf = [], [], []
    for b in range(bins):
        m = idx == b
        k = int(m.sum())
        count.append(k)
        acc.append(float(correct[m].mean()) if k else None)
        mean_conf.append(float(conf[m].mean()) if k else None)
    return {
        "edges": [float(e) for e in edges],
        "count": count,
        "accuracy": acc,
        "confidence": mean_conf,
    }


def member_summary(member_probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """What the paper's Table 6 discussion quotes: mean member accuracy and the best member.

    ``best_member`` is the index of the most accurate member (the lowest index
    on ties) with its accuracy and NLL.
    """
    member_probs = np.asarray(member_probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    accs = [accuracy(member_probs[:, m], labels) for m in range(member_probs.shape[1])]
    best = int(np.argmax(accs)) if accs else 0
    return {
        "mean_member_accuracy": float(np.mean(accs)) if accs else 0.0,
        "best_member": best,
        "best_member_accuracy": accs[best] if accs else 0.0,
        "best_member_nll": nll(member_probs[:, best], labels) if accs else 0.0,
    }
