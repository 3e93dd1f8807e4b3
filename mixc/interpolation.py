"""Linear interpolation between two ensemble members in weight space (the paper's Figure 4).

What is interpolated: each member's *composed* weights, not its alphas. A
member's weight for a banked layer is ``sum_l alpha[member, l] * T[l]``, and
under ``greedy_disjoint`` (or in blob mode) two members may mix different
templates, so interpolating alphas would not trace the straight line between
the two networks. Instead the run's model composes every member's weights
(its own ``compose()``), and a plain one-member network of the same backbone
(the spec recompiled with ``members=1, groups=none``) receives, for every
weight layer and every BatchNorm, ``(1 - t) * member_i + t * member_j``. Plain
layers shared by all members stay as they are (both ends agree).

BatchNorm runs in train mode by default, as in the paper: running statistics
are not meaningful between two networks, so each evaluation batch normalises
with its own statistics (``--batch-size`` matters; the default 500 takes
digits' test set in one batch). ``bn="eval"`` interpolates the running
statistics too; it reproduces the members exactly at t = 0 and 1. Dropout is
switched off in both modes (the plan's dropout layers get p = 0).

Any backend whose :class:`~mixc.backends.base.Runner` gives composed weights
(``composed_weights``) serves it; the arithmetic here is numpy, so torch and
flax score the same points (to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mixc.backends import DEFAULT
from mixc.compiler.plan import Plan
from mixc.core.checkpoint_format import spec_hash
from mixc.evaluation import EvalError, Run
from mixc.metrics import accuracy, ece, nll

__all__ = ["MemberWeights", "member_weights", "single_plan", "Interpolator", "interpolate"]


@dataclass
class MemberWeights:
    """Per-member arrays of a run: composed layer weights and BatchNorm tensors, member axis
    first."""

    # "<layer>.weight"/".bias" -> [M, ...], or a shared array (plain layers)
    layers: dict[str, np.ndarray]
    shared: set[str]  # keys of ``layers`` without a member axis
    # "bn.<layer>.weight|bias|running_mean|running_var", "ln.<layer>.weight|bias",
    # "embed.<layer>.token|pos" -> [M, ...]
    bn: dict[str, np.ndarray]
    members: int


def _member_own(role: str) -> bool:
    """A tensor each member holds whole, stored [M, ...] by its plan name: BatchNorm's (with its
    running statistics), LayerNorm's, class tokens and position embeddings."""
    return role.startswith("bn_") or role in ("norm_weight", "norm_bias", "embedding")


def member_weights(run: Run, backend: str = DEFAULT, device: str = "cpu") -> MemberWeights:
    """Load the run's checkpoint into ``backend``'s model and compose every member's weights."""
    from mixc.backends import get_backend
    from mixc.core.checkpoint_format import read_plan_arrays

    arrays, _, _ = read_plan_arrays(run.checkpoint, run.plan)
    runner = get_backend(backend, "interpolate").runner(run.plan, device=device)
    runner.load_arrays(arrays)
    layers = runner.composed_weights()
    shared = {
        f"{op.name}.{p}"
        for op in run.plan.ops
        if op.kind in ("conv", "linear") and op.source == "plain"
        for p in ("weight", "bias")
    }
    roles = {t.name: t.role for t in run.plan.tensors}
    bn = {n: np.array(a) for n, a in arrays.items() if _member_own(roles.get(n, ""))}
    return MemberWeights(layers, shared & set(layers), bn, run.plan.members)


def _weight_ops(plan: Plan) -> dict[str, tuple]:
    return {
        op.name: (op.kind, tuple(op.weight_shape), op.bias)
        for op in plan.ops
        if op.kind in ("conv", "linear")
    }


def single_plan(run: Run) -> Plan:
    """The run's backbone as a plain one-member network, recompiled from its spec (dropout set to
    0)."""
    import mixc
    from mixc.export import check_member_method, plain_plan_overrides
    from mixc.spec import SpecError

    check_member_method(run.plan, "interpolation between members", EvalError)
    spec, overrides = run.spec_and_overrides()
    try:
        again = mixc.compile(spec, overrides)
        plan = mixc.compile(spec, plain_plan_overrides(overrides, run.plan.method.name))
    except SpecError as e:
        raise EvalError(
            f"cannot recompile {spec} (with {' '.join(overrides) or 'no overrides'}) to build a"
            f" one-member network for {run.label}: {e.render()}"
        ) from e
    want = spec_hash(run.plan)
    if spec_hash(again) != want:
        raise EvalError(
            f"{spec} with {' '.join(overrides) or 'no overrides'} no longer compiles to the plan of"
            f" {run.label} (spec hash {again.spec_hash} vs {want}); hint: restore the spec as it"
            " was trained"
        )
    if _weight_ops(plan) != _weight_ops(run.plan):
        raise EvalError(
            f"the one-member network of {spec} has other weight layers than {run.label}'s plan"
        )
    ops = [op.model_copy(update={"p": 0.0}) if op.kind == "dropout" else op for op in plan.ops]
    return plan.model_copy(update={"ops": ops})


class Interpolator:
    """A one-member network that can be set to any point between two members and scored."""

    def __init__(
        self, run: Run, device: str = "cpu", backend: str = DEFAULT, batch: int = 500
    ) -> None:
        from mixc.backends import get_backend

        if run.plan.members < 2:
            raise EvalError(f"{run.label} has {run.plan.members} member; interpolation needs two")
        self.run = run
        self.weights = member_weights(run, backend, device)
        self.plan = single_plan(run)
        self.runner = get_backend(backend, "interpolate").runner(
            self.plan, device=device, batch_size=batch
        )
        self.shapes = {t.name: tuple(t.shape) for t in self.plan.tensors}
        self._sources: dict[str, tuple[str, str]] = {}  # target tensor -> (kind, key in weights)
        for t in self.plan.tensors:
            if _member_own(t.role):
                self._sources[t.name] = ("bn", t.name)
            else:  # member.<layer>.weight / plain.<layer>.bias -> "<layer>.weight"
                self._sources[t.name] = ("layer", t.name.split(".", 1)[1])

    def _pick(self, kind: str, key: str, m: int) -> np.ndarray:
        if kind == "bn":
            return self.weights.bn[key][m]
        w = self.weights.layers[key]
        return w if key in self.weights.shared else w[m]

    def set_point(self, i: int, j: int, t: float) -> None:
        """Load ``(1 - t) * member_i + t * member_j`` into the network."""
        m = self.weights.members
        for k in (i, j):
            if not 0 <= k < m:
                raise EvalError(
                    f"member {k} does not exist: {self.run.label} has members 0..{m - 1}"
                )
        point = {}
        for name, (kind, key) in self._sources.items():
            a, b = self._pick(kind, key, i), self._pick(kind, key, j)
            point[name] = ((1.0 - t) * a + t * b).astype(np.float32).reshape(self.shapes[name])
        self.runner.load_arrays(point)

    def probs(self, x: np.ndarray, bn: str = "train") -> np.ndarray:
        """The network's class probabilities ``[N, classes]``; BatchNorm in ``bn`` mode."""
        return self.runner.member_probs(x, bn=bn)[:, 0]

    def score(self, x: np.ndarray, y: np.ndarray, bn: str = "train") -> dict[str, float]:
        """Accuracy, NLL and ECE of the network as it stands; BatchNorm in ``bn`` mode."""
        p = self.probs(x, bn)
        return {"accuracy": accuracy(p, y), "nll": nll(p, y), "ece": ece(p, y)}


def interpolate(
    run: Run,
    i: int,
    j: int,
    points: int,
    x: np.ndarray,
    y: np.ndarray,
    bn: str = "train",
    batch: int = 500,
    device: str = "cpu",
    backend: str = DEFAULT,
) -> dict[str, Any]:
    """Score ``points`` evenly spaced networks from member ``i`` (t=0) to member ``j`` (t=1).

    Also scores the two ends with BatchNorm in eval mode (the members as the
    ensemble runs them), for reference.
    """
    if points < 2:
        raise EvalError("--points must be at least 2 (the two members)")
    if i == j:
        raise EvalError("--members needs two different members")
    interp = Interpolator(run, device, backend, batch)
    ts = [float(t) for t in np.linspace(0.0, 1.0, points)]
    rows = []
    for t in ts:
        interp.set_point(i, j, t)
        rows.append({"t": t, **interp.score(x, y, bn)})
    ends = {}
    for m, t in ((i, 0.0), (j, 1.0)):
        interp.set_point(i, j, t)
        ends[str(m)] = interp.score(x, y, "eval")
    return {
        "run": run.label,
        "members": [i, j],
        "bn": bn,
        "points": rows,
        "members_eval_mode": ends,
    }
