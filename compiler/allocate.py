"""Allocate: turn the parameter budget into template counts (DESIGN.md, "Allocate").

Cost model (trainable parameters):
    total = plain layers + M * BN + sum_g n_g * s_g + M * sum_g L_g * k_g,
    k_g = min(templates_per_layer_g, n_g)
so the alphas depend on the template counts: adding a template to a group
whose n_g is still below its templates-per-layer also adds one alpha per
layer per member. Every step below prices a template with that marginal cost,
so the result never exceeds the budget and no further template fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mixc.compiler.group import GroupDraft


class BudgetError(Exception):
    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.message, self.hint = message, hint


@dataclass
class Allocation:
    templates: list[int]  # n_g per group
    shares: list[float]  # f_g per group (0 for fixed groups)
    k: list[int]  # templates per layer, per group
    minimum_budget: int


def alpha_cost(g: GroupDraft, n: int, tpl: int, members: int) -> int:
    return members * len(g.layers) * min(tpl, n)


def allocate_banks(groups: list[GroupDraft], fixed_cost: int, members: int, tpl: int,
                   budget: int | None) -> Allocation:
    """Template counts per group. ``fixed_cost`` is plain layers plus all members' BN."""
    tpls = [g.templates_per_layer or tpl for g in groups]
    fixed_idx = [i for i, g in enumerate(groups) if g.templates is not None]
    free_idx = [i for i, g in enumerate(groups) if g.templates is None]
    n = [0] * len(groups)
    base = fixed_cost
    for i in fixed_idx:
        n[i] = groups[i].templates
        base += n[i] * groups[i].size + alpha_cost(groups[i], n[i], tpls[i], members)
    minimum = base + sum(groups[i].size + alpha_cost(groups[i], 1, tpls[i], members) for i in free_idx)

    # Shares of the template budget: explicit ones as given (normalised), others by parameter mass.
    explicit = [groups[i].share for i in free_idx if groups[i].share is not None]
    mass = sum(groups[i].total for i in free_idx if groups[i].share is None)
    shares = [0.0] * len(groups)
    if free_idx:
        if explicit:
            # Groups without a share split what the explicit shares leave, by parameter mass.
            given = sum(explicit)
            rest = max(0.0, 1.0 - given)
            scale = 1.0 / given if given > 1.0 or mass == 0 else 1.0
            for i in free_idx:
                g = groups[i]
                if g.share is not None:
                    shares[i] = g.share * scale
                else:
                    shares[i] = rest * g.total / mass if mass else 0.0
            tot = sum(shares[i] for i in free_idx)
            if tot <= 0:
                shares = [1.0 / len(free_idx) if i in free_idx else 0.0 for i in range(len(groups))]
            else:
                shares = [s / tot if i in free_idx else 0.0 for i, s in enumerate(shares)]
        else:
            for i in free_idx:
                shares[i] = groups[i].total / mass

    if budget is None:
        if free_idx:
            names = ", ".join(groups[i].name for i in free_idx)
            raise BudgetError(f"no budget is given, but groups {names} have no fixed template count",
                              "add a budget (e.g. budget 1.0x or budget 36.5M), or give every group templates = N")
        return Allocation(n, shares, [min(t, x) for t, x in zip(tpls, n)], minimum)
    if budget < minimum:
        raise BudgetError(
            f"the budget {budget:,} is below the minimum {minimum:,} for this spec",
            f"the minimum is the fixed cost (plain layers, every member's BatchNorm and alphas) plus one template "
            f"per group; raise the budget to at least {minimum:,}, or use fewer members or groups single",
        )

    def total() -> int:
        t = fixed_cost
        for i, g in enumerate(groups):
            t += n[i] * g.size + alpha_cost(g, n[i], tpls[i], members)
        return t

    def marginal(i: int) -> int:
        g = groups[i]
        return g.size + (members * len(g.layers) if n[i] < tpls[i] else 0)

    # 1. Ideal real-valued counts from the shares, pricing alphas at their maximum.
    template_budget = budget - base - sum(alpha_cost(groups[i], tpls[i], tpls[i], members) for i in free_idx)
    ideal = {i: max(0.0, shares[i] * template_budget / groups[i].size) for i in free_idx}
    for i in free_idx:
        n[i] = max(1, math.floor(ideal[i]))
    # Clamping to one template can overshoot a tight budget: give back from the most over-served group.
    while total() > budget:
        over = [i for i in free_idx if n[i] > 1]
        i = max(over, key=lambda j: (n[j] / max(ideal[j], 1e-12), -j))
        n[i] -= 1
    # 2. Largest remainder: round up the groups that lost most to the floor, while it fits.
    for i in sorted(free_idx, key=lambda j: (-(ideal[j] - math.floor(ideal[j])), j)):
        if n[i] >= max(1, math.ceil(ideal[i])):
            continue
        if total() + marginal(i) <= budget:
            n[i] += 1
    # 3. Spend what is left: the group furthest below its share first, while any template fits.
    while True:
        room = budget - total()
        fits = [i for i in free_idx if marginal(i) <= room]
        if not fits:
            break
        i = min(fits, key=lambda j: ((n[j] + 1) * groups[j].size / max(shares[j], 1e-12), j))
        n[i] += 1
    return Allocation(n, shares, [min(t, x) for t, x in zip(tpls, n)], minimum)


def blob_cost(size: int, layer_sizes: list[int], fixed_cost: int, members: int, tpl: int) -> int:
    """Total parameters when the blob holds ``size`` entries (k per layer = how many windows fit)."""
    alphas = members * sum(min(tpl, size // s) for s in layer_sizes)
    return fixed_cost + size + alphas


def allocate_blob(layer_sizes: list[int], fixed_cost: int, members: int, tpl: int,
                  budget: int | None) -> tuple[int, int]:
    """(blob size, minimum budget): the largest blob whose total fits the budget."""
    smallest = max(layer_sizes)  # every layer needs one whole template
    minimum = blob_cost(smallest, layer_sizes, fixed_cost, members, tpl)
    if budget is None:
        raise BudgetError("groups single needs a budget", "add a budget, e.g. budget 7M or budget 0.25x")
    if budget < minimum:
        raise BudgetError(
            f"the budget {budget:,} is below the minimum {minimum:,} for this spec",
            f"in single-blob mode the blob must hold at least the largest layer ({smallest:,} parameters) besides "
            f"the fixed cost; raise the budget to at least {minimum:,}",
        )
    lo, hi = smallest, budget  # blob_cost is increasing in size: binary search the largest that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if blob_cost(mid, layer_sizes, fixed_cost, members, tpl) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo, minimum
