"""Which plan tensors get no weight decay: one rule for every backend's optimiser.

In the core (not the training driver) because each backend builds its own optimiser and must exempt
the same roles, or a recipe would mean different models on torch and flax.
"""

from __future__ import annotations

from mixc.spec.recipe import Recipe

__all__ = ["EXCLUDE_ROLES", "decay_skipped_roles"]

#: ``weight_decay_exclude`` entries -> the plan tensor roles they exempt from weight decay
EXCLUDE_ROLES = {
    "alphas": {"alpha"},
    "bn": {"bn_weight", "bn_bias"},
    "bias": {"plain_bias", "member_bias"},
    "norm": {"norm_weight", "norm_bias"},  # LayerNorm
    "embedding": {"embedding"},  # class tokens, position embeddings
}


def decay_skipped_roles(recipe: Recipe) -> set[str]:
    """The plan tensor roles that get no weight decay under ``recipe``."""
    return set().union(*(EXCLUDE_ROLES[e] for e in recipe.weight_decay_exclude))
