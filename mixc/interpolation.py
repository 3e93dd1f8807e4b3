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

Torch only for now: it needs a backend that exposes the composed weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mixc.compiler.plan import Plan
from mixc.evaluation import EvalError, Run
from mixc.metrics import accuracy, ece, nll

__all__ = ["MemberWeights", "member_weights", "single_plan", "Interpolator", "interpolate"]


@dataclass
class MemberWeights:
    """Per-member tensors of a run: composed layer weights and BatchNorm tensors, member axis first."""

    layers: dict[str, Any]  # "<layer>.weight"/".bias" -> [M, ...] tensor, or a shared tensor (plain layers)
    shared: set[str]  # keys of ``layers`` without a member axis
    bn: dict[str, Any]  # "bn.<layer>.weight|bias|running_mean|running_var" -> [M, C]
    members: int


def member_weights(run: Run, device: str = "cpu") -> MemberWeights:
    """Load the run's checkpoint into its model and compose every member's weights."""
    import torch

    from mixc.backends.torch import CheckpointError, build, load_checkpoint, named_plan_tensors

    model = build(run.plan, device=device)
    try:
        load_checkpoint(run.checkpoint, model, run.plan)
    except CheckpointError as e:
        raise EvalError(str(e)) from e
    with torch.no_grad():
        layers = {k: v.detach().clone() for k, v in model.compose().items()}
    shared = {f"{op.name}.{p}" for op in run.plan.ops if op.kind in ("conv", "linear") and op.source == "plain"
              for p in ("weight", "bias")}
    tensors = named_plan_tensors(model)
    roles = {t.name: t.role for t in run.plan.tensors}
    bn = {n: t.detach().clone() for n, t in tensors.items() if roles.get(n, "").startswith("bn_")}
    return MemberWeights(layers, shared & set(layers), bn, run.plan.members)


def _weight_ops(plan: Plan) -> dict[str, tuple]:
    return {op.name: (op.kind, tuple(op.weight_shape), op.bias) for op in plan.ops if op.kind in ("conv", "linear")}


def single_plan(run: Run) -> Plan:
    """The run's backbone as a plain one-member network, recompiled from its spec (dropout set to 0)."""
    import mixc
    from mixc.spec import SpecError

    spec, overrides = run.spec_and_overrides()
    try:
        again = mixc.compile(spec, overrides)
        plan = mixc.compile(spec, overrides + ["members=1", "groups=none"])
    except SpecError as e:
        raise EvalError(
            f"cannot recompile {spec} (with {' '.join(overrides) or 'no overrides'}) to build a one-member "
            f"network for {run.label}: {e.render()}"
        ) from e
    want = run.plan.spec_hash or run.plan.content_hash()
    if (again.spec_hash or again.content_hash()) != want:
        raise EvalError(
            f"{spec} with {' '.join(overrides) or 'no overrides'} no longer compiles to the plan of {run.label} "
            f"(spec hash {again.spec_hash} vs {want}); hint: restore the spec as it was trained"
        )
    if _weight_ops(plan) != _weight_ops(run.plan):
        raise EvalError(f"the one-member network of {spec} has other weight layers than {run.label}'s plan")
    ops = [op.model_copy(update={"p": 0.0}) if op.kind == "dropout" else op for op in plan.ops]
    return plan.model_copy(update={"ops": ops})


class Interpolator:
    """A one-member network that can be set to any point between two members and scored."""

    def __init__(self, run: Run, device: str = "cpu") -> None:
        from mixc.backends.torch import build, named_plan_tensors

        if run.plan.members < 2:
            raise EvalError(f"{run.label} has {run.plan.members} member; interpolation needs two")
        self.run = run
        self.weights = member_weights(run, device)
        self.plan = single_plan(run)
        self.model = build(self.plan, device=device)
        self.targets = named_plan_tensors(self.model)
        self.device = device
        self._sources: dict[str, tuple[str, str]] = {}  # target tensor -> (kind, key in weights)
        for name in self.targets:
            role = next(t.role for t in self.plan.tensors if t.name == name)
            if role.startswith("bn_"):
                self._sources[name] = ("bn", name)
            else:  # member.<layer>.weight / plain.<layer>.bias -> "<layer>.weight"
                prefix, rest = name.split(".", 1)
                self._sources[name] = ("layer", rest)

    def _pick(self, kind: str, key: str, m: int):
        if kind == "bn":
            return self.weights.bn[key][m]
        w = self.weights.layers[key]
        return w if key in self.weights.shared else w[m]

    def set_point(self, i: int, j: int, t: float) -> None:
        """Load ``(1 - t) * member_i + t * member_j`` into the network."""
        import torch

        m = self.weights.members
        for k in (i, j):
            if not 0 <= k < m:
                raise EvalError(f"member {k} does not exist: {self.run.label} has members 0..{m - 1}")
        with torch.no_grad():
            for name, (kind, key) in self._sources.items():
                a, b = self._pick(kind, key, i), self._pick(kind, key, j)
                target = self.targets[name]
                target.copy_(((1.0 - t) * a + t * b).reshape(target.shape))

    def score(self, x: np.ndarray, y: np.ndarray, bn: str = "train", batch: int = 500) -> dict[str, float]:
        """Accuracy, NLL and ECE of the network as it stands; BatchNorm in ``bn`` mode."""
        import torch
        import torch.nn.functional as F

        self.model.train(bn == "train")
        outs = []
        with torch.no_grad():
            for s in range(0, len(x), batch):
                xb = torch.from_numpy(np.ascontiguousarray(x[s : s + batch], dtype=np.float32)).to(self.device)
                outs.append(F.softmax(self.model(xb)[:, 0].float(), dim=-1).cpu().numpy())
        p = np.concatenate(outs)
        return {"accuracy": accuracy(p, y), "nll": nll(p, y), "ece": ece(p, y)}


def interpolate(
    run: Run, i: int, j: int, points: int, x: np.ndarray, y: np.ndarray, bn: str = "train", batch: int = 500,
    device: str = "cpu",
) -> dict[str, Any]:
    """Score ``points`` evenly spaced networks from member ``i`` (t=0) to member ``j`` (t=1).

    Also scores the two ends with BatchNorm in eval mode (the members as the
    ensemble runs them), for reference.
    """
    if points < 2:
        raise EvalError("--points must be at least 2 (the two members)")
    if i == j:
        raise EvalError("--members needs two different members")
    interp = Interpolator(run, device)
    ts = [float(t) for t in np.linspace(0.0, 1.0, points)]
    rows = []
    for t in ts:
        interp.set_point(i, j, t)
        rows.append({"t": t, **interp.score(x, y, bn, batch)})
    ends = {}
    for m, t in ((i, 0.0), (j, 1.0)):
        interp.set_point(i, j, t)
        ends[str(m)] = interp.score(x, y, "eval", batch)
    return {"run": run.label, "members": [i, j], "bn": bn, "points": rows, "members_eval_mode": ends}
