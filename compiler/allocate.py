"""Allocate: turn the parameter budget into template counts.

Templates are priced at their marginal cost (alphas grow with them), no group holds more templates
than its slots can read, and ties go to the groups' shares by a two-group exchange search. The
cost model, water-filling and the exchanges: docs/allocation.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mixc.compiler.group import GroupDraft

MAX_TIE_STEPS = (
    200  # bound on tie-breaking exchanges (each strictly improves; in practice a handful)
)


class BudgetError(Exception):
    def __init__(
        self, message: str, hint: str, minimum: int | None = None, setting: str | None = None
    ):
        super().__init__(message)
        self.message, self.hint = message, hint
        self.minimum = minimum  # set when the budget is below the spec's minimum
        self.setting = setting  # the ensemble setting at fault, when it is not the budget


@dataclass
class Allocation:
    templates: list[int]  # n_g per group
    shares: list[float]  # f_g per group (0 for fixed groups)
    k: list[int]  # templates per layer, per group
    minimum_budget: int
    maximum_budget: int | None = None  # largest useful budget: every group at its readable capacity
    capacity: list[int] = field(default_factory=list)  # most templates each group's slots can read


def alpha_cost(g: GroupDraft, n: int, tpl: int, members: int) -> int:
    return members * len(g.layers) * min(tpl, n)


def readable_capacity(n_layers: int, tpl: int, members: int, policy: str) -> int:
    """Most templates a group's slots read: slots x k (shared: one slot per layer)."""
    return n_layers * tpl * (members if policy == "greedy_disjoint" else 1)


def group_shares(groups: list[GroupDraft]) -> list[float]:
    """Shares of the template budget: explicit ones as given (normalised), others by parameter
    mass."""
    free_idx = [i for i, g in enumerate(groups) if g.templates is None]
    explicit = [groups[i].share for i in free_idx if groups[i].share is not None]
    mass = sum(groups[i].total for i in free_idx if groups[i].share is None)
    shares = [0.0] * len(groups)
    if not free_idx:
        return shares
    if explicit:
        # Groups without a share split what the explicit shares leave, by parameter mass.
        given = sum(explicit)
        rest = max(0.0, 1.0 - given)
        scale = 1.0 / given if given > 1.0 or mass == 0 else 1.0
        for i in free_idx:
            g = groups[i]
            shares[i] = (
                g.share * scale if g.share is not None else (rest * g.total / mass if mass else 0.0)
            )
        tot = sum(shares[i] for i in free_idx)
        if tot <= 0:
            return [1.0 / len(free_idx) if i in free_idx else 0.0 for i in range(len(groups))]
        return [x / tot if i in free_idx else 0.0 for i, x in enumerate(shares)]
    for i in free_idx:
        shares[i] = groups[i].total / mass
    return shares


def water_fill(
    shares: dict[int, float], sizes: dict[int, int], caps: dict[int, int], template_budget: float
) -> dict[int, float]:
    """Ideal real counts by share, a group above its capacity held there and its excess re-shared.

    Why: budget a group cannot read is worth more to the others than to nobody.
    """
    ideal: dict[int, float] = {}
    pool = dict(shares)
    left = template_budget
    while pool:
        tot = sum(pool.values()) or 1.0
        over = [i for i, f in pool.items() if f / tot * left / sizes[i] >= caps[i]]
        if not over:
            for i, f in pool.items():
                ideal[i] = max(0.0, f / tot * left / sizes[i])
            break
        for i in over:
            ideal[i] = float(caps[i])
            left -= caps[i] * sizes[i]
            del pool[i]
    return ideal


def _fix_counts(
    groups: list[GroupDraft],
    fixed_idx: list[int],
    caps: list[int],
    tpls: list[int],
    members: int,
    policy: str,
    n: list[int],
    fixed_cost: int,
) -> int:
    """Sets the groups' given template counts in ``n``; returns the cost with them paid."""
    base = fixed_cost
    for i in fixed_idx:
        _check_fixed(groups[i], caps[i], tpls[i], members, policy)
        n[i] = groups[i].templates
        base += n[i] * groups[i].size + alpha_cost(groups[i], n[i], tpls[i], members)
    return base


def _check_budget(
    groups: list[GroupDraft], free_idx: list[int], budget: int | None, minimum: int
) -> None:
    """A budget is needed when any group's count is free, and it must cover the minimum."""
    if budget is None:
        if free_idx:
            names = ", ".join(groups[i].name for i in free_idx)
            raise BudgetError(
                f"no budget is given, but groups {names} have no fixed template count",
                "add a budget (e.g. budget 1.0x or budget 36.5M), or give every group"
                " templates = N",
            )
        return
    if budget < minimum:
        raise BudgetError(
            f"the budget {budget:,} is below the minimum {minimum:,} for this spec",
            "the minimum is the fixed cost (plain layers, every member's BatchNorm and alphas)"
            f" plus one template per group; raise the budget to at least {minimum:,}, or use fewer"
            " members or groups single",
            minimum,
        )


def _spend_budget(
    groups: list[GroupDraft],
    free_idx: list[int],
    caps: list[int],
    tpls: list[int],
    members: int,
    n: list[int],
    shares: list[float],
    budget: int,
    base: int,
    fixed_cost: int,
) -> list[int]:
    """The free groups' counts for a budget between the minimum and the maximum."""

    def total(c: list[int]) -> int:
        return fixed_cost + sum(
            c[i] * g.size + alpha_cost(g, c[i], tpls[i], members) for i, g in enumerate(groups)
        )

    def marginal(c: list[int], i: int) -> int | None:
        """Cost of one more template of group i (None at capacity)."""
        if c[i] >= caps[i]:
            return None
        g = groups[i]
        return g.size + (members * len(g.layers) if c[i] < tpls[i] else 0)

    # 1. Ideal real-valued counts from the shares (water-filled), pricing alphas at their maximum.
    template_budget = (
        budget - base - sum(alpha_cost(groups[i], tpls[i], tpls[i], members) for i in free_idx)
    )
    ideal = water_fill(
        {i: shares[i] for i in free_idx},
        {i: groups[i].size for i in free_idx},
        {i: caps[i] for i in free_idx},
        max(0.0, template_budget),
    )
    _round(n, free_idx, ideal, caps, budget, total, marginal)
    # 3. Spend what is left: the group furthest below its target first, while any template fits.
    sizes = {i: groups[i].size for i in free_idx}
    mass = sum(ideal[i] * sizes[i] for i in free_idx) or 1.0
    target = {i: ideal[i] * sizes[i] / mass for i in free_idx}
    fill(n, free_idx, sizes, target, budget, total, marginal)
    # 4. Ties go to the shares: exchanges that spend no less and come closer to the targets.
    return break_ties(n, free_idx, sizes, target, budget, total, marginal)


def allocate_banks(
    groups: list[GroupDraft],
    fixed_cost: int,
    members: int,
    tpl: int,
    budget: int | None,
    policy: str = "shared",
) -> Allocation:
    """Template counts per group. ``fixed_cost`` is plain layers plus all members' BN."""
    tpls = [g.templates_per_layer or tpl for g in groups]
    caps = [readable_capacity(len(g.layers), t, members, policy) for g, t in zip(groups, tpls)]
    fixed_idx = [i for i, g in enumerate(groups) if g.templates is not None]
    free_idx = [i for i, g in enumerate(groups) if g.templates is None]
    n = [0] * len(groups)
    base = _fix_counts(groups, fixed_idx, caps, tpls, members, policy, n, fixed_cost)
    minimum = base + sum(
        groups[i].size + alpha_cost(groups[i], 1, tpls[i], members) for i in free_idx
    )
    maximum = base + sum(
        caps[i] * groups[i].size + alpha_cost(groups[i], caps[i], tpls[i], members)
        for i in free_idx
    )
    shares = group_shares(groups)
    _check_budget(groups, free_idx, budget, minimum)
    if budget is not None and budget >= maximum:
        # every group at capacity: the rest of the budget is unusable
        for i in free_idx:
            n[i] = caps[i]
    elif budget is not None:
        n = _spend_budget(
            groups, free_idx, caps, tpls, members, n, shares, budget, base, fixed_cost
        )
    return Allocation(n, shares, [min(t, x) for t, x in zip(tpls, n)], minimum, maximum, caps)


def _check_fixed(g: GroupDraft, cap: int, tpl: int, members: int, policy: str) -> None:
    """BudgetError when group ``g`` fixes more templates than its slots read (``cap``)."""
    if g.templates > cap:
        raise BudgetError(
            f"group '{g.name}' fixes {g.templates} templates but its slots read at most {cap} "
            f"({len(g.layers)} layer(s) x {tpl} per layer"
            + (f" x {members} members)" if policy == "greedy_disjoint" else ")"),
            f"templates no layer reads train nothing: give it at most templates = {cap}, "
            "or raise its templates_per_layer",
            setting="groups",
        )


def _round(
    n: list[int],
    free_idx: list[int],
    ideal: dict[int, float],
    caps: list[int],
    budget: int,
    total,
    marginal,
) -> None:
    """Real-valued counts ``ideal`` made whole in place: floored (at least one), then the largest
    remainders rounded up while they fit."""
    for i in free_idx:
        n[i] = min(caps[i], max(1, math.floor(ideal[i])))
    # Clamping to one template can overshoot a tight budget: give back from the most over-served
    # group.
    while total(n) > budget:
        over = [i for i in free_idx if n[i] > 1]
        i = max(over, key=lambda j: (n[j] / max(ideal[j], 1e-12), -j))
        n[i] -= 1
    # 2. Largest remainder: round up the groups that lost most to the floor, while it fits.
    for i in sorted(free_idx, key=lambda j: (-(ideal[j] - math.floor(ideal[j])), j)):
        m = marginal(n, i)
        if n[i] >= max(1, math.ceil(ideal[i])) or m is None:
            continue
        if total(n) + m <= budget:
            n[i] += 1


def fill(
    n: list[int],
    free_idx: list[int],
    sizes: dict[int, int],
    target: dict[int, float],
    budget: int,
    total,
    marginal,
) -> None:
    """Add templates in place, the group furthest below its target first, while any fits."""
    t = total(n)
    while True:
        room = budget - t
        fits = [i for i in free_idx if (m := marginal(n, i)) is not None and m <= room]
        if not fits:
            return
        i = min(fits, key=lambda j: ((n[j] + 1) * sizes[j] / max(target[j], 1e-12), j))
        t += marginal(n, i)
        n[i] += 1


def share_distance(
    n: list[int], free_idx: list[int], sizes: dict[int, int], target: dict[int, float]
) -> tuple[float, float]:
    """(largest, summed) deviation of each group's fraction of the template parameters from its
    target."""
    mass = sum(n[i] * sizes[i] for i in free_idx) or 1
    dev = [abs(n[i] * sizes[i] / mass - target[i]) for i in free_idx]
    return (max(dev, default=0.0), sum(dev))


def improving_exchange(
    n: list[int],
    free_idx: list[int],
    sizes: dict[int, int],
    target: dict[int, float],
    budget: int,
    total,
    marginal,
) -> list[int] | None:
    """One exchange (fewer templates of group i, as many of j as then fit, refill) that spends no
    less and comes closer to the targets; None if there is none.

    For each pair only the fewest removals that make room for one more template of j (and one
    more than that) are tried: removing more is undone by the refill, so the search stays
    O(groups^2) allocations per step however large the counts are.
    """
    t0 = total(n)
    d0 = share_distance(n, free_idx, sizes, target)
    room = budget - t0
    for i in free_idx:
        for j in free_idx:
            mj = marginal(n, j)
            if i == j or n[i] <= 1 or mj is None:
                continue
            first = max(1, -(-(mj - room) // sizes[i]))
            for a in (first, first + 1):
                if a > n[i] - 1:
                    break
                c = list(n)
                c[i] -= a
                t = total(c)
                m = marginal(c, j)
                if m is None or t + m > budget:
                    continue
                while m is not None and t + m <= budget:  # as many of j as fit
                    c[j] += 1
                    t += m
                    m = marginal(c, j)
                fill(c, free_idx, sizes, target, budget, total, marginal)
                if total(c) < t0:
                    continue
                d = share_distance(c, free_idx, sizes, target)
                if d[0] < d0[0] - 1e-12 or (abs(d[0] - d0[0]) <= 1e-12 and d[1] < d0[1] - 1e-12):
                    return c
    return None


def break_ties(
    n: list[int],
    free_idx: list[int],
    sizes: dict[int, int],
    target: dict[int, float],
    budget: int,
    total,
    marginal,
) -> list[int]:
    """Local search: apply improving exchanges until none is left (docs/allocation.md).

    Each step strictly lowers the (largest, summed) deviation, so it ends; MAX_TIE_STEPS only
    guards the running time (the invariants then report the exchange that was left).
    """
    best = list(n)
    for _ in range(MAX_TIE_STEPS):
        better = improving_exchange(best, free_idx, sizes, target, budget, total, marginal)
        if better is None:
            break
        best = better
    return best


def blob_cost(size: int, layer_sizes: list[int], fixed_cost: int, members: int, tpl: int) -> int:
    """Total parameters when the blob holds ``size`` entries (k per layer = how many windows
    fit)."""
    alphas = members * sum(min(tpl, size // s) for s in layer_sizes)
    return fixed_cost + size + alphas


def blob_demand(size: int, layer_sizes: list[int], members: int, tpl: int, policy: str) -> int:
    """How many blob entries the slots read in all (with repeats) when the blob holds ``size``."""
    reads = sum(min(tpl, size // s) * s for s in layer_sizes)
    return reads * (members if policy == "greedy_disjoint" else 1)


def readable_blob(size: int, layer_sizes: list[int], members: int, tpl: int, policy: str) -> int:
    """The largest blob size <= ``size`` whose every entry some slot reads (demand >= size).

    Demand is a non-decreasing step function of the size, so iterating x <- demand(x)
    from ``size`` descends to the largest fixed point, which bounds every readable size below.
    """
    x = size
    while True:
        d = blob_demand(x, layer_sizes, members, tpl, policy)
        if d >= x:
            return x
        x = d


def next_readable_blob(
    size: int, layer_sizes: list[int], members: int, tpl: int, policy: str
) -> int | None:
    """The smallest readable blob size above ``size`` (None if none: the blob is at capacity)."""
    cap = blob_demand(max(layer_sizes) * tpl, layer_sizes, members, tpl, policy)
    x = size + 1
    while x <= cap:
        if blob_demand(x, layer_sizes, members, tpl, policy) >= x:
            return x
        # demand only changes where a layer's window count does: jump to the next such size
        steps = [(x // s + 1) * s for s in layer_sizes if x // s < tpl]
        if not steps:
            return None
        x = min(steps)
    return None


def allocate_blob(
    layer_sizes: list[int],
    fixed_cost: int,
    members: int,
    tpl: int,
    budget: int | None,
    policy: str = "shared",
) -> tuple[int, int, int]:
    """(blob size, minimum budget, largest useful budget): the largest readable blob whose total
    fits."""
    smallest = max(layer_sizes)  # every layer needs one whole template
    minimum = blob_cost(smallest, layer_sizes, fixed_cost, members, tpl)
    cap = blob_demand(smallest * tpl, layer_sizes, members, tpl, policy)  # every layer at k = tpl
    maximum = blob_cost(cap, layer_sizes, fixed_cost, members, tpl)
    if budget is None:
        raise BudgetError(
            "groups single needs a budget", "add a budget, e.g. budget 7M or budget 0.25x"
        )
    if budget < minimum:
        raise BudgetError(
            f"the budget {budget:,} is below the minimum {minimum:,} for this spec",
            f"in single-blob mode the blob must hold at least the largest layer ({smallest:,}"
            f" parameters) besides the fixed cost; raise the budget to at least {minimum:,}",
            minimum,
        )
    # blob_cost is increasing in size: binary search the largest that fits
    lo, hi = (smallest, min(budget, cap))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if blob_cost(mid, layer_sizes, fixed_cost, members, tpl) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return readable_blob(lo, layer_sizes, members, tpl, policy), minimum, maximum
