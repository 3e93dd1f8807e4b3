"""Packed-Ensembles: one network, every layer widened by alpha and split into gamma x M groups.

A budget, where given instead of alpha, solves alpha (the valid one whose total is nearest the
budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from math import gcd, lcm

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
from mixc.compiler.methods.widths import (
    MAX_WIDTH,
    WEIGHT_KINDS,
    in_width,
    layer_roles,
    out_width,
    params_of,
    retarget,
)
from mixc.spec.diagnostics import Pos


@dataclass(frozen=True)
class WidthConstraint:
    """alpha x ``channels`` must be a whole multiple of ``divisor`` (the ``side`` of ``layer``)."""

    layer: str
    side: str  # "input" or "output"
    channels: int
    divisor: int
    why: str


def packed_constraints(ops: list, M: int, gamma: int) -> list[WidthConstraint]:
    """What alpha must satisfy so every widened width splits into its layer's groups (in op
    order)."""
    first, last = layer_roles(ops)
    out: list[WidthConstraint] = []
    for o in ops:
        if o.kind == "attention":
            heads = f"{M} members x {o.heads} heads"
            out.append(WidthConstraint(o.name, "input", o.channels, M * o.heads, heads))
        if o.kind not in WEIGHT_KINDS:
            continue
        g = o.groups
        split = f"{gamma * M * g} groups (gamma {gamma} x {M} members" + (
            f" x groups {g})" if g > 1 else ")"
        )
        if o.name not in first:
            divisor, why = (
                (M * g, f"{M * g} groups (one per member)")
                if o.name in last
                else (gamma * M * g, split)
            )
            out.append(WidthConstraint(o.name, "input", in_width(o), divisor, why))
        if o.name not in last:
            if o.name in first:
                out.append(
                    WidthConstraint(
                        o.name,
                        "output",
                        out_width(o),
                        lcm(g, M),
                        f"{M} members' equal shares" + (f" and {g} groups" if g > 1 else ""),
                    )
                )
            else:
                out.append(WidthConstraint(o.name, "output", out_width(o), gamma * M * g, split))
    return out


def alpha_step(constraints: list[WidthConstraint]) -> Fraction:
    """The smallest alpha > 0 meeting every constraint; the valid alphas are exactly its
    multiples."""
    num, den = 1, 0
    for c in constraints:
        f = Fraction(c.divisor, c.channels)
        num, den = lcm(num, f.numerator), gcd(den, f.denominator)
    return Fraction(num, den or 1)


def show(x: Fraction) -> str:
    """A fraction as a spec would write it: 2, 0.25, or 1/3 when no short decimal is exact."""
    if x.denominator == 1:
        return str(x.numerator)
    f = float(x)
    return f"{f:g}" if Fraction(f"{f:g}") == x else f"{x.numerator}/{x.denominator}"


def packed_ops(ops: list, M: int, alpha: Fraction, gamma: int, where: dict[str, Pos]) -> list:
    """Packed-Ensembles' single network (torch-uncertainty ``PackedConv2d``/``PackedLinear``): each
    weight layer widened by alpha in ``gamma x M`` groups; a first layer keeps its input and its
    groups; a last layer reads its widened input in M groups and produces M x its outputs. Raises
    MethodError naming the first layer whose width does not divide."""
    for c in packed_constraints(ops, M, gamma):
        width = alpha * c.channels
        if width.denominator != 1 or width % c.divisor:
            raise MethodError(
                _width_message(c, alpha, gamma, M),
                where.get(c.layer),
                _width_hint(ops, M, gamma, alpha),
            )
    first, last = layer_roles(ops)

    def rule(o, cin: int) -> tuple[int, int]:
        g = o.groups
        want = in_width(o) if o.name in first else alpha * in_width(o)
        if cin != want:
            raise MethodError(
                f"packed: layer '{o.name}' would read {cin} channels, expected {show(want)}",
                where.get(o.name),
            )
        if o.name in last:
            return M * out_width(o), (g if o.name in first else M * g)
        return int(alpha * out_width(o)), (g if o.name in first else gamma * M * g)

    return retarget(ops, 1, rule, where, "packed", split=M)


def _width_message(c: WidthConstraint, alpha: Fraction, gamma: int, M: int) -> str:
    width = alpha * c.channels
    head = (
        f"packed(alpha = {show(alpha)}, gamma = {gamma}) with {M} members: layer '{c.layer}' would"
        f" have {show(alpha)} x {c.channels} = {show(width)} {c.side} channels"
    )
    if width.denominator != 1:
        return head + ", not a whole number"
    return head + f", which do not split into {c.why}"


def _width_hint(ops: list, M: int, gamma: int, alpha: Fraction) -> str:
    step = alpha_step(packed_constraints(ops, M, gamma))
    k = max(1, int(alpha / step))
    near = sorted({k * step, (k + 1) * step} - {alpha})
    return (
        f"every width divides when alpha is a multiple of {show(step)} (try alpha = "
        + " or ".join(show(a) for a in near)
        + "); or give a budget instead of alpha, which picks one"
    )


def solve_alpha(
    ops: list,
    M: int,
    gamma: int,
    budget: int,
    where: dict[str, Pos],
    budget_pos: Pos | None,
    backbone: int,
) -> Fraction:
    """The valid alpha whose Packed-Ensemble's total is closest to ``budget`` (ties: the smaller).
    Alpha moves the total in coarse steps (about alpha^2), so the nearest count matches a
    comparison better than the largest below (mixture's rule): 1.0x of WRN-28-10 is alpha 2 at
    1.0007x, not alpha 1.75 at 0.77x. A budget below the smallest Packed-Ensemble is an error.
    The total grows with alpha: bisection over the valid alphas (the multiples of the step)."""
    step = alpha_step(packed_constraints(ops, M, gamma))
    widest = max((out_width(o) for o in ops if o.kind in WEIGHT_KINDS), default=1)

    def total(n: int) -> int:
        return params_of(packed_ops(ops, M, n * step, gamma, where))

    smallest = total(1)
    if smallest > budget:
        raise MethodError(
            f"the budget {budget:,} is below the smallest Packed-Ensemble of this backbone with {M}"
            f" members and gamma {gamma}: alpha = {show(step)} (the smallest alpha at which every"
            f" width divides) gives {smallest:,} parameters",
            budget_pos,
            f"raise the budget to at least {smallest:,} ({smallest / backbone:.3g}x), or raise"
            " gamma",
        )
    lo, hi = 1, 2  # total(lo) <= budget; hi: above it, or as wide as a layer may grow
    while total(hi) <= budget and hi * step * widest < MAX_WIDTH:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid)
    if total(hi) > budget and total(hi) - budget < budget - total(lo):
        lo = hi
    return lo * step


class Packed(EnsembleMethod):
    name = "packed"
    title = "Packed-Ensembles"
    execution = "single_path"
    weight_sources = frozenset({"plain"})
    has_templates = False
    per_member_weights = False
    shares_plain_weights = True
    has_fast_weights = False
    stacks_inputs = False
    uses_budget = True
    budget_is_ceiling = False
    budget_solves = "alpha"
    equal_shares = True
    searched_settings = ("budget", "members")
    plain_backbone_override = ("method=naive",)

    def check_sizes(self, options: dict, ops: list, pos_of) -> None:
        if "alpha" in options:
            alpha = options["alpha"]
            widths = [out_width(o) for o in ops if o.kind in WEIGHT_KINDS]
            if widths and alpha * max(widths) > MAX_WIDTH:
                raise MethodError(
                    f"packed(alpha = {alpha:g}) would widen a layer of {max(widths):,} channels to "
                    f"{alpha * max(widths):,.0f}, more than {MAX_WIDTH:,} channels",
                    pos_of("alpha"),
                    "Packed-Ensembles widen layers by 1 to 4 (alpha 2 is the paper's); or give a"
                    " budget, which picks alpha",
                )

    def build(self, b: Backbone) -> MethodParts:
        M, ops, options, budget, where = (
            b.members,
            b.ops,
            b.ens.method.options,
            b.budget,
            b.graph.pos,
        )
        gamma = options.get("gamma", 1)
        if "alpha" in options or budget is None:
            alpha = Fraction(options.get("alpha", 2.0)).limit_denominator(10**6)
            budget = None
        else:
            alpha = solve_alpha(ops, M, gamma, budget, where, b.budget_pos, b.backbone)
        new = packed_ops(ops, M, alpha, gamma, where)
        tensors = layer_tensors(new, M, plain_tensors, single_path=True)
        step = alpha_step(packed_constraints(ops, M, gamma))
        smallest = params_of(packed_ops(ops, M, step, gamma, where))
        method = P.PackedMethod(
            alpha=float(alpha), gamma=gamma, alpha_from_budget=budget is not None
        )
        return MethodParts(
            method,
            new,
            tensors,
            trainable(tensors) // M,
            smallest,
            budget,
            sum(macs(o) for o in ops),
        )


register_method(Packed())
