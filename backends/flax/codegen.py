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

Generation is deterministic: the same Plan gives byte-identical source.
"""

from __future__ import annotations

import keyword
import math
import re
from dataclasses import dataclass

from mixc.backends.pysource import comment as _c
from mixc.backends.pysource import literal as _q
from mixc.backends.pysource import validated
from mixc.compiler.plan import PLAN_VERSION, ConvOp, LinearOp, Plan, Slot, Tensor

LINE_WIDTH = 100


class CodegenError(ValueError):
    """The plan asks for something this backend cannot lower."""


# ---------------------------------------------------------------------------
# Names (the same rules as the torch backend, so attributes read alike)


def attr_name(tensor_name: str) -> str:
    """The module attribute holding a plan tensor: dots become ``__``."""
    return re.sub(r"\W", "_", tensor_name.replace(".", "__"), flags=re.ASCII)


def module_name(plan: Plan) -> str:
    """Module name for a plan's source: the plan name made an identifier."""
    name = re.sub(r"\W", "_", plan.name, flags=re.ASCII) or "model"
    return f"m_{name}" if name[0].isdigit() or keyword.iskeyword(name) else name


def class_name(plan: Plan) -> str:
    name = module_name(plan)
    return name[0].upper() + name[1:]


_RESERVED = {
    "x", "w", "m", "flat", "blob", "outs", "layout", "self", "jax", "jnp", "nnx", "math", "stats", "train",
    "dropout_key", "logits",
}


def _var_names(plan: Plan) -> dict[str, str]:
    """A distinct Python identifier for each op's output."""
    out: dict[str, str] = {}
    taken = set(_RESERVED)
    for op in plan.ops:
        if op.kind == "input":
            out[op.name] = "x"
            continue
        base = re.sub(r"\W", "_", op.name, flags=re.ASCII) or "v"
        if base[0].isdigit() or keyword.iskeyword(base) or base in _RESERVED or base.startswith("_"):
            base = f"v_{base}"
        name, i = base, 1
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        out[op.name] = name
    return out


# ---------------------------------------------------------------------------
# Formatting helpers


def _tup(v: list[int]) -> str:
    """A static int tuple argument: an int when all entries agree."""
    if len(set(v)) == 1:
        return str(v[0])
    return "(" + ", ".join(map(str, v)) + ")"


def _call(head: str, args: list[str], indent: str) -> list[str]:
    """``head(arg, ...)`` on one line, or one argument per line when too long."""
    one = f"{indent}{head}({', '.join(args)})"
    if len(one) <= LINE_WIDTH:
        return [one]
    return [f"{indent}{head}("] + [f"{indent}    {a}," for a in args] + [f"{indent})"]


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fan_in(op: ConvOp | LinearOp) -> int:
    return math.prod(op.weight_shape[1:])


def _weight_var_value(op: ConvOp | LinearOp) -> float:
    """Variance of a plain layer's default init: conv 2 / fan_in (kaiming), linear 1 / (3 fan_in)."""
    fan = _fan_in(op)
    return 2 / fan if op.kind == "conv" else 1 / (3 * fan)


def _weight_var(op: ConvOp | LinearOp) -> str:
    fan = _fan_in(op)
    return f"2 / {fan}" if op.kind == "conv" else f"1 / (3 * {fan})"


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
# The emitter


@dataclass
class _Val:
    var: str
    shared: bool  # identical for every member (computed once)


class _Emitter:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.M = plan.members
        self.vars = _var_names(plan)
        self.ops = {op.name: op for op in plan.ops}
        self.tensors: dict[tuple[str, str | None], Tensor] = {}
        for t in plan.tensors:
            self.tensors[(t.role, t.layer if t.role not in ("bank", "blob") else t.name)] = t
        self.shared = self._shared_flags()
        self.bns = [op for op in plan.ops if op.kind == "bn"]
        self._check()

    # -- plan queries ------------------------------------------------------

    def tensor(self, role: str, key: str) -> Tensor:
        try:
            return self.tensors[(role, key)]
        except KeyError:
            raise CodegenError(
                f"plan {self.plan.name!r} has no {role} tensor for {key!r}; "
                "hint: the plan's tensors list and its ops disagree (a compiler bug)"
            ) from None

    def attr(self, role: str, key: str) -> str:
        return "self." + attr_name(self.tensor(role, key).name)

    def _shared_flags(self) -> dict[str, bool]:
        """An op's output is shared when it is the same for every member."""
        shared: dict[str, bool] = {}
        for op in self.plan.ops:
            ins = all(shared[i] for i in op.inputs)
            if op.kind == "input":
                shared[op.name] = True
            elif op.kind == "bn":
                shared[op.name] = False
            elif op.kind in ("conv", "linear"):
                shared[op.name] = ins and op.source == "plain"
            else:
                shared[op.name] = ins
        return shared

    def _check(self) -> None:
        p = self.plan
        names = [t.name for t in p.tensors]
        if len(set(names)) != len(names):
            raise CodegenError(f"plan {p.name!r} lists a tensor twice")
        attrs = [attr_name(n) for n in names]
        if len(set(attrs)) != len(attrs):
            raise CodegenError(f"plan {p.name!r}: two tensor names map to one attribute ({sorted(attrs)})")
        out = self.ops.get(p.output)
        if out is None:
            raise CodegenError(f"plan {p.name!r}: output op {p.output!r} does not exist")
        if out.out_shape != [p.classes]:
            raise CodegenError(f"plan {p.name!r}: output {p.output!r} has shape {out.out_shape}, not [{p.classes}]")
        if [op.kind for op in p.ops].count("input") != 1 or p.ops[0].kind != "input":
            raise CodegenError(f"plan {p.name!r} must start with exactly one input op")
        for op in p.ops:
            if op.kind == "linear" and len(op.in_shape) != 1:
                raise CodegenError(f"linear {op.name!r} reads shape {op.in_shape}; only vectors are supported")
            if op.kind in ("conv", "linear") and op.source in ("bank", "blob") and p.slot(op.name) is None:
                raise CodegenError(f"layer {op.name!r} is {op.source}-sourced but has no slot")
            if op.kind in ("conv", "pool") and op.dim not in (1, 2):
                raise CodegenError(f"{op.kind} {op.name!r} is {op.dim}-D; only 1-D and 2-D are supported")

    # -- the file ----------------------------------------------------------

    def source(self) -> str:
        out: list[str] = []
        out += self.header()
        out += ["import math", "", "import jax", "import jax.numpy as jnp", "from flax import nnx", ""]
        out += self.constants()
        out += ["", ""] + _HELPERS.splitlines()
        out += ["", ""] + self.klass()
        return "\n".join(out).rstrip() + "\n"

    def header(self) -> list[str]:
        p, a = self.plan, self.plan.accounting
        roles: dict[str, int] = {}
        for t in p.tensors:
            if t.trainable:
                roles[t.role] = roles.get(t.role, 0) + t.numel
        total = sum(roles.values())

        def n(*rs: str) -> int:
            return sum(roles.get(r, 0) for r in rs)

        budget = "none (template counts fixed)" if a.budget is None else _fmt_int(a.budget)
        banks = ", ".join(f"bank.{_c(g.name)} {g.templates}x{g.size}" for g in p.groups)
        if p.blob:
            banks = (banks + ", " if banks else "") + f"blob {p.blob.size}"
        lines = [
            f"# Generated by mixc (flax backend) from spec {_q(p.name)} ({_c(p.source)}).",
            f"# Plan version {p.version}, spec_hash {_c(p.spec_hash or p.content_hash())}. Do not edit: regenerate.",
            "#",
            f"# {p.members} members, grouping {_c(p.grouping)}, assign {_c(p.assign)}, "
            f"up to {p.templates_per_layer} templates per layer.",
            f"# Trainable parameters: {_fmt_int(total)} (budget {budget}; minimum {_fmt_int(a.minimum_budget)})",
            f"#   templates   {_fmt_int(n('bank', 'blob')):>12}" + (f"  ({banks})" if banks else ""),
            f"#   plain       {_fmt_int(n('plain_weight', 'plain_bias')):>12}  ({len(p.plain_layers)} layers shared by all members)",
            f"#   per member  {_fmt_int(n('member_weight', 'member_bias')):>12}  (unfactorised weights)",
            f"#   alphas      {_fmt_int(n('alpha')):>12}",
            f"#   batch norm  {_fmt_int(n('bn_weight', 'bn_bias')):>12}",
            f"# One plain backbone: {_fmt_int(a.backbone_params)}; naive ensemble of {p.members}: "
            f"{_fmt_int(a.naive_params)}.",
        ]
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
        return lines + [doc, ""]

    def constants(self) -> list[str]:
        p = self.plan
        lines = [
            f"SPEC_NAME = {_q(p.name)}",
            f"SPEC_HASH = {_q(p.spec_hash or p.content_hash())}",
            f"PLAN_VERSION = {p.version}",
            f"MEMBERS = {p.members}",
            f"CLASSES = {p.classes}",
            f"INPUT_SHAPE = {tuple(p.input_shape)!r}",
            'LAYOUTS = ("auto", "grouped", "loop")',
            "",
            "# Plan tensor name -> module attribute (attribute names cannot contain dots).",
            "PLAN_TENSORS = {",
        ]
        lines += [f"    {_q(t.name)}: {_q(attr_name(t.name))}," for t in p.tensors]
        lines.append("}")
        lines += ["", "# BatchNorm op -> the attributes of its running mean and variance, weight and bias.", "BN_TENSORS = {"]
        for op in self.bns:
            names = [_q(attr_name(self.tensor(r, op.name).name)) for r in ("bn_mean", "bn_var", "bn_weight", "bn_bias")]
            lines += [f"    {_q(op.name)}: ("] + [f"        {n}," for n in names] + ["    ),"]
        lines.append("}")
        return lines

    # -- the class -----------------------------------------------------------

    def klass(self) -> list[str]:
        p = self.plan
        lines = [
            f"class {class_name(p)}(nnx.Module):",
            f'    """The {_q(p.name)} ensemble; see the module docstring."""',
            "",
            "    spec_name = SPEC_NAME",
            "    spec_hash = SPEC_HASH",
            "    members = MEMBERS",
            "    classes = CLASSES",
            "    input_shape = INPUT_SHAPE",
            "    plan_tensors = PLAN_TENSORS",
            "",
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
        lines += self.reset_parameters()
        lines += [""] + self.compose()
        lines += [""] + self.call()
        lines += [""] + self.bn_tensors()
        lines += [""] + self.write_stats()
        lines += [""] + self.forward_grouped()
        lines += [""] + self.forward_loop()
        return lines

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
            fan = _fan_in(op)
            if g.bias:  # the weight part and the bias part of each template have their own laws
                body += [f"{ind}{bank}[...] = jnp.concatenate(", f"{ind}    ["]
                body.append(f"{ind}        math.sqrt({_weight_var(op)}) * {draw('z', [g.templates, wsize])},")
                body.append(f"{ind}        math.sqrt(1 / (3 * {fan})) * {draw('z', [g.templates, g.size - wsize])},")
                body += [f"{ind}    ],", f"{ind}    axis=1,", f"{ind})"]
            else:
                assign(bank, f"math.sqrt({_weight_var(op)}) * {draw('z', [g.templates, g.size])}")
        if p.blob is not None:
            assign(f"self.{attr_name('blob')}", f"math.sqrt({self._blob_var()!r}) * {draw('z', [p.blob.size])}")
        alphas: dict[int, list[str]] = {}
        for op in p.ops:
            if op.kind in ("conv", "linear") and op.source in ("plain", "member"):
                t = self.tensor(f"{op.source}_weight", op.name)
                fan = _fan_in(op)
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

    def _blob_var(self) -> float:
        """Read-weighted mean of the target variances of the layers reading the blob."""
        num = den = 0.0
        for slot in self.plan.slots:
            if slot.offsets is None:
                continue
            op = self.ops[slot.layer]
            wsize = math.prod(op.weight_shape)
            reads = len(slot.offsets) * slot.k
            num += reads * (wsize * _weight_var_value(op) + (slot.size - wsize) / (3 * _fan_in(op)))
            den += reads * slot.size
        return num / den if den else 1.0

    # -- composition ---------------------------------------------------------

    @staticmethod
    def _rows(bank: str, row: list[int]) -> str:
        """Expression for bank rows ``row`` (a slice when they are a contiguous run)."""
        if row == list(range(row[0], row[0] + len(row))):
            return f"{bank}[{row[0]}:{row[0] + len(row)}]"
        return f"{bank}[jnp.array({row})]"

    def _blob_window(self, off: int, length: int) -> str:
        """Expression for ``length`` consecutive blob entries from ``off``, wrapping."""
        total = self.plan.blob.size
        if off + length <= total:
            return f"blob[{off}:{off + length}]"
        pieces, pos, left = [], off, length
        while left > 0:
            take = min(left, total - pos)
            pieces.append("blob" if (pos, take) == (0, total) else f"blob[{pos}:{pos + take}]")
            left -= take
            pos = 0
        if len(pieces) <= 4:
            return f"jnp.concatenate([{', '.join(pieces)}])"
        reps = -(-(off + length) // total)
        return f"jnp.tile(blob, {reps})[{off}:{off + length}]"

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
                lines += self._compose_layer(op)
        lines.append("        return w")
        return lines

    def _compose_layer(self, op: ConvOp | LinearOp) -> list[str]:
        M, ind = self.M, "        "
        key = op.name
        if op.source in ("plain", "member"):
            lines = [f'{ind}w[{_q(key + ".weight")}] = {self.attr(op.source + "_weight", key)}[...]']
            if op.bias:
                lines.append(f'{ind}w[{_q(key + ".bias")}] = {self.attr(op.source + "_bias", key)}[...]')
            return lines
        slot: Slot = self.plan.slot(key)
        alpha_m = self.attr("alpha", key)  # a Variable: [m] reads one member's row
        alpha = alpha_m + "[...]"
        if slot.templates is not None:
            bank = self.attr("bank", f"bank.{slot.group}")
            rows = slot.templates
            same = all(r == rows[0] for r in rows)
            desc = f"{rows[0]} for every member" if same else ", ".join(map(str, rows))
            lines = [f"{ind}# {_c(key)}: bank.{_c(slot.group)} templates {desc}"]
            if same:
                lines.append(f"{ind}flat = {alpha} @ {self._rows(bank, rows[0])}")
            elif all(r == list(range(r[0], r[0] + len(r))) for r in rows):
                items = [f"{alpha_m}[{m}] @ {self._rows(bank, r)}" for m, r in enumerate(rows)]
                lines += self._stack(items, ind)
            else:
                lines += _call("flat = jnp.einsum", ['"mk,mks->ms"', alpha, f"{bank}[jnp.array({rows})]"], ind)
        else:
            span = slot.k * slot.size
            lines = [f"{ind}# {_c(key)}: blob windows of {slot.k} x {slot.size} from offsets {slot.offsets}"]
            if all(o == slot.offsets[0] for o in slot.offsets):
                lines.append(f"{ind}flat = {alpha} @ {self._blob_window(slot.offsets[0], span)}.reshape({slot.k}, {slot.size})")
            else:
                items = [
                    f"{alpha_m}[{m}] @ {self._blob_window(o, span)}.reshape({slot.k}, {slot.size})"
                    for m, o in enumerate(slot.offsets)
                ]
                lines += self._stack(items, ind)
        shape = ", ".join(map(str, [M, *op.weight_shape]))
        wsize = math.prod(op.weight_shape)
        if op.bias:
            lines.append(f'{ind}w[{_q(key + ".weight")}] = flat[:, :{wsize}].reshape({shape})')
            lines.append(f'{ind}w[{_q(key + ".bias")}] = flat[:, {wsize}:]')
        else:
            lines.append(f'{ind}w[{_q(key + ".weight")}] = flat.reshape({shape})')
        return lines

    @staticmethod
    def _stack(items: list[str], ind: str) -> list[str]:
        one = f"{ind}flat = jnp.stack([{', '.join(items)}])"
        if len(one) <= LINE_WIDTH:
            return [one]
        return [f"{ind}flat = jnp.stack(", f"{ind}    ["] + [f"{ind}        {it}," for it in items] + [f"{ind}    ]", f"{ind})"]

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

    def _expr(self, op, ins: list[_Val], grouped: bool, rep, index: int) -> tuple[str, str, list[str]]:
        """(target prefix, function, arguments) computing ``op``; function "" means args[0] is the expression."""
        M = self.M
        k = op.kind
        a = ins[0].var if ins else "x"
        W, B = f'w[{_q(op.name + ".weight")}]', f'w[{_q(op.name + ".bias")}]'
        if k == "conv":
            def conv_args(groups: int) -> list[str]:
                args = []
                if any(s != 1 for s in op.stride):
                    args.append(f"stride={_tup(op.stride)}")
                if any(p != 0 for p in op.padding):
                    args.append(f"padding={_tup(op.padding)}")
                if any(d != 1 for d in op.dilation):
                    args.append(f"dilation={_tup(op.dilation)}")
                if groups != 1:
                    args.append(f"groups={groups}")
                return args + ["cpu=cpu"]

            bias = B if op.bias else "None"
            stacked_shape = ", ".join(map(str, [M * op.out_channels, *op.weight_shape[1:]]))
            if op.source == "plain":
                if grouped and not ins[0].shared:
                    ones = ", ".join(["1"] * (len(op.weight_shape) - 1))
                    wr, br = f"jnp.tile({W}, ({M}, {ones}))", (f"jnp.tile({B}, {M})" if op.bias else "None")
                    return "", "_conv", [a, wr, br, *conv_args(M * op.groups)]
                return "", "_conv", [a, W, bias, *conv_args(op.groups)]
            if not grouped:
                return "", "_conv", [a, f"{W}[m]", f"{B}[m]" if op.bias else "None", *conv_args(op.groups)]
            ws = f"{W}.reshape({stacked_shape})"
            bs = f"{B}.reshape(-1)" if op.bias else "None"
            if ins[0].shared and op.groups == 1:  # one conv with the members' filters stacked
                return "", "_conv", [a, ws, bs, *conv_args(1)]
            src = rep(ins[0]) if ins[0].shared else a
            return "", "_conv", [src, ws, bs, *conv_args(M * op.groups)]
        if k == "linear":
            bias = B if op.bias else "None"
            if op.source == "plain":
                if grouped and not ins[0].shared:
                    return "", "_linear_grouped", [a, W, bias, str(M)]
                return "", "_linear", [a, W, bias]
            if not grouped:
                return "", "_linear", [a, f"{W}[m]", f"{B}[m]" if op.bias else "None"]
            if ins[0].shared:
                shape = f"{M * op.out_features}, {op.in_features}"
                return "", "_linear", [a, f"{W}.reshape({shape})", f"{B}.reshape(-1)" if op.bias else "None"]
            return "", "_linear_grouped", [a, W, bias, str(M)]
        if k == "bn":
            if grouped:
                src = rep(ins[0]) if ins[0].shared else a
                params, target = f"*self.bn_tensors({_q(op.name)})", f"stats[{_q(op.name)}]"
            else:
                src, params, target = a, f"*self.bn_tensors({_q(op.name)}, m)", f"stats[{_q(op.name)}][m]"
            return target, "_batch_norm", [src, params, "train", repr(op.momentum), repr(op.eps)]
        if k == "act":
            if op.fn in ("tanh",):
                return "", "jnp.tanh", [a]
            if op.fn == "leaky_relu":
                return "", "jax.nn.leaky_relu", [a, repr(op.slope)]
            if op.fn == "gelu":
                return "", "jax.nn.gelu", [a, "approximate=False"]
            return "", f"jax.nn.{op.fn}", [a]
        if k == "pool":
            args = [a, _q(op.op), _tup(op.kernel), _tup(op.stride)]
            if any(p != 0 for p in op.padding):
                args.append(_tup(op.padding))
            return "", "_pool", args
        if k == "global_pool":
            axes = tuple(range(1, len(op.in_shape)))
            fn = "mean" if op.op == "avg" else "max"
            return "", "", [f"{a}.{fn}(axis={axes if len(axes) > 1 else axes[0]})"]
        if k == "flatten":
            return "", "_flatten", [a]
        if k == "dropout":
            if op.p == 0:
                return "", "", [a]
            salt = [str(index)] + ([] if grouped else ["m"])
            return "", "_dropout", [a, repr(op.p), "train", "dropout_key", *salt]
        if k == "add":
            xs = [rep(v) if (grouped and v.shared and not self.shared[op.name]) else v.var for v in ins]
            return "", "", [" + ".join(xs)]
        raise CodegenError(f"op kind {k!r} is not supported by the flax backend")

    def _statements(self, ops, grouped: bool, indent: str, vals: dict[str, _Val]) -> list[str]:
        lines: list[str] = []
        reps: dict[str, str] = {}
        M = self.M

        def rep(v: _Val) -> str:  # shared value -> members side by side on the channel axis
            if v.var not in reps:
                reps[v.var] = f"{v.var}_rep"
                lines.append(f"{indent}{v.var}_rep = jnp.concatenate([{v.var}] * {M}, axis=-1)")
            return reps[v.var]

        for op in ops:
            if op.kind == "input":
                vals[op.name] = _Val(self.vars[op.name], True)
                continue
            ins = [vals[n] for n in op.inputs]
            index = self.plan.ops.index(op)
            target, fn, args = self._expr(op, ins, grouped, rep, index)
            var = self.vars[op.name]
            lhs = f"{var}, {target}" if target else var
            if fn:
                lines += _call(f"{lhs} = {fn}", args, indent)
            else:
                lines.append(f"{indent}{lhs} = {args[0]}")
            vals[op.name] = _Val(var, self.shared[op.name])
        return lines

    def _signature(self, name: str, doc: str) -> list[str]:
        return [
            f"    def {name}(self, x: jax.Array, w: dict, train: bool, dropout_key, cpu: bool):",
            f'        """{doc}"""',
        ]

    def forward_grouped(self) -> list[str]:
        p = self.plan
        lines = self._signature("forward_grouped", "Members side by side on the channel axis: activations are [B, ..., M*C].")
        lines.append("        stats: dict = {}")
        vals: dict[str, _Val] = {}
        lines += self._statements(p.ops, True, "        ", vals)
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
        vals: dict[str, _Val] = {}
        lines += self._statements(shared_ops, False, "        ", vals)
        if self.shared[p.output]:
            lines.append(f"        return jnp.broadcast_to({out}[:, None], ({out}.shape[0], {self.M}, {p.classes})), {{}}")
            return lines
        if bn_names:
            lines += _wrapped_dict(bn_names, self.M, "        ")
        else:
            lines.append("        stats: dict = {}")
        lines += ["        outs = []", f"        for m in range({self.M}):"]
        lines += self._statements(member_ops, False, "            ", vals)
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
    if plan.version != PLAN_VERSION:
        raise CodegenError(f"plan version {plan.version} is not the supported version {PLAN_VERSION}; recompile the spec")
    return _Emitter(validated(plan, CodegenError)).source()
