"""The ensemble methods, one module each, behind one registry (base.py); docs/methods.md says how to
add one."""

from mixc.compiler.methods import batch_ensemble, mimo, mixture, naive, packed  # noqa: F401  (registers them)
from mixc.compiler.methods.base import (
    CAPABILITIES,
    Backbone,
    EnsembleMethod,
    MethodError,
    MethodParts,
    get_method,
    method_of,
    register_method,
    registered,
)
from mixc.compiler.methods.mimo import MAX_REPETITIONS, mimo_ops, mimo_per_member
from mixc.compiler.methods.packed import (
    WidthConstraint,
    alpha_step,
    packed_constraints,
    packed_ops,
    show,
    solve_alpha,
)
from mixc.compiler.methods.tensors import batch_ensemble_tensors, bn_tensors, plain_tensors
from mixc.compiler.methods.widths import MAX_WIDTH, WEIGHT_KINDS, layer_roles, params_of, retarget

__all__ = [
    "CAPABILITIES",
    "Backbone",
    "EnsembleMethod",
    "MethodError",
    "MethodParts",
    "get_method",
    "method_of",
    "register_method",
    "registered",
    "MAX_REPETITIONS",
    "mimo_ops",
    "mimo_per_member",
    "WidthConstraint",
    "alpha_step",
    "packed_constraints",
    "packed_ops",
    "show",
    "solve_alpha",
    "batch_ensemble_tensors",
    "bn_tensors",
    "plain_tensors",
    "MAX_WIDTH",
    "WEIGHT_KINDS",
    "layer_roles",
    "params_of",
    "retarget",
]
