"""Out-of-distribution detection: scores and their metrics (AUROC, AUPR-in/out, FPR95), numpy
only, shared by every backend.

Every score is turned into an in-distribution score (higher = more like the training data) so one
set of metrics serves them all. Our own AUROC/AP (scikit-learn is a test dependency only): the
same formulas over one sort. The definitions: docs/evaluation.md.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "SCORES",
    "SCORE_LEGEND",
    "METRIC_LEGEND",
    "ood_scores",
    "auroc",
    "average_precision",
    "fpr_at_tpr",
    "detection_metrics",
    "evaluate_ood",
]

#: score -> (what it is, its direction as computed: "higher = in-distribution" or "higher = OOD")
SCORES: dict[str, tuple[str, str]] = {
    "msp": (
        "the ensemble's top probability (mean of the members' softmaxes)",
        "higher = in-distribution",
    ),
    "max_logit": (
        "the largest class logit of the members' mean logits",
        "higher = in-distribution",
    ),
    "energy": (
        "-logsumexp of the members' mean logits (Liu et al. 2020)",
        "lower = in-distribution",
    ),
    "entropy": ("entropy of the ensemble's prediction (predictive entropy)", "higher = OOD"),
    "mutual_information": (
        "entropy of the mean minus the mean of the members' entropies",
        "higher = OOD",
    ),
    "disagreement": ("fraction of member pairs whose top classes differ", "higher = OOD"),
}
#: +1 when a larger raw score means in-distribution, -1 when it means OOD
_SIGN = {
    "msp": 1.0,
    "max_logit": 1.0,
    "energy": -1.0,
    "entropy": -1.0,
    "mutual_information": -1.0,
    "disagreement": -1.0,
}

SCORE_LEGEND = {k: f"{what} ({direction})" for k, (what, direction) in SCORES.items()}
METRIC_LEGEND = {
    "auroc": (
        "chance that an in-distribution input scores as more in-distribution than an OOD one (0.5"
        " chance, 1 perfect)"
    ),
    "aupr_in": "average precision at finding in-distribution inputs (1 perfect)",
    "aupr_out": "average precision at finding OOD inputs (1 perfect; chance = the OOD share)",
    "fpr95": (
        "share of OOD inputs still accepted when 95% of in-distribution inputs are (0 perfect)"
    ),
}

_EPS = 1e-12


def _entropy(p: np.ndarray) -> np.ndarray:
    # einsum multiplies and sums in one pass (no [N, M, C] product array); maximum is cheaper than
    # clip
    return -np.einsum("...c,...c->...", p, np.log(np.maximum(p, _EPS)))


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=-1)
    e = z - m[..., None]
    np.exp(e, out=e)
    return m + np.log(e.sum(axis=-1))


def ood_scores(
    member_probs: np.ndarray, member_logits: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Every score of :data:`SCORES` per input, raw (in its own direction), from ``[N, M, C]``
    member outputs.

    ``max_logit`` and ``energy`` need logits: without ``member_logits`` they
    are left out (a backend that gives probabilities only).
    """
    p = np.asarray(member_probs, dtype=np.float64)
    if p.ndim != 3:
        raise ValueError(f"expected member_probs [N, M, C], got {list(p.shape)}")
    ens = p.mean(axis=1)
    h_ens = _entropy(ens)
    out: dict[str, np.ndarray] = {"msp": ens.max(axis=1)}
    if member_logits is not None:
        z = np.asarray(member_logits, dtype=np.float64)
        if z.shape != p.shape:
            raise ValueError(
                f"member_logits {list(z.shape)} and member_probs {list(p.shape)} differ in shape"
            )
        zbar = z.mean(axis=1)
        out["max_logit"] = zbar.max(axis=1)
        out["energy"] = -_logsumexp(zbar)
    out["entropy"] = h_ens
    # >= 0 by concavity; clip rounding
    out["mutual_information"] = np.maximum(h_ens - _entropy(p).mean(axis=1), 0.0)
    top = p.argmax(axis=2)  # [N, M]
    m = top.shape[1]
    if m > 1:
        # pairs that differ = (M^2 - sum over classes of count^2) / 2, counted per input without an
        # M^2 array
        c = p.shape[2]
        counts = np.bincount(
            (np.arange(len(top))[:, None] * c + top).reshape(-1), minlength=len(top) * c
        )
        counts = counts.reshape(len(top), c)
        same = (counts * (counts - 1)).sum(axis=1) / 2
        out["disagreement"] = 1.0 - same / (m * (m - 1) / 2)
    else:
        out["disagreement"] = np.zeros(len(top))
    return out


def _check(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(pos, dtype=np.float64).reshape(-1)
    neg = np.asarray(neg, dtype=np.float64).reshape(-1)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"need both classes: {len(pos)} positive and {len(neg)} negative scores")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("scores must be finite")
    return pos, neg


class _Ranked:
    """Positives and negatives sorted once (ascending), with their tie groups: every metric reads
    this."""

    def __init__(self, pos: np.ndarray, neg: np.ndarray) -> None:
        pos, neg = _check(pos, neg)
        s = np.concatenate([pos, neg])
        # ties are handled as groups below, so the order inside a group does not matter
        order = np.argsort(s)
        self.s = s[order]
        self.y = (order < len(pos)).astype(np.float64)
        self.n_pos, self.n_neg = len(pos), len(neg)
        self.starts = np.flatnonzero(np.r_[True, self.s[1:] != self.s[:-1]])
        self.ends = np.r_[self.starts[1:], len(s)]  # exclusive
        self.pos_per_group = np.add.reduceat(self.y, self.starts)

    def auroc(self) -> float:
        """Mann-Whitney U with average ranks for ties, over ``n_pos * n_neg``."""
        mean_rank = (self.starts + 1 + self.ends) / 2.0
        u = np.sum(self.pos_per_group * mean_rank) - self.n_pos * (self.n_pos + 1) / 2.0
        return float(u / (self.n_pos * self.n_neg))

    def ap(self, positives_high: bool) -> float:
        """Average precision of the positives ranked by descending score (or of the negatives by
        ascending)."""
        sizes = (self.ends - self.starts).astype(np.float64)
        hits = self.pos_per_group if positives_high else sizes - self.pos_per_group
        if positives_high:  # thresholds from the highest group down
            hits, sizes = hits[::-1], sizes[::-1]
        tps = np.cumsum(hits)
        precision = tps / np.cumsum(sizes)
        total = self.n_pos if positives_high else self.n_neg
        return float(np.sum(hits / total * precision))

    def fpr_at(self, tpr: float) -> float:
        k = max(1, math.ceil(tpr * self.n_pos - 1e-9))  # positives that must be accepted
        pos_sorted = self.s[self.y == 1.0]
        threshold = pos_sorted[self.n_pos - k]  # the k-th largest positive
        # everything from here on is accepted
        first = np.searchsorted(self.s, threshold, side="left")
        return float((len(self.s) - first - (self.n_pos - int(self.y[:first].sum()))) / self.n_neg)


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve of ``pos`` (positives) against ``neg``: the Mann-Whitney U statistic
    with average ranks for ties, over ``len(pos) * len(neg)``."""
    return _Ranked(pos, neg).auroc()


def average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision of ranking ``pos`` above ``neg`` by score (scikit-learn's definition, ties
    one threshold)."""
    return _Ranked(pos, neg).ap(positives_high=True)


def fpr_at_tpr(pos: np.ndarray, neg: np.ndarray, tpr: float = 0.95) -> float:
    """Share of ``neg`` scoring at or above the highest threshold that accepts at least ``tpr`` of
    ``pos``."""
    return _Ranked(pos, neg).fpr_at(tpr)


def detection_metrics(id_score: np.ndarray, ood_score: np.ndarray) -> dict[str, float]:
    """AUROC, AUPR-in, AUPR-out and FPR95 of in-distribution scores (higher = in-distribution), from
    one sort."""
    r = _Ranked(id_score, ood_score)
    return {
        "auroc": r.auroc(),
        "aupr_in": r.ap(positives_high=True),
        "aupr_out": r.ap(positives_high=False),
        "fpr95": r.fpr_at(0.95),
    }


def evaluate_ood(id_scores: dict[str, np.ndarray], ood: dict[str, np.ndarray]) -> dict[str, Any]:
    """For each score present in both: its direction and the four metrics (ID = positives).
    JSON-ready."""
    out: dict[str, Any] = {}
    for name in SCORES:
        if name in id_scores and name in ood:
            sign = _SIGN[name]
            out[name] = {
                "direction": SCORES[name][1],
                **detection_metrics(sign * id_scores[name], sign * ood[name]),
            }
    return out
