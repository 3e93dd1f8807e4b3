"""MixtureEnsembles: each banked layer of each member mixes shared templates (banks or one blob).

The groups, the template allocation under the budget and the assignment of templates to members
happen here; when no budget separates the members, the errors name the smallest one that does.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixc.compiler import plan as P
from mixc.compiler.allocate import BudgetError, allocate_banks, allocate_blob
from mixc.compiler.assign import assign_bank, assign_blob
from mixc.compiler.degenerate import all_collinear, degenerate_groups
from mixc.compiler.group import form_groups
from mixc.compiler.layers import weight_size
from mixc.compiler.methods.base import (
    Backbone,
    EnsembleMethod,
    MethodParts,
    get_method,
    register_method,
)
from mixc.compiler.methods.tensors import (
    MEMBER_OP_ROLES,
    alpha_tensors,
    member_op_tensors,
    member_tensors,
    plain_tensors,
    template_tensors,
)
from mixc.compiler.plan_warnings import plan_warning


def templated_parts(
    b: Backbone,
    method,
    grouping: str,
    sources: dict[str, str],
    built: _Built | None,
    plain: list[str],
    budget: int | None,
    minimum: int,
) -> MethodParts:
    """A mixture or naive model's parts once every weight layer has its source (``built``: the
    templates)."""
    ens, M = b.ens, b.members
    ops = [
        (
            o.model_copy(update={"source": sources[o.name]})
            if isinstance(o, (P.ConvOp, P.LinearOp))
            else o
        )
        for o in b.ops
    ]
    out_op = ops[-1]
    classifier_law = ens.init.get("classifier", {}).get("law", "uniform")
    if classifier_law != "uniform" and sources.get(out_op.name) in ("bank", "blob"):
        b.warnings.append(
            plan_warning(
                f"the classifier rule does not apply: the output layer '{out_op.name}' reads"
                f" templates ({sources[out_op.name]}), which are drawn by the template rule",
                ens.pos.get("init"),
                "keep the output layer plain (bank_singletons false) for the classifier rule to"
                " apply",
                b.diags.sources,
            )
        )
    groups, slots, blob = (built.groups, built.slots, built.blob) if built else ([], [], None)
    tensors = templated_tensors(ops, slots, groups, blob, M)
    by_role: dict[str, int] = {}
    for t in tensors:
        if t.trainable:
            by_role[t.role] = by_role.get(t.role, 0) + t.numel
    assert by_role.get("alpha", 0) == (built.alpha_params if built else 0)
    assert by_role.get("bank", 0) + by_role.get("blob", 0) == (
        built.template_params if built else 0
    )
    alpha_bn = by_role.get("alpha", 0) + sum(by_role.get(r, 0) for r in MEMBER_OP_ROLES)
    member = by_role.get("member_weight", 0) + by_role.get("member_bias", 0)
    return MethodParts(
        method,
        ops,
        tensors,
        alpha_bn // M + member // M,
        minimum,
        budget,
        maximum=built.maximum if built else None,
        grouping=grouping,
        groups=groups,
        slots=slots,
        blob=blob,
        plain_layers=plain,
    )


def templated_tensors(
    ops: list, slots: list[P.Slot], groups: list[P.Group], blob: P.Blob | None, M: int
) -> list[P.Tensor]:
    """The model's named tensors, in a stable order (checkpoints and backends use these names)."""
    out = template_tensors(groups, blob)
    slot_by_layer = {s.layer: s for s in slots}
    for o in ops:
        if isinstance(o, (P.ConvOp, P.LinearOp)):
            if o.source == "plain":
                out += plain_tensors(o)
            elif o.source == "member":
                out += member_tensors(o, M)
            else:
                out += alpha_tensors(o, M, slot_by_layer[o.name].k)
        else:
            out += member_op_tensors(o, M)
    return out


class Mixture(EnsembleMethod):
    name = "mixture"
    title = "MixtureEnsemble"
    execution = "per_member"
    weight_sources = frozenset({"plain", "member", "bank", "blob"})
    has_templates = True
    per_member_weights = True
    shares_plain_weights = True
    has_fast_weights = False
    stacks_inputs = False
    uses_budget = True
    budget_is_ceiling = True
    budget_solves = None
    equal_shares = False
    searched_settings = ("budget", "members", "templates_per_layer", "assign", "groups")
    plain_backbone_override = ("groups=none",)

    def build(self, b: Backbone) -> MethodParts:
        ens, diags, M, grouping = b.ens, b.diags, b.members, b.ens.groups
        if grouping == "none":  # groups none is the naive ensemble
            return get_method("naive").build(b)
        weights = [o for o in b.ops if isinstance(o, (P.ConvOp, P.LinearOp))]
        formed = form_groups(weights, ens, diags)
        if formed is None:
            diags.raise_if_any()
        drafts, plain = formed
        by_name = {o.name: o for o in weights}
        fixed_cost = sum(weight_size(by_name[n]) for n in plain) + M * b.member_op_params
        if not drafts:
            diags.error(
                "no layer is factorised: every conv/linear layer has a unique shape",
                ens.pos.get("groups", ens.pos.get("backbone")),
                "set bank_singletons true (the thin variant), or use groups single",
            )
            diags.raise_if_any()
        tpl, policy = ens.templates_per_layer, ens.assign

        def build(budget: int | None, t: int = tpl) -> _Built:
            return _allocate(drafts, weights, by_name, fixed_cost, M, t, policy, grouping, budget)

        built = _built_or_report(b, build)
        _check_members_differ(b, built, build)
        sources = {s.layer: "blob" if s.group == "blob" else "bank" for s in built.slots} | {
            n: "plain" for n in plain
        }
        return templated_parts(
            b, P.MixtureMethod(), grouping, sources, built, plain, b.budget, built.minimum
        )


def _built_or_report(b: Backbone, build) -> _Built:
    """The allocation at the spec's budget, or its error reported (with the minimum that also
    separates the members, where that is larger than the bare minimum)."""
    ens, M, budget = b.ens, b.members, b.budget
    try:
        return build(budget)
    except BudgetError as e:
        if budget is None and "budget" in ens.pos:  # the bad budget itself is already reported
            b.diags.raise_if_any()
        message, hint = e.message, e.hint
        # the stated minimum must itself compile: members must differ
        if e.minimum is not None and M > 1:
            message, hint = _below_minimum(
                e, M, ens.templates_per_layer, ens.assign, budget, b.backbone, build
            ) or (message, hint)
        b.diags.error(
            message, ens.pos.get(e.setting, b.budget_pos) if e.setting else b.budget_pos, hint
        )
        b.diags.raise_if_any()
        raise  # not reached: raise_if_any raised


def _check_members_differ(b: Backbone, built: _Built, build) -> None:
    """Warn of a budget above the largest useful one and of groups whose members read one template;
    refuse members that are all the same."""
    M, budget, budget_pos, sources = b.members, b.budget, b.budget_pos, b.diags.sources
    maximum = built.maximum
    if budget is not None and maximum is not None and budget > maximum:
        b.warnings.append(
            plan_warning(
                f"the budget {budget:,} exceeds the largest useful budget {maximum:,} for this"
                " spec: every group already holds as many templates as its layers can read, so"
                f" {budget - maximum:,} parameters are left unspent",
                budget_pos,
                f"lower the budget to {maximum:,}, or raise templates_per_layer (or members under"
                " greedy_disjoint) so more templates can be read",
                sources,
            )
        )
    if all_collinear(M, built.slots, 0):
        message, hint = _degenerate_error(
            M, b.ens.templates_per_layer, b.ens.assign, budget, b.backbone, build
        )
        b.diags.error(message, budget_pos, hint)
        b.diags.raise_if_any()
    same = degenerate_groups(built.slots) if M > 1 else []
    if same:
        what = (
            "the blob"
            if same == ["blob"]
            else "group" + ("s " if len(same) > 1 else " ") + ", ".join(same)
        )
        b.warnings.append(
            plan_warning(
                f"{what}: every member reads the same single template in each layer, so there the"
                " members' weights differ only by a scale that BatchNorm removes",
                budget_pos,
                "give these layers a second template per member: a larger budget or share with "
                "templates_per_layer >= 2, or assign greedy_disjoint",
                sources,
            )
        )


@dataclass
class _Built:
    """The allocation and assignment at one budget (the compiler also probes other budgets)."""

    groups: list[P.Group]
    slots: list[P.Slot]
    blob: P.Blob | None
    minimum: int
    maximum: int | None
    template_params: int
    alpha_params: int


def _allocate(
    drafts: list,
    weights: list,
    by_name: dict,
    fixed_cost: int,
    M: int,
    tpl: int,
    policy: str,
    grouping: str,
    budget: int | None,
) -> _Built:
    """Allocate templates (or the blob) and assign every slot. Raises ``BudgetError``."""
    groups: list[P.Group] = []
    slots: list[P.Slot] = []
    blob = None
    order = {o.name: i for i, o in enumerate(weights)}
    if grouping == "single":
        layers = sorted((n for d in drafts for n in d.layers), key=order.__getitem__)
        sizes = [weight_size(by_name[n]) for n in layers]
        size, minimum, maximum = allocate_blob(sizes, fixed_cost, M, tpl, budget, policy)
        ks = [min(tpl, size // s) for s in sizes]
        offsets, lo, hi = assign_blob(sizes, ks, size, M, policy)
        blob = P.Blob(size=size, layers=layers, usage_min=lo, usage_max=hi)
        for name, s, k, off in zip(layers, sizes, ks, offsets):
            slots.append(P.Slot(layer=name, group="blob", size=s, k=k, offsets=off))
        template_params, alpha_params = size, M * sum(ks)
    else:
        alloc = allocate_banks(drafts, fixed_cost, M, tpl, budget, policy=policy)
        minimum, maximum = alloc.minimum_budget, alloc.maximum_budget
        caps = alloc.capacity or [None] * len(drafts)
        for d, n, share, k, cap in zip(drafts, alloc.templates, alloc.shares, alloc.k, caps):
            table, usage = assign_bank(len(d.layers), n, k, M, policy)
            groups.append(
                P.Group(
                    name=d.name,
                    layers=d.layers,
                    weight_shape=d.weight_shape,
                    bias=d.bias,
                    size=d.size,
                    share=share,
                    templates=n,
                    templates_per_layer=k,
                    requested_templates_per_layer=d.templates_per_layer or tpl,
                    usage=usage,
                    fixed=d.templates is not None,
                    capacity=cap,
                )
            )
            for layer, per_member in zip(d.layers, table):
                slots.append(
                    P.Slot(layer=layer, group=d.name, size=d.size, k=k, templates=per_member)
                )
        template_params = sum(g.templates * g.size for g in groups)
        alpha_params = M * sum(len(g.layers) * g.templates_per_layer for g in groups)
    slots.sort(key=lambda s: order[s.layer])
    return _Built(groups, slots, blob, minimum, maximum, template_params, alpha_params)


def differ_budget(build, minimum: int, maximum: int) -> int | None:
    """The smallest budget at which the members are not all collinear (None: no budget helps).

    Binary search over [minimum, maximum]; the answer is always a budget that was
    compiled and checked, so it is guaranteed to work even where the allocation is
    not monotone in the budget.
    """

    def differs(b: int) -> bool:
        try:
            built = build(b)
        except BudgetError:
            return False
        return not all_collinear(2, built.slots, 0)

    if not differs(maximum):
        return None
    lo, hi = minimum, maximum  # differs(hi) holds
    while lo < hi:
        mid = (lo + hi) // 2
        if differs(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


_DEGENERATE = (
    "the {M} members would be identical: in every layer each member's weight is a scalar multiple"
    " of the others' (one template per layer, the same for all members; plain layers are shared),"
    " and BatchNorm removes the scale"
)
_HUGE = 10**30  # a budget above any capacity: probes the minimum and the largest useful budget


def _bounds(build, t: int) -> tuple[int, int]:
    """(minimum, largest useful budget) at templates_per_layer ``t``."""
    b = build(_HUGE, t)
    return b.minimum, max(b.maximum or b.minimum, b.minimum)


def _setting_fix(M: int, tpl: int, policy: str, backbone: int, build) -> str:
    """The hint when no budget separates the members at this templates_per_layer."""
    t = max(2, tpl)
    try:
        at = differ_budget(lambda b: build(b, t), *_bounds(build, t))
    except BudgetError:
        at = None
    if at is not None:
        return (
            f"set templates_per_layer {t} and a budget of at least {at:,} ({at / backbone:.3g}x),"
            " or assign greedy_disjoint"
        )
    return "use assign greedy_disjoint, or bank more layers (bank_singletons true)"


def _degenerate_error(
    M: int, tpl: int, policy: str, budget: int | None, backbone: int, build
) -> tuple[str, str]:
    """(message, hint) for a degenerate ensemble: the smallest budget, or the setting, that fixes
    it."""
    head = _DEGENERATE.format(M=M)
    if budget is None:
        return (
            head,
            (
                "give a group templates = 2 or more with templates_per_layer 2 or more, or assign "
                "greedy_disjoint"
            ),
        )
    at = differ_budget(build, *_bounds(build, tpl))
    if at is not None:
        return (
            f"{head}; the smallest budget at which members can differ is {at:,}",
            f"raise the budget to at least {at:,} ({at / backbone:.3g}x)",
        )
    return (
        f"{head}; no budget changes that at templates_per_layer {tpl} with assign {policy}",
        _setting_fix(M, tpl, policy, backbone, build),
    )


def _below_minimum(
    e: BudgetError, M: int, tpl: int, policy: str, budget: int, backbone: int, build
) -> tuple[str, str] | None:
    """A below-the-minimum error whose minimum also keeps the members apart (None: the plain one
    holds)."""
    lo, hi = _bounds(build, tpl)
    if not all_collinear(M, build(lo).slots, 0):
        return None
    at = differ_budget(build, lo, hi)
    if at is not None:
        return (
            (
                f"the budget {budget:,} is below the minimum {at:,} for this spec: below it (from"
                f" the bare minimum {lo:,} on) every layer gives the {M} members one shared"
                " template, so the members would be identical up to a scale that BatchNorm removes"
            ),
            f"raise the budget to at least {at:,} ({at / backbone:.3g}x)",
        )
    return (
        f"the budget {budget:,} is too small, and at templates_per_layer {tpl} with assign {policy}"
        " no budget helps: " + _DEGENERATE.format(M=M),
        _setting_fix(M, tpl, policy, backbone, build),
    )


register_method(Mixture())
