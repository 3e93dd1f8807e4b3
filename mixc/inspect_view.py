"""What `mixc inspect` shows: the allocation as rich tables or a JSON object."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from mixc.compiler.degenerate import collinear, distinct_template_sets
from mixc.compiler.methods import method_of
from mixc.compiler.plan import Plan
from mixc.core.flops import backbone_macs, ensemble_macs


def render_warnings(plan: Plan) -> str:
    """The plan's warnings in the errors' file:line:col style (with the line and a caret), labelled
    warning."""
    from mixc.spec.diagnostics import Diagnostic, Pos

    out = []
    for w in plan.warnings:
        pos = Pos(w.file, w.line, w.col) if w.file and w.line and w.col else None
        sources = (
            {w.file: "\n" * (w.line - 1) + w.source_line}
            if pos and w.source_line is not None
            else {}
        )
        out.append(Diagnostic(w.message, pos, w.hint, severity="warning").render(sources))
    return "\n".join(out)


def print_warnings(plan: Plan) -> None:
    """Write the plan's warnings to stderr (never silently compile a plan with a warning)."""
    import sys

    if plan.warnings:
        sys.stdout.flush()
        sys.stderr.write(render_warnings(plan) + "\n")


def _shape(s: list[int]) -> str:
    return "x".join(map(str, s))


def _transformer_rows(t, a, members: int, how: str) -> None:
    """LayerNorm and embedding rows, shown only for the backbones that have them."""
    for label, n in (("layernorm", a.norm_params), ("embeddings", a.embedding_params)):
        if n:
            t.add_row(label, f"{n:,}", f"{n // members:,} {how}" if how == "per member" else how)


def summary(plan: Plan) -> dict[str, Any]:
    """The JSON form of `mixc inspect`: stable keys for scripts and CI."""
    a = plan.accounting
    bn_member = a.bn_params // plan.members
    alpha_member = a.alpha_params // plan.members
    by_name = {o.name: o for o in plan.ops}
    return {
        "name": plan.name,
        "spec_hash": plan.spec_hash,
        "method": plan.method.name,
        "method_options": plan.method.model_dump(exclude={"name"}),
        "execution": plan.execution,
        "members": plan.members,
        "grouping": plan.grouping,
        "assign": plan.assign,
        "templates_per_layer": plan.templates_per_layer,
        "bank_singletons": plan.bank_singletons,
        "backbone_params": a.backbone_params,
        "total_params": a.total_params,
        "budget": a.budget,
        "minimum_budget": a.minimum_budget,
        "maximum_budget": a.maximum_budget,
        "maximum_budget_reason": _maximum_reason(plan),
        "utilisation": (a.total_params / a.budget) if a.budget else None,
        "naive_params": a.naive_params,
        "saving_vs_naive": 1 - a.total_params / a.naive_params,
        "plain_params": a.plain_params,
        "template_params": a.template_params,
        "alpha_params": a.alpha_params,
        "bn_params": a.bn_params,
        "alphas_per_member": alpha_member,
        "bn_per_member": bn_member,
        "per_member_params": a.per_member_params,
        "fast_params": a.fast_params,
        "norm_params": a.norm_params,
        "embedding_params": a.embedding_params,
        "inference_macs": ensemble_macs(plan),
        "backbone_macs": backbone_macs(plan),
        "relative_flops": ensemble_macs(plan) / backbone_macs(plan),
        "groups": [
            {
                "name": g.name,
                "layers": g.layers,
                "weight_shape": g.weight_shape,
                "bias": g.bias,
                "template_size": g.size,
                "share": g.share,
                "templates": g.templates,
                "templates_per_layer": g.templates_per_layer,
                "bank_params": g.templates * g.size,
                "usage_min": min(g.usage),
                "usage_max": max(g.usage),
                "fixed": g.fixed,
                "capacity": g.capacity,
                "distinct_template_sets": distinct_template_sets(
                    [sl for sl in plan.slots if sl.group == g.name]
                ),
                "members_differ": (
                    plan.members > 1
                    and not all(collinear(sl) for sl in plan.slots if sl.group == g.name)
                ),
            }
            for g in plan.groups
        ],
        "blob": (
            None
            if plan.blob is None
            else {
                "size": plan.blob.size,
                "layers": plan.blob.layers,
                "templates_per_layer": {s.layer: s.k for s in plan.slots},
                "usage_min": plan.blob.usage_min,
                "usage_max": plan.blob.usage_max,
            }
        ),
        "plain_layers": [
            {"name": n, "weight_shape": by_name[n].weight_shape, "params": _params(by_name[n])}
            for n in plan.plain_layers
        ],
    }


def _maximum_reason(plan: Plan) -> str | None:
    """Why budget beyond ``maximum_budget`` is useless, and what would raise it."""
    a = plan.accounting
    if a.maximum_budget is None:
        return None
    what = "the blob" if plan.blob is not None else "every group"
    per = (
        "layers x templates_per_layer"
        if plan.assign == "shared"
        else "members x layers x templates_per_layer"
    )
    return (
        f"at {a.maximum_budget:,} {what} holds as many templates as its slots can read ({per}); "
        "raise templates_per_layer"
        + (" or members" if plan.assign == "greedy_disjoint" else "")
        + " to use a larger budget"
    )


def _params(op) -> int:
    n = 1
    for d in op.weight_shape:
        n *= d
    return n + (op.weight_shape[0] if op.bias else 0)


def method_label(plan: Plan) -> str:
    """``packed(alpha = 2, gamma = 1)``: the method as a spec writes it, with the options that
    define it."""
    opts = plan.method.model_dump(exclude={"name", "alpha_from_budget"})
    if not opts:
        return plan.method.name
    return (
        f"{plan.method.name}("
        + ", ".join(
            f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}" for k, v in opts.items()
        )
        + ")"
    )


def _role_params(plan: Plan, *roles: str) -> int:
    return sum(t.numel for t in plan.tensors if t.trainable and t.role in roles)


def print_inspect(plan: Plan, console: Console) -> None:
    a = plan.accounting
    if method_of(plan).per_member_weights:
        head = (
            (
                f"groups {plan.grouping}, assign {plan.assign}, templates per layer"
                f" {plan.templates_per_layer}"
                + (", singletons banked" if plan.bank_singletons else "")
            )
            if method_of(plan).has_templates
            else ""
        )
    else:
        head = "activations " + plan.execution.replace("_", " ")
    console.print(
        f"[bold]{plan.name}[/bold]  ({plan.source})  method {method_label(plan)}, members"
        f" {plan.members}" + (f", {head}" if head else ""),
        markup=True,
    )
    console.print(
        f"plain backbone: [bold]{a.backbone_params:,}[/bold] parameters "
        f"(input {_shape(plan.input_shape)}, {plan.classes} classes)"
    )
    if method_of(plan).per_member_weights:
        _print_mixture(plan, console)
    else:
        _print_method(plan, console)


def _flops_row(t: Table, plan: Plan) -> None:
    macs, ref = ensemble_macs(plan), backbone_macs(plan)
    t.add_row(
        "inference MACs", f"{macs:,}", f"{macs / ref:.2f}x one plain backbone ({ref:,}), per sample"
    )


def _print_method(plan: Plan, console: Console) -> None:
    """batch_ensemble, mimo and packed: what the method holds, then the accounting."""
    a, M, name = plan.accounting, plan.members, plan.method.name
    t = Table(title="accounting", title_justify="left", show_header=False)
    t.add_column("what")
    t.add_column("params", justify="right")
    t.add_column("note")
    if method_of(plan).has_fast_weights:
        console.print(
            "every conv/linear layer: one shared weight W and, per member, fast weights r (input "
            "channels) and s (output channels): member i computes ((x * r_i) conv W) * s_i + b_i; "
            f"the batch runs tiled {M} times"
        )
        bias = _role_params(plan, "member_bias")
        t.add_row(
            "shared weights",
            f"{_role_params(plan, 'plain_weight'):,}",
            "one W per layer, all members",
        )
        t.add_row("fast weights r, s", f"{a.fast_params:,}", f"{a.fast_params // M:,} per member")
        if bias:
            t.add_row("biases", f"{bias:,}", f"{bias // M:,} per member")
    else:
        first = next(o for o in plan.ops if o.kind in ("conv", "linear"))
        if method_of(plan).stacks_inputs:
            console.print(
                f"one network: its first layer '{first.name}' reads the {M} members' inputs stacked"
                f" on the channel axis ({_shape(plan.ops[0].out_shape)}), its output has {M} heads"
                f" ({M} x {plan.classes})"
            )
        else:
            m = plan.method
            console.print(
                f"one network, every layer alpha = {m.alpha:g} times as wide and split into gamma x"
                f" members = {m.gamma * M} groups (the first layer '{first.name}' not split, the"
                f" output layer in {M} groups producing {M} x {plan.classes})"
            )
            console.print(_budget_note(plan))
        t.add_row("weights and biases", f"{a.plain_params:,}", "one network holding every member")
    if a.bn_params or not a.norm_params:
        t.add_row(
            "batchnorm",
            f"{a.bn_params:,}",
            (
                f"{a.bn_params // M:,} per member"
                if plan.execution == "per_member"
                else "one per layer (per channel)"
            ),
        )
    _transformer_rows(
        t, a, M, "per member" if plan.execution == "per_member" else "one per layer (per channel)"
    )
    own = {
        "batch_ensemble": "fast weights, biases and batchnorm",
        "mimo": "its share of the first layer's input channels and its head",
        "packed": "its groups of every layer (a member owns 1/M of every tensor)",
    }[name]
    t.add_row("per member", f"{a.per_member_params:,}", own)
    t.add_row(
        "[bold]total[/bold]",
        f"[bold]{a.total_params:,}[/bold]",
        (
            f"budget {a.budget:,}, {a.total_params / a.budget - 1:+.2%}"
            if a.budget
            else "no budget applies"
        ),
    )
    t.add_row(
        "naive ensemble",
        f"{a.naive_params:,}",
        f"{M} x backbone; this is {a.total_params / a.naive_params:.1%} of it",
    )
    _flops_row(t, plan)
    console.print(t)


def _budget_note(plan: Plan) -> str:
    """How packed's alpha was chosen."""
    a, m = plan.accounting, plan.method
    if m.alpha_from_budget and a.budget:
        return (
            f"alpha {m.alpha:g} solved from the budget {a.budget:,}: of the alphas at which every"
            " width divides, the one whose total is closest to the budget"
            f" ({a.total_params / a.budget - 1:+.2%})"
        )
    return (
        f"alpha {m.alpha:g} as given (with a budget and no alpha, the alpha closest to the budget"
        " is taken)"
    )


def _print_mixture(plan: Plan, console: Console) -> None:
    s = summary(plan)
    if plan.groups:
        _print_groups(plan, s, console)
    if plan.blob is not None:
        _print_blob(plan, console)
    _print_plain_layers(plan, s, console)
    _print_accounting(plan, s, console)


def _print_groups(plan: Plan, s: dict[str, Any], console: Console) -> None:
    """The parameter groups' table, its legend, and every group's layers."""
    t = Table(title="parameter groups", title_justify="left")
    t.add_column("group", overflow="fold")
    for col in ("layers", "share", "n", "cap", "k", "params", "usage", "sets"):
        t.add_column(col, justify="right", no_wrap=True)
    for g in s["groups"]:
        t.add_row(
            g["name"],
            str(len(g["layers"])),
            "fixed" if g["fixed"] else f"{g['share']:.3f}",
            str(g["templates"]),
            str(g["capacity"]),
            str(g["templates_per_layer"]),
            f"{g['bank_params']:,}",
            f"{g['usage_min']}-{g['usage_max']}",
            str(g["distinct_template_sets"])
            + ("" if g["members_differ"] or plan.members == 1 else " (!)"),
        )
    console.print(t)
    console.print(
        "n = templates; cap = most templates the group's slots can read; k = templates per"
        " layer; usage = slots per template (shared: one slot per layer); sets = distinct"
        " template selections among the members ((!): members differ only by a scale in every"
        " layer of the group)"
    )
    for g in s["groups"]:
        console.print(f"  {g['name']}: " + ", ".join(g["layers"]), overflow="fold")


def _print_blob(plan: Plan, console: Console) -> None:
    """The single blob's size, its layers and how often each entry is read."""
    b = plan.blob
    ks = sorted({sl.k for sl in plan.slots})
    console.print(
        f"single blob: [bold]{b.size:,}[/bold] entries shared by {len(b.layers)} layers "
        f"(templates per layer {', '.join(map(str, ks))}; each entry read by "
        f"{b.usage_min}-{b.usage_max} slots)"
    )


def _print_plain_layers(plan: Plan, s: dict[str, Any], console: Console) -> None:
    """The layers outside any group (shared by all members, or per member without sharing)."""
    if s["plain_layers"]:
        t = Table(
            title=(
                "plain layers (one weight shared by all members)"
                if plan.grouping != "none"
                else "per-member layers (no sharing)"
            ),
            title_justify="left",
        )
        t.add_column("layer")
        t.add_column("shape")
        t.add_column("params", justify="right")
        for p in s["plain_layers"]:
            t.add_row(p["name"], _shape(p["weight_shape"]), f"{p['params']:,}")
        console.print(t)
    elif plan.grouping == "none":
        console.print("no sharing (groups none): every member has its own copy of every layer")


def _print_accounting(plan: Plan, s: dict[str, Any], console: Console) -> None:
    """Where the parameters go, the budget, the naive ensemble it is measured against, FLOPs."""
    a = plan.accounting
    t = Table(title="accounting", title_justify="left", show_header=False)
    t.add_column("what")
    t.add_column("params", justify="right")
    t.add_column("note")
    t.add_row(
        "plain layers" if plan.grouping != "none" else "per-member layers",
        f"{a.plain_params:,}",
        "",
    )
    t.add_row(
        "templates",
        f"{a.template_params:,}",
        "banks" if plan.groups else ("blob" if plan.blob else ""),
    )
    t.add_row("alphas", f"{a.alpha_params:,}", f"{s['alphas_per_member']:,} per member")
    if a.bn_params or not a.norm_params:
        t.add_row("batchnorm", f"{a.bn_params:,}", f"{s['bn_per_member']:,} per member")
    _transformer_rows(t, a, plan.members, "per member")
    t.add_row(
        "per-member overhead",
        f"{a.per_member_params:,}",
        f"{a.per_member_params / a.backbone_params:.2%} of one backbone",
    )
    t.add_row(
        "[bold]total[/bold]",
        f"[bold]{a.total_params:,}[/bold]",
        (
            f"budget {a.budget:,}, {a.total_params / a.budget:.2%} used (minimum"
            f" {a.minimum_budget:,})"
            if a.budget
            else "no budget applies"
        ),
    )
    if a.budget and a.maximum_budget is not None:
        t.add_row(
            "largest useful budget",
            f"{a.maximum_budget:,}",
            _maximum_reason(plan)
            + (" [bold]the budget exceeds it[/bold]" if a.budget > a.maximum_budget else ""),
        )
    t.add_row(
        "naive ensemble",
        f"{a.naive_params:,}",
        f"{plan.members} x backbone; this spec saves {s['saving_vs_naive']:.1%}",
    )
    _flops_row(t, plan)
    console.print(t)
