"""How the ensemble methods beside MixtureEnsembles shape a training batch and its optimiser.

Framework-free, so both backends train a method on the same rows: a torch run and a flax run of
the same recipe see the same MIMO batches.

- MIMO (uncertainty-baselines ``cifar/mimo.py``): the batch of B unique examples is repeated
  ``batch_repetitions`` times and shuffled; each member then reads its own shuffle of the first
  ``(1 - input_sharing)`` of those rows and the main order for the rest, so with ``input_sharing``
  rho a fraction rho of the rows shows every member the same image. Member m is trained on its
  own labels.
- BatchEnsemble: the fast weights r and s train at ``fast_lr`` x the learning rate, without weight
  decay (uncertainty-baselines ``fast_weight_lr_multiplier``; edward2 leaves them undecayed).
"""

from __future__ import annotations

import numpy as np

from mixc.compiler.plan import Plan

#: the plan tensor roles of BatchEnsemble's fast weights
FAST_ROLES = frozenset({"fast_in", "fast_out"})


def mimo_rows(batch: int, plan: Plan, rng: np.random.Generator) -> np.ndarray | None:
    """Rows of the batch each member reads, ``[batch * repetitions, M]``; None for other methods."""
    method = plan.method
    if method.name != "mimo":
        return None
    main = rng.permutation(np.tile(np.arange(batch), method.batch_repetitions))
    shuffled = int(len(main) * (1.0 - method.input_sharing))
    cols = [np.concatenate([rng.permutation(main[:shuffled]), main[shuffled:]]) for _ in range(plan.members)]
    return np.stack(cols, axis=1)


def lr_scale(plan: Plan, role: str) -> float:
    """The learning-rate multiplier of a tensor of ``role`` under ``plan``'s method."""
    return plan.method.fast_lr if role in FAST_ROLES and plan.method.name == "batch_ensemble" else 1.0
