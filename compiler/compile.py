"""compile_program: elaborate the backbone, let the spec's method build on it (compiler/methods/),
account, Plan."""

from __future__ import annotations

from mixc.compiler import plan as P
from mixc.compiler.elaborate import elaborate
from mixc.compiler.layers import member_op_params, weight_size
from mixc.compiler.methods import Backbone, EnsembleMethod, MethodError, MethodParts, get_method
from mixc.compiler.plan_warnings import plan_warning
from mixc.spec.diagnostics import Diagnostics
from mixc.spec.expr import LIMIT, Multiple
from mixc.spec.loader import Program


def compile_program(program: Program) -> P.Plan:
    """Compile a loaded program. Raises ``SpecError`` listing every problem found."""
    plan = _compile(program)
    # counts stay within the spec's number limit (docs/security.md)
    if plan.accounting.total_params > LIMIT:
        ens = program.ensemble
        diags = Diagnostics(sources=dict(program.sources))
        diags.error(
            f"the model would have {plan.accounting.total_params:,} parameters, more than numbers"
            " in mixc go (1e18)",
            ens.method.pos or ens.pos.get("backbone") or ens.pos.get("members"),
            "lower the backbone's width, the members or the method's options",
        )
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
    b = _backbone(program, graph, diags)
    method = get_method(b.ens.method.name)
    parts = _build(method, b)
    # errors found earlier (the train section, say) are reported with none of the method's
    diags.raise_if_any()
    return _plan(program, b, method, parts)


def _backbone(program: Program, graph, diags: Diagnostics) -> Backbone:
    """The backbone's size and the spec's budget in parameters, for the method to build from."""
    ens = program.ensemble
    weights = [o for o in graph.ops if isinstance(o, (P.ConvOp, P.LinearOp))]
    member_ops = sum(member_op_params(o) for o in graph.ops)
    backbone = sum(weight_size(o) for o in weights) + member_ops
    budget = ens.budget
    if isinstance(budget, Multiple):
        budget = int(budget.factor * backbone)
    budget_pos = ens.pos.get("budget", ens.pos.get("backbone"))
    return Backbone(
        ens,
        graph,
        backbone,
        member_ops,
        budget,
        budget_pos,
        _ignored_warnings(ens, diags.sources),
        diags,
    )


def _build(method: EnsembleMethod, b: Backbone) -> MethodParts:
    """The method's parts; a MethodError is reported at its position."""
    ens = b.ens
    try:
        method.check_sizes(
            ens.method.options, b.ops, lambda key: ens.method.option_pos.get(key, ens.method.pos)
        )
        return method.build(b)
    except MethodError as e:
        b.diags.error(e.message, e.pos, e.hint)
        b.diags.raise_if_any()
        raise  # not reached: raise_if_any raised


def _accounting(b: Backbone, parts: MethodParts) -> P.Accounting:
    """Every method's counts from its tensors' roles (docs/plan.md)."""
    by_role: dict[str, int] = {}
    for t in parts.tensors:
        if t.trainable:
            by_role[t.role] = by_role.get(t.role, 0) + t.numel
    part = {
        k: sum(by_role.get(r, 0) for r in roles)
        for k, roles in (
            ("plain", ("plain_weight", "plain_bias", "member_weight", "member_bias")),
            ("fast", ("fast_in", "fast_out")),
            ("bn", ("bn_weight", "bn_bias")),
            ("norm", ("norm_weight", "norm_bias")),
            ("embedding", ("embedding",)),
            ("templates", ("bank", "blob")),
            ("alpha", ("alpha",)),
        )
    }
    M = b.members
    return P.Accounting(
        backbone_params=b.backbone,
        naive_params=M * b.backbone,
        plain_params=part["plain"],
        template_params=part["templates"],
        alpha_params=part["alpha"],
        bn_params=part["bn"],
        norm_params=part["norm"],
        embedding_params=part["embedding"],
        total_params=sum(by_role.values()),
        budget=parts.budget,
        minimum_budget=parts.minimum,
        per_member_params=parts.per_member,
        maximum_budget=parts.maximum,
        fast_params=part["fast"],
        backbone_macs=parts.backbone_macs,
    )


def _plan(program: Program, b: Backbone, method: EnsembleMethod, parts: MethodParts) -> P.Plan:
    ens, ops, graph = b.ens, parts.ops, b.graph
    plan = P.Plan(
        name=program.name,
        source=program.main_file,
        members=b.members,
        grouping=parts.grouping,
        assign=ens.assign,
        templates_per_layer=ens.templates_per_layer,
        bank_singletons=ens.bank_singletons,
        input_shape=list(graph.ops[0].out_shape),
        input_layout=ops[0].layout,
        output=ops[-1].name,
        classes=graph.ops[-1].out_shape[0],
        ops=ops,
        groups=parts.groups,
        blob=parts.blob,
        slots=parts.slots,
        plain_layers=parts.plain_layers,
        tensors=parts.tensors,
        accounting=_accounting(b, parts),
        train=program.recipe,
        init=_init_rules(ens.init),
        warnings=b.warnings,
        scopes=graph.scopes,
        method=parts.method,
        execution=method.execution,
    )
    return plan.model_copy(update={"spec_hash": plan.content_hash()})


def _ignored_warnings(ens, sources: dict[str, str]) -> list[P.PlanWarning]:
    """One warning naming the spec's settings that a --set made moot (spec/sections.py decides
    which)."""
    if not ens.ignored:
        return []
    ignored = sorted(ens.ignored, key=lambda kp: (kp[1].line, kp[1].col))
    m = ens.method.name
    solves = get_method(
        m
    ).budget_solves  # the budget, though ignored, is read: it would solve this option
    unused = [
        k for k, _ in ignored if k not in ("method.alpha",) and not (k == "budget" and solves)
    ]
    reasons = []
    if unused:
        reasons.append(
            f"method {m}, chosen with --set, does not use the spec's {', '.join(unused)} "
            f"({'they are' if len(unused) > 1 else 'it is'} ignored)"
        )
    if any(k == "budget" for k, _ in ignored) and solves:
        reasons.append(f"the spec's budget is ignored: {m}'s {solves} is given with --set")
    if any(k == "method.alpha" for k, _ in ignored):
        reasons.append("the spec's alpha is ignored: the budget given with --set solves alpha")
    return [
        plan_warning(
            "; ".join(reasons),
            ignored[0][1],
            f"to silence this, remove {'them' if len(ignored) > 1 else 'it'} from the spec",
            sources,
        )
    ]


def _init_rules(rules: dict[str, dict]) -> P.InitRules:
    """The spec's ``init { ... }`` lines over the defaults (today's behaviour)."""
    return P.InitRules(**{k: P.InitRule(**v) for k, v in rules.items()})
