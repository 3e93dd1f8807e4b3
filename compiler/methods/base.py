"""What an ensemble method is to the rest of mixc: a name, declarative capabilities, and a build.

Code outside this package asks a method's capabilities (``get_method(name).single_path``) instead of
comparing method names, so a new method is one module here plus ``register_method``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from mixc.spec.diagnostics import Diagnostics, Pos


class MethodError(Exception):
    """A method that cannot be applied to this backbone; compile.py reports it at ``pos``."""

    def __init__(self, message: str, pos: Pos | None, hint: str | None = None):
        super().__init__(message)
        self.message, self.pos, self.hint = message, pos, hint


@dataclass
class Backbone:
    """What every method builds from: the elaborated backbone and the spec's ensemble settings."""

    ens: Any  # the spec's EnsembleSpec
    graph: Any  # the elaborated graph (ops, pos, scopes)
    backbone: int  # one plain backbone's trainable parameters
    member_op_params: int  # one member's BatchNorm, LayerNorm and embedding parameters
    budget: int | None  # the budget in parameters (a multiple already resolved)
    budget_pos: Pos | None
    warnings: list  # plan warnings so far; a method may add its own
    diags: Diagnostics

    @property
    def members(self) -> int:
        return self.ens.members

    @property
    def ops(self) -> list:
        return list(self.graph.ops)


@dataclass
class MethodParts:
    """What a method contributes to the Plan; compile.py adds the accounting and the rest."""

    method: Any  # the plan's method record (plan.MixtureMethod, ...)
    ops: list
    tensors: list
    per_member: int  # parameters one member holds alone (docs/plan.md, per method)
    minimum: int  # the smallest model of this method (packed: at the smallest valid alpha)
    budget: int | None  # the budget that applied, else None
    backbone_macs: int | None = None  # one plain backbone's MACs, for single-path plans
    maximum: int | None = None  # mixture: the largest useful budget
    grouping: str = "none"
    groups: list = field(default_factory=list)
    slots: list = field(default_factory=list)
    blob: Any = None
    plain_layers: list = field(default_factory=list)


#: every capability a method declares (tests/test_method_homes.py checks each is set)
CAPABILITIES = (
    "title",
    "execution",
    "weight_sources",
    "has_templates",
    "per_member_weights",
    "shares_plain_weights",
    "has_fast_weights",
    "stacks_inputs",
    "uses_budget",
    "budget_is_ceiling",
    "budget_solves",
    "equal_shares",
    "searched_settings",
    "plain_backbone_override",
)


class EnsembleMethod:
    """One ensemble method. Subclasses set every capability in CAPABILITIES and implement
    ``build``."""

    name: ClassVar[str]
    title: ClassVar[str]  # the display name ("Packed-Ensembles")
    # "per_member" (activations per member) or "single_path" (one network holds all)
    execution: ClassVar[str]
    weight_sources: ClassVar[frozenset[str]]  # the conv/linear ``source`` values its plans may hold
    has_templates: ClassVar[bool]  # template groups, slots, blob and alphas (mixture)
    per_member_weights: ClassVar[bool]  # some layer holds a weight per member (``member.*``)
    # some layer holds one weight shared by all members (``plain.*``)
    shares_plain_weights: ClassVar[bool]
    has_fast_weights: ClassVar[bool]  # BatchEnsemble's r and s (``fast.*``)
    stacks_inputs: ClassVar[bool]  # the input stacks the members' inputs on the channel axis (MIMO)
    uses_budget: ClassVar[bool]  # a budget changes the model
    # the total never exceeds the budget (else: the nearest total)
    budget_is_ceiling: ClassVar[bool]
    budget_solves: ClassVar[str | None]  # the method option a budget solves for (packed: "alpha")
    equal_shares: ClassVar[bool]  # total = members x per-member parameters
    searched_settings: ClassVar[tuple[str, ...]]  # the settings ``mixc verify`` varies
    # --set lines giving the plain single network's spec
    plain_backbone_override: ClassVar[tuple[str, ...]]

    @property
    def single_path(self) -> bool:
        """One forward path for all members (MIMO, Packed-Ensembles): BatchNorm [C], M heads."""
        return self.execution == "single_path"

    def check_sizes(self, options: dict, ops: list, pos_of) -> None:
        """Refuse options that make a model too large by construction (MethodError); none by
        default."""

    def build(self, b: Backbone) -> MethodParts:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<method {self.name}>"


_REGISTRY: dict[str, EnsembleMethod] = {}


def register_method(method: EnsembleMethod) -> EnsembleMethod:
    """Add ``method`` under its name (one call per method module)."""
    missing = [c for c in CAPABILITIES if not hasattr(method, c)]
    if missing:
        raise TypeError(f"method {method.name} does not set {', '.join(missing)}")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> EnsembleMethod:
    """The registered method called ``name`` (KeyError if none)."""
    return _REGISTRY[name]


def method_of(plan) -> EnsembleMethod:
    """The method a plan (or anything with ``.method.name``) was compiled with."""
    return _REGISTRY[plan.method.name]


def registered() -> tuple[EnsembleMethod, ...]:
    """Every registered method, in registration order."""
    return tuple(_REGISTRY.values())
