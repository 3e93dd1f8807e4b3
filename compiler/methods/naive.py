"""The naive deep ensemble: M independent backbones (``member.*`` weights), what ``groups none``
compiles to."""

from __future__ import annotations

from mixc.compiler import plan as P
from mixc.compiler.methods.base import Backbone, EnsembleMethod, MethodParts, register_method
from mixc.compiler.methods.mixture import templated_parts


def naive_parts(b: Backbone) -> MethodParts:
    """No sharing: the size is M backbones whatever the budget says, so a budget does not apply
    (this is how baselines are compiled from any spec)."""
    sources = {o.name: "member" for o in b.ops if isinstance(o, (P.ConvOp, P.LinearOp))}
    return templated_parts(
        b, P.NaiveMethod(), "none", sources, None, [], None, b.members * b.backbone
    )


class Naive(EnsembleMethod):
    name = "naive"
    title = "Deep ensemble"
    execution = "per_member"
    weight_sources = frozenset({"member"})
    has_templates = False
    per_member_weights = True
    shares_plain_weights = False
    has_fast_weights = False
    stacks_inputs = False
    uses_budget = False
    budget_is_ceiling = False
    budget_solves = None
    equal_shares = False
    searched_settings = ("members",)
    plain_backbone_override = ("groups=none",)  # a naive spec may keep its grouping line

    def build(self, b: Backbone) -> MethodParts:
        return naive_parts(b)


register_method(Naive())
