"""compile_program: elaborate -> group -> allocate -> assign -> Plan."""

from __future__ import annotations

from mixc.compiler import plan as P
from mixc.compiler.allocate import BudgetError, allocate_banks, allocate_blob
from mixc.compiler.assign import assign_bank, assign_blob
from mixc.compiler.elaborate import elaborate
from mixc.compiler.group import form_groups
from mixc.compiler.layers import weight_size
from mixc.spec.diagnostics import Diagnostics
from mixc.spec.expr import Multiple
from mixc.spec.loader import Program


def compile_program(program: Program) -> P.Plan:
    """Compile a loaded program. Raises ``SpecError`` listing every problem found."""
    diags = Diagnostics(sources=dict(program.sources), items=list(program.pending))
    result = elaborate(program, diags)
    if result is None:
        diags.raise_if_any()
    # Errors already found elsewhere (say, in the train section) do not stop the
    # allocation: a budget problem is reported with them, all at once.
    graph, _ = result
    ens = program.ensemble
    M = ens.members
    ops = list(graph.ops)
    weights = [o for o in ops if isinstance(o, (P.ConvOp, P.LinearOp))]
    bns = [o for o in ops if isinstance(o, P.BatchNormOp)]
    bn_per_member = sum(2 * o.channels for o in bns)
    backbone = sum(weight_size(o) for o in weights) + bn_per_member

    budget = ens.budget
    if isinstance(budget, Multiple):
        budget = int(budget.factor * backbone)
    budget_pos = ens.pos.get("budget", ens.pos.get("backbone"))

    grouping = ens.groups
    groups: list[P.Group] = []
    slots: list[P.Slot] = []
    blob: P.Blob | None = None
    sources: dict[str, str] = {}
    if grouping == "none":
        plain: list[str] = []
        for o in weights:
            sources[o.name] = "member"
        template_params = alpha_params = 0
        # No sharing: the size is M backbones whatever the budget says, so a budget
        # does not apply (this is how baselines are compiled from any spec).
        budget = None
        minimum = M * backbone
    else:
        formed = form_groups(weights, ens, diags)
        if formed is None:
            diags.raise_if_any()
        drafts, plain = formed
        by_name = {o.name: o for o in weights}
        plain_params = sum(weight_size(by_name[n]) for n in plain)
        fixed_cost = plain_params + M * bn_per_member
        if not drafts:
            diags.error("no layer is factorised: every conv/linear layer has a unique shape",
                        ens.pos.get("groups", ens.pos.get("backbone")),
                        "set bank_singletons true (the thin variant), or use groups single")
            diags.raise_if_any()
        try:
            if grouping == "single":
                layers = [n for d in drafts for n in d.layers]
                order = {o.name: i for i, o in enumerate(weights)}
                layers.sort(key=order.__getitem__)
                sizes = [weight_size(by_name[n]) for n in layers]
                size, minimum = allocate_blob(sizes, fixed_cost, M, ens.templates_per_layer, budget)
                ks = [min(ens.templates_per_layer, size // s) for s in sizes]
                offsets, lo, hi = assign_blob(sizes, ks, size, M, ens.assign)
                blob = P.Blob(size=size, layers=layers, usage_min=lo, usage_max=hi)
                for name, s, k, off in zip(layers, sizes, ks, offsets):
                    slots.append(P.Slot(layer=name, group="blob", size=s, k=k, offsets=off))
                    sources[name] = "blob"
                template_params = size
                alpha_params = M * sum(ks)
            else:
                alloc = allocate_banks(drafts, fixed_cost, M, ens.templates_per_layer, budget)
                minimum = alloc.minimum_budget
                for d, n, share, k in zip(drafts, alloc.templates, alloc.shares, alloc.k):
                    table, usage = assign_bank(len(d.layers), n, k, M, ens.assign)
                    groups.append(P.Group(name=d.name, layers=d.layers, weight_shape=d.weight_shape, bias=d.bias,
                                          size=d.size, share=share, templates=n, templates_per_layer=k,
                                          requested_templates_per_layer=d.templates_per_layer or ens.templates_per_layer,
                                          usage=usage, fixed=d.templates is not None))
                    for layer, per_member in zip(d.layers, table):
                        slots.append(P.Slot(layer=layer, group=d.name, size=d.size, k=k, templates=per_member))
                        sources[layer] = "bank"
                template_params = sum(g.templates * g.size for g in groups)
                alpha_params = M * sum(len(g.layers) * g.templates_per_layer for g in groups)
        except BudgetError as e:
            if not (budget is None and "budget" in ens.pos):  # else the bad budget itself is already reported
                diags.error(e.message, budget_pos, e.hint)
            diags.raise_if_any()
        for n in plain:
            sources[n] = "plain"
        order = {o.name: i for i, o in enumerate(weights)}
        slots.sort(key=lambda s: order[s.layer])
    diags.raise_if_any()

    ops = [o.model_copy(update={"source": sources[o.name]}) if isinstance(o, (P.ConvOp, P.LinearOp)) else o
           for o in ops]
    tensors = _tensors(ops, slots, groups, blob, M)
    by_role: dict[str, int] = {}
    for t in tensors:
        if t.trainable:
            by_role[t.role] = by_role.get(t.role, 0) + t.numel
    plain_params = by_role.get("plain_weight", 0) + by_role.get("plain_bias", 0)
    member_params = by_role.get("member_weight", 0) + by_role.get("member_bias", 0)
    bn_params = by_role.get("bn_weight", 0) + by_role.get("bn_bias", 0)
    total = sum(by_role.values())
    assert by_role.get("alpha", 0) == alpha_params
    assert by_role.get("bank", 0) + by_role.get("blob", 0) == template_params
    accounting = P.Accounting(
        backbone_params=backbone, naive_params=M * backbone, plain_params=plain_params + member_params,
        template_params=template_params, alpha_params=alpha_params, bn_params=bn_params, total_params=total,
        budget=budget, minimum_budget=minimum,
        per_member_params=(alpha_params + bn_params) // M + (member_params // M),
    )
    plan = P.Plan(
        name=program.name, source=program.main_file, members=M, grouping=grouping, assign=ens.assign,
        templates_per_layer=ens.templates_per_layer, bank_singletons=ens.bank_singletons,
        input_shape=list(ops[0].out_shape), input_layout=ops[0].layout, output=ops[-1].name,
        classes=ops[-1].out_shape[0], ops=ops, groups=groups, blob=blob, slots=slots, plain_layers=plain,
        tensors=tensors, accounting=accounting, train=program.recipe,
    )
    return plan.model_copy(update={"spec_hash": plan.content_hash()})


def _tensors(ops: list, slots: list[P.Slot], groups: list[P.Group], blob: P.Blob | None, M: int) -> list[P.Tensor]:
    """The model's named tensors, in a stable order (checkpoints and backends use these names)."""
    out: list[P.Tensor] = []
    for g in groups:
        out.append(P.Tensor(name=f"bank.{g.name}", shape=[g.templates, g.size], role="bank", trainable=True))
    if blob is not None:
        out.append(P.Tensor(name="blob", shape=[blob.size], role="blob", trainable=True))
    slot_by_layer = {s.layer: s for s in slots}
    for o in ops:
        if isinstance(o, (P.ConvOp, P.LinearOp)):
            out_ch = o.weight_shape[0]
            if o.source == "plain":
                out.append(P.Tensor(name=f"plain.{o.name}.weight", shape=o.weight_shape, role="plain_weight",
                                    trainable=True, layer=o.name))
                if o.bias:
                    out.append(P.Tensor(name=f"plain.{o.name}.bias", shape=[out_ch], role="plain_bias",
                                        trainable=True, layer=o.name))
            elif o.source == "member":
                out.append(P.Tensor(name=f"member.{o.name}.weight", shape=[M, *o.weight_shape],
                                    role="member_weight", trainable=True, layer=o.name, per_member=True))
                if o.bias:
                    out.append(P.Tensor(name=f"member.{o.name}.bias", shape=[M, out_ch], role="member_bias",
                                        trainable=True, layer=o.name, per_member=True))
            else:
                s = slot_by_layer[o.name]
                out.append(P.Tensor(name=f"alpha.{o.name}", shape=[M, s.k], role="alpha", trainable=True,
                                    layer=o.name, per_member=True))
        elif isinstance(o, P.BatchNormOp):
            for field, role, trainable in (("weight", "bn_weight", True), ("bias", "bn_bias", True),
                                           ("running_mean", "bn_mean", False), ("running_var", "bn_var", False)):
                out.append(P.Tensor(name=f"bn.{o.name}.{field}", shape=[M, o.channels], role=role,
                                    trainable=trainable, layer=o.name, per_member=True))
    return out
