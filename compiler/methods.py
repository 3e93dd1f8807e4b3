"""The ensemble methods beside MixtureEnsembles: their op graphs, tensors and parameter counts.

``compile.py`` elaborates the backbone once and hands the plain graph here for
``batch_ensemble``, ``mimo`` and ``packed`` (``mixture`` and ``naive`` stay in
``compile.py``). BatchEnsemble keeps the graph and gives each weight layer a
shared weight plus per-member fast weights; MIMO and Packed-Ensembles rewrite
the graph's widths into one single-path network (:func:`retarget`), so their
tensors are ordinary ``plain.*`` weights of new shapes. docs/plan.md states
each method's tensors; the tests recount them from the backbone independently.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from math import gcd, lcm
from typing import Callable

from mixc.compiler import plan as P
from mixc.compiler.layers import macs
from mixc.spec.diagnostics import Diagnostics, Pos

WEIGHT_KINDS = ("conv", "linear")
MAX_WIDTH = 1 << 24  # channels a packed layer may reach while alpha is solved (far above any real network)


class MethodError(Exception):
    """A method that cannot be applied to this backbone; compile.py reports it at ``pos``."""

    def __init__(self, message: str, pos: Pos | None, hint: str | None = None):
        super().__init__(message)
        self.message, self.pos, self.hint = message, pos, hint


@dataclass
class MethodParts:
    """What a method contributes to the Plan; compile.py adds the accounting and the rest."""

    method: P.Method
    ops: list
    tensors: list[P.Tensor]
    per_member: int  # parameters one member holds alone (docs/plan.md, per method)
    minimum: int  # the smallest model of this method (packed: at the smallest valid alpha)
    budget: int | None  # the budget that applied (packed with a budget), else None
    backbone_macs: int | None  # one plain backbone's MACs, for single-path plans


# ---------------------------------------------------------------------------
# Which layers read the input, which produce the logits


def layer_roles(ops: list) -> tuple[set[str], set[str]]:
    """(first, last): weight layers no weight layer precedes (they read the input), and weight layers
    whose output reaches the logits through no other weight layer."""
    after_weight: dict[str, bool] = {}
    first: set[str] = set()
    for o in ops:
        upstream = any(after_weight[i] for i in o.inputs)
        if o.kind in WEIGHT_KINDS:
            if not upstream:
                first.add(o.name)
            after_weight[o.name] = True
        else:
            after_weight[o.name] = upstream
    by_name = {o.name: o for o in ops}
    last: set[str] = set()
    stack, seen = [ops[-1].name], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if by_name[name].kind in WEIGHT_KINDS:
            last.add(name)
        else:
            stack.extend(by_name[name].inputs)
    return first, last


# ---------------------------------------------------------------------------
# Rewriting widths: one network that holds every member


#: (op, its new input channels) -> (output channels, groups) of a weight layer
WidthRule = Callable[[P.ConvOp | P.LinearOp, int], tuple[int, int]]


def retarget(ops: list, input_factor: int, rule: WidthRule, where: dict[str, Pos], what: str) -> list:
    """The graph with the input's channels multiplied by ``input_factor`` and every weight layer's output
    channels and groups from ``rule``; every other op follows its input's new shape. Raises MethodError
    where two paths meet with different widths."""
    shapes: dict[str, list[int]] = {}
    out = []
    for o in ops:
        if o.kind == "input":
            new = o.model_copy(update={"out_shape": [o.out_shape[0] * input_factor, *o.out_shape[1:]]})
            shapes[o.name] = new.out_shape
            out.append(new)
            continue
        ins = [shapes[i] for i in o.inputs]
        x = ins[0]
        if any(s != x for s in ins[1:]):
            raise MethodError(f"{what}: the residual add '{o.name}' would add {ins[0][0]} channels to "
                              f"{ins[1][0]}: one path reads the network's input before any weight layer, the "
                              "other after one", where.get(o.name),
                              "give the shortcut a projection (conv) so both paths are weight layers' outputs")
        update: dict = {"in_shape": x}
        if o.kind == "conv":
            cout, groups = rule(o, x[0])
            update |= {"in_channels": x[0], "out_channels": cout, "groups": groups, "out_shape": [cout, *o.out_shape[1:]]}
        elif o.kind == "linear":
            cout, groups = rule(o, x[0])
            update |= {"in_features": x[0], "out_features": cout, "groups": groups, "out_shape": [cout]}
        elif o.kind == "bn":
            update |= {"channels": x[0], "out_shape": x}
        elif o.kind == "flatten":
            n = 1
            for d in x:
                n *= d
            update["out_shape"] = [n]
        elif o.kind == "global_pool":
            update["out_shape"] = [x[0]]
        else:  # activations, pools, dropout, add: the channels of their input, their own spatial size
            update["out_shape"] = [x[0], *o.out_shape[1:]]
        new = o.model_copy(update=update)
        shapes[o.name] = new.out_shape
        out.append(new)
    return out


def _in_width(o) -> int:
    return o.in_channels if o.kind == "conv" else o.in_features


def _out_width(o) -> int:
    return o.out_channels if o.kind == "conv" else o.out_features


def _groups(o) -> int:
    return o.groups


# ---------------------------------------------------------------------------
# MIMO


def mimo_ops(ops: list, M: int, where: dict[str, Pos]) -> list:
    """MIMO's single network: the input stacks the M members' inputs on the channel axis (member-major),
    the first weight layers read all of them, the last produce M x their outputs (M heads)."""
    first, last = layer_roles(ops)

    def rule(o, cin: int) -> tuple[int, int]:
        want = _in_width(o) * (M if o.name in first else 1)
        if cin != want:
            raise MethodError(f"mimo: layer '{o.name}' would read {cin} channels, expected {want}", where.get(o.name))
        return _out_width(o) * (M if o.name in last else 1), _groups(o)

    return retarget(ops, M, rule, where, "mimo")


def mimo_per_member(ops: list, M: int) -> int:
    """The parameters that serve one member alone: its share of the first layers' input channels and its head."""
    first, last = layer_roles(ops)
    n = 0
    for o in ops:
        if o.kind in WEIGHT_KINDS and (o.name in first or o.name in last):
            weight = 1
            for d in o.weight_shape:
                weight *= d
            n += (weight + (_out_width(o) if o.bias and o.name in last else 0)) // M
    return n


# ---------------------------------------------------------------------------
# Packed-Ensembles


@dataclass(frozen=True)
class WidthConstraint:
    """alpha x ``channels`` must be a whole multiple of ``divisor`` (the ``side`` of ``layer``)."""

    layer: str
    side: str  # "input" or "output"
    channels: int
    divisor: int
    why: str


def packed_constraints(ops: list, M: int, gamma: int) -> list[WidthConstraint]:
    """What alpha must satisfy so every widened width splits into its layer's groups (in op order)."""
    first, last = layer_roles(ops)
    out: list[WidthConstraint] = []
    for o in ops:
        if o.kind not in WEIGHT_KINDS:
            continue
        g = _groups(o)
        split = f"{gamma * M * g} groups (gamma {gamma} x {M} members" + (f" x groups {g})" if g > 1 else ")")
        if o.name not in first:
            divisor, why = (M * g, f"{M * g} groups (one per member)") if o.name in last else (gamma * M * g, split)
            out.append(WidthConstraint(o.name, "input", _in_width(o), divisor, why))
        if o.name not in last:
            if o.name in first:
                out.append(WidthConstraint(o.name, "output", _out_width(o), lcm(g, M),
                                           f"{M} members' equal shares" + (f" and {g} groups" if g > 1 else "")))
            else:
                out.append(WidthConstraint(o.name, "output", _out_width(o), gamma * M * g, split))
    return out


def alpha_step(constraints: list[WidthConstraint]) -> Fraction:
    """The smallest alpha > 0 meeting every constraint; the valid alphas are exactly its multiples."""
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
    """Packed-Ensembles' single network (torch-uncertainty ``PackedConv2d``/``PackedLinear``): each weight
    layer widened by alpha in ``gamma x M`` groups; a first layer keeps its input and its groups; a last
    layer reads its widened input in M groups and produces M x its outputs. Raises MethodError naming
    the first layer whose width does not divide."""
    for c in packed_constraints(ops, M, gamma):
        width = alpha * c.channels
        if width.denominator != 1 or width % c.divisor:
            raise MethodError(_width_message(c, alpha, gamma, M), where.get(c.layer), _width_hint(ops, M, gamma, alpha))
    first, last = layer_roles(ops)

    def rule(o, cin: int) -> tuple[int, int]:
        g = _groups(o)
        want = _in_width(o) if o.name in first else alpha * _in_width(o)
        if cin != want:
            raise MethodError(f"packed: layer '{o.name}' would read {cin} channels, expected {show(want)}",
                              where.get(o.name))
        if o.name in last:
            return M * _out_width(o), (g if o.name in first else M * g)
        return int(alpha * _out_width(o)), (g if o.name in first else gamma * M * g)

    return retarget(ops, 1, rule, where, "packed")


def _width_message(c: WidthConstraint, alpha: Fraction, gamma: int, M: int) -> str:
    width = alpha * c.channels
    head = (f"packed(alpha = {show(alpha)}, gamma = {gamma}) with {M} members: layer '{c.layer}' would have "
            f"{show(alpha)} x {c.channels} = {show(width)} {c.side} channels")
    if width.denominator != 1:
        return head + ", not a whole number"
    return head + f", which do not split into {c.why}"


def _width_hint(ops: list, M: int, gamma: int, alpha: Fraction) -> str:
    step = alpha_step(packed_constraints(ops, M, gamma))
    k = max(1, int(alpha / step))
    near = sorted({k * step, (k + 1) * step} - {alpha})
    return (f"every width divides when alpha is a multiple of {show(step)} (try alpha = "
            + " or ".join(show(a) for a in near) + "); or give a budget instead of alpha, which picks one")


def params_of(ops: list) -> int:
    """Trainable parameters of a single-path network: weights, biases, one BatchNorm scale and shift."""
    n = 0
    for o in ops:
        if o.kind in WEIGHT_KINDS:
            w = 1
            for d in o.weight_shape:
                w *= d
            n += w + (_out_width(o) if o.bias else 0)
        elif o.kind == "bn":
            n += 2 * o.channels
    return n


def solve_alpha(ops: list, M: int, gamma: int, budget: int, where: dict[str, Pos],
                budget_pos: Pos | None, backbone: int) -> Fraction:
    """The valid alpha whose Packed-Ensemble's total is closest to ``budget`` (ties: the smaller). Alpha moves
    the total in coarse steps (about alpha^2), so the nearest count matches a comparison better than the
    largest below (mixture's rule): 1.0x of WRN-28-10 is alpha 2 at 1.0007x, not alpha 1.75 at 0.77x. A
    budget below the smallest Packed-Ensemble is an error. The total grows with alpha: bisection over
    the valid alphas (the multiples of the step)."""
    step = alpha_step(packed_constraints(ops, M, gamma))
    widest = max((_out_width(o) for o in ops if o.kind in WEIGHT_KINDS), default=1)

    def total(n: int) -> int:
        return params_of(packed_ops(ops, M, n * step, gamma, where))

    smallest = total(1)
    if smallest > budget:
        raise MethodError(f"the budget {budget:,} is below the smallest Packed-Ensemble of this backbone with {M} "
                          f"members and gamma {gamma}: alpha = {show(step)} (the smallest alpha at which every "
                          f"width divides) gives {smallest:,} parameters", budget_pos,
                          f"raise the budget to at least {smallest:,} ({smallest / backbone:.3g}x), or raise gamma")
    lo, hi = 1, 2  # total(lo) <= budget; hi: above it, or as wide as a layer may grow
    while total(hi) <= budget and hi * step * widest < MAX_WIDTH:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid)
    if total(hi) > budget and total(hi) - budget < budget - total(lo):
        lo = hi
    return lo * step


# ---------------------------------------------------------------------------
# Tensors


def bn_tensors(o: P.BatchNormOp, M: int | None) -> list[P.Tensor]:
    """One BatchNorm's tensors: ``[M, C]`` per member, or ``[C]`` for a single-path network (``M`` None)."""
    shape = [o.channels] if M is None else [M, o.channels]
    return [P.Tensor(name=f"bn.{o.name}.{field}", shape=shape, role=role, trainable=trainable, layer=o.name,
                     per_member=M is not None)
            for field, role, trainable in (("weight", "bn_weight", True), ("bias", "bn_bias", True),
                                           ("running_mean", "bn_mean", False), ("running_var", "bn_var", False))]


def plain_tensors(o) -> list[P.Tensor]:
    out = [P.Tensor(name=f"plain.{o.name}.weight", shape=o.weight_shape, role="plain_weight", trainable=True,
                    layer=o.name)]
    if o.bias:
        out.append(P.Tensor(name=f"plain.{o.name}.bias", shape=[_out_width(o)], role="plain_bias", trainable=True,
                            layer=o.name))
    return out


def batch_ensemble_tensors(o, M: int) -> list[P.Tensor]:
    """A BatchEnsemble layer: shared ``W``, fast weights ``r [M, in]`` and ``s [M, out]``, a bias per member."""
    out = [P.Tensor(name=f"plain.{o.name}.weight", shape=o.weight_shape, role="plain_weight", trainable=True,
                    layer=o.name),
           P.Tensor(name=f"fast.{o.name}.r", shape=[M, _in_width(o)], role="fast_in", trainable=True, layer=o.name,
                    per_member=True),
           P.Tensor(name=f"fast.{o.name}.s", shape=[M, _out_width(o)], role="fast_out", trainable=True,
                    layer=o.name, per_member=True)]
    if o.bias:
        out.append(P.Tensor(name=f"member.{o.name}.bias", shape=[M, _out_width(o)], role="member_bias",
                            trainable=True, layer=o.name, per_member=True))
    return out


def method_tensors(ops: list, M: int, method: str) -> list[P.Tensor]:
    """Every tensor of a batch_ensemble, mimo or packed model, in op order (the checkpoint names)."""
    out: list[P.Tensor] = []
    for o in ops:
        if o.kind in WEIGHT_KINDS:
            out += batch_ensemble_tensors(o, M) if method == "batch_ensemble" else plain_tensors(o)
        elif o.kind == "bn":
            out += bn_tensors(o, M if method == "batch_ensemble" else None)
    return out


# ---------------------------------------------------------------------------
# The whole method


#: MIMO trains on ``batch x batch_repetitions`` rows a step; like members (1,024), kept where tables and
#: index arrays stay small (the paper repeats a batch 2 to 4 times)
MAX_REPETITIONS = 1024


def check_method_sizes(name: str, options: dict, ops: list, pos_of: Callable[[str], Pos | None]) -> None:
    """Refuse method options that make a model too large by construction, at the option (MethodError):
    a packed alpha widening a layer past MAX_WIDTH channels, MIMO repetitions past MAX_REPETITIONS."""
    if name == "mimo" and options.get("batch_repetitions", 1) > MAX_REPETITIONS:
        r = options["batch_repetitions"]
        raise MethodError(f"mimo(batch_repetitions = {r:,}): at most {MAX_REPETITIONS:,} repetitions of a batch "
                          f"(each training step reads batch x {r:,} rows)", pos_of("batch_repetitions"),
                          "the MIMO paper repeats a batch 2 to 4 times")
    if name == "packed" and "alpha" in options:
        alpha = options["alpha"]
        widths = [_out_width(o) for o in ops if o.kind in WEIGHT_KINDS]
        if widths and alpha * max(widths) > MAX_WIDTH:
            raise MethodError(f"packed(alpha = {alpha:g}) would widen a layer of {max(widths):,} channels to "
                              f"{alpha * max(widths):,.0f}, more than {MAX_WIDTH:,} channels", pos_of("alpha"),
                              "Packed-Ensembles widen layers by 1 to 4 (alpha 2 is the paper's); or give a budget, "
                              "which picks alpha")


def build_method(name: str, options: dict, ops: list, M: int, budget: int | None, budget_pos: Pos | None,
                 where: dict[str, Pos], backbone: int) -> MethodParts:
    """``batch_ensemble``, ``mimo`` or ``packed`` on the elaborated backbone ``ops``. Raises MethodError."""
    if name == "batch_ensemble":
        new = [o.model_copy(update={"source": "batch_ensemble"}) if o.kind in WEIGHT_KINDS else o for o in ops]
        tensors = method_tensors(new, M, name)
        own = sum(t.numel for t in tensors if t.per_member and t.trainable)
        return MethodParts(P.BatchEnsembleMethod(**options), new, tensors, own // M, _trainable(tensors), None, None)
    if name == "mimo":
        new = mimo_ops(ops, M, where)
        tensors = method_tensors(new, M, name)
        return MethodParts(P.MimoMethod(**options), new, tensors, mimo_per_member(new, M), _trainable(tensors), None,
                           sum(macs(o) for o in ops))
    gamma = options.get("gamma", 1)
    if "alpha" in options or budget is None:
        alpha = Fraction(options.get("alpha", 2.0)).limit_denominator(10**6)
        budget = None
    else:
        alpha = solve_alpha(ops, M, gamma, budget, where, budget_pos, backbone)
    new = packed_ops(ops, M, alpha, gamma, where)
    tensors = method_tensors(new, M, name)
    step = alpha_step(packed_constraints(ops, M, gamma))
    smallest = params_of(packed_ops(ops, M, step, gamma, where))
    method = P.PackedMethod(alpha=float(alpha), gamma=gamma, alpha_from_budget=budget is not None)
    return MethodParts(method, new, tensors, _trainable(tensors) // M, smallest, budget, sum(macs(o) for o in ops))


def _trainable(tensors: list[P.Tensor]) -> int:
    return sum(t.numel for t in tensors if t.trainable)
