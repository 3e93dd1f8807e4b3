"""The allocation invariants of DESIGN.md, checked on a Plan.

One implementation shared by the test suite and ``mixc verify``: each check
returns the violations it finds, named so a report says which invariant broke.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixc.compiler.allocate import blob_cost
from mixc.compiler.plan import Plan

INVARIANTS = (
    "accounting",  # the plan's total equals the sum of its tensors
    "within_budget",  # the total never exceeds the budget
    "no_template_fits",  # no further template (or blob entry) would fit
    "distinct_templates",  # a layer's k templates are distinct
    "balanced_usage",  # template usage max - min <= 1
    "full_coverage",  # every template is used when demand covers supply
    "disjoint_members",  # greedy_disjoint: members of a layer disjoint when M*k <= n
)


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"


def check_plan(plan: Plan) -> list[Violation]:
    """Every invariant violation of ``plan`` (empty when the plan is sound)."""
    out: list[Violation] = []
    a = plan.accounting
    M = plan.members
    trainable = sum(t.numel for t in plan.tensors if t.trainable)
    parts = a.plain_params + a.template_params + a.alpha_params + a.bn_params
    if trainable != a.total_params or parts != a.total_params:
        out.append(Violation("accounting", f"tensors hold {trainable:,}, parts sum to {parts:,}, "
                                           f"total says {a.total_params:,}"))
    if a.budget is not None and a.total_params > a.budget:
        out.append(Violation("within_budget", f"total {a.total_params:,} exceeds the budget {a.budget:,}"))

    room = None if a.budget is None else a.budget - a.total_params
    for g in plan.groups:
        slots = [s for s in plan.slots if s.group == g.name]
        if room is not None and not g.fixed:
            requested = g.requested_templates_per_layer
            marginal = g.size + (M * len(g.layers) if g.templates < requested else 0)
            if marginal <= room:
                out.append(Violation("no_template_fits", f"group {g.name}: one more template costs {marginal:,} "
                                                         f"but {room:,} of the budget is unused"))
        usage = [0] * g.templates
        distinct_slots = 0
        for s in slots:
            seen: list[list[int]] = []
            for m, idx in enumerate(s.templates or []):
                if len(set(idx)) != len(idx) or len(idx) != g.templates_per_layer:
                    out.append(Violation("distinct_templates", f"layer {s.layer} member {m}: templates {idx} "
                                                               f"(k = {g.templates_per_layer})"))
                if any(not 0 <= t < g.templates for t in idx):
                    out.append(Violation("distinct_templates", f"layer {s.layer}: index out of range in {idx}"))
                    continue
                if plan.assign == "shared" and m > 0:
                    if idx != seen[0]:
                        out.append(Violation("distinct_templates", f"layer {s.layer}: shared policy but member "
                                                                   f"{m} has {idx}, member 0 has {seen[0]}"))
                    continue
                seen.append(idx)
                distinct_slots += 1
                for t in idx:
                    usage[t] += 1
            if plan.assign == "greedy_disjoint" and M * s.k <= g.templates:
                for i in range(len(seen)):
                    for j in range(i + 1, len(seen)):
                        common = set(seen[i]) & set(seen[j])
                        if common:
                            out.append(Violation("disjoint_members", f"layer {s.layer}: members {i} and {j} share "
                                                                     f"templates {sorted(common)} with M*k = "
                                                                     f"{M * s.k} <= n = {g.templates}"))
        if usage != list(g.usage):
            out.append(Violation("accounting", f"group {g.name}: recorded usage {g.usage} but slots give {usage}"))
        if usage and max(usage) - min(usage) > 1:
            out.append(Violation("balanced_usage", f"group {g.name}: usage ranges {min(usage)}..{max(usage)}"))
        if distinct_slots * g.templates_per_layer >= g.templates and usage and min(usage) == 0:
            unused = [t for t, u in enumerate(usage) if u == 0]
            out.append(Violation("full_coverage", f"group {g.name}: templates {unused} unused although "
                                                  f"{distinct_slots} slots x k = {g.templates_per_layer} cover "
                                                  f"{g.templates}"))
    if plan.blob is not None:
        out.extend(_check_blob(plan, room))
    return out


def _check_blob(plan: Plan, room: int | None) -> list[Violation]:
    out: list[Violation] = []
    b = plan.blob
    slots = [s for s in plan.slots if s.group == "blob"]
    for s in slots:
        if s.k * s.size > b.size:
            out.append(Violation("distinct_templates", f"layer {s.layer}: {s.k} templates of {s.size:,} do not fit "
                                                       f"a blob of {b.size:,} without overlapping"))
        if s.k != min(plan.templates_per_layer, b.size // s.size):
            out.append(Violation("distinct_templates", f"layer {s.layer}: k = {s.k}, expected "
                                                       f"{min(plan.templates_per_layer, b.size // s.size)}"))
    if b.usage_max - b.usage_min > 1:
        out.append(Violation("balanced_usage", f"blob usage ranges {b.usage_min}..{b.usage_max}"))
    demand = sum(s.k * s.size * (1 if plan.assign == "shared" else plan.members) for s in slots)
    if demand >= b.size and b.usage_min == 0:
        out.append(Violation("full_coverage", f"some blob entries unused although slots read {demand:,} >= "
                                              f"{b.size:,}"))
    if room is not None:
        plain_bn = plan.accounting.plain_params + plan.accounting.bn_params
        bigger = blob_cost(b.size + 1, [s.size for s in slots], plain_bn, plan.members, plan.templates_per_layer)
        if bigger <= plan.accounting.budget:
            out.append(Violation("no_template_fits", f"a blob of {b.size + 1:,} entries would still fit the budget"))
    return out
