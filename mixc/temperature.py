"""Post-hoc temperature scaling of an ensemble (Guo et al. 2017), numpy only.

Definition: one temperature ``T`` for the ensemble divides **every member's
logits** by ``T`` before the softmax, and the ensemble's prediction stays the
mean of the members' (tempered) softmaxes. Member probabilities suffice:
``log p_m = z_m - logsumexp(z_m)``, so ``softmax(log p_m / T) = softmax(z_m / T)``
(the per-member constant cancels). ``T > 1`` softens an over-confident
ensemble, ``T < 1`` sharpens it; ``T = 1`` changes nothing. A member's own
temperature (``member_temperatures``) is fitted the same way on that member
alone, for whoever deploys one member.

``T`` is chosen to minimise the NLL on held-out data. Why our own 1-D search
instead of scipy's ``minimize_scalar``: scipy is not a dependency of mixc. The
NLL of tempered logits is convex in ``1/T`` for one member and unimodal in
practice for the mean; a golden-section search over ``log T`` in
``[1/20, 20]`` to a tolerance of 1e-6 in ``log T`` takes about 45 evaluations.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["apply_temperature", "tempered_nll", "fit_temperature", "T_MIN", "T_MAX"]

T_MIN, T_MAX = 0.05, 20.0
_TINY = (
    1e-38  # below float32's smallest normal: a probability that underflowed to 0 keeps a finite log
)


def apply_temperature(member_probs: np.ndarray, temperature: float) -> np.ndarray:
    """Member probabilities ``[N, M, C]`` as if each member's logits were divided by ``temperature``
    (float64)."""
    p = np.asarray(member_probs, dtype=np.float64)
    if temperature == 1.0:
        return p
    z = np.log(np.clip(p, _TINY, None)) / float(temperature)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def tempered_nll(member_probs: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """NLL of the mean of the tempered members' softmaxes (``mixc.metrics.nll``'s clip at 1e-12)."""
    from mixc.metrics import nll

    return nll(apply_temperature(member_probs, temperature).mean(axis=1), labels)


def _golden(f, lo: float, hi: float, tol: float = 1e-6) -> float:
    """The minimiser of a unimodal ``f`` on ``[lo, hi]`` by golden-section search."""
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2


def fit_temperature(member_probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in ``[T_MIN, T_MAX]`` minimising :func:`tempered_nll` on ``(member_probs,
    labels)``."""
    p = np.asarray(member_probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if p.ndim != 3 or y.shape != (p.shape[0],) or len(y) == 0:
        raise ValueError(
            f"expected member_probs [N, M, C] and labels [N] with N > 0, got {list(p.shape)}, "
            f"{list(y.shape)}"
        )
    log_t = _golden(lambda s: tempered_nll(p, y, math.exp(s)), math.log(T_MIN), math.log(T_MAX))
    return float(math.exp(log_t))
