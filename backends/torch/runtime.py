"""The layer classes every generated torch ensemble is built from.

A generated file (``mixc compile --backend torch``) holds what is particular to its spec: the
tables of layers, banks and BatchNorms, one class per ``.mix`` block and the model's forward. It
imports these classes, so a reader sees the architecture first and the machinery once, here;
``mixc compile --standalone`` writes this module's code into the file instead (a single file to
copy into another project, depending on torch alone).

Each layer reads its row of the file's ``Config`` by its plan name, holds its own per-member
parameters (alphas, unfactorised weights, BatchNorm) and runs every member at once. Activations
carry the members side by side on the channel axis ([B, M*C, ...], the "grouped" layout: one
grouped convolution) or as a ``Members`` tuple (the "loop" layout: one convolution per member); a
value shared by all members (the image, a plain stem's output) is [B, C, ...] and read by every
member. The layout is a property of the call, so blocks have one forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# --- the runtime (``--standalone`` copies everything below this line into the file) ---


@dataclass(frozen=True)
class Config:
    """A generated file's tables: members, classes, output layer, init rules, banks, blob,
    layers."""

    members: int
    classes: int
    # conv/linear (and non-default BatchNorm) options by plan name
    layers: dict[str, dict[str, Any]]
    batch_norms: dict[str, int]  # channels by plan name
    # plan name -> (key, (templates, size), (weight size, weight std, bias std))
    banks: dict[str, tuple]
    blob: tuple[int, float] | None = None  # (size, std) of the flat template store
    output: str = ""  # the output layer (the classifier rule applies to it)
    alpha_std: float | None = None  # None: orthonormal alphas
    classifier_std: float | None = None  # None: PyTorch's usual init of the output layer
    single_path: bool = (
        False  # one network holds every member (MIMO, Packed-Ensembles): BatchNorm [C]
    )
    input_members: int = 1  # MIMO: the input stacks this many members' images on the channel axis
    fast_init: tuple[str, float] | None = (
        None  # BatchEnsemble: ("normal", std) or ("signs", 0) for r and s
    )


class Members(tuple):
    """Each member's activation (loop layout): torch functions, tensor methods and + apply per
    member."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        n = next(len(v) for v in (*args, *kwargs.values()) if isinstance(v, Members))
        pick = lambda v, m: v[m] if isinstance(v, Members) else v  # noqa: E731
        return Members(
            [
                func(*[pick(a, m) for a in args], **{k: pick(v, m) for k, v in kwargs.items()})
                for m in range(n)
            ]
        )

    def __add__(self, other):  # tensor + Members goes through __torch_function__
        return Members(
            [a + (other[m] if isinstance(other, Members) else other) for m, a in enumerate(self)]
        )

    def __getattr__(self, name: str):  # h.mean((2, 3)), h.flatten(1)
        return lambda *args, **kwargs: Members([getattr(t, name)(*args, **kwargs) for t in self])


class Composed:
    """Composed layers' weights for one forward, by plan name, and how members are laid out.
    ``split_groups`` (layout "loop" asked for by name): a single-path network's grouped layers
    (Packed-Ensembles) run one dense op per group instead of one grouped op; "auto" keeps the
    grouped op, so the trainer can time both."""

    def __init__(
        self,
        weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
        members: int,
        grouped: bool,
        split_groups: bool = False,
    ) -> None:
        self.weights, self.members, self.grouped = weights, members, grouped
        self.split_groups = split_groups

    def repeat(self, x: torch.Tensor) -> torch.Tensor | Members:
        """A value shared by all members as every member's (beside per-member values)."""
        return torch.cat([x] * self.members, dim=1) if self.grouped else Members([x] * self.members)


def orthonormal_rows_(alpha: torch.Tensor) -> None:
    """Unit-norm rows, mutually orthogonal within each block of k members (Haar-random)."""
    members, k = alpha.shape
    for start in range(0, members, k):
        rows = min(k, members - start)
        q, r = torch.linalg.qr(torch.randn(k, rows, device=alpha.device))
        alpha[start : start + rows] = (q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)).T


def window(blob: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """``length`` consecutive blob entries from ``start``, wrapping round the end."""
    pieces = []
    while length > 0:
        take = min(length, blob.numel() - start)
        pieces.append(blob[start : start + take])
        length, start = length - take, 0
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


#: weight source (or "bn") -> (plan tensor name, module attribute) of each tensor a layer holds; an
#: entry on "bias" exists only when the layer has a bias. The compiler's table
#: (compiler/tensor_names.py), kept here because a standalone file holds this module alone
#: (tests/test_method_homes.py checks they agree).
LAYER_TENSORS: dict[str, tuple[tuple[str, str], ...]] = {
    "plain": (("plain.{layer}.weight", "weight"), ("plain.{layer}.bias", "bias")),
    "member": (("member.{layer}.weight", "weight"), ("member.{layer}.bias", "bias")),
    "bank": (("alpha.{layer}", "alpha"),),
    "blob": (("alpha.{layer}", "alpha"),),
    "batch_ensemble": (
        ("plain.{layer}.weight", "weight"),
        ("fast.{layer}.r", "r"),
        ("fast.{layer}.s", "s"),
        ("member.{layer}.bias", "bias"),
    ),
    "bn": (
        ("bn.{layer}.weight", "weight"),
        ("bn.{layer}.bias", "bias"),
        ("bn.{layer}.running_mean", "running_mean"),
        ("bn.{layer}.running_var", "running_var"),
    ),
    "layernorm": (("ln.{layer}.weight", "weight"), ("ln.{layer}.bias", "bias")),
    "cls_token": (("embed.{layer}.token", "token"),),
    "pos_embed": (("embed.{layer}.pos", "pos"),),
}


def _layer_tensors(source: str, name: str, path: str, has_bias: bool) -> dict[str, str]:
    """A layer's plan tensor names -> its state_dict keys under ``path``."""
    return {
        n.format(layer=name): f"{path}.{a}"
        for n, a in LAYER_TENSORS[source]
        if a != "bias" or has_bias
    }


class _Member:
    """A weight [M, *shape] (and bias [M, out]) per member: the naive ensemble's layers. Its
    forwards are every per-member layer's (composed ones too, once their weights are composed)."""

    templates = None  # "bank" or "blob": the model composes this layer's weights from that store

    @staticmethod
    def make(
        layer: "Weighted", cfg: dict, M: int, lead: tuple = None, bias_lead: tuple = None
    ) -> None:
        lead = (M,) if lead is None else lead
        layer.weight = nn.Parameter(torch.empty(*lead, *layer.shape))
        bias_lead = lead if bias_lead is None else bias_lead
        layer.bias = (
            nn.Parameter(torch.empty(*bias_lead, layer.shape[0])) if layer.has_bias else None
        )

    @staticmethod
    def weights(layer: "Weighted", w: Composed) -> tuple[torch.Tensor, torch.Tensor | None]:
        return layer.weight, layer.bias

    @staticmethod
    def reset(layer: "Weighted") -> None:
        """PyTorch's usual init (kaiming normal for convs); the output layer the plan's classifier
        rule."""
        classifier_std = layer.init[1]
        bound = 1 / math.sqrt(math.prod(layer.shape[1:]))
        if classifier_std is not None:
            nn.init.normal_(layer.weight, std=classifier_std)
            return None if layer.bias is None else nn.init.zeros_(layer.bias)
        if isinstance(layer, Conv):  # kaiming normal
            nn.init.normal_(layer.weight, std=math.sqrt(2) * bound)
        else:
            nn.init.uniform_(layer.weight, -bound, bound)
        return None if layer.bias is None else nn.init.uniform_(layer.bias, -bound, bound)

    @staticmethod
    def conv(layer: "Conv", x, weight, bias, w: Composed):
        conv, groups, options, M = layer.conv, layer.groups, layer.options, layer.members
        if not w.grouped:  # one convolution per member
            xs = [x] * M if layer.shared_input else x
            biases = [None] * M if bias is None else bias
            return Members(
                [conv(*args, groups=groups, **options) for args in zip(xs, weight, biases)]
            )
        # one convolution, the members' filters stacked
        bias = None if bias is None else bias.flatten()
        if layer.shared_input and groups == 1:
            return conv(x, weight.flatten(0, 1), bias, **options)
        x = torch.cat([x] * M, dim=1) if layer.shared_input else x
        return conv(x, weight.flatten(0, 1), bias, groups=M * groups, **options)

    @staticmethod
    def linear(layer: "Linear", x, weight, bias, w: Composed):
        if layer.groups > 1:
            return _grouped_linear(layer, x, weight, bias, w)
        if layer.shared_input and w.grouped:
            return F.linear(x, weight.flatten(0, 1), None if bias is None else bias.flatten())
        if not w.grouped:
            xs = [x] * layer.members if layer.shared_input else x
            return Members(
                [
                    F.linear(xm, weight[m], None if bias is None else bias[m])
                    for m, xm in enumerate(xs)
                ]
            )
        y = torch.einsum("bmi,moi->bmo", x.unflatten(1, (layer.members, -1)), weight)
        return (y if bias is None else y + bias).flatten(1)

    @staticmethod
    def composed(layer: "Weighted", mixed: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's weight and bias for analysis (``Ensemble.compose``)."""
        return mixed.get(layer.name, (getattr(layer, "weight", None), layer.bias))


def _grouped_linear(layer: "Linear", x, weight, bias, w: Composed):
    """A block-diagonal linear layer (one network, single path): group j maps its slice; weight [O,
    I/g]. One batched product, or one per group with ``w.split_groups``."""
    if w.split_groups:
        return _per_group(F.linear, layer.groups, x, weight, bias)
    y = torch.einsum(
        "bgi,goi->bgo", x.unflatten(1, (layer.groups, -1)), weight.unflatten(0, (layer.groups, -1))
    )
    return y.flatten(1) if bias is None else y.flatten(1) + bias


def _per_group(op, groups: int, x: torch.Tensor, weight, bias, **options) -> torch.Tensor:
    """A grouped op as one dense ``op`` per group: group j's input channels (axis 1) with its
    slice of the weight's outputs, the outputs concatenated; the numbers of ``groups=g``."""
    biases = [None] * groups if bias is None else bias.chunk(groups)
    parts = zip(x.chunk(groups, dim=1), weight.chunk(groups), biases)
    return torch.cat([op(xj, wj, bj, **options) for xj, wj, bj in parts], dim=1)


class _Plain(_Member):
    """One weight shared by all members (and the whole network of a single-path method)."""

    @staticmethod
    def make(layer: "Weighted", cfg: dict, M: int) -> None:
        _Member.make(layer, cfg, M, lead=())

    @staticmethod
    def conv(layer: "Conv", x, weight, bias, w: Composed):
        if layer.shared_input:  # computed once for all members
            if w.split_groups and layer.groups > 1:  # Packed-Ensembles, layout "loop"
                y = _per_group(layer.conv, layer.groups, x, weight, bias, **layer.options)
            else:
                y = layer.conv(x, weight, bias, groups=layer.groups, **layer.options)
            return w.repeat(y) if layer.spread else y
        M = layer.members  # the shared weight, once per member
        weight, bias = weight.expand(M, *weight.shape), None if bias is None else bias.expand(M, -1)
        return _Member.conv(layer, x, weight, bias, w)

    @staticmethod
    def linear(layer: "Linear", x, weight, bias, w: Composed):
        if layer.groups > 1:
            return _grouped_linear(layer, x, weight, bias, w)
        if layer.shared_input or not w.grouped:  # a Members input runs each member
            y = F.linear(x, weight, bias)
            return w.repeat(y) if layer.spread else y
        return F.linear(x.unflatten(1, (layer.members, -1)), weight, bias).flatten(1)


class _Bank(_Member):
    """Alphas [M, k] over bank rows ``templates[i]``; the model composes the weights
    (Ensemble.mix)."""

    templates = "bank"

    @staticmethod
    def make(layer: "Weighted", cfg: dict, M: int) -> None:
        # alpha [M, k] @ selector [M, k, rows]
        layer.alpha = nn.Parameter(torch.empty(M, len(cfg["templates"][0])))
        selector = F.one_hot(torch.tensor(cfg["templates"]), cfg["rows"]).to(
            torch.get_default_dtype()
        )
        layer.register_buffer("selector", selector, persistent=False)

    @staticmethod
    def weights(layer: "Weighted", w: Composed) -> tuple[torch.Tensor, torch.Tensor | None]:
        return w.weights[layer.name]

    @staticmethod
    def reset(layer: "Weighted") -> None:
        """Orthonormal alphas, or the plan's normal law."""
        alpha_std = layer.init[0]
        return (
            orthonormal_rows_(layer.alpha)
            if alpha_std is None
            else nn.init.normal_(layer.alpha, std=alpha_std)
        )


class _Blob(_Bank):
    """Alphas [M, k] over blob windows at ``offsets[i]``."""

    templates = "blob"

    @staticmethod
    def make(layer: "Weighted", cfg: dict, M: int) -> None:
        layer.alpha, layer.offsets = nn.Parameter(torch.empty(M, cfg["k"])), cfg["offsets"]


class _BatchEnsemble(_Member):
    """One shared weight W [O, I/g, *k], fast weights r [M, in] and s [M, out], a bias [M, out] per
    member. Member m's layer is W_m = W * s_m r_m^T (r read per group of input channels), run in
    one of two formulations with the same numbers:

    - composed: W_m formed in the forward (``fold``), then the naive ensemble's layer
      (``_Member``): autograd saves x and W_m, as the naive ensemble does; the extra work is
      weight-sized, M * |W| products.
    - scaled: ((x * r[m]) apply W) * s[m] + b[m]: W is read once, but x, x * r and the layer's
      output are saved (about 3x a plain layer's activations) and the extra work is
      activation-sized, M * B * positions * (in + out) products.

    The rule (``composes``): compose when M * |W| <= M * B * positions * (in + out), positions
    the input's spatial size (1 for a linear layer), i.e. when the weight-sized work is no more
    than the activation-sized work it replaces; shapes are the forward's own."""

    formulation = "auto"  # "compose" or "scale" forces one (tests, benchmarks)

    @staticmethod
    def make(layer: "Weighted", cfg: dict, M: int) -> None:
        _Member.make(layer, cfg, M, lead=(), bias_lead=(M,))
        layer.r = nn.Parameter(torch.empty(M, layer.shape[1] * layer.groups))
        layer.s = nn.Parameter(torch.empty(M, layer.shape[0]))

    @staticmethod
    def reset(layer: "Weighted") -> None:
        """Fast weights N(1, std^2) or random signs, then the shared weight as a plain layer's."""
        law, std = layer.fast_init
        for t in (layer.r, layer.s):
            (
                nn.init.normal_(t, mean=1.0, std=std)
                if law == "normal"
                else t.copy_(torch.randint_like(t, 2) * 2 - 1)
            )
        _Member.reset(layer)

    @staticmethod
    def composes(layer: "Weighted", x: torch.Tensor | Members) -> bool:
        """The size rule (see the class): whether composing W_m costs less than scaling x."""
        if _BatchEnsemble.formulation != "auto":
            return _BatchEnsemble.formulation == "compose"
        a = x[0] if isinstance(x, Members) else x  # [B, C, *spatial]
        positions = a.shape[0] * math.prod(a.shape[2:])
        return math.prod(layer.shape) <= positions * (layer.r.shape[1] + layer.shape[0])

    @staticmethod
    def fold(layer: "Weighted") -> torch.Tensor:
        """W * s r^T for every member, [M, *shape]: the fast weights' outer product [M, O, I/g]
        first, so the product with W saves only W and that (not an [M, *shape] intermediate).
        Elementwise ops, which autocast leaves alone: in the parameters' precision, as
        ``Ensemble._mix``; the convolution casts the result."""
        out, per_group, M = layer.shape[0], layer.shape[1], layer.members
        r = layer.r.unflatten(1, (layer.groups, per_group))
        outer = layer.s.view(M, out, 1) * r.repeat_interleave(out // layer.groups, dim=1)
        return layer.weight * outer.view(*outer.shape, *(1,) * (len(layer.shape) - 2))

    @staticmethod
    def conv(layer: "Conv", x, weight, bias, w: Composed):
        if _BatchEnsemble.composes(layer, x):
            return _Member.conv(layer, x, _BatchEnsemble.fold(layer), bias, w)
        return _BatchEnsemble.apply(
            layer, x, w, lambda h: layer.conv(h, weight, groups=layer.groups, **layer.options)
        )

    @staticmethod
    def linear(layer: "Linear", x, weight, bias, w: Composed):
        if _BatchEnsemble.composes(layer, x):
            return _Member.linear(layer, x, _BatchEnsemble.fold(layer), bias, w)
        return _BatchEnsemble.apply(layer, x, w, lambda h: F.linear(h, weight))

    @staticmethod
    def apply(
        layer: "Weighted", x: torch.Tensor | Members, w: Composed, apply
    ) -> torch.Tensor | Members:
        """The scaled formulation; ``apply`` is the layer's own op on one batch. Grouped: the
        members' activations [B, M*C, ...] are read as a batch [B*M, C, ...] (a view), so the
        shared weight runs once, as BatchEnsemble's tiled batch does."""
        M, b = layer.members, layer.bias
        if not w.grouped:
            xs = [x] * M if layer.shared_input else x
            return Members(
                [
                    _scaled(apply(_scaled(xm, layer.r[m])), layer.s[m], None if b is None else b[m])
                    for m, xm in enumerate(xs)
                ]
            )
        x = w.repeat(x) if layer.shared_input else x
        h = _scaled(x.unflatten(1, (M, -1)), layer.r, dim=2)  # [B, M, C, ...]
        y = apply(h.flatten(0, 1)).unflatten(0, (x.shape[0], M))  # [B, M, O, ...]
        return _scaled(y, layer.s, b, dim=2).flatten(1, 2)

    @staticmethod
    def composed(layer: "Weighted", mixed: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-member weights W * s r^T ([M, *shape]; r read per group)."""
        return _BatchEnsemble.fold(layer), layer.bias


#: a layer's weight source (the plan's ``source``) -> the code that holds and runs its weights
WEIGHTS = {
    "plain": _Plain,
    "member": _Member,
    "bank": _Bank,
    "blob": _Blob,
    "batch_ensemble": _BatchEnsemble,
}


class Weighted(nn.Module):
    """A conv or linear layer of every member; how it holds and runs its weights is its source's
    (WEIGHTS): "bank" and "blob" (alphas; the model composes the weights), "member" (a weight per
    member), "plain" (one shared weight) or "batch_ensemble" (one shared weight and fast weights).
    """

    def __init__(self, config: Config, name: str) -> None:
        super().__init__()
        cfg, M = config.layers[name], config.members
        self.name, self.source = name, cfg["source"]
        self.shape = cfg["shape"]  # [out, in/groups, *kernel]
        self.members, self.bank = M, cfg.get("bank")
        self.has_bias, self.bias = cfg.get("bias", False), None
        self.shared_input = cfg.get("shared_input", False)
        self.spread = cfg.get("spread", False)  # a shared-input output repeated for every member
        self.init = (config.alpha_std, config.classifier_std if name == config.output else None)
        self.groups, self.fast_init = cfg.get("groups", 1), config.fast_init
        self.kind.make(self, cfg, M)

    @property
    def kind(self):
        """The code of this layer's weight source."""
        return WEIGHTS[self.source]

    def extra_repr(self) -> str:
        return f"{self.name}, shape={tuple(self.shape)}, source={self.source}"

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Composed templates [M, size] -> weight [M, *shape] and bias [M, out] (or None)."""
        size = math.prod(self.shape)
        return flat[:, :size].reshape(self.members, *self.shape), (
            flat[:, size:] if self.has_bias else None
        )

    def mix_blob(self, blob: torch.Tensor) -> torch.Tensor:
        """Member i's templates [k, size] are the blob's window at offsets[i], mixed by its
        alphas."""
        k, size = (
            self.alpha.shape[1],
            math.prod(self.shape) + (self.shape[0] if self.has_bias else 0),
        )
        windows = [window(blob, offset, k * size).view(k, size) for offset in self.offsets]
        if len(set(self.offsets)) == 1:
            return self.alpha @ windows[0]
        return torch.stack([a @ w for a, w in zip(self.alpha, windows)])

    def weights(self, w: Composed) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.kind.weights(self, w)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Alphas orthonormal (or the plan's normal law); plain and member layers PyTorch's usual
        init (kaiming normal for convs); the output layer the plan's classifier rule."""
        self.kind.reset(self)

    def plan_tensors(self, path: str) -> dict[str, str]:
        return _layer_tensors(self.source, self.name, path, self.bias is not None)


def _scaled(
    x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, dim: int = 1
) -> torch.Tensor:
    """x * scale (+ bias), both [..., C] broadcast along x's axis ``dim`` (the channels)."""
    shape = (*scale.shape, *(1,) * (x.dim() - dim - 1))
    x = x * scale.view(*([1] * (dim - scale.dim() + 1)), *shape)
    return x if bias is None else x + bias.view(*([1] * (dim - bias.dim() + 1)), *shape)


class Conv(Weighted):
    """A convolution of every member (see Weighted)."""

    def __init__(self, config: Config, name: str) -> None:
        super().__init__(config, name)
        cfg = config.layers[name]
        self.options = {key: cfg[key] for key in ("stride", "padding", "dilation") if key in cfg}
        self.conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.shape) - 3]

    def forward(self, x: torch.Tensor | Members, w: Composed) -> torch.Tensor | Members:
        return self.kind.conv(self, x, *self.weights(w), w)


def _tokenwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, **options):
    """A linear layer applied to every token of x [B, I, N]: a 1-D convolution of kernel 1."""
    return F.conv1d(x, weight.unsqueeze(-1), bias, **options)


class Linear(Weighted):
    """A linear layer of every member (see Weighted); inputs [B, M*I], or shared [B, I]. With
    ``groups`` (Packed-Ensembles' last layer) block-diagonal: group j maps its slice of the inputs.
    With ``tokens`` it reads a sequence [B, M*I, N] and maps each token alike, which is a 1-D
    convolution of kernel 1: it runs through its source's conv path (every layout and weight source
    as a Conv's) with the weight kept [out, in], so checkpoints keep the plan's shapes.
    """

    def __init__(self, config: Config, name: str) -> None:
        super().__init__(config, name)
        self.tokens = config.layers[name].get("tokens", False)
        self.conv, self.options = _tokenwise, {}

    def forward(self, x: torch.Tensor | Members, w: Composed) -> torch.Tensor | Members:
        if self.tokens:
            return self.kind.conv(self, x, *self.weights(w), w)
        return self.kind.linear(self, x, *self.weights(w), w)


class BatchNorm(nn.Module):
    """Each member's own BatchNorm (weight, bias, running statistics [M, C]): per member in the
    loop layout, one batch_norm over the members' M*C channels (views of the same) when grouped."""

    def __init__(self, config: Config, name: str) -> None:
        super().__init__()
        cfg, channels = config.layers.get(name, {}), config.batch_norms[name]
        self.name, self.shared_input = name, cfg.get("shared_input", False)
        self.momentum, self.eps = cfg.get("momentum", 0.1), cfg.get("eps", 1e-5)
        lead = () if config.single_path else (config.members,)  # one network: one BatchNorm [C]
        self.weight = nn.Parameter(torch.ones(*lead, channels))
        self.bias = nn.Parameter(torch.zeros(*lead, channels))
        self.register_buffer("running_mean", torch.zeros(*lead, channels))
        self.register_buffer("running_var", torch.ones(*lead, channels))

    def extra_repr(self) -> str:
        return f"{self.name}, channels={self.weight.shape[-1]}"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        (
            self.weight.fill_(1.0),
            self.bias.zero_(),
            self.running_mean.zero_(),
            self.running_var.fill_(1.0),
        )

    def forward(self, x: torch.Tensor | Members, w: Composed) -> torch.Tensor | Members:
        x = w.repeat(x) if self.shared_input else x
        options = dict(training=self.training, momentum=self.momentum, eps=self.eps)
        tensors = (self.running_mean, self.running_var, self.weight, self.bias)
        if isinstance(x, Members):  # rows of [M, C]: the running statistics update in place
            return Members(
                [F.batch_norm(xm, *[t[m] for t in tensors], **options) for m, xm in enumerate(x)]
            )
        return F.batch_norm(x, *(t.view(-1) for t in tensors), **options)


class MemberOp(nn.Module):
    """A layer with each member's own parameters ([M, ...]; one network's [...] on a single path)
    besides the weight layers: LayerNorm, ClassToken, PosEmbed. ``TENSORS`` is its LAYER_TENSORS
    key; a shared input (``shared_input``) is first repeated for every member."""

    TENSORS = ""

    def __init__(self, config: Config, name: str) -> None:
        super().__init__()
        cfg = config.layers[name]
        self.name, self.channels = name, cfg["channels"]
        self.shared_input = cfg.get("shared_input", False)
        self.lead = () if config.single_path else (config.members,)

    def extra_repr(self) -> str:
        return f"{self.name}, channels={self.channels}"

    def plan_tensors(self, path: str) -> dict[str, str]:
        return _layer_tensors(self.TENSORS, self.name, path, True)

    def forward(self, x: torch.Tensor | Members, w: Composed) -> torch.Tensor | Members:
        x = w.repeat(x) if self.shared_input else x
        if isinstance(x, Members):
            return Members([self.apply_to(xm, m) for m, xm in enumerate(x)])
        return self.apply_to(x, None)

    def apply_to(self, x: torch.Tensor, m: int | None) -> torch.Tensor:
        """The layer on one tensor: member m's parameters (loop layout), or with m None every
        member's side by side on the channel axis (grouped layout, or one network)."""
        raise NotImplementedError

    def own(self, t: torch.Tensor, m: int | None) -> torch.Tensor:
        """Member m's row of a parameter, or every row (the members side by side)."""
        return t if m is None else t[m]


class LayerNorm(MemberOp):
    """Each member's LayerNorm over the channels at every position: for x[:, c, ...] at one
    position, y = (x - mean_c x) / sqrt(var_c x + eps) * weight[c] + bias[c], the variance biased
    (as torch's and timm's). Grouped, the members' M*C channels are normalised in M blocks of C;
    with ``groups`` g (Packed-Ensembles' one network) in g blocks of C/g, each block read alone so
    members stay apart. Weight ones and bias zeros at init."""

    TENSORS = "layernorm"

    def __init__(self, config: Config, name: str) -> None:
        super().__init__(config, name)
        cfg = config.layers[name]
        self.eps, self.block = cfg.get("eps", 1e-5), self.channels // cfg.get("groups", 1)
        self.weight = nn.Parameter(torch.ones(*self.lead, self.channels))
        self.bias = nn.Parameter(torch.zeros(*self.lead, self.channels))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.fill_(1.0), self.bias.zero_()

    def apply_to(self, x: torch.Tensor, m: int | None) -> torch.Tensor:
        weight, bias, block = self.own(self.weight, m), self.own(self.bias, m), self.block
        blocks = x.shape[1] // block
        if blocks == 1:  # one block: torch's layer_norm with its affine, channels last
            y = F.layer_norm(
                x.movedim(1, -1), (block,), weight.reshape(block), bias.reshape(block), self.eps
            )
            return y.movedim(-1, 1)
        h = x.unflatten(1, (blocks, block)).movedim(2, -1)  # [B, blocks, *positions, block]
        h = F.layer_norm(h, (block,), eps=self.eps)
        shape = (blocks, *(1,) * (x.dim() - 2), block)
        h = h * weight.reshape(shape) + bias.reshape(shape)
        return h.movedim(-1, 2).flatten(1, 2)


class ClassToken(MemberOp):
    """Each member's learned class token put before its sequence: [B, D, N] -> [B, D, N + 1],
    token 0 being ``token`` [D] (grouped: the members' [M*D] side by side). Init N(0, 1e-6^2),
    timm's."""

    TENSORS = "cls_token"

    def __init__(self, config: Config, name: str) -> None:
        super().__init__(config, name)
        self.token = nn.Parameter(torch.zeros(*self.lead, self.channels))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.token, std=1e-6)

    def apply_to(self, x: torch.Tensor, m: int | None) -> torch.Tensor:
        token = self.own(self.token, m).reshape(1, -1, 1).to(x.dtype)
        return torch.cat([token.expand(x.shape[0], -1, -1), x], dim=2)


class PosEmbed(MemberOp):
    """Each member's learned position embedding, added: y[:, d, n] = x[:, d, n] + pos[n, d]. The
    tensor is token-major [N, D] (timm's layout; [M, N, D] per member), the activations
    channels-first, so its transpose is added. Init truncated normal, std 0.02 (timm's call:
    bounds +-2, so at this std all but a normal)."""

    TENSORS = "pos_embed"

    def __init__(self, config: Config, name: str) -> None:
        super().__init__(config, name)
        tokens = config.layers[name]["tokens"]
        self.pos = nn.Parameter(torch.zeros(*self.lead, tokens, self.channels))

    def extra_repr(self) -> str:
        return f"{self.name}, tokens={self.pos.shape[-2]}, channels={self.channels}"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos, std=0.02)

    def apply_to(self, x: torch.Tensor, m: int | None) -> torch.Tensor:
        pos = self.own(self.pos, m).transpose(-1, -2)  # [..., D, N]
        return x + pos.reshape(-1, pos.shape[-1])


def attend(q, k, v, head_dim: int):
    """Multi-head scaled dot-product attention of q, k, v [B, C, N] (channels-first sequences):
    head h reads channels h*head_dim .. (h+1)*head_dim - 1, and its output at token i is
    sum_j softmax_j(q_i . k_j / sqrt(head_dim)) v_j. The head count is C // head_dim, so one call
    serves one network, a member (loop layout: a Members tuple, per member) or the members side
    by side (grouped: their heads side by side)."""
    if any(isinstance(t, Members) for t in (q, k, v)):
        n = next(len(t) for t in (q, k, v) if isinstance(t, Members))
        q, k, v = ((t if isinstance(t, Members) else [t] * n) for t in (q, k, v))
        return Members([attend(*qkv, head_dim=head_dim) for qkv in zip(q, k, v)])
    split = lambda t: t.unflatten(1, (-1, head_dim)).transpose(2, 3)  # noqa: E731  [B, H, N, d]
    y = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return y.transpose(2, 3).flatten(1, 2)


class Ensemble(nn.Module):
    """What every generated ensemble shares: templates, composition, initialisation, tensor
    names."""

    def __init__(self, config: Config, layout: str, channels_last: bool) -> None:
        super().__init__()
        if layout not in ("auto", "grouped", "loop"):
            raise ValueError(f"layout must be auto, grouped or loop, not {layout!r}")
        self.config, self.layout, self.channels_last = config, layout, channels_last
        self.banks = nn.ParameterDict(
            {key: nn.Parameter(torch.empty(shape)) for key, shape, _ in config.banks.values()}
        )
        self.blob = nn.Parameter(torch.empty(config.blob[0])) if config.blob else None
        self._mixed = None  # (key, composed weights) kept between eval-mode forwards, see mix

    def __getstate__(self) -> dict:
        """Pickles and deep copies leave the eval-mode cache of composed weights behind."""
        return {**super().__getstate__(), "_mixed": None}

    def extra_repr(self) -> str:
        return (
            f"spec={getattr(self, 'spec_name', '?')}, members={self.config.members},"
            f" layout={self.layout}, channels_last={self.channels_last}"
        )

    def setup(self) -> None:
        """Once the layers exist: list the composed ones by bank (plain lists), then initialise."""
        weighted = [m for m in self.modules() if isinstance(m, Weighted)]
        self.banked = {
            key: [m for m in weighted if m.bank == key] for key, _, _ in self.config.banks.values()
        }
        self.blobbed = [m for m in weighted if m.kind.templates == "blob"]
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Templates N(0, v) (weight and bias parts; the variances are in the banks table), then
        every layer."""
        for key, _, (weight_size, weight_std, bias_std) in self.config.banks.values():
            nn.init.normal_(self.banks[key][:, :weight_size], std=weight_std)
            nn.init.normal_(self.banks[key][:, weight_size:], std=bias_std)
        if self.blob is not None:
            nn.init.normal_(self.blob, std=self.config.blob[1])
        for layer in self.modules():
            if isinstance(layer, (Weighted, BatchNorm, MemberOp)):
                layer.reset_parameters()

    def mix(self, device: torch.device) -> Composed:
        """Every composed layer's weights for all members, once per forward. In eval mode without
        autograd they are kept until a template or alpha changes (their version counters and
        storage), so inference costs what per-member weights would."""
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            self._mixed = None
            return self._mix(device)
        inputs = [*self.banks.values(), *([self.blob] if self.blob is not None else [])]
        inputs += [m.alpha for layers in self.banked.values() for m in layers] + [
            m.alpha for m in self.blobbed
        ]
        key = (device, self.layout, *((t._version, t.data_ptr(), t.dtype) for t in inputs))
        if self._mixed is None or self._mixed[0] != key:
            self._mixed = (key, self._mix(device))
        return self._mixed[1]

    def _mix(self, device: torch.device) -> Composed:
        """Per bank, the layers' alphas spread over its rows, then one product with the templates.
        In the parameters' precision even under autocast (the convolutions cast the result once)."""
        weights, M = {}, self.config.members
        with torch.autocast(device.type, enabled=False):
            for key, layers in self.banked.items():
                coeffs = torch.cat(
                    [torch.einsum("mk,mkt->mt", m.alpha, m.selector) for m in layers]
                )
                for layer, flat in zip(layers, (coeffs @ self.banks[key]).split(M)):
                    weights[layer.name] = layer.split(flat)
            for layer in self.blobbed:
                weights[layer.name] = layer.split(layer.mix_blob(self.blob))
        grouped = self.layout == "grouped" or (self.layout == "auto" and device.type == "cuda")
        return Composed(weights, M, grouped, split_groups=self.layout == "loop")

    def stack_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """MIMO: the members' inputs side by side on the channel axis, member-major. x [B, M,
        *input] gives each member its own (training); x [B, *input] gives every member the same
        (evaluation).
        """
        if x.dim() == len(self.input_shape) + 2:
            if x.shape[1] != self.config.input_members:
                raise ValueError(
                    f"MIMO takes one input per member, [B, {self.config.input_members}, *input], "
                    f"not {list(x.shape)}"
                )
            return x.flatten(1, 2)
        return torch.cat([x] * self.config.input_members, dim=1)

    def logits(self, x: torch.Tensor | Members) -> torch.Tensor:
        """The last layer's output as member logits [B, members, classes]."""
        if isinstance(x, Members):
            return torch.stack(x, dim=1)
        return x.unflatten(1, (self.config.members, self.config.classes))

    def compose(self) -> dict[str, torch.Tensor]:
        """Every layer's "<layer>.weight"/".bias" ([M, ...], or shared for plain layers), for
        analysis."""
        mixed = self.mix(next(self.parameters()).device).weights
        layers = [m for m in self.modules() if isinstance(m, Weighted)]
        pairs = [(m.name, m.kind.composed(m, mixed)) for m in layers]
        return {
            f"{name}.{part}": t
            for name, wb in pairs
            for part, t in zip(("weight", "bias"), wb)
            if t is not None
        }

    def plan_tensors(self) -> dict[str, str]:
        """Plan tensor name (the checkpoint format, shared with the flax backend) -> state_dict
        key."""
        names = {name: f"banks.{key}" for name, (key, _, _) in self.config.banks.items()}
        names |= {"blob": "blob"} if self.config.blob else {}
        for path, layer in self.named_modules():
            if isinstance(layer, BatchNorm):
                names |= _layer_tensors("bn", layer.name, path, True)
            elif isinstance(layer, (Weighted, MemberOp)):
                names |= layer.plan_tensors(path)
        return names
