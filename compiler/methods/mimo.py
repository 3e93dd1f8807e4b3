"""MIMO: one network whose first layers read the members' stacked inputs and whose last layers hold
M heads."""

from __future__ import annotations

from mixc.compiler import plan as P
from mixc.compiler.layers import macs
from mixc.compiler.methods.base import (
    Backbone,
    EnsembleMethod,
    MethodError,
    MethodParts,
    register_method,
)
from mixc.compiler.methods.tensors import layer_tensors, plain_tensors, trainable
from mixc.compiler.methods.widths import WEIGHT_KINDS, in_width, layer_roles, out_width, retarget
from mixc.spec.diagnostics import Pos

#: MIMO trains on ``batch x batch_repetitions`` rows a step; like members (1,024), kept where tables
#: and index arrays stay small (the paper repeats a batch 2 to 4 times)
MAX_REPETITIONS = 1024


def mimo_ops(ops: list, M: int, where: dict[str, Pos]) -> list:
    """MIMO's single network: the input stacks the M members' inputs on the channel axis
    (member-major), the first weight layers read all of them, the last produce M x their outputs
    (M heads)."""
    first, last = layer_roles(ops)

    def rule(o, cin: int) -> tuple[int, int]:
        want = in_width(o) * (M if o.name in first else 1)
        if cin != want:
            raise MethodError(
                f"mimo: layer '{o.name}' would read {cin} channels, expected {want}",
                where.get(o.name),
            )
        return out_width(o) * (M if o.name in last else 1), o.groups

    return retarget(ops, M, rule, where, "mimo")


def mimo_per_member(ops: list, M: int) -> int:
    """The parameters that serve one member alone: its share of the first layers' input channels and
    its head."""
    first, last = layer_roles(ops)
    n = 0
    for o in ops:
        if o.kind in WEIGHT_KINDS and (o.name in first or o.name in last):
            weight = 1
            for d in o.weight_shape:
                weight *= d
            n += (weight + (out_width(o) if o.bias and o.name in last else 0)) // M
    return n


class Mimo(EnsembleMethod):
    name = "mimo"
    title = "MIMO"
    execution = "single_path"
    weight_sources = frozenset({"plain"})
    has_templates = False
    per_member_weights = False
    shares_plain_weights = True
    has_fast_weights = False
    stacks_inputs = True
    uses_budget = False
    budget_is_ceiling = False
    budget_solves = None
    equal_shares = False
    searched_settings = ("members",)
    plain_backbone_override = ("method=naive",)

    def check_sizes(self, options: dict, ops: list, pos_of) -> None:
        if options.get("batch_repetitions", 1) > MAX_REPETITIONS:
            r = options["batch_repetitions"]
            raise MethodError(
                f"mimo(batch_repetitions = {r:,}): at most {MAX_REPETITIONS:,} repetitions of a"
                f" batch (each training step reads batch x {r:,} rows)",
                pos_of("batch_repetitions"),
                "the MIMO paper repeats a batch 2 to 4 times",
            )

    def build(self, b: Backbone) -> MethodParts:
        M, ops = b.members, b.ops
        new = mimo_ops(ops, M, b.graph.pos)
        tensors = layer_tensors(new, M, plain_tensors, single_path=True)
        return MethodParts(
            P.MimoMethod(**b.ens.method.options),
            new,
            tensors,
            mimo_per_member(new, M),
            trainable(tensors),
            None,
            sum(macs(o) for o in ops),
        )


register_method(Mimo())
