"""Deployment, framework-neutral: each member's own weights composed once, in numpy, from a
checkpoint.

A MixtureEnsemble checkpoint stores the bank form (templates, alphas, plain
weights, per-member BatchNorm). Deployment wants the opposite: every member's
weights spelled out, so that inference never re-composes them and so that a
member can leave as an ordinary single network. This module computes that
form from the Plan alone (``docs/plan.md``): member ``i``'s template mix is
``sum_j alpha[i, j] * bank[templates[i][j]]`` in bank mode, or the blob
windows starting at ``(offsets[i] + j * size) mod blob.size`` (wrapping round
the end) in blob mode; the first ``prod(weight_shape)`` entries are the weight,
the rest the bias. No torch or jax import here, so both backends' runs (which
share the checkpoint format) export the same way.

The ``members`` export writes one checkpoint per member for the *plain
backbone*: the plan compiled from the same spec with ``members=1 groups=none``,
whose tensors are ``member.<layer>.weight [1, ...]`` and ``bn.<layer>.* [1, C]``.
Each file is an ordinary mixc checkpoint of that plan (header, checksum), so
``mixc eval member_0.safetensors --plan plain_plan.json`` and
``load_checkpoint`` read it like any single network's.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mixc.compiler.methods import get_method
from mixc.compiler.plan import ConvOp, LinearOp, Plan
from mixc.core.errors import MixcError
from mixc.core.member_weights import LayerWeights, MemberWeights
from mixc.spec.sections import DEFAULT_METHOD

__all__ = [
    "ExportError",
    "LayerWeights",
    "MemberWeights",
    "compose_member",
    "compose_all",
    "with_temperature",
    "plain_plan_overrides",
    "member_tensors",
    "check_plain_plan",
    "ExportManifest",
    "TOLERANCE",
]

#: Largest max-abs difference in member probabilities an export may show against the run's own
#: model.
TOLERANCE = 1e-4


class ExportError(MixcError):
    """A user-facing export or predict problem: one paragraph, printed without a traceback."""


def _weight_ops(plan: Plan) -> list[ConvOp | LinearOp]:
    return [op for op in plan.ops if op.kind in ("conv", "linear")]


def _split(flat: np.ndarray, op: ConvOp | LinearOp) -> LayerWeights:
    """A template-shaped vector -> (weight, bias): the Plan's 'weight flattened, then bias'
    layout."""
    n = math.prod(op.weight_shape)
    return LayerWeights(flat[:n].reshape(op.weight_shape), flat[n:].copy() if op.bias else None)


def _get(arrays: dict[str, np.ndarray], name: str) -> np.ndarray:
    try:
        return np.asarray(arrays[name], dtype=np.float64)
    except KeyError:
        raise ExportError(
            f"the checkpoint has no tensor {name!r}, which its plan names; hint: the run folder's "
            "plan.json and checkpoint do not belong together (re-copy the run)"
        ) from None


def compose_layer(
    plan: Plan, arrays: dict[str, np.ndarray], op: ConvOp | LinearOp, m: int
) -> LayerWeights:
    """Member ``m``'s weight and bias of ``op`` (float64, so composition adds no rounding of its
    own)."""
    if op.source == "plain":
        b = f"plain.{op.name}.bias"
        return LayerWeights(
            _get(arrays, f"plain.{op.name}.weight"), _get(arrays, b) if op.bias else None
        )
    if op.source == "member":
        b = f"member.{op.name}.bias"
        return LayerWeights(
            _get(arrays, f"member.{op.name}.weight")[m], _get(arrays, b)[m] if op.bias else None
        )
    if op.source == "batch_ensemble":  # W * s r^T, r read per group of input channels
        w, r, s = (
            _get(arrays, f"{k}.{op.name}{p}")
            for k, p in (("plain", ".weight"), ("fast", ".r"), ("fast", ".s"))
        )
        out, per_group = w.shape[0], w.shape[1]
        r_m = np.repeat(r[m].reshape(op.groups, per_group), out // op.groups, axis=0)  # [O, I/g]
        tail = (1,) * (w.ndim - 2)
        bias = _get(arrays, f"member.{op.name}.bias")[m] if op.bias else None
        return LayerWeights(w * s[m].reshape(out, 1, *tail) * r_m.reshape(*r_m.shape, *tail), bias)
    slot = plan.slot(op.name)
    if slot is None:
        raise ExportError(
            f"plan {plan.name!r}: layer {op.name} draws from a {op.source} but has no slot; "
            "hint: recompile the spec"
        )
    alpha = _get(arrays, f"alpha.{op.name}")[m]
    if slot.templates is not None:
        bank = _get(arrays, f"bank.{slot.group}")
        rows = bank[np.asarray(slot.templates[m], dtype=np.int64)]  # [k, size]
    else:
        blob = _get(arrays, "blob")
        start = (
            slot.offsets[m] + np.arange(slot.k)[:, None] * slot.size + np.arange(slot.size)[None, :]
        )
        rows = blob[start % blob.shape[0]]  # windows wrap round the end of the blob
    return _split(alpha @ rows, op)


def compose_member(plan: Plan, arrays: dict[str, np.ndarray], m: int) -> MemberWeights:
    """Everything member ``m`` computes with, as a plain network's tensors."""
    layers = {op.name: compose_layer(plan, arrays, op, m) for op in _weight_ops(plan)}
    bn = {}
    for op in plan.ops:
        if op.kind == "bn":
            p = f"bn.{op.name}."
            bn[op.name] = tuple(
                _get(arrays, p + s)[m] for s in ("weight", "bias", "running_mean", "running_var")
            )
    own = {
        t.name: _get(arrays, t.name)[m]
        for t in plan.tensors
        if t.role in ("norm_weight", "norm_bias", "embedding")
    }
    return MemberWeights(layers, bn, own)


def compose_all(plan: Plan, arrays: dict[str, np.ndarray]) -> list[MemberWeights]:
    check_member_method(plan, "export", ExportError)
    return [compose_member(plan, arrays, m) for m in range(plan.members)]


def with_temperature(
    plan: Plan, members: list[MemberWeights], temperature: float | None
) -> list[MemberWeights]:
    """``members`` with the output layer's weight and bias divided by ``temperature``: its logits /
    T, so the exported softmaxes are the tempered ones (``mixc.temperature``). The plan's last op
    must be that layer (every zoo backbone ends in its classifier); otherwise an ExportError says
    to export without it.
    """
    if temperature is None or temperature == 1.0:
        return members
    last = plan.ops[-1]
    if last.kind not in ("conv", "linear"):
        raise ExportError(
            f"the run's temperature divides the logits, but {plan.name}'s last op {last.name} is a "
            f"{last.kind}, not the classifier, so it cannot be folded into the exported weights; "
            "hint: pass --no-temperature (and divide the logits yourself)"
        )
    out = []
    for mw in members:
        lw = mw.layers[last.name]
        scaled = LayerWeights(
            lw.weight / temperature, None if lw.bias is None else lw.bias / temperature
        )
        out.append(MemberWeights({**mw.layers, last.name: scaled}, mw.bn, mw.own))
    return out


# ---------------------------------------------------------------------------
# The plain backbone


def plain_plan_overrides(overrides: list[str], method: str = DEFAULT_METHOD) -> list[str]:
    """The run's overrides plus ``members=1`` and unfactorised weights (later --set wins): the plain
    backbone's plan. ``groups=none`` for a mixture (the spec's grouping line may stay),
    ``method=naive`` for the other per-member methods (grouping does not apply to them)."""
    return [*overrides, "members=1", *get_method(method).plain_backbone_override]


def check_member_method(plan: Plan, what: str, error: type[Exception]) -> None:
    """Refuse a single-path plan (MIMO, Packed-Ensembles) where each member must be a network of its
    own."""
    if plan.execution == "single_path":
        raise error(
            f"{what} needs each member as a network of its own, but method {plan.method.name} runs"
            f" all {plan.members} members in one network; hint: evaluate it as an ensemble (mixc"
            " eval), or export it whole (--format onnx/torch-export)"
        )


def check_plain_plan(plan: Plan, plain: Plan) -> None:
    """The plain backbone computes exactly what one member of ``plan`` does: same ops, same
    shapes."""
    # where weights come from may differ, nothing else
    ours = [o.model_dump(exclude={"source"}) for o in plan.ops]
    theirs = [o.model_dump(exclude={"source"}) for o in plain.ops]
    if (
        ours != theirs
        or plain.members != 1
        or any(o.source != "member" for o in _weight_ops(plain))
    ):
        raise ExportError(
            f"the plain backbone compiled from {plan.source} (members=1 groups=none) does not have"
            " the run's op graph; the spec file changed since the run was trained; hint: restore"
            " the spec it was trained from (config.json names it), or use --format"
            " onnx/torch-export, which need no recompilation"
        )


def member_tensors(plain: Plan, member: MemberWeights) -> dict[str, np.ndarray]:
    """``member`` under the plain backbone's tensor names and shapes (a leading member axis of 1),
    float32."""
    out: dict[str, np.ndarray] = {}
    for op in _weight_ops(plain):
        w = member.layers[op.name]
        out[f"member.{op.name}.weight"] = w.weight[None]
        if op.bias:
            out[f"member.{op.name}.bias"] = w.bias[None]
    for name, (g, b, mean, var) in member.bn.items():
        for suffix, a in (("weight", g), ("bias", b), ("running_mean", mean), ("running_var", var)):
            out[f"bn.{name}.{suffix}"] = a[None]
    want = {t.name: t.shape for t in plain.tensors}
    got = {k: list(v.shape) for k, v in out.items()}
    if got != want:
        bad = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        raise ExportError(
            f"the member's tensors do not match the plain backbone's ({', '.join(bad[:4])}); "
            "hint: the spec changed since the run was trained"
        )
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


# ---------------------------------------------------------------------------
# What an export records beside its file


class ExportManifest(BaseModel):
    """``<out>.json`` beside an export: what it is, where it came from, and how well it was
    checked."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["onnx", "torch-export", "members"]
    run: str
    spec: str
    spec_hash: str
    epoch: int = Field(ge=0)
    members: int = Field(ge=1)
    classes: int = Field(ge=1)
    input_shape: list[int]
    outputs: list[str]
    exporter: str
    opset: int | None = None
    checked_on: str
    checked_samples: int = Field(ge=1)
    max_abs_diff: float = Field(ge=0)
    files: list[str]
    preprocessing: str
    #: model input = (pixels in [0, 1] - pixel_mean) / pixel_std per channel, as the training data
    #: was prepared (None when the inputs are not images or their pixel scale is unknown)
    pixel_mean: list[float] | None = None
    pixel_std: list[float] | None = None
    #: the run's temperature (``mixc calibrate``), folded into the classifier's weights and bias
    #: (logits / T); None when the export is uncalibrated
    temperature: float | None = None
    calibration_checkpoint_sha256: str | None = None
