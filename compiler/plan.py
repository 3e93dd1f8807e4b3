"""The Plan: the versioned IR that crosses from the compiler to every backend.

A backend needs nothing but this object (never the AST or the parser): the op
graph in execution order, how each weight layer gets its weights (plain, from a
group's bank, or from the flat blob), and the canonical tensor names that
checkpoints use so that every backend reads every other backend's files.

Conventions every backend follows:
- Shapes are channels-first without the batch axis: image ``[C, H, W]``,
  signal ``[C, L]``, vector ``[D]``. A backend may run NHWC internally.
- Conv weights are ``[out, in/groups, *kernel]`` (PyTorch layout); linear
  weights are ``[out, in]``. A template is the layer's weight flattened in that
  order, followed by its bias when the layer has one (``size`` entries).
- Per-member tensors carry the member axis first (``[M, ...]``).
- A weight layer's ``source`` says where its weights come from: ``plain``
  (one tensor shared by all members: ``plain.<layer>.weight``/``.bias``),
  ``member`` (an unfactorised weight per member, the naive ensemble:
  ``member.<layer>.weight`` ``[M, ...]``), ``bank`` or ``blob`` (composed per
  member from templates, see ``Slot``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

PLAN_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------
# The op graph


class _OpBase(_Model):
    name: str  # hierarchical and unique, e.g. "s2.b1.conv1"
    inputs: list[str]  # names of the ops whose outputs this op reads
    in_shape: list[int]
    out_shape: list[int]


class InputOp(_OpBase):
    kind: Literal["input"] = "input"
    layout: Literal["image", "signal", "vector"]


class ConvOp(_OpBase):
    kind: Literal["conv"] = "conv"
    dim: Literal[1, 2]
    in_channels: int
    out_channels: int
    kernel: list[int]
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    bias: bool
    source: Literal["plain", "member", "bank", "blob"]

    @property
    def weight_shape(self) -> list[int]:
        return [self.out_channels, self.in_channels // self.groups, *self.kernel]


class LinearOp(_OpBase):
    kind: Literal["linear"] = "linear"
    in_features: int
    out_features: int
    bias: bool
    source: Literal["plain", "member", "bank", "blob"]

    @property
    def weight_shape(self) -> list[int]:
        return [self.out_features, self.in_features]


class BatchNormOp(_OpBase):
    kind: Literal["bn"] = "bn"
    channels: int
    eps: float
    momentum: float  # PyTorch convention: new = (1 - momentum) * old + momentum * batch


class ActOp(_OpBase):
    kind: Literal["act"] = "act"
    fn: Literal["relu", "gelu", "silu", "tanh", "sigmoid", "leaky_relu"]
    slope: float = 0.01  # leaky_relu only


class PoolOp(_OpBase):
    kind: Literal["pool"] = "pool"
    op: Literal["max", "avg"]
    dim: Literal[1, 2]
    kernel: list[int]
    stride: list[int]
    padding: list[int]


class GlobalPoolOp(_OpBase):
    kind: Literal["global_pool"] = "global_pool"
    op: Literal["max", "avg"]


class FlattenOp(_OpBase):
    kind: Literal["flatten"] = "flatten"


class DropoutOp(_OpBase):
    kind: Literal["dropout"] = "dropout"
    p: float


class AddOp(_OpBase):
    kind: Literal["add"] = "add"


Op = Annotated[
    Union[
        InputOp, ConvOp, LinearOp, BatchNormOp, ActOp, PoolOp, GlobalPoolOp, FlattenOp, DropoutOp, AddOp
    ],
    Field(discriminator="kind"),
]
WeightOp = Union[ConvOp, LinearOp]


# ---------------------------------------------------------------------------
# Where weights come from


class Group(_Model):
    """A parameter group: layers of one weight shape drawing from one bank.

    The bank is the tensor ``bank.<name>`` of shape ``[templates, size]``.
    """

    name: str
    layers: list[str]
    weight_shape: list[int]
    bias: bool
    size: int  # parameters per template: prod(weight_shape) (+ out channels with bias)
    share: float  # fraction of the template budget this group was given
    templates: int  # n_g
    templates_per_layer: int  # k = min(requested, n_g)
    requested_templates_per_layer: int  # what the spec asked for
    usage: list[int]  # how many slots use each template (shared: one slot per layer)
    fixed: bool = False  # template count fixed by the spec, not allocated
    capacity: int | None = None  # most templates its slots can read (templates never exceed it)


class Blob(_Model):
    """Single-group mode: one flat parameter vector ``blob`` every banked layer reads."""

    size: int
    layers: list[str]
    usage_min: int  # how many slots read the least-used blob entry
    usage_max: int


class Slot(_Model):
    """How one banked layer gets each member's weights.

    Bank mode: member ``i`` mixes templates ``templates[i]`` of its group's
    bank with alphas ``alpha.<layer>[i]``. Blob mode: member ``i``'s template
    ``j`` is the ``size`` blob entries starting at ``(offsets[i] + j * size)
    mod blob.size`` (wrapping round the end of the blob).
    """

    layer: str
    group: str  # group name, or "blob"
    size: int
    k: int
    templates: list[list[int]] | None = None  # [M][k], bank mode
    offsets: list[int] | None = None  # [M], blob mode


class Tensor(_Model):
    """A named tensor of the model, as it is stored in checkpoints."""

    name: str
    shape: list[int]
    role: Literal[
        "bank",
        "blob",
        "plain_weight",
        "plain_bias",
        "member_weight",
        "member_bias",
        "alpha",
        "bn_weight",
        "bn_bias",
        "bn_mean",
        "bn_var",
    ]
    trainable: bool
    layer: str | None = None
    per_member: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class Accounting(_Model):
    """Parameter counts (trainable parameters only; BN running stats are buffers)."""

    backbone_params: int  # one plain member, no factorisation
    naive_params: int  # members * backbone_params
    plain_params: int  # layers shared by all members, unfactorised
    template_params: int  # banks or blob
    alpha_params: int  # all members
    bn_params: int  # all members
    total_params: int
    budget: int | None  # None when every group fixed its template count
    minimum_budget: int  # fixed cost plus one template per group
    per_member_params: int  # alphas + BN of one member
    maximum_budget: int | None = None  # largest useful budget: every group (or the blob) fully readable


class PlanWarning(_Model):
    """A compile-time warning (the plan is usable), positioned like an error."""

    message: str
    file: str | None = None
    line: int | None = None
    col: int | None = None
    hint: str | None = None
    source_line: str | None = None  # the line it points at, for the caret display


class InitRule(_Model):
    """How one kind of tensor is initialised; ``std`` only for ``normal``."""

    law: Literal["orthonormal", "normal", "uniform"]
    std: float | None = None


class InitRules(_Model):
    """Initialisation every backend applies (defaults: the rules before they were configurable).

    ``alphas``: ``orthonormal`` (unit rows, orthonormal across members in blocks of k) or
    ``normal`` (i.i.d. N(0, std^2)). ``classifier`` (the output layer when it is plain or
    per-member): ``uniform`` (PyTorch's U(+-1/sqrt(fan_in)) for weight and bias) or ``normal``
    (weight N(0, std^2), bias 0).
    """

    alphas: InitRule = InitRule(law="orthonormal")
    classifier: InitRule = InitRule(law="uniform")


# Plan fields outside the content hash (see Plan.content_hash).
_HASH_EXCLUDE = {"spec_hash": True, "source": True, "train": True, "warnings": True,
                 "groups": {"__all__": {"capacity"}}, "accounting": {"maximum_budget"}}


class Plan(_Model):
    version: int = PLAN_VERSION
    name: str
    source: str  # the spec file it was compiled from, for messages
    spec_hash: str = ""  # sha256 of the plan's content (see content_hash)
    members: int
    grouping: Literal["by_shape", "single", "explicit", "none"]  # none: naive ensemble
    assign: Literal["shared", "greedy_disjoint"]
    templates_per_layer: int
    bank_singletons: bool
    input_shape: list[int]
    input_layout: Literal["image", "signal", "vector"]
    output: str  # name of the op whose output is the logits
    classes: int
    ops: list[Op]
    groups: list[Group]
    blob: Blob | None = None
    slots: list[Slot]
    plain_layers: list[str]
    tensors: list[Tensor]
    accounting: Accounting
    train: dict | None = None  # the validated train section, backend-neutral
    init: InitRules = InitRules()  # initialisation rules (part of the model's definition)
    warnings: list[PlanWarning] = []  # compile-time warnings (not part of the content hash)

    def op(self, name: str) -> Op:
        for o in self.ops:
            if o.name == name:
                return o
        raise KeyError(name)

    def slot(self, layer: str) -> Slot | None:
        for s in self.slots:
            if s.layer == layer:
                return s
        return None

    def content_hash(self) -> str:
        """Hash of everything that determines the model's tensors and maths.

        Excludes the file name, the train section and the hash itself, so a
        checkpoint stays valid when the spec moves or only its recipe changes.
        Warnings, derived bookkeeping (capacity, maximum_budget) and default init
        rules are left out too, so a plan whose model did not change keeps its hash.
        """
        data = self.model_dump(mode="json", exclude=_HASH_EXCLUDE | ({"init": True} if self.init == InitRules()
                                                                      else {}))
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.model_validate_json(text)
