"""BatchEnsemble: the backbone's graph as it is, each weight layer one shared W plus per-member fast
weights."""

from __future__ import annotations

from mixc.compiler import plan as P
from mixc.compiler.methods.base import Backbone, EnsembleMethod, MethodParts, register_method
from mixc.compiler.methods.tensors import batch_ensemble_tensors, layer_tensors, trainable
from mixc.compiler.methods.widths import WEIGHT_KINDS


class BatchEnsemble(EnsembleMethod):
    name = "batch_ensemble"
    title = "BatchEnsemble"
    execution = "per_member"
    weight_sources = frozenset({"batch_ensemble"})
    has_templates = False
    per_member_weights = False
    shares_plain_weights = True
    has_fast_weights = True
    stacks_inputs = False
    uses_budget = False
    budget_is_ceiling = False
    budget_solves = None
    equal_shares = False
    searched_settings = ("members",)
    plain_backbone_override = ("method=naive",)

    def build(self, b: Backbone) -> MethodParts:
        M = b.members
        new = [
            o.model_copy(update={"source": "batch_ensemble"}) if o.kind in WEIGHT_KINDS else o
            for o in b.ops
        ]
        tensors = layer_tensors(new, M, lambda o: batch_ensemble_tensors(o, M), single_path=False)
        own = sum(t.numel for t in tensors if t.per_member and t.trainable)
        return MethodParts(
            P.BatchEnsembleMethod(**b.ens.method.options),
            new,
            tensors,
            own // M,
            trainable(tensors),
            None,
        )


register_method(BatchEnsemble())
