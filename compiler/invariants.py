"""The allocation invariants of docs/allocation.md, checked on a Plan.

One implementation shared by the test suite and ``mixc verify``: each check
returns the violations it finds, named so a report says which invariant broke.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixc.compiler.allocate import (
    alpha_cost,
    blob_cost,
    group_shares,
    improving_exchange,
    next_readable_blob,
    readable_capacity,
    share_distance,
    water_fill,
)
from mixc.compiler.degenerate import all_collinear
from mixc.compiler.group import GroupDraft
from mixc.compiler.methods import method_of
from mixc.compiler.methods.tensors import member_op_tensors
from mixc.compiler.plan import Group, Plan, Slot
from mixc.compiler.tensor_names import tensor_name

INVARIANTS = (
    "accounting",  # the plan's total equals the sum of its tensors
    "within_budget",  # the total never exceeds the budget
    "no_template_fits",  # no further template (or blob entry) would fit
    "distinct_templates",  # a layer's k templates are distinct
    "balanced_usage",  # template usage max - min <= 1
    "full_coverage",  # every template (and every blob entry) is read by some slot
    "readable_capacity",  # no group holds more templates than its slots can read
    "shares",  # no exchange of templates that spends no less comes closer to the shares
    "members_differ",  # several members are not all scalar multiples of one another
    "disjoint_members",  # greedy_disjoint: members of a layer disjoint when M*k <= n
    "method_tensors",  # each weight layer and BatchNorm holds exactly its method's tensors
)


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"


def check_plan(plan: Plan) -> list[Violation]:
    """Every invariant violation of ``plan`` (empty when the plan is sound)."""
    out = _check_totals(plan)
    a = plan.accounting
    room = None if a.budget is None else a.budget - a.total_params
    for g in plan.groups:
        out.extend(_check_group(plan, g, room))
    if plan.blob is not None:
        out.extend(_check_blob(plan, room))
    out.extend(_check_shares(plan))
    out.extend(_check_members_differ(plan))
    return out


def _check_totals(plan: Plan) -> list[Violation]:
    """The plan-wide counts: accounting, within_budget and the method's tensors."""
    out: list[Violation] = []
    a = plan.accounting
    trainable = sum(t.numel for t in plan.tensors if t.trainable)
    parts = a.plain_params + a.template_params + a.alpha_params + a.fast_params + a.member_op_params
    if trainable != a.total_params or parts != a.total_params:
        out.append(
            Violation(
                "accounting",
                f"tensors hold {trainable:,}, parts sum to {parts:,}, "
                f"total says {a.total_params:,}",
            )
        )
    # A budget is a ceiling for mixture; packed takes the alpha closest to it
    # (compiler/methods/packed.py).
    if a.budget is not None and a.total_params > a.budget and method_of(plan).budget_is_ceiling:
        out.append(
            Violation("within_budget", f"total {a.total_params:,} exceeds the budget {a.budget:,}")
        )
    if not method_of(plan).has_templates:
        out.extend(_check_method_tensors(plan))
    return out


def _check_group(plan: Plan, g: Group, room: int | None) -> list[Violation]:
    """One group's invariants: its capacity, the budget left, its slots and its usage."""
    out = _check_group_size(plan, g, room)
    usage = [0] * g.templates
    for s in plan.slots:
        if s.group == g.name:
            out.extend(_check_slot(plan, g, s, usage))
    out.extend(_check_usage(g, usage))
    return out


def _check_group_size(plan: Plan, g: Group, room: int | None) -> list[Violation]:
    """readable_capacity and no_template_fits for one group."""
    out: list[Violation] = []
    M = plan.members
    requested = g.requested_templates_per_layer
    cap = readable_capacity(len(g.layers), requested, M, plan.assign)
    if g.templates > cap:
        out.append(
            Violation(
                "readable_capacity",
                f"group {g.name}: {g.templates} templates but its slots read at most {cap}",
            )
        )
    if room is not None and not g.fixed and g.templates < cap:
        marginal = g.size + (M * len(g.layers) if g.templates < requested else 0)
        if marginal <= room:
            out.append(
                Violation(
                    "no_template_fits",
                    f"group {g.name}: one more template costs {marginal:,} "
                    f"but {room:,} of the budget is unused",
                )
            )
    return out


def _check_slot(plan: Plan, g: Group, s: Slot, usage: list[int]) -> list[Violation]:
    """One slot's template indices (distinct, in range, shared or disjoint as the policy says);
    counts the templates it reads into ``usage``."""
    out: list[Violation] = []
    seen: list[list[int]] = []
    for m, idx in enumerate(s.templates or []):
        if len(set(idx)) != len(idx) or len(idx) != g.templates_per_layer:
            out.append(
                Violation(
                    "distinct_templates",
                    f"layer {s.layer} member {m}: templates {idx} (k = {g.templates_per_layer})",
                )
            )
        if any(not 0 <= t < g.templates for t in idx):
            out.append(
                Violation("distinct_templates", f"layer {s.layer}: index out of range in {idx}")
            )
            continue
        if plan.assign == "shared" and m > 0:
            if idx != seen[0]:
                out.append(
                    Violation(
                        "distinct_templates",
                        f"layer {s.layer}: shared policy but member "
                        f"{m} has {idx}, member 0 has {seen[0]}",
                    )
                )
            continue
        seen.append(idx)
        for t in idx:
            usage[t] += 1
    if plan.assign == "greedy_disjoint" and plan.members * s.k <= g.templates:
        out.extend(_check_disjoint(plan, g, s, seen))
    return out


def _check_disjoint(plan: Plan, g: Group, s: Slot, seen: list[list[int]]) -> list[Violation]:
    """greedy_disjoint: no two members of a layer share a template."""
    out: list[Violation] = []
    for i in range(len(seen)):
        for j in range(i + 1, len(seen)):
            common = set(seen[i]) & set(seen[j])
            if common:
                out.append(
                    Violation(
                        "disjoint_members",
                        f"layer {s.layer}: members {i} and {j} share "
                        f"templates {sorted(common)} with M*k = "
                        f"{plan.members * s.k} <= n = {g.templates}",
                    )
                )
    return out


def _check_usage(g: Group, usage: list[int]) -> list[Violation]:
    """The group's recorded usage, its balance and its coverage."""
    out: list[Violation] = []
    if usage != list(g.usage):
        out.append(
            Violation(
                "accounting", f"group {g.name}: recorded usage {g.usage} but slots give {usage}"
            )
        )
    if usage and max(usage) - min(usage) > 1:
        out.append(
            Violation("balanced_usage", f"group {g.name}: usage ranges {min(usage)}..{max(usage)}")
        )
    if usage and min(usage) == 0:
        unused = [t for t, u in enumerate(usage) if u == 0]
        shown = unused[:8] + (["..."] if len(unused) > 8 else [])
        out.append(
            Violation(
                "full_coverage",
                f"group {g.name}: {len(unused)} of {g.templates} templates "
                f"({', '.join(map(str, shown))}) are read by no slot",
            )
        )
    return out


def _check_members_differ(plan: Plan) -> list[Violation]:
    """Several members that are all scalar multiples of one another are one model."""
    M = plan.members
    member_layers = sum(1 for o in plan.ops if getattr(o, "source", None) == "member")
    if plan.grouping != "none" and all_collinear(M, list(plan.slots), member_layers):
        return [
            Violation(
                "members_differ",
                f"all {M} members are scalar multiples of one another in every layer",
            )
        ]
    return []


def _check_shares(plan: Plan) -> list[Violation]:
    """Rebuild the allocator's targets from the plan alone and look for an exchange it missed."""
    a = plan.accounting
    free = [i for i, g in enumerate(plan.groups) if not g.fixed]
    if (
        a.budget is None
        or not free
        or (a.maximum_budget is not None and a.budget >= a.maximum_budget)
    ):
        return []
    M = plan.members
    drafts = [
        GroupDraft(
            g.name,
            list(g.layers),
            list(g.weight_shape),
            g.bias,
            g.size,
            share=None if g.fixed else g.share,
            templates=g.templates if g.fixed else None,
            templates_per_layer=g.requested_templates_per_layer,
        )
        for g in plan.groups
    ]
    tpls = [g.requested_templates_per_layer for g in plan.groups]
    caps = [readable_capacity(len(g.layers), t, M, plan.assign) for g, t in zip(plan.groups, tpls)]
    fixed_cost = a.plain_params + a.member_op_params
    base = fixed_cost + sum(
        g.templates * g.size + alpha_cost(d, g.templates, t, M)
        for d, g, t in zip(drafts, plan.groups, tpls)
        if g.fixed
    )
    shares = group_shares(drafts)
    template_budget = (
        a.budget - base - sum(alpha_cost(drafts[i], tpls[i], tpls[i], M) for i in free)
    )
    sizes = {i: plan.groups[i].size for i in free}
    ideal = water_fill(
        {i: shares[i] for i in free}, sizes, {i: caps[i] for i in free}, max(0.0, template_budget)
    )
    mass = sum(ideal[i] * sizes[i] for i in free) or 1.0
    target = {i: ideal[i] * sizes[i] / mass for i in free}

    def total(c: list[int]) -> int:
        return fixed_cost + sum(
            c[i] * d.size + alpha_cost(d, c[i], tpls[i], M) for i, d in enumerate(drafts)
        )

    def marginal(c: list[int], i: int) -> int | None:
        if c[i] >= caps[i]:
            return None
        return drafts[i].size + (M * len(drafts[i].layers) if c[i] < tpls[i] else 0)

    n = [g.templates for g in plan.groups]
    better = improving_exchange(list(n), free, sizes, target, a.budget, total, marginal)
    if better is not None:
        d0, d1 = share_distance(n, free, sizes, target), share_distance(better, free, sizes, target)
        return [
            Violation(
                "shares",
                f"templates {n} are {d0[0]:.1%} from the shares at most, but {better} "
                f"spends no less and is {d1[0]:.1%} from them",
            )
        ]
    return []


def _check_blob(plan: Plan, room: int | None) -> list[Violation]:
    out: list[Violation] = []
    b = plan.blob
    slots = [s for s in plan.slots if s.group == "blob"]
    for s in slots:
        if s.k * s.size > b.size:
            out.append(
                Violation(
                    "distinct_templates",
                    f"layer {s.layer}: {s.k} templates of {s.size:,} do not fit "
                    f"a blob of {b.size:,} without overlapping",
                )
            )
        if s.k != min(plan.templates_per_layer, b.size // s.size):
            out.append(
                Violation(
                    "distinct_templates",
                    f"layer {s.layer}: k = {s.k}, expected "
                    f"{min(plan.templates_per_layer, b.size // s.size)}",
                )
            )
    if b.usage_max - b.usage_min > 1:
        out.append(Violation("balanced_usage", f"blob usage ranges {b.usage_min}..{b.usage_max}"))
    demand = sum(s.k * s.size * (1 if plan.assign == "shared" else plan.members) for s in slots)
    if b.usage_min == 0:
        out.append(
            Violation(
                "full_coverage",
                f"some blob entries are read by no slot (slots read {demand:,} "
                f"entries of {b.size:,})",
            )
        )
    if demand < b.size:
        out.append(
            Violation(
                "readable_capacity", f"a blob of {b.size:,} entries but its slots read {demand:,}"
            )
        )
    if room is not None:
        plain_bn = plan.accounting.plain_params + plan.accounting.member_op_params
        sizes = [s.size for s in slots]
        nxt = next_readable_blob(b.size, sizes, plan.members, plan.templates_per_layer, plan.assign)
        if (
            nxt is not None
            and blob_cost(nxt, sizes, plain_bn, plan.members, plan.templates_per_layer)
            <= plan.accounting.budget
        ):
            out.append(
                Violation(
                    "no_template_fits",
                    f"a readable blob of {nxt:,} entries would still fit the budget",
                )
            )
    return out


def _expected_tensors(plan: Plan) -> dict[str, list[int]]:
    """Tensor name -> shape that the plan's method prescribes for its ops (docs/plan.md), for every
    method but mixture (whose banks and alphas the checks above cover)."""
    M, method = plan.members, method_of(plan)
    per_member = not method.single_path
    want: dict[str, list[int]] = {}
    for o in plan.ops:
        if o.kind in ("conv", "linear"):
            shape = list(o.weight_shape)
            cin, cout = shape[1] * o.groups, shape[0]
            name = lambda attribute: tensor_name(o.source, o.name, attribute)  # noqa: E731, B023
            want[name("weight")] = [M, *shape] if method.per_member_weights else shape
            if method.has_fast_weights:
                want[name("r")], want[name("s")] = [M, cin], [M, cout]
            if o.bias:
                want[name("bias")] = [cout] if not per_member else [M, cout]
        elif o.kind == "bn":
            for field in ("weight", "bias", "running_mean", "running_var"):
                want[tensor_name("bn", o.name, field)] = (
                    [M, o.channels] if per_member else [o.channels]
                )
        else:  # LayerNorm, class token, position embedding
            for t in member_op_tensors(o, M if per_member else None):
                want[t.name] = list(t.shape)
    return want


def _check_method_tensors(plan: Plan) -> list[Violation]:
    out: list[Violation] = []
    want = _expected_tensors(plan)
    have = {t.name: list(t.shape) for t in plan.tensors}
    for n in sorted(set(want) | set(have)):
        if want.get(n) != have.get(n):
            out.append(
                Violation(
                    "method_tensors",
                    f"{plan.method.name}: tensor {n} has shape {have.get(n)}, "
                    f"expected {want.get(n)}",
                )
            )
            break
    if method_of(plan).single_path:
        M = plan.members
        logits = plan.op(plan.output).out_shape
        if logits != [M * plan.classes]:
            out.append(
                Violation(
                    "method_tensors",
                    f"{plan.method.name}: the output has shape {logits}, expected "
                    f"[{M} x {plan.classes}] (M heads)",
                )
            )
        if (
            method_of(plan).equal_shares
            and plan.accounting.total_params != M * plan.accounting.per_member_params
        ):
            out.append(
                Violation(
                    "method_tensors",
                    f"{plan.method.name}: {plan.accounting.total_params:,} parameters do not split "
                    f"into {M} members of {plan.accounting.per_member_params:,}",
                )
            )
    return out
