"""Lower a Plan to the Python source of a ``flax.nnx`` Module.

The output is a self-contained file (it imports only ``math``, ``jax`` and
``flax``) that a user can copy into their own project. It computes exactly
what the torch backend's module computes, so a checkpoint written by either
backend gives the same logits in the other. The framework differences that
would silently change results are handled here, once:

- Layout: parameters are stored in the plan's (PyTorch) layout, so checkpoint
  tensors need no conversion; activations run channels-last (NHWC / NWC,
  XLA's native conv layout) and conv weights are transposed to ``HWIO`` when
  used. ``flatten`` restores channels-first order before flattening, so a
  linear layer after it sees PyTorch's feature order.
- BatchNorm: written out, not ``nnx.BatchNorm``: PyTorch's momentum convention
  (``new = (1 - m) * old + m * batch``; flax's ``momentum`` is ``1 - m``), the
  plan's epsilon, biased variance for normalising and unbiased variance for the
  running estimate (``nnx.BatchNorm`` keeps the biased one).
- Padding is explicit ``(p, p)`` per side; average pooling counts padded zeros
  (PyTorch's ``count_include_pad``); gelu is the exact (erf) form.

The backend-neutral half (names, checks, header, composition, statement order)
is ``backends/emit.py``; this module holds the flax idioms and the table ``LOWER``
from op kind to lowering function. The same Plan gives byte-identical source.
"""

from __future__ import annotations

import math
from typing import ClassVar

from mixc.backends.emit import (
    BankMix, CodegenError, Emitter, LINE_WIDTH, Lowered, Site, Val, add_terms, attr_name, blob_var, methods,
    checked, class_name, constants, conv_kwargs, fan_in, module_name, tup, weight_var,
)
from mixc.backends.pysource import literal as _q
from mixc.compiler.plan import Plan, Slot

__all__ = ["CodegenError", "attr_name", "class_name", "emit_source", "module_name"]


# ---------------------------------------------------------------------------
# Helpers every generated file carries (plain text: they do not depend on the plan)

_HELPERS = '''
def _pairs(v, dim: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dim


def _conv(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, cpu=False):
    """PyTorch's conv on channels-last x [B, *spatial, C]; w in PyTorch layout [O, I/groups, *k].

    ``cpu``: take the kernel gradient from matmuls (_conv_cpu), several times faster there.
    """
    dim = w.ndim - 2
    kernel = jnp.moveaxis(w, (0, 1), (-1, -2))  # [*kernel, I/groups, O]
    args = (_pairs(stride, dim), _pairs(padding, dim), _pairs(dilation, dim), groups)
    y = _conv_cpu(x, kernel, *args) if cpu and groups == 1 else _xla_conv(x, kernel, *args)
    return y if b is None else y + b


def _xla_conv(x, kernel, stride, padding, dilation, groups):
    numbers = ("NWC", "WIO", "NWC") if x.ndim == 3 else ("NHWC", "HWIO", "NHWC")
    pads = [(p, p) for p in padding]
    return jax.lax.conv_general_dilated(
        x, kernel, stride, pads, rhs_dilation=dilation, dimension_numbers=numbers,
        feature_group_count=groups,
    )


def _conv_cpu_fwd(x, kernel, stride, padding, dilation, groups):
    return _xla_conv(x, kernel, stride, padding, dilation, groups), (x, kernel)


def _conv_cpu_bwd(stride, padding, dilation, groups, res, dy):
    """XLA's input gradient; the kernel gradient as one matmul per kernel tap, sum over (batch,
    positions) of x's shifted window times dy (XLA's own runs at a few GFLOP/s on CPU)."""
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


def _linear(x, w, b=None):
    """x [..., I] @ w [O, I].T (+ b)."""
    y = x @ w.T
    return y if b is None else y + b


def _linear_grouped(x, w, b, members: int):
    """Members side by side: x [B, M*I], w [M, O, I] (shared: [O, I]), b or None -> [B, M*O]."""
    x = x.reshape(x.shape[0], members, -1)
    y = jnp.einsum("bmi,moi->bmo", x, w) if w.ndim == 3 else x @ w.T
    if b is not None:
        y = y + b
    return y.reshape(x.shape[0], -1)


def _batch_norm(x, mean, var, weight, bias, train: bool, momentum: float, eps: float):
    """PyTorch's batch_norm over the last (channel) axis; returns (y, (new_mean, new_var)).

    Training normalises with the batch's biased variance and moves the running
    variance towards the unbiased one, new = (1 - momentum) * old + momentum * batch
    (flax's nnx.BatchNorm would need momentum 1 - m and keeps the biased variance).
    y = x * scale + shift, folded per channel as PyTorch's CPU kernel does: on CPU,
    XLA runs this form's forward and backward 3-4x faster than (x - mean) * ... .
    """
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


def _pool(x, op: str, kernel, stride, padding=0):
    """Max or average pooling of channels-last x; an average counts padded zeros, as in PyTorch."""
    dim = x.ndim - 2
    k, s, p = _pairs(kernel, dim), _pairs(stride, dim), _pairs(padding, dim)
    window, strides = (1, *k, 1), (1, *s, 1)
    pads = ((0, 0), *((q, q) for q in p), (0, 0))
    if op == "max":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, pads)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads) / math.prod(k)


def _flatten(x):
    """PyTorch's flatten(1): channels-first order, so the next linear sees the same features."""
    if x.ndim > 2:
        x = jnp.moveaxis(x, -1, 1)
    return x.reshape(x.shape[0], -1)


def _dropout(x, p: float, train: bool, key, *salt: int):
    """Inverted dropout; each call site folds its own ``salt`` into ``key``."""
    if not train or p == 0:
        return x
    if key is None:
        raise ValueError("train=True with dropout needs dropout_key=jax.random.key(...)")
    for s in salt:
        key = jax.random.fold_in(key, s)
    keep = jax.random.bernoulli(key, 1.0 - p, x.shape)
    return jnp.where(keep, x / (1.0 - p), 0.0).astype(x.dtype)


def _spread(alpha, index, n: int):
    """Mixing weights [M, n] over n bank rows: member i's alphas placed at its rows ``index[i]``."""
    return jnp.einsum("mk,mkn->mn", alpha, jax.nn.one_hot(jnp.array(index), n, dtype=alpha.dtype))


def _orthonormal_rows(g, members: int):
    """Gaussians g [layers, blocks, k, k] -> [layers, members, k]: per layer, unit-norm rows,
    orthogonal within each block of k members.

    Haar-random: Gram-Schmidt on the columns of each Gaussian block (the Q of its QR with a
    positive diagonal, without a LAPACK call, which is slow to compile on CPU); a last block
    of n < k members takes the first n columns.
    """
    layers, blocks, k, _ = g.shape
    cols = []
    for j in range(k):
        v = g[..., j]
        for q in cols:
            v = v - (q * v).sum(-1, keepdims=True) * q
        cols.append(v * jax.lax.rsqrt((v * v).sum(-1, keepdims=True)))
    return jnp.stack(cols, axis=-2).reshape(layers, blocks * k, k)[:, :members]
'''.strip("\n")


# ---------------------------------------------------------------------------
# The lowering table: one function per op kind


def _bias(s: Site, member: bool = False) -> str:
    return (s.w("bias") + ("[m]" if member else "")) if s.op.bias else "None"


def _conv(e: "FlaxEmitter", s: Site) -> Lowered:
    op, M, a, W = s.op, e.M, s.a, s.w("weight")

    def args(groups: int) -> list[str]:
        return [*conv_kwargs(op, groups), "cpu=cpu"]

    if op.source == "plain":
        if s.grouped and not s.ins[0].shared:
            ones = ", ".join(["1"] * (len(op.weight_shape) - 1))
            bias = f"jnp.tile({s.w('bias')}, {M})" if op.bias else "None"
            return Lowered("_conv", [a, f"jnp.tile({W}, ({M}, {ones}))", bias, *args(M * op.groups)])
        return Lowered("_conv", [a, W, _bias(s), *args(op.groups)])
    if not s.grouped:
        return Lowered("_conv", [a, f"{W}[m]", _bias(s, True), *args(op.groups)])
    stacked_shape = ", ".join(map(str, [M * op.out_channels, *op.weight_shape[1:]]))
    ws, bs = f"{W}.reshape({stacked_shape})", (f"{s.w('bias')}.reshape(-1)" if op.bias else "None")
    if s.ins[0].shared and op.groups == 1:  # one conv with the members' filters stacked
        return Lowered("_conv", [a, ws, bs, *args(1)])
    src = s.rep(s.ins[0]) if s.ins[0].shared else a
    return Lowered("_conv", [src, ws, bs, *args(M * op.groups)])


def _linear(e: "FlaxEmitter", s: Site) -> Lowered:
    op, M, a, W = s.op, e.M, s.a, s.w("weight")
    if op.source == "plain":
        if s.grouped and not s.ins[0].shared:
            return Lowered("_linear_grouped", [a, W, _bias(s), str(M)])
        return Lowered("_linear", [a, W, _bias(s)])
    if not s.grouped:
        return Lowered("_linear", [a, f"{W}[m]", _bias(s, True)])
    if s.ins[0].shared:
        shape = f"{M * op.out_features}, {op.in_features}"
        return Lowered("_linear", [a, f"{W}.reshape({shape})", f"{s.w('bias')}.reshape(-1)" if op.bias else "None"])
    return Lowered("_linear_grouped", [a, W, _bias(s), str(M)])


def _bn(e: "FlaxEmitter", s: Site) -> Lowered:
    name = _q(s.op.name)
    if s.grouped:
        src = s.rep(s.ins[0]) if s.ins[0].shared else s.a
        params, target = f"*self.bn_tensors({name})", f"stats[{name}]"
    else:
        src, params, target = s.a, f"*self.bn_tensors({name}, m)", f"stats[{name}][m]"
    return Lowered("_batch_norm", [src, params, "train", repr(s.op.momentum), repr(s.op.eps)], extra=target)


def _act(e: "FlaxEmitter", s: Site) -> Lowered:
    fn = s.op.fn
    if fn == "tanh":
        return Lowered("jnp.tanh", [s.a])
    if fn == "leaky_relu":
        return Lowered("jax.nn.leaky_relu", [s.a, repr(s.op.slope)])
    if fn == "gelu":
        return Lowered("jax.nn.gelu", [s.a, "approximate=False"])
    return Lowered(f"jax.nn.{fn}", [s.a])


def _pool(e: "FlaxEmitter", s: Site) -> Lowered:
    op = s.op
    args = [s.a, _q(op.op), tup(op.kernel), tup(op.stride)]
    if any(p != 0 for p in op.padding):
        args.append(tup(op.padding))
    return Lowered("_pool", args)


def _global_pool(e: "FlaxEmitter", s: Site) -> Lowered:
    axes = tuple(range(1, len(s.op.in_shape)))
    fn = "mean" if s.op.op == "avg" else "max"
    return Lowered("", [f"{s.a}.{fn}(axis={axes if len(axes) > 1 else axes[0]})"])


def _flatten(e: "FlaxEmitter", s: Site) -> Lowered:
    return Lowered("_flatten", [s.a])


def _dropout(e: "FlaxEmitter", s: Site) -> Lowered:
    if s.op.p == 0:
        return Lowered("", [s.a])
    salt = [str(s.index)] + ([] if s.grouped else ["m"])
    return Lowered("_dropout", [s.a, repr(s.op.p), "train", "dropout_key", *salt])


def _add(e: "FlaxEmitter", s: Site) -> Lowered:
    return Lowered("", [add_terms(s)])


# ---------------------------------------------------------------------------
# The emitter


class FlaxEmitter(Emitter):
    LOWER: ClassVar = dict(  # op kind -> lowering function
        conv=_conv, linear=_linear, bn=_bn, act=_act, pool=_pool,
        global_pool=_global_pool, flatten=_flatten, dropout=_dropout, add=_add,
    )
    RESERVED: ClassVar = Emitter.RESERVED | {"jax", "jnp", "nnx", "stats", "train", "dropout_key", "logits", "cpu"}
    BACKEND: ClassVar = "flax"
    STACK: ClassVar = "jnp.stack"
    CONCAT: ClassVar = "jnp.concatenate([{}])"
    TILE: ClassVar = "jnp.tile(blob, {})"

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        self.bns = [op for op in plan.ops if op.kind == "bn"]
        for op in plan.ops:
            if op.kind in ("conv", "pool") and op.dim not in (1, 2):
                raise CodegenError(f"{op.kind} {op.name!r} is {op.dim}-D; only 1-D and 2-D are supported")

    IMPORTS: ClassVar = ["import math", "", "import jax", "import jax.numpy as jnp", "from flax import nnx"]

    def helpers(self) -> list[str]:
        return _HELPERS.splitlines()

    def repeat(self, var: str) -> str:
        return f"jnp.concatenate([{var}] * {self.M}, axis=-1)"

    def read(self, attr: str) -> str:
        return attr + "[...]"

    def bank_rows(self, bank: str, mix: BankMix, slot: Slot) -> str:
        if mix.rows is not None:
            return f"{bank}[jnp.array({mix.rows})]"
        return f"{bank}[...]" if mix.whole else f"{bank}[{mix.lo}:{mix.hi}]"

    def bank_coeffs(self, alpha: str, mix: BankMix, slot: Slot) -> str:
        if mix.selector is None:
            return alpha
        return f"_spread({alpha}, {mix.selector}, {mix.n})"

    # -- the file ----------------------------------------------------------

    def docstring(self) -> list[str]:
        p = self.plan
        doc = f'''"""MixtureEnsemble {_q(p.name)} as a flax.nnx Module: {p.members} members composed from shared templates.

Every banked layer's weights for all members are composed once per call:
member i's weight is sum_l alpha[i, l] * T[l], where the templates T are rows
of a bank (``bank.<group>``, shape [templates, size]) or windows of the flat
``blob``. A template is the layer's weight flattened in PyTorch order ([out,
in/groups, *kernel]) followed by its bias. ``plain`` layers are one weight
shared by all members; ``member`` layers hold an unfactorised weight per
member; every member has its own BatchNorm. Every parameter is stored in the
plan's (PyTorch) layout under the plan's tensor names (PLAN_TENSORS), so the
torch backend's checkpoints load unchanged.

model(x, train=False, dropout_key=None) takes x [B, *INPUT_SHAPE] channels-first
(like the data and the torch backend) and returns member logits
[B, MEMBERS, CLASSES]; the ensemble prediction is the mean over members of
their softmax. Inside, activations are channels-last. With train=True,
BatchNorm uses batch statistics and updates its running statistics in place
(nnx.BatchStat; PyTorch's momentum convention). Two layouts compute the same numbers:
  "grouped"  members side by side on the channel axis ([B, ..., M*C]): a conv
             is one conv with feature_group_count = M, a BatchNorm one
             normalisation over M*C channels;
  "loop"     each member's ops run in turn with its own composed weights.
  "auto"     loop on CPU (XLA's grouped convolutions are a slow path there),
             grouped on accelerators.
Ops whose input is the same for every member (a plain stem) run once.

Initialisation (reset_parameters), the torch backend's rules: alphas are unit
rows, orthonormal across members in blocks of k; templates N(0, v) with v the
variance of the plain layer's default init (conv 2 / fan_in, linear
1 / (3 fan_in), biases 1 / (3 fan_in)); the blob the read-weighted mean of its
layers' variances; plain and member convs kaiming normal, linears
U(+-1/sqrt(fan_in)); BatchNorm weight 1, bias 0, running mean 0, variance 1.
These are the defaults; the plan's init rules may instead draw alphas N(0, std^2)
and the plain output layer N(0, std^2) with bias 0.
"""'''
        return [doc, ""]

    def constants(self) -> list[str]:
        lines = constants(self.plan)
        lines += ["", "# BatchNorm op -> the attributes of its running mean and variance, weight and bias.", "BN_TENSORS = {"]
        for op in self.bns:
            names = [_q(attr_name(self.tensor(r, op.name).name)) for r in ("bn_mean", "bn_var", "bn_weight", "bn_bias")]
            lines += [f"    {_q(op.name)}: ("] + [f"        {n}," for n in names] + ["    ),"]
        lines.append("}")
        return lines

    # -- the class -----------------------------------------------------------

    def klass(self) -> list[str]:
        p = self.plan
        lines = self.class_head("nnx.Module") + [
            "    def __init__(",
            "        self,",
            "        rngs: nnx.Rngs | None = None,",
            '        layout: str = "auto",',
            "        dtype=jnp.float32,",
            '        platform: str = "auto",',
            "    ) -> None:",
            '        """``platform``: the jax platform the model runs on ("cpu", "gpu"...; "auto": jax\'s default',
            '        backend when called); it picks the "auto" layout and the CPU convolution gradient."""',
            "        if layout not in LAYOUTS:",
            '            raise ValueError(f"layout must be auto, grouped or loop, not {layout!r}")',
            "        self.layout = layout",
            "        self.platform = platform",
            "        self.dtype = jnp.dtype(dtype)",
        ]
        lines += self.declarations()
        lines += [
            "        self.reset_parameters(rngs.params() if rngs is not None else jax.random.key(0))",
            "",
        ]
        parts = [self.reset_parameters(), self.compose(), self.call(), self.bn_tensors(), self.write_stats()]
        return lines + methods(*parts, self.forward_grouped(), self.forward_loop())

    def declarations(self) -> list[str]:
        lines = []
        for t in self.plan.tensors:
            shape = "(" + ", ".join(map(str, t.shape)) + ("," if len(t.shape) == 1 else "") + ")"
            kind = "nnx.Param" if t.trainable else "nnx.BatchStat"
            fill = "jnp.ones" if t.role in ("bn_var", "bn_weight") else "jnp.zeros"
            lines.append(f"        self.{attr_name(t.name)} = {kind}({fill}({shape}, dtype))")
        return lines

    def reset_parameters(self) -> list[str]:
        """All random draws come from one normal and one uniform vector, sliced (and one batched QR
        per distinct k): XLA compiles every random call separately, and slowly, on CPU."""
        p = self.plan
        ind = "        "
        body: list[str] = []
        pos = {"z": 0, "u": 0}

        def draw(vec: str, shape: list[int]) -> str:
            n = math.prod(shape)
            start = pos[vec]
            pos[vec] += n
            return f"{vec}[{start}:{start + n}].reshape({', '.join(map(str, shape))})"

        def assign(target: str, expr: str) -> None:
            line = f"{ind}{target}[...] = {expr}"
            if len(line) <= LINE_WIDTH:
                body.append(line)
            else:
                body.extend([f"{ind}{target}[...] = (", f"{ind}    {expr}", f"{ind})"])

        for g in p.groups:
            op = self.ops[g.layers[0]]
            bank = self.attr("bank", f"bank.{g.name}")
            wsize = math.prod(g.weight_shape)
            fan = fan_in(op)
            if g.bias:  # the weight part and the bias part of each template have their own laws
                body += [f"{ind}{bank}[...] = jnp.concatenate(", f"{ind}    ["]
                body.append(f"{ind}        math.sqrt({weight_var(op)}) * {draw('z', [g.templates, wsize])},")
                body.append(f"{ind}        math.sqrt(1 / (3 * {fan})) * {draw('z', [g.templates, g.size - wsize])},")
                body += [f"{ind}    ],", f"{ind}    axis=1,", f"{ind})"]
            else:
                assign(bank, f"math.sqrt({weight_var(op)}) * {draw('z', [g.templates, g.size])}")
        if p.blob is not None:
            assign(f"self.{attr_name('blob')}", f"math.sqrt({blob_var(self.plan)!r}) * {draw('z', [p.blob.size])}")
        alphas: dict[int, list[str]] = {}
        for op in p.ops:
            if op.kind in ("conv", "linear") and op.source in ("plain", "member"):
                t = self.tensor(f"{op.source}_weight", op.name)
                fan = fan_in(op)
                if op.name == p.output and p.init.classifier.law == "normal":  # the plan's classifier rule
                    assign(f"self.{attr_name(t.name)}", f"{p.init.classifier.std!r} * {draw('z', t.shape)}")
                    if op.bias:
                        t = self.tensor(f"{op.source}_bias", op.name)
                        body.append(f"{ind}self.{attr_name(t.name)}[...] = jnp.zeros({tuple(t.shape)!r}, dtype)")
                    continue
                if op.kind == "conv":  # kaiming normal
                    assign(f"self.{attr_name(t.name)}", f"math.sqrt(2 / {fan}) * {draw('z', t.shape)}")
                else:
                    assign(f"self.{attr_name(t.name)}", f"{draw('u', t.shape)} / math.sqrt({fan})")
                if op.bias:
                    t = self.tensor(f"{op.source}_bias", op.name)
                    assign(f"self.{attr_name(t.name)}", f"{draw('u', t.shape)} / math.sqrt({fan})")
            elif op.kind in ("conv", "linear") and p.init.alphas.law == "normal":  # the plan's alpha rule
                t = self.tensor("alpha", op.name)
                assign(self.attr("alpha", op.name), f"{p.init.alphas.std!r} * {draw('z', t.shape)}")
            elif op.kind in ("conv", "linear"):
                alphas.setdefault(self.plan.slot(op.name).k, []).append(self.attr("alpha", op.name))
            elif op.kind == "bn":
                for role, fill in (("bn_weight", "ones"), ("bn_bias", "zeros"), ("bn_mean", "zeros"), ("bn_var", "ones")):
                    t = self.tensor(role, op.name)
                    body.append(f"{ind}self.{attr_name(t.name)}[...] = jnp.{fill}({tuple(t.shape)!r}, dtype)")
        for k, names in sorted(alphas.items()):
            blocks = -(-self.M // k)
            body.append(f"{ind}alpha = _orthonormal_rows({draw('z', [len(names), blocks, k, k])}, {self.M})")
            body += [f"{ind}{name}[...] = alpha[{j}]" for j, name in enumerate(names)]
        lines = [
            "    def reset_parameters(self, key: jax.Array) -> None:",
            '        """Initialise as the module docstring says, from one PRNG key.',
            "",
            "        Every draw is a slice of one uniform vector u on (-1, 1), its normal ones of",
            "        z = sqrt(2) erfinv(u) (XLA compiles each random call on its own, slowly on CPU);",
            '        alphas orthonormalise Gaussians from z."""',
            "        dtype = self.dtype",
            f"        u = jax.random.uniform(key, ({pos['u'] + pos['z']},), dtype, -1.0, 1.0)",
            f"        z = math.sqrt(2) * jax.scipy.special.erfinv(u[{pos['u']}:])  # N(0, 1), as jax.random.normal does",
        ]
        return lines + body

    # -- composition ---------------------------------------------------------

    def compose(self) -> list[str]:
        lines = [
            "    def compose(self) -> dict[str, jax.Array]:",
            '        """Every weight layer\'s weights, "<layer>.weight" and "<layer>.bias", in PyTorch layout.',
            "",
            "        Composed layers and member layers carry the member axis first ([M, ...]);",
            "        plain layers are the shared arrays themselves. Called once per call of the model.",
            '        """',
            "        w: dict[str, jax.Array] = {}",
        ]
        if self.plan.blob is not None:
            lines.append(f"        blob = self.{attr_name('blob')}[...]")
        for op in self.plan.ops:
            if op.kind in ("conv", "linear"):
                lines += self.compose_layer(op, "        ")
        lines.append("        return w")
        return lines

    # -- calling -------------------------------------------------------------

    def call(self) -> list[str]:
        return [
            "    def __call__(self, x: jax.Array, train: bool = False, dropout_key: jax.Array | None = None):",
            '        """x [B, *INPUT_SHAPE] channels-first -> member logits [B, MEMBERS, CLASSES].',
            "",
            "        train=True: batch statistics (running statistics updated in place) and dropout",
            "        (which needs ``dropout_key``).",
            '        """',
            "        cpu = (jax.default_backend() if self.platform == \"auto\" else self.platform) == \"cpu\"",
            "        layout = self.layout",
            '        if layout == "auto":',
            '            layout = "loop" if cpu else "grouped"',
            "        if x.ndim > 2:",
            "            x = jnp.moveaxis(x, 1, -1)  # channels last",
            "        w = self.compose()",
            '        if layout == "grouped":',
            "            logits, stats = self.forward_grouped(x, w, train, dropout_key, cpu)",
            "        else:",
            "            logits, stats = self.forward_loop(x, w, train, dropout_key, cpu)",
            "        if train:",
            "            self._write_stats(stats)",
            "        return logits",
        ]

    def bn_tensors(self) -> list[str]:
        return [
            "    def bn_tensors(self, name: str, m: int | None = None) -> list[jax.Array]:",
            '        """[running mean, running var, weight, bias] of BatchNorm ``name``: member ``m``\'s rows [C],',
            '        or every member\'s side by side [M*C] (the grouped layout)."""',
            "        tensors = [getattr(self, attr) for attr in BN_TENSORS[name]]",
            "        return [t[...].reshape(-1) if m is None else t[m] for t in tensors]",
        ]

    def write_stats(self) -> list[str]:
        return [
            "    def _write_stats(self, stats: dict) -> None:",
            '        """Store new running statistics: [M*C] (grouped) or per-member lists (loop) -> [M, C]."""',
            "        for name, new in stats.items():",
            "            if isinstance(new, list):",
            "                mean, var = jnp.stack([s[0] for s in new]), jnp.stack([s[1] for s in new])",
            "            else:",
            "                mean, var = new[0].reshape(MEMBERS, -1), new[1].reshape(MEMBERS, -1)",
            "            mean_attr, var_attr = BN_TENSORS[name][:2]",
            "            getattr(self, mean_attr)[...] = mean",
            "            getattr(self, var_attr)[...] = var",
        ]

    def _signature(self, name: str, doc: str) -> list[str]:
        return [
            f"    def {name}(self, x: jax.Array, w: dict, train: bool, dropout_key, cpu: bool):",
            f'        """{doc}"""',
        ]

    def forward_grouped(self) -> list[str]:
        p = self.plan
        lines = self._signature("forward_grouped", "Members side by side on the channel axis: activations are [B, ..., M*C].")
        lines.append("        stats: dict = {}")
        vals: dict[str, Val] = {}
        lines += self.statements(p.ops, True, "        ", vals)
        out = self.vars[p.output]
        if self.shared[p.output]:
            lines.append(f"        return jnp.broadcast_to({out}[:, None], ({out}.shape[0], {self.M}, {p.classes})), stats")
        else:
            lines.append(f"        return {out}.reshape({out}.shape[0], {self.M}, {p.classes}), stats")
        return lines

    def forward_loop(self) -> list[str]:
        p = self.plan
        lines = self._signature("forward_loop", "Each member in turn with its own weights; shared ops run once, before the loop.")
        shared_ops = [op for op in p.ops if self.shared[op.name]]
        member_ops = [op for op in p.ops if not self.shared[op.name]]
        bn_names = [op.name for op in member_ops if op.kind == "bn"]
        out = self.vars[p.output]
        vals: dict[str, Val] = {}
        lines += self.statements(shared_ops, False, "        ", vals)
        if self.shared[p.output]:
            lines.append(f"        return jnp.broadcast_to({out}[:, None], ({out}.shape[0], {self.M}, {p.classes})), {{}}")
            return lines
        if bn_names:
            lines += _wrapped_dict(bn_names, self.M, "        ")
        else:
            lines.append("        stats: dict = {}")
        lines += ["        outs = []", f"        for m in range({self.M}):"]
        lines += self.statements(member_ops, False, "            ", vals)
        lines += [f"            outs.append({out})", "        return jnp.stack(outs, 1), stats"]
        return lines


def _wrapped_dict(names: list[str], members: int, indent: str) -> list[str]:
    """``stats = {name: [None] * M, ...}``: one slot per member for each BatchNorm's new statistics."""
    one = f"{indent}stats = {{name: [None] * {members} for name in ({', '.join(_q(n) for n in names)}{',' if len(names) == 1 else ''})}}"
    if len(one) <= LINE_WIDTH:
        return [one]
    return [f"{indent}stats = {{", *[f"{indent}    {_q(n)}: [None] * {members}," for n in names], f"{indent}}}"]


def emit_source(plan: Plan) -> str:
    """The Python source of ``plan`` as a flax.nnx Module (deterministic)."""
    return FlaxEmitter(checked(plan)).source()
