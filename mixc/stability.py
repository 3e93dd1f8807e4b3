"""The first steps of training, measured: what ``bench/stability.py`` prints and the stability tests
check.

A run that diverges does so in its first few hundred steps, so these drive a backend's ``Trainer``
directly (no run folder, no evaluation) on synthetic data and record, per step, the mean member
cross-entropy and, at chosen steps, how far one optimiser step moved each kind of tensor: the
update-to-weight ratio ``|new - old| / |old|`` per plan role, and the same for every member's
*composed* weights (what each member computes with), which is where sharing shows. Everything is
read through the framework-neutral ``Trainer.state_arrays``, so torch and flax are measured alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mixc.compiler.plan import Plan
from mixc.run_writer import seed_of
from mixc.spec.recipe import Recipe
from mixc.training import learning_rate

if TYPE_CHECKING:
    from mixc.backends.base import Backend

__all__ = ["ROLE_KINDS", "Trace", "synthetic", "first_steps", "role_ratios", "composed_ratios"]

#: the tensor kinds reported, by plan role (BatchNorm running statistics are not trained)
ROLE_KINDS = {
    "bank": "templates",
    "blob": "templates",
    "alpha": "alphas",
    "plain_weight": "plain (shared)",
    "plain_bias": "plain (shared)",
    "member_weight": "per-member weights",
    "member_bias": "per-member weights",
    "fast_in": "fast weights",
    "fast_out": "fast weights",
    "bn_weight": "batchnorm",
    "bn_bias": "batchnorm",
}


@dataclass
class Trace:
    """One run's first steps: the loss of every step, and update ratios at the probed steps."""

    losses: list[float] = field(default_factory=list)  # mean member cross-entropy, per step
    roles: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> kind -> update ratio
    # step -> layer -> median over members
    composed: dict[int, dict[str, float]] = field(default_factory=dict)
    # step -> mean L2 norm of a member's layer alphas
    alpha_norm: dict[int, float] = field(default_factory=dict)

    @property
    def peak(self) -> float:
        """The largest loss of any step (inf once a step was not finite)."""
        return max((v if np.isfinite(v) else np.inf) for v in self.losses)

    def tail(self, n: int = 10) -> float:
        """The mean loss of the last ``n`` steps."""
        return float(np.mean(self.losses[-n:]))


def synthetic(
    shape: tuple[int, ...] | list[int], classes: int, n: int, signal: float = 0.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` examples ``signal * prototype[y] + N(0, 1)`` of ``classes`` Gaussian prototypes
    (float32, labels int64): data of any input shape that a network learns quickly but that is
    not trivially separable.
    """
    r = np.random.default_rng(seed)
    proto = r.normal(size=(classes, *shape)).astype(np.float32)
    y = r.integers(0, classes, n)
    x = (proto[y] * signal + r.normal(size=(n, *shape))).astype(np.float32)
    return x, y.astype(np.int64)


def role_ratios(
    plan: Plan, before: dict[str, np.ndarray], after: dict[str, np.ndarray]
) -> dict[str, float]:
    """``|after - before| / |before|`` over all trainable tensors of each kind
    (:data:`ROLE_KINDS`)."""
    moved: dict[str, float] = {}
    norm: dict[str, float] = {}
    for t in plan.tensors:
        kind = ROLE_KINDS.get(t.role)
        if kind is None or not t.trainable:
            continue
        old = np.asarray(before[t.name], np.float64)
        moved[kind] = moved.get(kind, 0.0) + float(
            np.sum((np.asarray(after[t.name], np.float64) - old) ** 2)
        )
        norm[kind] = norm.get(kind, 0.0) + float(np.sum(old**2))
    return {k: float(np.sqrt(moved[k] / norm[k])) if norm[k] > 0 else float("nan") for k in moved}


def composed_ratios(
    plan: Plan, before: dict[str, np.ndarray], after: dict[str, np.ndarray]
) -> dict[str, float]:
    """Per weight layer, the median over members of ``|W_after - W_before| / |W_before|`` of the
    member's composed weight (empty for the single-path methods, whose members share one
    network)."""
    if plan.execution == "single_path":
        return {}
    from mixc.export import compose_layer

    out = {}
    for op in plan.ops:
        if op.kind not in ("conv", "linear"):
            continue
        ratios = []
        for m in range(plan.members):
            w0, w1 = (
                compose_layer(plan, before, op, m).weight,
                compose_layer(plan, after, op, m).weight,
            )
            ratios.append(float(np.linalg.norm(w1 - w0) / max(np.linalg.norm(w0), 1e-30)))
        out[op.name] = float(np.median(ratios))
    return out


def _alpha_norm(plan: Plan, arrays: dict[str, np.ndarray]) -> float:
    norms = [
        np.linalg.norm(np.asarray(arrays[t.name]), axis=-1)
        for t in plan.tensors
        if t.role == "alpha"
    ]
    return float(np.mean(np.concatenate(norms))) if norms else float("nan")


def _snapshot(trainer: Any) -> dict[str, np.ndarray]:
    """The trainer's state, copied (torch's arrays on the CPU are views of the live parameters)."""
    return {k: np.array(v, copy=True) for k, v in trainer.state_arrays().items()}


def first_steps(
    backend: Backend,
    plan: Plan,
    recipe: Recipe,
    x: np.ndarray,
    y: np.ndarray,
    steps: int,
    *,
    probe: tuple[int, ...] = (0,),
    device: str = "cpu",
    layout: str = "auto",
    augment: str = "none",
) -> Trace:
    """Train ``plan`` with ``recipe`` (its learning rate, schedule and warm-up, batch, seed) for
    ``steps`` steps on ``x, y`` (at least ``steps * recipe.batch`` examples: each example is seen
    once) and trace them. ``probe``: the 0-based steps whose update ratios are measured (each
    costs a copy of the state).
    """
    batch = recipe.batch
    if len(y) < steps * batch:
        raise ValueError(f"{steps} steps of {batch} need {steps * batch} examples, not {len(y)}")
    trainer = backend.trainer(plan, recipe, device=device, layout=layout, augment=augment)
    trace = Trace()
    try:
        trainer.begin(x, y, batch)
        trainer.begin_epoch(seed_of(recipe.seed, 0, 0, 1), seed_of(recipe.seed, 0, 0, 2))
        for step in range(steps):
            before = _snapshot(trainer) if step in probe else None
            lr = learning_rate(recipe, step, steps, recipe.epochs)
            loss: Any = trainer.step(np.arange(step * batch, (step + 1) * batch), lr, step)
            trace.losses.append(float(loss) / plan.members)
            if before is not None:
                after = _snapshot(trainer)
                trace.roles[step] = role_ratios(plan, before, after)
                trace.composed[step] = composed_ratios(plan, before, after)
                trace.alpha_norm[step] = _alpha_norm(plan, after)
    finally:
        trainer.close()
    return trace
