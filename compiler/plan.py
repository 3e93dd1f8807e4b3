"""The Plan: the versioned IR that crosses from the compiler to every backend.

A backend needs nothing but this object: the op graph in execution order, where each weight layer
gets its weights, and the tensor names checkpoints use, so every backend reads every other's files.
A plan is also an input (``plan.json`` travels in shared run folders and is lowered to code that
runs), so every field is validated here, not trusted. Conventions: docs/plan.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from mixc.core.errors import MixcError

PLAN_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Grown(_Model):
    """A model that gained fields after plan version 1: each is left out of the JSON (and so of the
    content hash) while it holds the value every older plan implies, so those plans keep their bytes
    and their hashes. ``_implied`` maps such a field to that value. ``model_dump()`` leaves it out
    too: read ``plan.method``, never ``plan.model_dump()["method"]``."""

    _implied: ClassVar[dict[str, Any]] = {}

    @model_serializer(mode="wrap")
    def _leave_out_implied(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict:
        data = handler(self)
        for key, value in self._implied_values().items():
            if key in data and getattr(self, key) == value:
                del data[key]
        return data

    def _implied_values(self) -> dict[str, Any]:
        return self._implied


# ---------------------------------------------------------------------------
# Validated field types: what a plan read from disk may hold


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_TENSOR = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_HASH = re.compile(r"([0-9a-f]{16})?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _name(v: str) -> str:
    if len(v) > 1000 or not _NAME.fullmatch(v):
        raise ValueError("must be a dotted name of letters, digits and _ (such as s2.b1.conv1)")
    return v


def _tensor_name(v: str) -> str:
    if len(v) > 1000 or not _TENSOR.fullmatch(v):
        raise ValueError(
            "must be a dotted name starting with a letter (such as bank.conv_16x16x3x3)"
        )
    return v


def _hash(v: str) -> str:
    if not _HASH.fullmatch(v):
        raise ValueError("must be 16 lowercase hex digits (or empty)")
    return v


def _text(v: str) -> str:
    if len(v) > 4096 or _CONTROL.search(v):
        raise ValueError(
            "must be one line of text without control characters (at most 4096 characters)"
        )
    return v


Name = Annotated[str, AfterValidator(_name)]  # op, layer and group names
TensorName = Annotated[str, AfterValidator(_tensor_name)]
Hash = Annotated[str, AfterValidator(_hash)]
# the spec's name and file: shown in messages and comments
Text = Annotated[str, AfterValidator(_text)]
Dim = Annotated[int, Field(ge=1)]  # a shape entry, kernel, stride, dilation, count of things
Count = Annotated[int, Field(ge=0)]  # a padding, an index, a parameter count
Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


# ---------------------------------------------------------------------------
# The op graph

#: where a weight layer's weights come from (docs/plan.md)
Source = Literal["plain", "member", "bank", "blob", "batch_ensemble"]


class _OpBase(_Model):
    name: Name  # hierarchical and unique, e.g. "s2.b1.conv1"
    inputs: list[Name]  # names of the ops whose outputs this op reads
    in_shape: list[Dim]
    out_shape: list[Dim]


class InputOp(_OpBase):
    kind: Literal["input"] = "input"
    layout: Literal["image", "signal", "vector"]


class ConvOp(_OpBase):
    kind: Literal["conv"] = "conv"
    dim: Literal[1, 2]
    in_channels: Dim
    out_channels: Dim
    kernel: list[Dim]
    stride: list[Dim]
    padding: list[Count]
    dilation: list[Dim]
    groups: Dim
    bias: bool
    source: Source

    @property
    def weight_shape(self) -> list[int]:
        return [self.out_channels, self.in_channels // self.groups, *self.kernel]


class LinearOp(_OpBase, _Grown):
    kind: Literal["linear"] = "linear"
    in_features: Dim
    out_features: Dim
    bias: bool
    source: Source
    groups: Dim = 1  # a grouped linear (Packed-Ensembles): block-diagonal, ``groups`` blocks

    _implied: ClassVar[dict[str, Any]] = {"groups": 1}

    @property
    def weight_shape(self) -> list[int]:
        return [self.out_features, self.in_features // self.groups]


class BatchNormOp(_OpBase):
    kind: Literal["bn"] = "bn"
    channels: Dim
    eps: Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
    momentum: Fraction  # PyTorch convention: new = (1 - momentum) * old + momentum * batch


class ActOp(_OpBase):
    kind: Literal["act"] = "act"
    fn: Literal["relu", "gelu", "silu", "tanh", "sigmoid", "leaky_relu"]
    slope: Finite = 0.01  # leaky_relu only


class PoolOp(_OpBase):
    kind: Literal["pool"] = "pool"
    op: Literal["max", "avg"]
    dim: Literal[1, 2]
    kernel: list[Dim]
    stride: list[Dim]
    padding: list[Count]


class GlobalPoolOp(_OpBase):
    kind: Literal["global_pool"] = "global_pool"
    op: Literal["max", "avg"]


class FlattenOp(_OpBase):
    kind: Literal["flatten"] = "flatten"


class DropoutOp(_OpBase):
    kind: Literal["dropout"] = "dropout"
    p: Fraction


class AddOp(_OpBase):
    kind: Literal["add"] = "add"


# Transformer ops (docs/transformers.md). A token sequence is [D, N] like a signal: channels first,
# one position per token, so the members sit on the channel axis as for convnets.


class LayerNormOp(_OpBase):
    """Normalisation over the channels at each position, one scale and shift per member.
    ``groups`` > 1 (Packed-Ensembles' single network) normalises each block of channels alone."""

    kind: Literal["layernorm"] = "layernorm"
    channels: Dim
    eps: Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
    groups: Dim = 1


class AttentionOp(_OpBase):
    """Scaled dot-product attention of inputs (q, k, v), each [D, N], in ``heads`` heads of
    ``channels // heads``: the weightless middle of a multi-head self-attention, whose q/k/v and
    output projections are linear ops of their own."""

    kind: Literal["attention"] = "attention"
    channels: Dim
    heads: Dim

    @property
    def head_dim(self) -> int:
        return self.channels // self.heads


class TokensOp(_OpBase):
    """An image [C, H, W] read as a sequence of H*W tokens [C, H*W] (row-major, as timm's)."""

    kind: Literal["tokens"] = "tokens"


class ClassTokenOp(_OpBase):
    """A learned token put before the sequence: [D, N] -> [D, N + 1]; one [D] per member."""

    kind: Literal["cls_token"] = "cls_token"
    channels: Dim


class PosEmbedOp(_OpBase):
    """A learned position embedding added to the sequence; one [N, D] per member."""

    kind: Literal["pos_embed"] = "pos_embed"
    channels: Dim
    tokens: Dim


class TokenPoolOp(_OpBase):
    """A sequence [D, N] to a vector [D]: the first (class) token, or the mean of the tokens."""

    kind: Literal["token_pool"] = "token_pool"
    op: Literal["cls", "mean"]


Op = Annotated[
    InputOp
    | ConvOp
    | LinearOp
    | BatchNormOp
    | ActOp
    | PoolOp
    | GlobalPoolOp
    | FlattenOp
    | DropoutOp
    | AddOp
    | LayerNormOp
    | AttentionOp
    | TokensOp
    | ClassTokenOp
    | PosEmbedOp
    | TokenPoolOp,
    Field(discriminator="kind"),
]
WeightOp = ConvOp | LinearOp


# ---------------------------------------------------------------------------
# Where weights come from


class Group(_Model):
    """A parameter group: layers of one weight shape drawing from one bank.

    The bank is the tensor ``bank.<name>`` of shape ``[templates, size]``.
    """

    name: Name
    layers: list[Name]
    weight_shape: list[Dim]
    bias: bool
    size: Dim  # parameters per template: prod(weight_shape) (+ out channels with bias)
    share: Annotated[Finite, Field(ge=0.0)]  # fraction of the template budget this group was given
    templates: Dim  # n_g
    templates_per_layer: Dim  # k = min(requested, n_g)
    requested_templates_per_layer: Dim  # what the spec asked for
    usage: list[Count]  # how many slots use each template (shared: one slot per layer)
    fixed: bool = False  # template count fixed by the spec, not allocated
    capacity: Dim | None = None  # most templates its slots can read (templates never exceed it)


class Blob(_Model):
    """Single-group mode: one flat parameter vector ``blob`` every banked layer reads."""

    size: Dim
    layers: list[Name]
    usage_min: Count  # how many slots read the least-used blob entry
    usage_max: Count


class Slot(_Model):
    """How one banked layer gets each member's weights.

    Bank mode: member ``i`` mixes templates ``templates[i]`` of its group's
    bank with alphas ``alpha.<layer>[i]``. Blob mode: member ``i``'s template
    ``j`` is the ``size`` blob entries starting at ``(offsets[i] + j * size)
    mod blob.size`` (wrapping round the end of the blob).
    """

    layer: Name
    group: Name  # group name, or "blob"
    size: Dim
    k: Dim
    templates: list[list[Count]] | None = None  # [M][k], bank mode
    offsets: list[Count] | None = None  # [M], blob mode


class Tensor(_Model):
    """A named tensor of the model, as it is stored in checkpoints."""

    name: TensorName
    shape: list[Dim]
    role: Literal[
        "bank",
        "blob",
        "plain_weight",
        "plain_bias",
        "member_weight",
        "member_bias",
        "alpha",
        "fast_in",  # BatchEnsemble: r, scales a layer's input channels per member
        "fast_out",  # BatchEnsemble: s, scales a layer's output channels per member
        "bn_weight",
        "bn_bias",
        "bn_mean",
        "bn_var",
        "norm_weight",  # LayerNorm's scale
        "norm_bias",  # LayerNorm's shift
        "embedding",  # a class token or a position embedding
    ]
    trainable: bool
    layer: Name | None = None
    per_member: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class Accounting(_Grown):
    """Parameter counts (trainable parameters only; BN running stats are buffers).

    ``total = plain + templates + alphas + fast + bn + norm + embedding``; the fields after
    ``maximum_budget`` came with the other ensemble methods and the transformer ops, and are left
    out of the JSON at their defaults (see ``_Grown``).
    """

    backbone_params: Count  # one plain member, no factorisation
    naive_params: Count  # members * backbone_params
    plain_params: (
        Count  # unfactorised weights and biases: shared, per-member, or the single-path network's
    )
    template_params: Count  # banks or blob
    alpha_params: Count  # all members
    bn_params: Count  # all members
    total_params: Count
    budget: Count | None  # None when no budget applies (or every group fixed its template count)
    minimum_budget: (
        Count  # fixed cost plus one template per group (other methods: the smallest model)
    )
    per_member_params: Count  # what one member holds alone (mixture: alphas + BN; see docs/plan.md)
    maximum_budget: Count | None = (
        None  # largest useful budget: every group (or the blob) fully readable
    )
    fast_params: Count = 0  # BatchEnsemble's fast weights r and s, all members
    norm_params: Count = 0  # LayerNorm scales and shifts, all members
    embedding_params: Count = 0  # class tokens and position embeddings, all members
    backbone_macs: Count | None = (
        None  # one plain backbone's MACs, where the ops are not that backbone
    )

    @property
    def member_op_params(self) -> int:
        """Every member's BatchNorm, LayerNorm and embedding parameters."""
        return self.bn_params + self.norm_params + self.embedding_params

    _implied: ClassVar[dict[str, Any]] = {
        "fast_params": 0,
        "backbone_macs": None,
        "norm_params": 0,
        "embedding_params": 0,
    }


class PlanWarning(_Model):
    """A compile-time warning (the plan is usable), positioned like an error."""

    message: Text
    file: Text | None = None
    line: Dim | None = None
    col: Dim | None = None
    hint: Text | None = None
    source_line: Text | None = None  # the line it points at, for the caret display


class InitRule(_Model):
    """How one kind of tensor is initialised; ``std`` only for ``normal``."""

    law: Literal["orthonormal", "normal", "uniform"]
    std: Annotated[Finite, Field(gt=0.0)] | None = None


class InitRules(_Model):
    """Initialisation every backend applies (defaults: the rules before they were configurable).

    ``alphas``: ``orthonormal`` (unit rows, orthonormal across members in blocks of k) or
    ``normal`` (i.i.d. N(0, std^2)). ``classifier`` (the output layer when it is plain or
    per-member): ``uniform`` (PyTorch's U(+-1/sqrt(fan_in)) for weight and bias) or ``normal``
    (weight N(0, std^2), bias 0).
    """

    alphas: InitRule = InitRule(law="orthonormal")
    classifier: InitRule = InitRule(law="uniform")


Positive = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]


class MixtureMethod(_Model):
    """MixtureEnsembles: every banked layer of every member mixes shared templates (``groups``,
    ``blob``, ``slots``)."""

    name: Literal["mixture"] = "mixture"


class NaiveMethod(_Model):
    """A deep ensemble: M independent backbones (``member.*`` weights); what ``groups none``
    compiles to."""

    name: Literal["naive"] = "naive"


class BatchEnsembleMethod(_Model):
    """BatchEnsemble (Wen et al. 2020; edward2's ``Conv2DBatchEnsemble``/``DenseBatchEnsemble``).

    Member i's layer computes ``((x * r[i]) conv W) * s[i] + b[i]`` with one shared ``W``; the batch
    is tiled M times. ``fast_init``/``fast_std`` initialise r and s (N(1, fast_std^2), or random
    signs +-1); ``fast_lr`` multiplies the learning rate of r and s, which get no weight decay
    (training only: not hashed).
    """

    name: Literal["batch_ensemble"] = "batch_ensemble"
    fast_init: Literal["normal", "signs"] = "normal"
    fast_std: Positive = 0.5
    fast_lr: Positive = 0.5


class MimoMethod(_Model):
    """MIMO (Havasi et al. 2021): one network; the first layer reads the M members' inputs stacked
    on the channel axis, the last has M heads. ``batch_repetitions`` and ``input_sharing`` (rho)
    shape training batches only (not hashed)."""

    name: Literal["mimo"] = "mimo"
    batch_repetitions: Dim = 4
    input_sharing: Fraction = 0.0


class PackedMethod(_Model):
    """Packed-Ensembles (Laurent et al. 2023): every layer widened by ``alpha`` and split into
    ``gamma * M`` groups (the first not split, the last with M groups producing M x classes).
    ``alpha_from_budget``: alpha was solved from the budget (the one closest to it: see
    compiler/methods/packed.py)."""

    name: Literal["packed"] = "packed"
    alpha: Positive = 2.0
    gamma: Dim = 1
    alpha_from_budget: bool = False


Method = Annotated[
    MixtureMethod | NaiveMethod | BatchEnsembleMethod | MimoMethod | PackedMethod,
    Field(discriminator="name"),
]
METHODS = ("mixture", "batch_ensemble", "mimo", "packed", "naive")
#: method options that only shape training, left out of the content hash (as the train section is)
_TRAINING_OPTIONS = {"fast_lr", "batch_repetitions", "input_sharing"}


class Scope(_Model):
    """A named scope of the backbone, as the spec wrote it: the scope ``s1.b0`` is the call of
    block ``wide_basic`` at ``index`` 0 of a repeat. Ops belong to the scopes their names start
    with; backends use this to emit one module per block (descriptive, so not hashed)."""

    name: Name  # the full dotted path, e.g. "s1.b0"
    block: Name | None = None  # the .mix block it instantiates (None: a stage or repeat body)
    index: Count | None = None  # its position in a repeat


# Plan fields outside the content hash (see Plan.content_hash).
_HASH_EXCLUDE = {
    "spec_hash": True,
    "source": True,
    "train": True,
    "warnings": True,
    "scopes": True,
    "groups": {"__all__": {"capacity"}},
    "accounting": {"maximum_budget", "backbone_macs"},
    "method": _TRAINING_OPTIONS,
}


class Plan(_Grown):
    version: Dim = PLAN_VERSION
    name: Text
    source: Text  # the spec file it was compiled from, for messages
    spec_hash: Hash = ""  # sha256 of the plan's content (see content_hash)
    members: Dim
    # none: no template groups (every method but mixture)
    grouping: Literal["by_shape", "single", "explicit", "none"]
    assign: Literal["shared", "greedy_disjoint"]
    templates_per_layer: Dim
    bank_singletons: bool
    input_shape: list[Dim]
    input_layout: Literal["image", "signal", "vector"]
    output: Name  # name of the op whose output is the logits
    classes: Dim
    ops: list[Op]
    groups: list[Group]
    blob: Blob | None = None
    slots: list[Slot]
    plain_layers: list[Name]
    tensors: list[Tensor]
    accounting: Accounting
    train: dict | None = None  # the validated train section, backend-neutral
    init: InitRules = InitRules()  # initialisation rules (part of the model's definition)
    warnings: list[PlanWarning] = []  # compile-time warnings (not part of the content hash)
    scopes: list[Scope] = []  # the spec's blocks, stages and repeats (not part of the content hash)
    # The ensemble method; a plan without one (every plan before methods existed) is mixture, or
    # naive when grouping is none. Left out of the JSON while it is that implied default (see
    # _Grown).
    method: Method = MixtureMethod()
    execution: Literal["per_member", "single_path"] = (
        "per_member"  # how activations run: the method's execution
    )

    def _implied_values(self) -> dict[str, Any]:
        return {
            "method": NaiveMethod() if self.grouping == "none" else MixtureMethod(),
            "execution": "per_member",
        }

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
        data = self.model_dump(
            mode="json",
            exclude=_HASH_EXCLUDE | ({"init": True} if self.init == InitRules() else {}),
        )
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.model_validate_json(text)

    @model_validator(mode="before")
    @classmethod
    def _implied_method(cls, data: Any) -> Any:
        """A plan that names no method has the one its grouping implies: naive for ``none``, else
        mixture."""
        if isinstance(data, dict) and "method" not in data and data.get("grouping") == "none":
            return {**data, "method": NaiveMethod()}
        return data

    @model_validator(mode="after")
    def _method_fits(self) -> Plan:
        """The method, the execution, the grouping and the weight sources agree (backends branch on
        them)."""
        # the methods' modules build plans: imported when used
        from mixc.compiler.methods import get_method

        name, method = self.method.name, get_method(self.method.name)
        if self.execution != method.execution:
            raise ValueError(
                f"method {name} runs {method.execution}, but execution is {self.execution}"
            )
        if method.has_templates == (self.grouping == "none"):
            raise ValueError(
                f"method {name} with grouping {self.grouping}: mixture has template groups "
                "(grouping none is the naive ensemble), other methods have none"
            )
        if not method.has_templates and (self.groups or self.slots or self.blob is not None):
            raise ValueError(f"method {name} has no template groups, slots or blob")
        allowed = method.weight_sources
        bad = next(
            (o for o in self.ops if isinstance(o, (ConvOp, LinearOp)) and o.source not in allowed),
            None,
        )
        if bad is not None:
            raise ValueError(
                f"layer {bad.name} has source {bad.source}, which method {name} does not use"
            )
        return self

    @model_validator(mode="after")
    def _references(self) -> Plan:
        """Every name the plan uses refers to something it defines (a backend then needs no
        guards)."""
        ops: set[str] = set()
        for op in self.ops:
            if op.name in ops:
                raise ValueError(f"op {op.name} is listed twice")
            missing = [i for i in op.inputs if i not in ops]
            if missing:
                raise ValueError(f"op {op.name} reads {missing[0]}, which is not an op before it")
            ops.add(op.name)
        groups = {g.name for g in self.groups}
        if len(groups) != len(self.groups):
            raise ValueError("a group is listed twice")
        used = [
            self.output,
            *self.plain_layers,
            *(n for g in self.groups for n in g.layers),
            *(s.layer for s in self.slots),
            *(t.layer for t in self.tensors if t.layer is not None),
            *(self.blob.layers if self.blob else ()),
        ]
        unknown = next((n for n in used if n not in ops), None)
        if unknown is not None:
            raise ValueError(f"{unknown} is named as a layer but is not an op of the plan")
        for s in self.slots:
            if s.group not in groups and not (s.group == "blob" and self.blob is not None):
                raise ValueError(
                    f"slot of {s.layer} draws from group {s.group}, which the plan does not have"
                )
        return self


# ---------------------------------------------------------------------------
# Reading a plan file: validate it and check it against its hash before anything lowers it

MAX_PLAN_BYTES = 256 * 2**20


class PlanFileError(MixcError, ValueError):
    """A plan file that cannot be used: unreadable, not a valid plan, or not matching its
    spec_hash."""


def read_plan(path: str | os.PathLike) -> Plan:
    """Read ``path`` as a Plan, refusing it unless every field is valid and it matches its
    ``spec_hash``.

    Run folders are shared like model files, and a plan is lowered to source that
    is exec'd: a plan edited by hand (or damaged) must stop here, with a message
    naming the file, never reach a backend.
    """
    try:
        size = os.path.getsize(path)
        if size > MAX_PLAN_BYTES:
            raise PlanFileError(f"{path} is too large to be a mixc plan ({size:,} bytes)")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise PlanFileError(f"{path} is not a mixc plan (not UTF-8 text)") from None
    except OSError as e:
        raise PlanFileError(
            f"cannot read the plan {path}: {e.strerror or type(e).__name__}"
        ) from None
    try:
        plan = Plan.from_json(text)
    except ValidationError as e:
        raise PlanFileError(
            f"{path} is not a valid mixc plan: {first_problem(e)}; hint: recompile the spec "
            "(`mixc compile SPEC -o plan.json` with the overrides it was trained with)"
        ) from None
    want = plan.content_hash()
    if plan.spec_hash != want:
        got = f"its spec_hash is {plan.spec_hash}" if plan.spec_hash else "it has no spec_hash"
        raise PlanFileError(
            f"{path} does not match its content hash ({got}, its content hashes to {want}): it was"
            " edited or damaged after mixc wrote it, so it is not used; hint: recompile the spec"
            " it came from (`mixc compile SPEC -o plan.json` with the overrides it was trained"
            " with) instead of editing a plan"
        )
    return plan


def first_problem(err: ValidationError) -> str:
    """The first validation error as ``field: message`` (never the offending value: it may be
    hostile)."""
    problems = err.errors(include_url=False, include_input=False)
    first = problems[0]

    def part(x: int | str) -> str:  # a key comes from the file: shown only when it is a plain word
        if isinstance(x, int):
            return f"[{x}]"
        return "." + (x if re.fullmatch(r"[A-Za-z0-9_]{1,64}", x) else "<a key>")

    loc = "".join(part(x) for x in first["loc"]).lstrip(".")
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{loc}: {msg}{more}" if loc else f"{msg}{more}"
