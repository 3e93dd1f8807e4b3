"""The layer classes and functions every generated flax.nnx ensemble is built from.

A generated file (``mixc compile --backend flax``) holds what is particular to its spec: the same
tables the torch backend writes, one ``nnx.Module`` per ``.mix`` block and the model's call. It
imports these, so a reader sees the architecture first and the machinery once, here; ``mixc
compile --backend flax --standalone`` writes this module's code into the file instead.

Each layer reads its row of the file's ``Config`` by its plan name (keeping hashable copies: nnx
treats plain attributes as static), holds its own per-member parameters (alphas, unfactorised
weights, BatchNorm) and runs every member at once. Activations are channels-last and carry the
members side by side on the channel axis ([B, ..., M*C], "grouped") or as a ``Members`` tuple of one
array per member ("loop"); a value shared by all members (the image, a plain stem's output) is one
[B, ..., C] array read by every member. ``conv`` (with its CPU kernel gradient) and
``_batch_norm`` (PyTorch's semantics) compute exactly what the torch backend's layers compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# --- the runtime (``--standalone`` copies everything below this line into the file) ---


# The same dataclass as backends/torch/runtime.py's: each runtime must stand alone (--standalone
# copies it).
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


def _pairs(v, dim: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dim


def kernel_layout(w, lead: int = 0):
    """A PyTorch conv weight [*lead, O, I/groups, *k] in XLA's kernel layout [*lead, *k, I/groups,
    O]."""
    return jnp.moveaxis(w, (lead, lead + 1), (-1, -2))


def torch_layout(kernel, lead: int = 0):
    """The inverse of ``kernel_layout``."""
    return jnp.moveaxis(kernel, (-1, -2), (lead, lead + 1))


def _conv(x, kernel, b=None, stride=1, padding=0, dilation=1, groups=1, cpu=False, split=False):
    """PyTorch's conv of channels-last x with ``kernel`` [*k, I/groups, O] (``kernel_layout``);
    ``cpu``: on CPU, _conv_cpu's kernel gradient where it is the faster one; ``split``: one dense
    convolution per group (the same numbers)."""
    dim = kernel.ndim - 2
    args = (_pairs(stride, dim), _pairs(padding, dim), _pairs(dilation, dim), groups)
    # XLA's grouped convolution is slower on CPU than one per group (mixc's docs/execution.md)
    if groups > 1 and (split or (cpu and groups <= 16)):
        parts = zip(jnp.split(x, groups, axis=-1), jnp.split(kernel, groups, axis=-1))
        y = jnp.concatenate([_conv(xg, kg, None, *args[:3], cpu=cpu) for xg, kg in parts], axis=-1)
    else:
        taps = cpu and groups == 1 and _taps_gradient(kernel, args[0])
        y = _conv_cpu(x, kernel, *args) if taps else _xla_conv(x, kernel, *args)
    return y if b is None else y + b


def _taps_gradient(kernel, stride) -> bool:
    """Whether _conv_cpu's kernel gradient beats XLA's own on CPU for this ``kernel`` [*k, I, O]:
    for 1x1 kernels, strided convolutions and those with more than 128 output channels (the
    measurements behind the rule: mixc's docs/execution.md)."""
    return math.prod(kernel.shape[:-2]) == 1 or max(stride) > 1 or kernel.shape[-1] > 128


def _xla_conv(x, kernel, stride, padding, dilation, groups):
    numbers = ("NWC", "WIO", "NWC") if x.ndim == 3 else ("NHWC", "HWIO", "NHWC")
    pads = [(p, p) for p in padding]
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        stride,
        pads,
        rhs_dilation=dilation,
        dimension_numbers=numbers,
        feature_group_count=groups,
    )


def _conv_cpu_fwd(x, kernel, stride, padding, dilation, groups):
    return _xla_conv(x, kernel, stride, padding, dilation, groups), (x, kernel)


def _conv_cpu_bwd(stride, padding, dilation, groups, res, dy):
    """XLA's input gradient; the kernel gradient as one matmul per kernel tap, sum over (batch,
    positions) of x's shifted window times dy (see _taps_gradient for where it beats XLA's own)."""
    x, kernel = res
    dx = jax.vjp(lambda x: _xla_conv(x, kernel, stride, padding, dilation, groups), x)[1](dy)[0]
    xp = jnp.pad(x, ((0, 0), *((p, p) for p in padding), (0, 0)))
    d = dy.reshape(-1, dy.shape[-1])
    grid = [()]
    for k in kernel.shape[:-2]:
        grid = [tap + (i,) for tap in grid for i in range(k)]
    taps = []
    for tap in grid:
        start = (0, *(t * dl for t, dl in zip(tap, dilation)), 0)
        ends = [s + (n - 1) * st + 1 for s, n, st in zip(start[1:-1], dy.shape[1:-1], stride)]
        window = jax.lax.slice(xp, start, (x.shape[0], *ends, x.shape[-1]), (1, *stride, 1))
        taps.append(window.reshape(-1, x.shape[-1]).T @ d)
    return dx, jnp.stack(taps).reshape(kernel.shape)


_conv_cpu = jax.custom_vjp(_xla_conv, nondiff_argnums=(2, 3, 4, 5))
_conv_cpu.defvjp(_conv_cpu_fwd, _conv_cpu_bwd)


def _batch_norm(x, mean, var, weight, bias, train: bool, momentum: float, eps: float):
    """PyTorch's batch_norm over the channel (last) axis -> (y, new running (mean, var) or None):
    biased batch variance, unbiased running one, new = (1 - momentum) * old + momentum * batch;
    y = x * scale + shift, which XLA runs 3-4x faster on CPU than (x - mean) * ..."""
    if train:
        axes = tuple(range(x.ndim - 1))
        mu = x.mean(axes)
        v = jnp.square(x - mu).mean(axes)
        n = x.size // x.shape[-1]
        unbiased = v * (n / max(n - 1, 1))
        stats = (1 - momentum) * mean + momentum * mu, (1 - momentum) * var + momentum * unbiased
    else:
        mu, v, stats = mean, var, None
    scale = jax.lax.rsqrt(v + eps) * weight
    return x * scale + (bias - mu * scale), stats


def pool(x, op: str, kernel, stride, padding=0):
    """Max or average pooling of channels-last x; an average counts padded zeros, as in PyTorch."""
    dim = x.ndim - 2
    k, s, p = _pairs(kernel, dim), _pairs(stride, dim), _pairs(padding, dim)
    window, strides = (1, *k, 1), (1, *s, 1)
    pads = ((0, 0), *((q, q) for q in p), (0, 0))
    if op == "max":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, pads)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads) / math.prod(k)


def flatten(x):
    """PyTorch's flatten(1): channels-first order, so the next linear sees the same features."""
    if x.ndim > 2:
        x = jnp.moveaxis(x, -1, 1)
    return x.reshape(x.shape[0], -1)


def tokens(x):
    """An image [B, H, W, C] as a sequence [B, H*W, C], row-major over (H, W): the token order of
    PyTorch's flatten(2) of [B, C, H, W], so positions match the torch backend's."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def token_pool(x, op: str):
    """A sequence [B, N, C] -> [B, C]: its first (class) token ("cls") or the mean of its tokens."""
    return x[:, 0] if op == "cls" else x.mean(1)


class Members(tuple):
    """Each member's activation (loop layout); ``+`` adds per member (a shared array to each)."""

    def __add__(self, other):
        return Members(
            [a + (other[m] if isinstance(other, Members) else other) for m, a in enumerate(self)]
        )

    __radd__ = __add__


_MADE = [0]


def _made() -> int:
    """A creation counter: layers are made in the plan's op order (nnx sorts attributes by name)."""
    _MADE[0] += 1
    return _MADE[0]


def each(fn, x, *args, **kwargs):
    """``fn`` of every member's activation (a Members), or of one array."""
    if isinstance(x, Members):
        return Members([fn(v, *args, **kwargs) for v in x])
    return fn(x, *args, **kwargs)


def attend(q, k, v, head_dim: int):
    """Softmax attention of sequences [B, N, C] in heads of ``head_dim`` channels: C // head_dim
    heads, so members side by side on the channels (grouped) are just more heads. One of q, k, v
    shared by all members (a plain layer's, [B, N, D]) is read by every member."""
    qkv = (q, k, v)
    loop = next((len(t) for t in qkv if isinstance(t, Members)), 0)
    if loop:
        qkv = [t if isinstance(t, Members) else [t] * loop for t in qkv]
        return Members([attend(*one, head_dim) for one in zip(*qkv)])
    width = max(t.shape[-1] for t in qkv)  # grouped: a shared one repeated side by side
    qkv = [jnp.concatenate([t] * (width // t.shape[-1]), -1) for t in qkv]
    y = jax.nn.dot_product_attention(
        *[t.reshape(*t.shape[:-1], width // head_dim, head_dim) for t in qkv]
    )
    return y.reshape(*y.shape[:-2], width)


class Composed:
    """One call's composed weights (by plan name), the layout, and the call's options.
    ``split_groups`` (layout "loop" asked for by name): a single-path network's grouped layers
    (Packed-Ensembles) run one dense op per group instead of one grouped op; "auto" keeps the
    grouped op (on CPU ``_conv`` splits it anyway), so the trainer can time both."""

    def __init__(
        self,
        weights: dict,
        members: int,
        grouped: bool,
        cpu: bool,
        train: bool,
        dropout_key,
        split_groups: bool = False,
    ) -> None:
        self.weights, self.members, self.grouped = weights, members, grouped
        self.cpu, self.train, self.dropout_key = cpu, train, dropout_key
        self.split_groups = split_groups

    def repeat(self, x):
        """A value shared by all members as every member's (beside per-member values)."""
        return (
            jnp.concatenate([x] * self.members, axis=-1)
            if self.grouped
            else Members([x] * self.members)
        )

    def dropout(self, x, p: float, salt: int):
        """Inverted dropout; the key is folded with the op's ``salt`` (and the member, in a
        loop)."""
        if not self.train or p == 0:
            return x
        if self.dropout_key is None:
            raise ValueError("train=True with dropout needs dropout_key=jax.random.key(...)")
        key = jax.random.fold_in(self.dropout_key, salt)

        def drop(v, key):
            keep = jax.random.bernoulli(key, 1.0 - p, v.shape)
            return jnp.where(keep, v / (1.0 - p), 0.0).astype(v.dtype)

        if isinstance(x, Members):
            return Members([drop(v, jax.random.fold_in(key, m)) for m, v in enumerate(x)])
        return drop(x, key)


def window(blob, start: int, length: int):
    """``length`` consecutive blob entries from ``start``, wrapping round the end."""
    pieces = []
    while length > 0:
        take = min(length, blob.shape[0] - start)
        pieces.append(blob[start : start + take])
        length, start = length - take, 0
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)


def orthonormal_rows(g, members: int):
    """Gaussians g [layers, blocks, k, k] -> [layers, members, k]: per layer, unit-norm rows,
    orthogonal within each block of k members (Gram-Schmidt, the Q of a QR with a positive
    diagonal, without a LAPACK call, which is slow to compile on CPU)."""
    layers, blocks, k, _ = g.shape
    cols = []
    for j in range(k):
        v = g[..., j]
        for q in cols:
            v = v - (q * v).sum(-1, keepdims=True) * q
        cols.append(v * jax.lax.rsqrt((v * v).sum(-1, keepdims=True)))
    return jnp.stack(cols, axis=-2).reshape(layers, blocks * k, k)[:, :members]


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
    """A layer's plan tensor names -> its module paths under ``path``."""
    return {
        n.format(layer=name): f"{path}.{a}"
        for n, a in LAYER_TENSORS[source]
        if a != "bias" or has_bias
    }


def _linear(x, w, b=None):
    """x [..., I] @ w [O, I].T (+ b)."""
    y = x @ w.T
    return y if b is None else y + b


class _Member:
    """A weight [M, *shape] (and bias [M, out]) per member: the naive ensemble's layers. Its calls
    are every per-member layer's (composed ones too, once their weights are composed)."""

    templates = None  # "bank" or "blob": the model composes this layer's weights from that store
    lead = 1  # the weight's leading member axis (0: one weight for all members)

    @staticmethod
    def make(layer, cfg: dict, M: int, lead: tuple = None, bias_lead: tuple = None) -> None:
        lead = (M,) if lead is None else lead
        layer.weight = nnx.Param(jnp.zeros((*lead, *layer.shape)))
        if layer.has_bias:
            layer.bias = nnx.Param(
                jnp.zeros((*(lead if bias_lead is None else bias_lead), layer.shape[0]))
            )

    @classmethod
    def weights(cls, layer, w: Composed):
        return layer.layout(layer.weight[...], cls.lead), (
            layer.bias[...] if layer.has_bias else None
        )

    @staticmethod
    def reset(layer, draw) -> None:
        """PyTorch's usual init (kaiming normal for convs), the plan's rule for the output layer."""
        classifier_std, fan = layer.init[1], math.prod(layer.shape[1:])
        if classifier_std is not None:
            layer.weight.set_value(classifier_std * draw.normal(layer.weight.shape))
            if layer.has_bias:
                layer.bias.set_value(jnp.zeros(layer.bias.shape, draw.dtype))
            return
        if isinstance(layer, Conv):
            layer.weight.set_value(math.sqrt(2 / fan) * draw.normal(layer.weight.shape))
        else:
            layer.weight.set_value(draw.uniform(layer.weight.shape) / math.sqrt(fan))
        if layer.has_bias:
            layer.bias.set_value(draw.uniform(layer.bias.shape) / math.sqrt(fan))

    @staticmethod
    def conv(layer, x, weight, bias, w: Composed):
        groups, options, M = layer.groups, dict(layer.options), layer.members
        if not w.grouped:  # one convolution per member
            xs = [x] * M if layer.shared_input else x
            biases = [None] * M if bias is None else bias
            return Members(
                [
                    _conv(v, wm, bm, groups=groups, cpu=w.cpu, **options)
                    for v, wm, bm in zip(xs, weight, biases)
                ]
            )
        # the members' filters stacked
        weight = jnp.moveaxis(weight, 0, -2).reshape(*weight.shape[1:-1], -1)
        bias = None if bias is None else bias.reshape(-1)
        if layer.shared_input and groups == 1:
            return _conv(x, weight, bias, cpu=w.cpu, **options)
        x = jnp.concatenate([x] * M, axis=-1) if layer.shared_input else x
        return _conv(x, weight, bias, groups=M * groups, cpu=w.cpu, **options)

    @staticmethod
    def linear(layer, x, weight, bias, w: Composed):
        M = layer.members
        if layer.groups > 1:
            return _grouped_linear(layer, x, weight, bias, w)
        if layer.shared_input and w.grouped:
            return _linear(
                x, weight.reshape(-1, weight.shape[-1]), None if bias is None else bias.reshape(-1)
            )
        if not w.grouped:
            xs = [x] * M if layer.shared_input else x
            return Members(
                [_linear(v, weight[m], None if bias is None else bias[m]) for m, v in enumerate(xs)]
            )
        y = jnp.einsum("...mi,moi->...mo", x.reshape(*x.shape[:-1], M, -1), weight)
        return (y if bias is None else y + bias).reshape(*x.shape[:-1], -1)

    @staticmethod
    def composed(layer, mixed: dict):
        """The layer's weight and bias in the plan's (PyTorch) layout, for analysis
        (``Ensemble.compose``)."""
        if layer.name in mixed:
            return layer.plan_layout(mixed[layer.name][0], 1), mixed[layer.name][1]
        return layer.weight[...], (layer.bias[...] if layer.has_bias else None)


def _grouped_linear(layer, x, weight, bias, w: Composed):
    """A block-diagonal linear layer (one network, single path): group j maps its slice; weight [O,
    I/g]. One batched product, or one per group with ``w.split_groups``."""
    g = layer.groups
    if w.split_groups:
        biases = [None] * g if bias is None else jnp.split(bias, g)
        parts = zip(jnp.split(x, g, axis=-1), jnp.split(weight, g), biases)
        return jnp.concatenate([_linear(xj, wj, bj) for xj, wj, bj in parts], axis=-1)
    y = jnp.einsum(
        "...gi,goi->...go", x.reshape(*x.shape[:-1], g, -1), weight.reshape(g, -1, weight.shape[-1])
    )
    y = y.reshape(*x.shape[:-1], -1)
    return y if bias is None else y + bias


class _Plain(_Member):
    """One weight shared by all members (and the whole network of a single-path method)."""

    lead = 0

    @staticmethod
    def make(layer, cfg: dict, M: int) -> None:
        _Member.make(layer, cfg, M, lead=())

    @staticmethod
    def conv(layer, x, weight, bias, w: Composed):
        groups, options, M = layer.groups, dict(layer.options), layer.members
        if layer.shared_input:  # computed once for all members; split: Packed-Ensembles' "loop"
            y = _conv(x, weight, bias, groups=groups, cpu=w.cpu, split=w.split_groups, **options)
            return w.repeat(y) if layer.spread else y
        if isinstance(x, Members):  # the shared weight, once per member
            return Members([_conv(v, weight, bias, groups=groups, cpu=w.cpu, **options) for v in x])
        # members side by side: the weight tiled
        weight = jnp.tile(weight, (1,) * (weight.ndim - 1) + (M,))
        bias = None if bias is None else jnp.tile(bias, M)
        return _conv(x, weight, bias, groups=M * groups, cpu=w.cpu, **options)

    @staticmethod
    def linear(layer, x, weight, bias, w: Composed):
        if layer.groups > 1:
            return _grouped_linear(layer, x, weight, bias, w)
        if layer.shared_input or isinstance(x, Members):
            y = each(_linear, x, weight, bias)
            return w.repeat(y) if layer.spread else y
        y = x.reshape(*x.shape[:-1], layer.members, -1) @ weight.T
        return (y if bias is None else y + bias).reshape(*x.shape[:-1], -1)


class _Bank(_Member):
    """Alphas [M, k] over bank rows ``templates[i]``; the model composes the weights
    (Ensemble.mix)."""

    templates = "bank"

    @staticmethod
    def make(layer, cfg: dict, M: int) -> None:
        # static: nnx hashes them
        layer.templates, layer.rows = (tuple(map(tuple, cfg["templates"])), cfg["rows"])
        layer.alpha = nnx.Param(jnp.zeros((M, len(cfg["templates"][0]))))

    @staticmethod
    def weights(layer, w: Composed):
        return w.weights[layer.name]

    @staticmethod
    def reset(layer, draw) -> None:
        """The plan's normal law; orthonormal alphas are set by the model (per k)."""
        alpha_std = layer.init[0]
        if alpha_std is not None:
            layer.alpha.set_value(alpha_std * draw.normal(layer.alpha.shape))


class _Blob(_Bank):
    """Alphas [M, k] over blob windows at ``offsets[i]``."""

    templates = "blob"

    @staticmethod
    def make(layer, cfg: dict, M: int) -> None:
        layer.offsets = tuple(cfg["offsets"])
        layer.alpha = nnx.Param(jnp.zeros((M, cfg["k"])))


class _BatchEnsemble(_Member):
    """One shared weight W [O, I/g, *k], fast weights r [M, in] and s [M, out], a bias [M, out] per
    member. Member m's layer is W_m = W * s_m r_m^T (r read per group of input channels), run in
    one of two formulations with the same numbers, as torch's:

    - composed: W_m formed in the call (``fold``), then the naive ensemble's layer (``_Member``):
      the residuals are x and W_m, as the naive ensemble's; the extra work is M * |W| products.
    - scaled: ((x * r[m]) apply W) * s[m] + b[m]: W is read once, but x, x * r and the layer's
      output are kept for the backward pass, and the extra work is M * B * positions * (in + out).

    The rule (``composes``): compose when M * |W| <= M * B * positions * (in + out), positions
    the input's spatial size (1 for a linear layer); shapes are the call's own."""

    formulation = "auto"  # "compose" or "scale" forces one (tests, benchmarks)
    lead = 0

    @staticmethod
    def make(layer, cfg: dict, M: int) -> None:
        _Member.make(layer, cfg, M, lead=(), bias_lead=(M,))
        layer.r = nnx.Param(jnp.zeros((M, layer.shape[1] * layer.groups)))
        layer.s = nnx.Param(jnp.zeros((M, layer.shape[0])))

    @staticmethod
    def reset(layer, draw) -> None:
        """Fast weights N(1, std^2) or random signs, then the shared weight as a plain layer's."""
        law, std = layer.fast_init
        for t in (layer.r, layer.s):
            t.set_value(
                1.0 + std * draw.normal(t.shape)
                if law == "normal"
                else jnp.sign(draw.uniform(t.shape) + 1e-30)
            )
        _Member.reset(layer, draw)

    @staticmethod
    def composes(layer, x) -> bool:
        """The size rule (see the class): whether composing W_m costs less than scaling x."""
        if _BatchEnsemble.formulation != "auto":
            return _BatchEnsemble.formulation == "compose"
        a = x[0] if isinstance(x, Members) else x  # [B, *spatial, C]
        positions = math.prod(a.shape[:-1])
        return math.prod(layer.shape) <= positions * (layer.r.shape[1] + layer.shape[0])

    @staticmethod
    def fold(layer):
        """W * s r^T for every member, [M, *shape] in the plan's layout: the fast weights' outer
        product [M, O, I/g] first, then one product with W."""
        out, per_group, M = layer.shape[0], layer.shape[1], layer.members
        r = jnp.repeat(layer.r[...].reshape(M, layer.groups, per_group), out // layer.groups, 1)
        outer = layer.s[...].reshape(M, out, 1) * r
        return layer.weight[...] * outer.reshape(*outer.shape, *(1,) * (len(layer.shape) - 2))

    @staticmethod
    def conv(layer, x, weight, bias, w: Composed):
        if _BatchEnsemble.composes(layer, x):
            return _Member.conv(layer, x, layer.layout(_BatchEnsemble.fold(layer), 1), bias, w)
        groups, options = layer.groups, dict(layer.options)
        return _BatchEnsemble.apply(
            layer, x, w, lambda h: _conv(h, weight, groups=groups, cpu=w.cpu, **options)
        )

    @staticmethod
    def linear(layer, x, weight, bias, w: Composed):
        if _BatchEnsemble.composes(layer, x):
            return _Member.linear(layer, x, _BatchEnsemble.fold(layer), bias, w)
        return _BatchEnsemble.apply(layer, x, w, lambda h: _linear(h, weight))

    @staticmethod
    def apply(layer, x, w: Composed, apply):
        """The scaled formulation; ``apply`` is the layer's own op on one batch (channels last,
        so r and s broadcast). Grouped: the members move to the batch axis, so the shared weight
        runs once, as BatchEnsemble's tiled batch does.
        """
        M, r, s = layer.members, layer.r[...], layer.s[...]
        b = layer.bias[...] if layer.has_bias else None
        if not w.grouped:
            xs = [x] * M if layer.shared_input else x
            return Members(
                [apply(v * r[m]) * s[m] + (0 if b is None else b[m]) for m, v in enumerate(xs)]
            )
        x = w.repeat(x) if layer.shared_input else x
        h = jnp.moveaxis(x.reshape(*x.shape[:-1], M, -1) * r, -2, 0)  # [M, B, ..., C]
        y = apply(h.reshape(-1, *h.shape[2:]))
        # [B, ..., M, O]
        y = jnp.moveaxis(y.reshape(M, -1, *y.shape[1:]), 0, -2) * s + (0 if b is None else b)
        return y.reshape(*y.shape[:-2], -1)

    @staticmethod
    def composed(layer, mixed: dict):
        """Per-member weights W * s r^T ([M, *shape]; r read per group), for analysis, as
        torch's."""
        return _BatchEnsemble.fold(layer), layer.bias[...] if layer.has_bias else None


#: a layer's weight source (the plan's ``source``) -> the code that holds and runs its weights
WEIGHTS = {
    "plain": _Plain,
    "member": _Member,
    "bank": _Bank,
    "blob": _Blob,
    "batch_ensemble": _BatchEnsemble,
}


class Weighted(nnx.Module):
    """A conv or linear layer of every member; how it holds and runs its weights is its source's
    (WEIGHTS): "bank" and "blob" (alphas; the model composes the weights), "member" (a weight per
    member), "plain" (one shared weight) or "batch_ensemble" (one shared weight and fast weights).
    Parameters are in the plan's (PyTorch) layout."""

    def __init__(self, config: Config, name: str) -> None:
        cfg, M = config.layers[name], config.members
        self.name, self.source, self.made = name, cfg["source"], _made()
        self.shape = tuple(cfg["shape"])  # [out, in/groups, *kernel]
        self.members, self.has_bias, self.bank = M, cfg.get("bias", False), cfg.get("bank")
        self.shared_input, self.spread = cfg.get("shared_input", False), cfg.get("spread", False)
        self.init = (config.alpha_std, config.classifier_std if name == config.output else None)
        self.groups, self.fast_init = cfg.get("groups", 1), config.fast_init
        self.kind.make(self, cfg, M)

    @property
    def kind(self):
        """The code of this layer's weight source."""
        return WEIGHTS[self.source]

    def layout(self, weight, lead: int = 0):
        """A weight [*lead, *shape] as the layer's call reads it (a conv's kernel layout)."""
        return weight

    def plan_layout(self, weight, lead: int = 0):
        """The inverse of ``layout``: the plan's (PyTorch) layout."""
        return weight

    def weights(self, w: Composed):
        """(weight in the call's layout ([M, ...] unless plain), bias or None)."""
        return self.kind.weights(self, w)

    def plan_tensors(self, path: str) -> dict[str, str]:
        return _layer_tensors(self.source, self.name, path, self.has_bias)

    def reset_parameters(self, draw) -> None:
        """Plain and member layers PyTorch's usual init (kaiming normal for convs, the plan's rule
        for the output layer); alphas are set by the model (orthonormal per k, or the plan's
        normal law).
        """
        self.kind.reset(self, draw)

    def mix_blob(self, blob):
        """(weight [M, ...] in the call's layout, bias [M, out] or None): member i's templates [k,
        size] are the blob's window at offsets[i], mixed by its alphas."""
        offsets, alpha = self.offsets, self.alpha[...]
        k, size = alpha.shape[1], math.prod(self.shape) + (self.shape[0] if self.has_bias else 0)
        windows = [window(blob, offset, k * size).reshape(k, size) for offset in offsets]
        if len(set(offsets)) == 1:
            flat = alpha @ windows[0]
        else:
            flat = jnp.stack([a @ w for a, w in zip(alpha, windows)])
        weight_size = math.prod(self.shape)
        weight = self.layout(flat[:, :weight_size].reshape(self.members, *self.shape), 1)
        return weight, (flat[:, weight_size:] if self.has_bias else None)


class Conv(Weighted):
    """A convolution of every member (see Weighted)."""

    def __init__(self, config: Config, name: str) -> None:
        super().__init__(config, name)
        cfg = config.layers[name]
        self.options = tuple(
            (key, cfg.get(key, default))
            for key, default in (("stride", 1), ("padding", 0), ("dilation", 1))
        )

    def layout(self, weight, lead: int = 0):
        return kernel_layout(weight, lead)

    def plan_layout(self, weight, lead: int = 0):
        return torch_layout(weight, lead)

    def __call__(self, x, w: Composed):
        # weight in the kernel layout [(M,) *k, I/groups, O]
        return self.kind.conv(self, x, *self.weights(w), w)


class Linear(Weighted):
    """A linear layer of every member (see Weighted); inputs [B, M*I], or shared [B, I]; on a token
    sequence [B, N, M*I] each token alike (every axis before the channels is a batch axis). With
    ``groups`` (Packed-Ensembles' grouped layers) block-diagonal: group j maps its slice of the
    inputs."""

    def __call__(self, x, w: Composed):
        return self.kind.linear(self, x, *self.weights(w), w)


class BatchNorm(nnx.Module):
    """Each member's own BatchNorm (weight, bias, running statistics [M, C]; PyTorch's semantics):
    per member in the loop layout, one normalisation over the members' M*C channels when grouped.
    In training the running statistics are updated in place (nnx.BatchStat)."""

    def __init__(self, config: Config, name: str) -> None:
        cfg, channels = config.layers.get(name, {}), config.batch_norms[name]
        self.name, self.shared_input, self.made = name, cfg.get("shared_input", False), _made()
        self.momentum, self.eps = cfg.get("momentum", 0.1), cfg.get("eps", 1e-5)
        # one network: one BatchNorm
        shape = (channels,) if config.single_path else (config.members, channels)
        self.weight = nnx.Param(jnp.ones(shape))
        self.bias = nnx.Param(jnp.zeros(shape))
        self.running_mean = nnx.BatchStat(jnp.zeros(shape))
        self.running_var = nnx.BatchStat(jnp.ones(shape))

    def plan_tensors(self, path: str) -> dict[str, str]:
        return _layer_tensors("bn", self.name, path, True)

    def reset_parameters(self, draw) -> None:
        for t, fill in (
            (self.weight, 1),
            (self.bias, 0),
            (self.running_mean, 0),
            (self.running_var, 1),
        ):
            t.set_value(jnp.full(t.shape, fill, draw.dtype))

    def __call__(self, x, w: Composed):
        x = w.repeat(x) if self.shared_input else x
        tensors = [t[...] for t in (self.running_mean, self.running_var, self.weight, self.bias)]
        options = (w.train, self.momentum, self.eps)
        if isinstance(x, Members):
            outs = [_batch_norm(v, *[t[m] for t in tensors], *options) for m, v in enumerate(x)]
            y, stats = (
                Members([o[0] for o in outs]),
                ([jnp.stack(s) for s in zip(*[o[1] for o in outs])] if w.train else None),
            )
        else:
            y, stats = _batch_norm(x, *[t.reshape(-1) for t in tensors], *options)
            stats = [s.reshape(tensors[0].shape) for s in stats] if w.train else None
        if w.train:
            self.running_mean[...], self.running_var[...] = stats
        return y


def _layer_norm(x, weight, bias, blocks: int, eps: float):
    """PyTorch's layer_norm over each of ``blocks`` equal consecutive blocks of the channel (last)
    axis (biased variance), then the affine of all the channels: blocks are the members side by
    side (grouped) or Packed-Ensembles' groups. Statistics in float32 at least, as torch's autocast
    runs layer_norm, so a bf16/fp16 forward keeps them accurate."""
    h = x.reshape(*x.shape[:-1], blocks, -1).astype(jnp.promote_types(x.dtype, jnp.float32))
    mu = h.mean(-1, keepdims=True)
    h = (h - mu) * jax.lax.rsqrt(jnp.square(h - mu).mean(-1, keepdims=True) + eps)
    return (h.reshape(x.shape) * weight.reshape(-1) + bias.reshape(-1)).astype(x.dtype)


class _PerMember(nnx.Module):
    """A layer holding each member's own tensors ([M, *shape]; one network: [*shape]) and no
    weights to compose: LayerNorm and the token embeddings. ``kind`` names its LAYER_TENSORS row;
    ``shared_input``: the input is the same for every member, repeated before the layer runs."""

    kind = ""

    def __init__(self, config: Config, name: str) -> None:
        cfg = config.layers[name]
        self.name, self.channels, self.made = name, cfg["channels"], _made()
        self.shared_input, self.single_path = cfg.get("shared_input", False), config.single_path
        self.members = config.members

    def param(self, *shape):
        """A parameter of one member's ``shape``, per member unless the network is one."""
        return nnx.Param(jnp.zeros(shape if self.single_path else (self.members, *shape)))

    def plan_tensors(self, path: str) -> dict[str, str]:
        return _layer_tensors(self.kind, self.name, path, True)

    def members_of(self, x, w: Composed):
        """(the input, per member if shared, and the loop layout's member index or None)."""
        x = w.repeat(x) if self.shared_input else x
        return x, (range(len(x)) if isinstance(x, Members) else None)


class LayerNorm(_PerMember):
    """Each member's LayerNorm over the channels at each position (weight, bias [M, C]; PyTorch's
    semantics); grouped, one normalisation of every member's block of channels. With ``groups``
    (Packed-Ensembles' one network) each group's channels are normalised alone."""

    kind = "layernorm"

    def __init__(self, config: Config, name: str) -> None:
        super().__init__(config, name)
        cfg = config.layers[name]
        self.eps, self.groups = cfg.get("eps", 1e-5), cfg.get("groups", 1)
        self.weight, self.bias = self.param(self.channels), self.param(self.channels)

    def reset_parameters(self, draw) -> None:
        self.weight.set_value(jnp.ones(self.weight.shape, draw.dtype))
        self.bias.set_value(jnp.zeros(self.bias.shape, draw.dtype))

    def __call__(self, x, w: Composed):
        x, loop = self.members_of(x, w)
        weight, bias = self.weight[...], self.bias[...]
        if loop is not None:
            return Members([_layer_norm(x[m], weight[m], bias[m], 1, self.eps) for m in loop])
        blocks = self.groups if self.single_path else self.members
        return _layer_norm(x, weight, bias, blocks, self.eps)


class ClassToken(_PerMember):
    """Each member's learned token [M, D] put before its sequence: [B, N, D] -> [B, N + 1, D].
    Initialised N(0, 1e-6^2), as timm's ViT."""

    kind = "cls_token"

    def __init__(self, config: Config, name: str) -> None:
        super().__init__(config, name)
        self.token = self.param(self.channels)

    def reset_parameters(self, draw) -> None:
        self.token.set_value(1e-6 * draw.normal(self.token.shape))

    @staticmethod
    def _put(x, token):
        return jnp.concatenate([jnp.broadcast_to(token, (x.shape[0], 1, x.shape[-1])), x], 1)

    def __call__(self, x, w: Composed):
        x, loop = self.members_of(x, w)
        token = self.token[...]
        if loop is not None:
            return Members([self._put(x[m], token[m]) for m in loop])
        return self._put(x, token.reshape(-1))  # grouped: the members' tokens side by side


class PosEmbed(_PerMember):
    """Each member's learned position embedding [M, N, D] (token-major, the plan's layout) added
    to its sequence. Initialised N(0, 0.02^2), as timm's ViT (its truncation at +-2 lies 100
    standard deviations out)."""

    kind = "pos_embed"

    def __init__(self, config: Config, name: str) -> None:
        super().__init__(config, name)
        self.pos = self.param(config.layers[name]["tokens"], self.channels)

    def reset_parameters(self, draw) -> None:
        self.pos.set_value(0.02 * draw.normal(self.pos.shape))

    def __call__(self, x, w: Composed):
        x, loop = self.members_of(x, w)
        pos = self.pos[...]
        if loop is not None:
            return Members([x[m] + pos[m] for m in loop])
        if not self.single_path:  # grouped: [M, N, D] -> [N, M*D], the members side by side
            pos = jnp.moveaxis(pos, 0, 1).reshape(pos.shape[1], -1)
        return x + pos


#: every kind of layer the model walks for parameters, initialisation and plan tensor names
LAYER_TYPES = (Weighted, BatchNorm, _PerMember)


class _Draws:
    """Every random draw of the initialisation is a slice of one uniform vector u on (-1, 1), the
    normal ones of z = sqrt(2) erfinv(u) (XLA compiles each random call on its own, slowly on CPU).
    Without a key it only counts (a first pass, to size u)."""

    def __init__(self, key, sizes: tuple[int, int], dtype) -> None:
        self.key, self.dtype, self.pos = key, dtype, [0, 0]
        if key is not None:
            u = jax.random.uniform(key, (sizes[0] + sizes[1],), dtype, -1.0, 1.0)
            # uniform's interval includes -1 (one draw in 2^23), where erfinv is -inf: a model of
            # tens of millions of weights then starts with -inf weights and trains to NaN. Clip to
            # the open interval (|z| <= 5.4).
            tiny = jnp.finfo(dtype).epsneg
            inner = jnp.clip(u[sizes[0] :], -1.0 + tiny, 1.0 - tiny)
            self.vecs = (u[: sizes[0]], math.sqrt(2) * jax.scipy.special.erfinv(inner))

    def _take(self, i: int, shape):
        n = math.prod(shape)
        start, self.pos[i] = self.pos[i], self.pos[i] + n
        return (
            jnp.zeros(shape, self.dtype)
            if self.key is None
            else self.vecs[i][start : start + n].reshape(shape)
        )

    def uniform(self, shape):
        return self._take(0, shape)

    def normal(self, shape):
        return self._take(1, shape)


def _coefficients(layers: list, rows: int, dtype):
    """The bank layers' alphas spread over the bank's rows, [layers * M, rows]: row j*M + i holds
    member i of layer j, alpha[i, l] at column templates[i][l]. Alphas that already are the rows'
    coefficients (every member reads the bank's rows in order) are used as they are; otherwise one
    gather through a static index (a one-hot product where a member reads a row twice)."""
    alphas = [layer.alpha[...] for layer in layers]
    if all(t == tuple(range(rows)) for layer in layers for t in layer.templates):
        return alphas[0] if len(alphas) == 1 else jnp.concatenate(alphas)
    index, n = [], 0
    for layer in layers:
        for member in layer.templates:
            if len(set(member)) < len(member):
                return jnp.concatenate(
                    [
                        jnp.einsum(
                            "mk,mkt->mt",
                            m.alpha[...],
                            jax.nn.one_hot(jnp.array(m.templates), rows, dtype=dtype),
                        )
                        for m in layers
                    ]
                )
            row = [None] * rows
            for l, t in enumerate(member):
                row[t] = n + l
            index.append(row)
            n += len(member)
    flat = jnp.concatenate([a.reshape(-1) for a in alphas] + [jnp.zeros(1, alphas[0].dtype)])
    # n: the trailing zero
    return flat[jnp.array([[n if i is None else i for i in row] for row in index])]


class Ensemble(nnx.Module):
    """What every generated ensemble shares: templates, composition, initialisation, tensor
    names."""

    def __init__(self, config: Config, layout: str, dtype, platform: str) -> None:
        if layout not in ("auto", "grouped", "loop"):
            raise ValueError(f"layout must be auto, grouped or loop, not {layout!r}")
        self.layout, self.platform, self.dtype = layout, platform, jnp.dtype(dtype)
        self.members, self.n_classes, self.alpha_std = (
            config.members,
            config.classes,
            config.alpha_std,
        )
        self.input_members = config.input_members
        self.bank_table = tuple(
            (name, key, tuple(shape), tuple(stds))
            for name, (key, shape, stds) in config.banks.items()
        )
        self.blob_init = config.blob  # (size, std) or None
        self.banks = nnx.Dict(
            {key: nnx.Param(jnp.zeros(shape)) for _, key, shape, _ in self.bank_table}
        )
        if config.blob:
            self.blob = nnx.Param(jnp.zeros(config.blob[0]))

    def layers(self) -> list[tuple[str, nnx.Module]]:
        """(path, layer) of every Conv, Linear, BatchNorm, LayerNorm and token embedding, in the
        order they were made (the plan's)."""

        def walk(node, path: str):
            items = enumerate(node) if isinstance(node, nnx.List) else vars(node).items()
            for key, child in items:
                if isinstance(child, LAYER_TYPES):
                    yield f"{path}{key}", child
                elif isinstance(child, (nnx.Module, nnx.List)) and not isinstance(child, nnx.Dict):
                    yield from walk(child, f"{path}{key}.")

        return sorted(walk(self, ""), key=lambda item: item[1].made)

    def reset_parameters(self, key) -> None:
        """Templates N(0, v) (weight and bias parts with their own laws), orthonormal alphas per k
        (or the plan's normal law), then every layer; see docs/execution.md."""
        count = _Draws(None, (0, 0), self.dtype)
        self._draw_all(count)
        self._draw_all(_Draws(key, tuple(count.pos), self.dtype))

    def _draw_all(self, draw) -> None:
        for _, key, (rows, size), (weight_size, weight_std, bias_std) in self.bank_table:
            weight = weight_std * draw.normal((rows, weight_size))
            bias = bias_std * draw.normal((rows, size - weight_size))
            self.banks[key].set_value(jnp.concatenate([weight, bias], axis=1))
        if self.blob_init:
            self.blob.set_value(self.blob_init[1] * draw.normal((self.blob_init[0],)))
        alphas: dict[int, list] = {}
        for _, layer in self.layers():
            layer.reset_parameters(draw)
            if isinstance(layer, Weighted) and layer.kind.templates and self.alpha_std is None:
                alphas.setdefault(layer.alpha.shape[1], []).append(layer)
        for k, layers in sorted(alphas.items()):
            rows = orthonormal_rows(
                draw.normal((len(layers), -(-self.members // k), k, k)), self.members
            )
            for j, layer in enumerate(layers):
                layer.alpha.set_value(rows[j])

    def mix(self) -> dict:
        """Every composed layer's (weight [M, ...] in the layer's call layout, bias [M, out] or
        None), once per call. Per bank: its templates permuted once into the layers' layout (a
        conv's kernel layout [*k, I, O]), the layers' alphas spread over the bank's rows, then
        one product, whose rows are every layer's member weights, ready to use."""
        weights, banked = {}, {}
        for _, layer in self.layers():
            if isinstance(layer, Weighted) and layer.kind.templates == "bank":
                banked.setdefault(layer.bank, []).append(layer)
            elif isinstance(layer, Weighted) and layer.kind.templates == "blob":
                weights[layer.name] = layer.mix_blob(self.blob[...])
        M = self.members
        for key, layers in banked.items():
            first, bank = layers[0], self.banks[key][...]  # a bank's layers share one shape
            rows, size = bank.shape[0], math.prod(first.shape)
            templates = first.layout(bank[:, :size].reshape(rows, *first.shape), 1)
            coeffs = _coefficients(layers, rows, self.dtype)
            composed = (coeffs @ templates.reshape(rows, size)).reshape(
                len(layers), M, *templates.shape[1:]
            )
            biases = coeffs @ bank[:, size:] if first.has_bias else None
            for j, layer in enumerate(layers):
                weights[layer.name] = (
                    composed[j],
                    (None if biases is None else biases[j * M : (j + 1) * M]),
                )
        return weights

    def composed(self, train: bool, dropout_key) -> Composed:
        cpu = (jax.default_backend() if self.platform == "auto" else self.platform) == "cpu"
        grouped = self.layout == "grouped" or (self.layout == "auto" and not cpu)
        split = self.layout == "loop"
        return Composed(self.mix(), self.members, grouped, cpu, train, dropout_key, split)

    def stack_inputs(self, x):
        """MIMO: the members' inputs side by side on the channel axis (channels-first,
        member-major). x [B, M, *input] gives each member its own (training); x [B, *input] every
        member the same.
        """
        if x.ndim == len(self.input_shape) + 2:
            if x.shape[1] != self.input_members:
                raise ValueError(
                    f"MIMO takes one input per member, [B, {self.input_members}, *input], "
                    f"not {list(x.shape)}"
                )
            return x.reshape(x.shape[0], -1, *x.shape[3:])
        return jnp.concatenate([x] * self.input_members, axis=1)

    def logits(self, x):
        """The last layer's output as member logits [B, members, classes]."""
        return (
            jnp.stack(x, axis=1)
            if isinstance(x, Members)
            else x.reshape(x.shape[0], self.members, self.n_classes)
        )

    def compose(self) -> dict:
        """Every layer's "<layer>.weight"/".bias" ([M, ...], or shared for plain layers) in the
        plan's (PyTorch) layout, for analysis."""
        mixed, out = self.mix(), {}
        for _, m in self.layers():
            if isinstance(m, Weighted):
                wb = m.kind.composed(m, mixed)
                out |= {
                    f"{m.name}.{part}": t
                    for part, t in zip(("weight", "bias"), wb)
                    if t is not None
                }
        return out

    @property
    def plan_tensors(self) -> dict[str, str]:
        """Plan tensor name (the checkpoint format, shared with the torch backend) -> module
        path."""
        names = {name: f"banks.{key}" for name, key, _, _ in self.bank_table} | (
            {"blob": "blob"} if self.blob_init else {}
        )
        for path, layer in self.layers():
            names |= layer.plan_tensors(path)
        return names
