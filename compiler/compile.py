"""compile_program: elaborate -> group -> allocate -> assign -> Plan."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mixc.compiler import plan as P
from mixc.compiler.allocate import BudgetError, allocate_banks, allocate_blob
from mixc.compiler.assign import assign_bank, assign_blob
from mixc.compiler.degenerate import all_collinear, degenerate_groups
from mixc.compiler.elaborate import elaborate
from mixc.compiler.group import form_groups
from mixc.compiler.layers import weight_size
from mixc.spec.expr import LIMIT
from mixc.compiler.methods import MethodError, build_method, check_method_sizes
from mixc.spec.diagnostics import Diagnostics, Pos
from mixc.spec.expr import Multiple
from mixc.spec.loader import Program


def compile_program(program: Program) -> P.Plan:
    """Compile a loaded program. Raises ``SpecError`` listing every problem found."""
    plan = _compile(program)
    if plan.accounting.total_params > LIMIT:  # counts stay within the spec's number limit (docs/security.md)
        ens = program.ensemble
        diags = Diagnostics(sources=dict(program.sources))
        diags.error(f"the model would have {plan.accounting.total_params:,} parameters, more than numbers in mixc "
                    "go (1e18)", ens.method.pos or ens.pos.get("backbone") or ens.pos.get("members"),
                    "lower the backbone's width, the members or the method's options")
        diags.raise_if_any()
    return plan


def _compile(program: Program) -> P.Plan:
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
    warnings: list[P.PlanWarning] = _ignored_warnings(ens, diags.sources)
    if ens.method.name in ("batch_ensemble", "mimo", "packed"):
        return _compile_method(program, graph, backbone, budget, budget_pos, warnings, diags)

    grouping = "none" if ens.method.name == "naive" else ens.groups  # groups none is the naive ensemble
    maximum: int | None = None
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
        tpl, policy = ens.templates_per_layer, ens.assign

        def build(b: int | None, t: int = tpl) -> _Built:
            return _allocate(drafts, weights, by_name, fixed_cost, M, t, policy, grouping, b)

        try:
            built = build(budget)
        except BudgetError as e:
            if budget is None and "budget" in ens.pos:  # the bad budget itself is already reported
                diags.raise_if_any()
            message, hint = e.message, e.hint
            if e.minimum is not None and M > 1:  # the stated minimum must itself compile: members must differ
                message, hint = _below_minimum(e, M, tpl, policy, budget, backbone, build) or (message, hint)
            diags.error(message, ens.pos.get(e.setting, budget_pos) if e.setting else budget_pos, hint)
            diags.raise_if_any()
        groups, slots, blob, minimum, maximum = built.groups, built.slots, built.blob, built.minimum, built.maximum
        template_params, alpha_params = built.template_params, built.alpha_params
        for s in slots:
            sources[s.layer] = "blob" if s.group == "blob" else "bank"
        if budget is not None and maximum is not None and budget > maximum:
            warnings.append(_warning(
                f"the budget {budget:,} exceeds the largest useful budget {maximum:,} for this spec: every group "
                f"already holds as many templates as its layers can read, so {budget - maximum:,} parameters are "
                f"left unspent", budget_pos,
                f"lower the budget to {maximum:,}, or raise templates_per_layer (or members under greedy_disjoint) "
                f"so more templates can be read", diags.sources))
        if all_collinear(M, slots, 0):
            message, hint = _degenerate_error(M, tpl, policy, budget, backbone, build)
            diags.error(message, budget_pos, hint)
            diags.raise_if_any()
        same = degenerate_groups(slots) if M > 1 else []
        if same:
            what = "the blob" if same == ["blob"] else "group" + ("s " if len(same) > 1 else " ") + ", ".join(same)
            warnings.append(_warning(
                f"{what}: every member reads the same single template in each layer, so there the members' "
                f"weights differ only by a scale that BatchNorm removes", budget_pos,
                "give these layers a second template per member: a larger budget or share with "
                "templates_per_layer >= 2, or assign greedy_disjoint", diags.sources))
        for n in plain:
            sources[n] = "plain"
    diags.raise_if_any()

    ops = [o.model_copy(update={"source": sources[o.name]}) if isinstance(o, (P.ConvOp, P.LinearOp)) else o
           for o in ops]
    out_op = ops[-1]
    classifier_law = ens.init.get("classifier", {}).get("law", "uniform")
    if classifier_law != "uniform" and sources.get(out_op.name) in ("bank", "blob"):
        warnings.append(_warning(
            f"the classifier rule does not apply: the output layer '{out_op.name}' reads templates "
            f"({sources[out_op.name]}), which are drawn by the template rule", ens.pos.get("init"),
            "keep the output layer plain (bank_singletons false) for the classifier rule to apply", diags.sources))
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
        maximum_budget=maximum,
    )
    plan = P.Plan(
        name=program.name, source=program.main_file, members=M, grouping=grouping, assign=ens.assign,
        templates_per_layer=ens.templates_per_layer, bank_singletons=ens.bank_singletons,
        input_shape=list(ops[0].out_shape), input_layout=ops[0].layout, output=ops[-1].name,
        classes=ops[-1].out_shape[0], ops=ops, groups=groups, blob=blob, slots=slots, plain_layers=plain,
        tensors=tensors, accounting=accounting, train=program.recipe,
        init=_init_rules(ens.init), warnings=warnings, scopes=graph.scopes,
        method=P.NaiveMethod() if grouping == "none" else P.MixtureMethod(),
    )
    return plan.model_copy(update={"spec_hash": plan.content_hash()})


def _compile_method(program: Program, graph, backbone: int, budget: int | None, budget_pos: Pos | None,
                    warnings: list[P.PlanWarning], diags: Diagnostics) -> P.Plan:
    """A batch_ensemble, mimo or packed plan (compiler/methods.py): no groups, slots or blob."""
    ens = program.ensemble
    M = ens.members
    try:
        check_method_sizes(ens.method.name, ens.method.options, list(graph.ops),
                           lambda key: ens.method.option_pos.get(key, ens.method.pos))
        parts = build_method(ens.method.name, ens.method.options, list(graph.ops), M, budget, budget_pos,
                             graph.pos, backbone)
    except MethodError as e:
        diags.error(e.message, e.pos, e.hint)
        diags.raise_if_any()
    diags.raise_if_any()  # errors found earlier (the train section, say) are reported with none of ours
    by_role: dict[str, int] = {}
    for t in parts.tensors:
        if t.trainable:
            by_role[t.role] = by_role.get(t.role, 0) + t.numel
    part = {k: sum(by_role.get(r, 0) for r in roles) for k, roles in (
        ("plain", ("plain_weight", "plain_bias", "member_weight", "member_bias")), ("fast", ("fast_in", "fast_out")),
        ("bn", ("bn_weight", "bn_bias")))}
    accounting = P.Accounting(
        backbone_params=backbone, naive_params=M * backbone, plain_params=part["plain"], template_params=0,
        alpha_params=0, bn_params=part["bn"], total_params=sum(by_role.values()), budget=parts.budget,
        minimum_budget=parts.minimum, per_member_params=parts.per_member, fast_params=part["fast"],
        backbone_macs=parts.backbone_macs,
    )
    ops = parts.ops
    plan = P.Plan(
        name=program.name, source=program.main_file, members=M, grouping="none", assign=ens.assign,
        templates_per_layer=ens.templates_per_layer, bank_singletons=ens.bank_singletons,
        input_shape=list(ops[0].in_shape), input_layout=ops[0].layout, output=ops[-1].name,
        classes=graph.ops[-1].out_shape[0], ops=ops, groups=[], blob=None, slots=[], plain_layers=[],
        tensors=parts.tensors, accounting=accounting, train=program.recipe, init=_init_rules(ens.init),
        warnings=warnings, scopes=graph.scopes, method=parts.method, execution=P.EXECUTION[ens.method.name],
    )
    return plan.model_copy(update={"spec_hash": plan.content_hash()})


def _ignored_warnings(ens, sources: dict[str, str]) -> list[P.PlanWarning]:
    """One warning naming the spec's settings that a --set made moot (spec/sections.py decides which)."""
    if not ens.ignored:
        return []
    ignored = sorted(ens.ignored, key=lambda kp: (kp[1].line, kp[1].col))
    m = ens.method.name
    unused = [k for k, _ in ignored if k not in ("method.alpha",) and not (k == "budget" and m == "packed")]
    reasons = []
    if unused:
        reasons.append(f"method {m}, chosen with --set, does not use the spec's {', '.join(unused)} "
                       f"({'they are' if len(unused) > 1 else 'it is'} ignored)")
    if any(k == "budget" for k, _ in ignored) and m == "packed":
        reasons.append("the spec's budget is ignored: packed's alpha is given with --set")
    if any(k == "method.alpha" for k, _ in ignored):
        reasons.append("the spec's alpha is ignored: the budget given with --set solves alpha")
    return [_warning("; ".join(reasons), ignored[0][1],
                     f"to silence this, remove {'them' if len(ignored) > 1 else 'it'} from the spec", sources)]


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


def _allocate(drafts: list, weights: list, by_name: dict, fixed_cost: int, M: int, tpl: int, policy: str,
              grouping: str, budget: int | None) -> _Built:
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
            groups.append(P.Group(name=d.name, layers=d.layers, weight_shape=d.weight_shape, bias=d.bias,
                                  size=d.size, share=share, templates=n, templates_per_layer=k,
                                  requested_templates_per_layer=d.templates_per_layer or tpl,
                                  usage=usage, fixed=d.templates is not None, capacity=cap))
            for layer, per_member in zip(d.layers, table):
                slots.append(P.Slot(layer=layer, group=d.name, size=d.size, k=k, templates=per_member))
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


_DEGENERATE = ("the {M} members would be identical: in every layer each member's weight is a scalar multiple of "
               "the others' (one template per layer, the same for all members; plain layers are shared), and "
               "BatchNorm removes the scale")
_HUGE = 10 ** 30  # a budget above any capacity: probes the minimum and the largest useful budget


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
        return f"set templates_per_layer {t} and a budget of at least {at:,} ({at / backbone:.3g}x), or assign " \
               f"greedy_disjoint"
    return "use assign greedy_disjoint, or bank more layers (bank_singletons true)"


def _degenerate_error(M: int, tpl: int, policy: str, budget: int | None, backbone: int, build) -> tuple[str, str]:
    """(message, hint) for a degenerate ensemble: the smallest budget, or the setting, that fixes it."""
    head = _DEGENERATE.format(M=M)
    if budget is None:
        return (head, "give a group templates = 2 or more with templates_per_layer 2 or more, or assign "
                      "greedy_disjoint")
    at = differ_budget(build, *_bounds(build, tpl))
    if at is not None:
        return (f"{head}; the smallest budget at which members can differ is {at:,}",
                f"raise the budget to at least {at:,} ({at / backbone:.3g}x)")
    return (f"{head}; no budget changes that at templates_per_layer {tpl} with assign {policy}",
            _setting_fix(M, tpl, policy, backbone, build))


def _below_minimum(e: BudgetError, M: int, tpl: int, policy: str, budget: int, backbone: int,
                   build) -> tuple[str, str] | None:
    """A below-the-minimum error whose minimum also keeps the members apart (None: the plain one holds)."""
    lo, hi = _bounds(build, tpl)
    if not all_collinear(M, build(lo).slots, 0):
        return None
    at = differ_budget(build, lo, hi)
    if at is not None:
        return (f"the budget {budget:,} is below the minimum {at:,} for this spec: below it (from the bare minimum "
                f"{lo:,} on) every layer gives the {M} members one shared template, so the members would be "
                f"identical up to a scale that BatchNorm removes",
                f"raise the budget to at least {at:,} ({at / backbone:.3g}x)")
    return (f"the budget {budget:,} is too small, and at templates_per_layer {tpl} with assign {policy} no budget "
            f"helps: " + _DEGENERATE.format(M=M), _setting_fix(M, tpl, policy, backbone, build))


def _init_rules(rules: dict[str, dict]) -> P.InitRules:
    """The spec's ``init { ... }`` lines over the defaults (today's behaviour)."""
    return P.InitRules(**{k: P.InitRule(**v) for k, v in rules.items()})


def _warning(message: str, pos: Pos | None, hint: str | None, sources: dict[str, str]) -> P.PlanWarning:
    """A positioned warning; it keeps its source line so it renders like an error anywhere."""
    line = None
    if pos is not None and pos.file in sources:
        lines = sources[pos.file].split("\n")
        line = lines[pos.line - 1] if 1 <= pos.line <= len(lines) else None
    if line is not None:
        # A plan holds one-line text only (a tab or a CRLF's \r would not validate); one space
        # per character keeps the caret under the column it names.
        line = re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", " ", line.rstrip("\r"))[:4096]
    return P.PlanWarning(message=message, hint=hint, file=pos.file if pos else None,
                         line=pos.line if pos else None, col=pos.col if pos else None, source_line=line)


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
