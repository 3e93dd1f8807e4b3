"""Inference cost from a Plan: multiply-accumulates of the weight layers, as the paper's FLOPs
column counts.

Only convolutions, linear layers and attention's two products (q k^T and the weighted sum of v,
2 N^2 D for N tokens of D channels) are counted (BatchNorm, LayerNorm, activations, softmax and
pooling are a few percent of a ResNet's or a ViT's cost and the paper's ratios ignore them). An
ensemble runs every member's layers, except that a chain of plain layers reading the shared input
(e.g. a plain stem) runs once for all members, as the generated models do. Composing weights from
templates is also left out: at inference it is done once, not per sample. So a 4-member
MixtureEnsemble costs about 4x its backbone, and the paper's thin WRN-28-5 x4 about 1x a WRN-28-10.
BatchEnsemble runs every layer per member (M x); MIMO and Packed-Ensembles run one network (MIMO
about 1x, Packed-Ensembles about alpha^2 / (gamma M) x).
"""

from __future__ import annotations

from mixc.compiler.layers import macs
from mixc.compiler.plan import Plan

__all__ = ["layer_macs", "backbone_macs", "ensemble_macs", "relative_flops"]


def layer_macs(op) -> int:
    """Multiply-accumulates of one conv, linear or attention op for one sample (0 for other
    ops)."""
    return macs(op)


def backbone_macs(plan: Plan) -> int:
    """One plain backbone, every layer once (a single-path plan records it: its ops are the widened
    network)."""
    if plan.accounting.backbone_macs is not None:
        return plan.accounting.backbone_macs
    return sum(layer_macs(op) for op in plan.ops)


def ensemble_macs(plan: Plan) -> int:
    """All members: per-member layers M times, the shared plain prefix once; a single-path plan
    (MIMO, Packed-Ensembles) runs its one network once. BatchEnsemble's fast weights add M x (in +
    out) multiplies per layer, elementwise, which are not counted (like BatchNorm)."""
    if plan.execution == "single_path":
        return sum(layer_macs(op) for op in plan.ops)
    shared: dict[str, bool] = {}
    total = 0
    for op in plan.ops:
        if op.kind == "input":
            shared[op.name] = True
            continue
        inputs_shared = all(shared.get(i, False) for i in op.inputs)
        if op.kind in ("bn", "layernorm", "cls_token", "pos_embed"):
            s = False  # every member has its own parameters
        elif op.kind in ("conv", "linear"):
            s = inputs_shared and op.source == "plain"
        else:
            s = inputs_shared
        shared[op.name] = s
        total += layer_macs(op) * (1 if s else plan.members)
    return total


def relative_flops(plan: Plan, reference: Plan | None = None) -> float:
    """Inference cost of ``plan``'s ensemble relative to one plain ``reference`` backbone (default
    its own)."""
    ref = backbone_macs(reference if reference is not None else plan)
    return ensemble_macs(plan) / ref if ref else float("nan")
