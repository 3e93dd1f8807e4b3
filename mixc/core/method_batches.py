"""How the ensemble methods shape a training batch and its optimiser.

Framework-free, so both backends train a method on the same rows and the same gradient scales: a
torch run and a flax run of the same recipe see the same MIMO batches and take the same steps.

- Shared weights (:func:`gradient_scales`): the loss is the sum of the members' cross-entropies, so
  a weight that every member reads as it is (a mixture's plain layers: the stem, a stage's first
  conv, the projections, the classifier; BatchEnsemble's shared ``W``) gets the sum of M members'
  gradients: up to M times the step a network of its own would take. Behind a BatchNorm that is
  absorbed (the layer is scale-invariant); the output layer has none, and there the summed step
  diverges at width. Under the recipe's ``shared_gradient mean_output`` (the default) the output
  layer's gradient is divided by M; under ``mean`` every such weight's; ``sum`` divides none.
  Per-member tensors keep their
  own gradient, and so do templates: each member reads them through its alphas, orthonormal across
  members, so the template-path update of member i's weight is its own gradient step (the
  cross-member terms cancel). The single-path methods (MIMO, Packed-Ensembles) train one network as
  their references do. docs/execution.md has the measurements that chose this.

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

from mixc.compiler.methods import method_of
from mixc.compiler.plan import Plan

#: the plan tensor roles of BatchEnsemble's fast weights
FAST_ROLES = frozenset({"fast_in", "fast_out"})


def mimo_rows(batch: int, plan: Plan, rng: np.random.Generator) -> np.ndarray | None:
    """Rows of the batch each member reads, ``[batch * repetitions, M]``; None for other methods."""
    method = plan.method
    if not method_of(plan).stacks_inputs:
        return None
    main = rng.permutation(np.tile(np.arange(batch), method.batch_repetitions))
    shuffled = int(len(main) * (1.0 - method.input_sharing))
    cols = [
        np.concatenate([rng.permutation(main[:shuffled]), main[shuffled:]])
        for _ in range(plan.members)
    ]
    return np.stack(cols, axis=1)


#: the plan tensor roles of weights that every member of a multi-path ensemble reads as they are
SHARED_ROLES = frozenset({"plain_weight", "plain_bias"})


def gradient_scales(plan: Plan, shared_gradient: str) -> dict[str, float]:
    """Plan tensor name -> the factor its gradient is multiplied by before clipping and the
    optimiser (only the tensors whose factor is not 1). ``shared_gradient`` is the recipe's:
    "mean" divides the gradient of every weight all members read as it is by the member count,
    "mean_output" only the output layer's (the one weight of that kind no normalisation follows),
    "sum" leaves every gradient as the summed loss gives it."""
    M = plan.members
    if shared_gradient == "sum" or M == 1 or plan.execution == "single_path":
        return {}
    shared = [t for t in plan.tensors if t.trainable and t.role in SHARED_ROLES]
    if shared_gradient == "mean_output":
        output = [o.name for o in plan.ops if o.kind in ("conv", "linear")][-1]
        shared = [t for t in shared if t.layer == output]
    return {t.name: 1.0 / M for t in shared}


def lr_scale(plan: Plan, role: str) -> float:
    """The learning-rate multiplier of a tensor of ``role`` under ``plan``'s method."""
    return plan.method.fast_lr if role in FAST_ROLES and method_of(plan).has_fast_weights else 1.0
