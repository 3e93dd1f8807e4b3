"""The built-in layer kinds: their arguments, shape rules and op records.

One table (``LAYERS``) drives argument checking, shape inference and the
language reference, so adding a layer kind is one entry plus one builder.
Shapes are channels-first without the batch axis: [C, H, W], [C, L] or [D]; a token sequence is
[D, N], read like a signal (D channels, N positions), so a linear layer on it maps each token.
A kind's builder returns one op, or several (``attention``: its projections and the attention
between them, under a scope of the layer's name).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mixc.compiler import plan as P


class ShapeError(Exception):
    """A layer cannot take its input; ``hint`` says what would fix it."""

    def __init__(self, message: str, hint: str | None = None, arg: str | None = None):
        super().__init__(message)
        self.message, self.hint, self.arg = message, hint, arg


@dataclass(frozen=True)
class LayerKind:
    params: tuple[str, ...]  # in positional order
    required: tuple[str, ...]
    defaults: dict[str, Any]
    # (name, inputs, in_shape, args) -> Op
    build: Callable[[str, list[str], list[int], dict[str, Any]], Any]
    doc: str


def _spatial(shape: list[int], kind: str) -> int:
    if len(shape) == 3:
        return 2
    if len(shape) == 2:
        return 1
    raise ShapeError(
        f"{kind} needs an image [C, H, W] or a signal [C, L], but its input is a vector {shape}",
        "use linear on vectors, or keep the spatial axes (no flatten/global pooling before this"
        " layer)",
    )


def _tuple(v: Any, dim: int, arg: str) -> list[int]:
    if isinstance(v, list):
        if len(v) != dim or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise ShapeError(
                f"'{arg}' must be an integer or a list of {dim} integers, got {v}", arg=arg
            )
        return list(v)
    return [v] * dim


def _out_size(n: int, k: int, s: int, p: int, d: int = 1) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _spatial_out(
    shape: list[int],
    kernel: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    what: str,
) -> list[int]:
    out = []
    for n, k, s, p, d in zip(shape[1:], kernel, stride, padding, dilation):
        if s < 1:
            raise ShapeError(f"{what}: stride must be at least 1, got {s}", arg="stride")
        if p < 0:
            raise ShapeError(f"{what}: padding must not be negative, got {p}", arg="padding")
        o = _out_size(n, k, s, p, d)
        if o < 1:
            raise ShapeError(
                f"{what}: kernel {k} (dilation {d}, padding {p}) does not fit an input of size {n}",
                "use a smaller kernel or stride, more padding, or less downsampling before this"
                " layer",
            )
        out.append(o)
    return out


def _conv(name, inputs, shape, a):
    dim = _spatial(shape, "conv")
    cin = shape[0]
    kernel = _tuple(a["kernel"], dim, "kernel")
    dilation = _tuple(a["dilation"], dim, "dilation")
    pad = a["padding"]
    padding = (
        [d * (k // 2) for k, d in zip(kernel, dilation)]
        if pad is None
        else _tuple(pad, dim, "padding")
    )
    stride = _tuple(a["stride"], dim, "stride")
    groups, cout = a["groups"], a["out"]
    if groups < 1 or cin % groups or cout % groups:
        raise ShapeError(
            f"conv groups={groups} must divide both the input channels ({cin}) and the output"
            f" channels ({cout})",
            arg="groups",
        )
    if min(kernel) < 1:
        raise ShapeError(f"kernel must be at least 1, got {kernel}", arg="kernel")
    out = [cout, *_spatial_out(shape, kernel, stride, padding, dilation, "conv")]
    return P.ConvOp(
        name=name,
        inputs=inputs,
        in_shape=shape,
        out_shape=out,
        dim=dim,
        in_channels=cin,
        out_channels=cout,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=a["bias"],
        source="plain",
    )


def _linear(name, inputs, shape, a):
    if len(shape) > 2:
        raise ShapeError(
            f"linear needs a vector [D] or a sequence [D, N], but its input has shape {shape}",
            "add global_avgpool (or flatten) before the linear layer, or tokens to read an image"
            " as a sequence",
        )
    return P.LinearOp(
        name=name,
        inputs=inputs,
        in_shape=shape,
        out_shape=[a["out"], *shape[1:]],
        in_features=shape[0],
        out_features=a["out"],
        bias=a["bias"],
        source="plain",
    )


def _sequence(shape: list[int], kind: str) -> None:
    if len(shape) != 2:
        raise ShapeError(
            f"{kind} needs a token sequence [D, N], but its input has shape {shape}",
            "read an image as tokens first (conv patch(..., kernel = p, stride = p) then tokens)",
        )


def _layernorm(name, inputs, shape, a):
    if not a["eps"] > 0:
        raise ShapeError(f"layernorm eps must be positive, got {a['eps']}", arg="eps")
    return P.LayerNormOp(
        name=name, inputs=inputs, in_shape=shape, out_shape=shape, channels=shape[0], eps=a["eps"]
    )


def _attention(name, inputs, shape, a):
    """q, k, v (linear D -> D each), the attention of the three, the output projection."""
    _sequence(shape, "attention")
    dim, heads = shape[0], a["heads"]
    if dim % heads:
        raise ShapeError(
            f"attention: {heads} heads must divide the {dim} channels of its input",
            f"use a number of heads that divides {dim}",
            arg="heads",
        )

    def proj(local: str, src: str) -> P.LinearOp:
        return P.LinearOp(
            name=f"{name}.{local}",
            inputs=[src],
            in_shape=shape,
            out_shape=shape,
            in_features=dim,
            out_features=dim,
            bias=a["bias"],
            source="plain",
        )

    q, k, v = (proj(p, inputs[0]) for p in ("q", "k", "v"))
    attend = P.AttentionOp(
        name=f"{name}.attend",
        inputs=[q.name, k.name, v.name],
        in_shape=shape,
        out_shape=shape,
        channels=dim,
        heads=heads,
    )
    return [q, k, v, attend, proj("proj", attend.name)]


def _tokens(name, inputs, shape, a):
    if len(shape) != 3:
        raise ShapeError(
            f"tokens reads an image [C, H, W] as a sequence, but its input has shape {shape}",
            "use tokens right after the patch embedding (a conv with kernel = stride = patch)",
        )
    return P.TokensOp(
        name=name, inputs=inputs, in_shape=shape, out_shape=[shape[0], shape[1] * shape[2]]
    )


def _cls_token(name, inputs, shape, a):
    _sequence(shape, "cls_token")
    return P.ClassTokenOp(
        name=name,
        inputs=inputs,
        in_shape=shape,
        out_shape=[shape[0], shape[1] + 1],
        channels=shape[0],
    )


def _pos_embed(name, inputs, shape, a):
    _sequence(shape, "pos_embed")
    return P.PosEmbedOp(
        name=name,
        inputs=inputs,
        in_shape=shape,
        out_shape=shape,
        channels=shape[0],
        tokens=shape[1],
    )


def _token_pool(name, inputs, shape, a):
    _sequence(shape, "token_pool")
    if a["mode"] not in ("cls", "mean"):
        raise ShapeError(
            f'token_pool mode is "cls" or "mean", got {a["mode"]!r}',
            'token_pool("cls") reads the class token, token_pool("mean") averages the tokens',
            arg="mode",
        )
    return P.TokenPoolOp(
        name=name, inputs=inputs, in_shape=shape, out_shape=[shape[0]], op=a["mode"]
    )


def _bn(name, inputs, shape, a):
    if not 0 <= a["momentum"] <= 1:
        raise ShapeError(
            f"bn momentum is in [0, 1] (PyTorch convention), got {a['momentum']}", arg="momentum"
        )
    if not a["eps"] > 0:
        raise ShapeError(f"bn eps must be positive, got {a['eps']}", arg="eps")
    return P.BatchNormOp(
        name=name,
        inputs=inputs,
        in_shape=shape,
        out_shape=shape,
        channels=shape[0],
        eps=a["eps"],
        momentum=a["momentum"],
    )


def _act(fn):
    def build(name, inputs, shape, a):
        return P.ActOp(
            name=name,
            inputs=inputs,
            in_shape=shape,
            out_shape=shape,
            fn=fn,
            slope=a.get("slope", 0.01),
        )

    return build


def _pool(op):
    def build(name, inputs, shape, a):
        dim = _spatial(shape, f"{op}pool")
        kernel = _tuple(a["kernel"], dim, "kernel")
        stride = kernel if a["stride"] is None else _tuple(a["stride"], dim, "stride")
        padding = _tuple(a["padding"], dim, "padding")
        if any(2 * p > k for p, k in zip(padding, kernel)):
            raise ShapeError(
                f"pool padding {padding} must be at most half the kernel {kernel}", arg="padding"
            )
        out = [shape[0], *_spatial_out(shape, kernel, stride, padding, [1] * dim, f"{op}pool")]
        return P.PoolOp(
            name=name,
            inputs=inputs,
            in_shape=shape,
            out_shape=out,
            op=op,
            dim=dim,
            kernel=kernel,
            stride=stride,
            padding=padding,
        )

    return build


def _global(op):
    def build(name, inputs, shape, a):
        _spatial(shape, f"global_{op}pool")
        return P.GlobalPoolOp(name=name, inputs=inputs, in_shape=shape, out_shape=[shape[0]], op=op)

    return build


def _flatten(name, inputs, shape, a):
    n = 1
    for d in shape:
        n *= d
    return P.FlattenOp(name=name, inputs=inputs, in_shape=shape, out_shape=[n])


def _dropout(name, inputs, shape, a):
    if not 0 <= a["p"] < 1:
        raise ShapeError(f"dropout p is in [0, 1), got {a['p']}", arg="p")
    return P.DropoutOp(name=name, inputs=inputs, in_shape=shape, out_shape=shape, p=a["p"])


_POOL_ARGS = dict(
    params=("kernel", "stride", "padding"),
    required=("kernel",),
    defaults={"stride": None, "padding": 0},
)

LAYERS: dict[str, LayerKind] = {
    "conv": LayerKind(
        ("out", "kernel", "stride", "padding", "dilation", "groups", "bias"),
        ("out",),
        {"kernel": 3, "stride": 1, "padding": None, "dilation": 1, "groups": 1, "bias": False},
        _conv,
        "1-D or 2-D convolution (by the input's rank); padding defaults to dilation*(kernel//2)",
    ),
    "linear": LayerKind(
        ("out", "bias"),
        ("out",),
        {"bias": True},
        _linear,
        "fully connected layer on a vector [D], or on each token of a sequence [D, N]",
    ),
    "bn": LayerKind(
        ("eps", "momentum"),
        (),
        {"eps": 1e-5, "momentum": 0.1},
        _bn,
        "batch normalisation, one per member (PyTorch momentum convention)",
    ),
    "relu": LayerKind((), (), {}, _act("relu"), "activation"),
    "gelu": LayerKind((), (), {}, _act("gelu"), "activation"),
    "silu": LayerKind((), (), {}, _act("silu"), "activation"),
    "tanh": LayerKind((), (), {}, _act("tanh"), "activation"),
    "sigmoid": LayerKind((), (), {}, _act("sigmoid"), "activation"),
    "leaky_relu": LayerKind(("slope",), (), {"slope": 0.01}, _act("leaky_relu"), "activation"),
    "maxpool": LayerKind(
        **_POOL_ARGS, build=_pool("max"), doc="max pooling; stride defaults to the kernel"
    ),
    "avgpool": LayerKind(
        **_POOL_ARGS, build=_pool("avg"), doc="average pooling; stride defaults to the kernel"
    ),
    "global_avgpool": LayerKind(
        (), (), {}, _global("avg"), "mean over the spatial axes: [C, ...] -> [C]"
    ),
    "global_maxpool": LayerKind(
        (), (), {}, _global("max"), "max over the spatial axes: [C, ...] -> [C]"
    ),
    "flatten": LayerKind((), (), {}, _flatten, "[C, ...] -> [C * ...]"),
    "dropout": LayerKind(("p",), (), {"p": 0.5}, _dropout, "dropout with probability p"),
    "layernorm": LayerKind(
        ("eps",),
        (),
        {"eps": 1e-5},
        _layernorm,
        "layer normalisation over the channels at each position, one per member",
    ),
    "attention": LayerKind(
        ("heads", "bias"),
        ("heads",),
        {"bias": True},
        _attention,
        "multi-head self-attention on a sequence [D, N]: linear q, k, v (D -> D), scaled"
        " dot-product attention in `heads` heads, linear proj",
    ),
    "tokens": LayerKind((), (), {}, _tokens, "an image [C, H, W] as a sequence [C, H*W]"),
    "cls_token": LayerKind(
        (), (), {}, _cls_token, "a learned class token before the sequence: [D, N] -> [D, N + 1]"
    ),
    "pos_embed": LayerKind((), (), {}, _pos_embed, "a learned position embedding, added"),
    "token_pool": LayerKind(
        ("mode",),
        (),
        {"mode": "cls"},
        _token_pool,
        'a sequence [D, N] to a vector [D]: "cls" (the first token) or "mean"',
    ),
}

# What each argument must be, for the checker in elaborate.py.
ARG_TYPES: dict[str, str] = {
    "out": "int",
    "kernel": "ints",
    "stride": "ints",
    "padding": "ints?",
    "dilation": "ints",
    "groups": "int",
    "bias": "bool",
    "eps": "float",
    "momentum": "float",
    "slope": "float",
    "p": "float",
    "heads": "int",
    "mode": "str",
}

INPUT_LAYOUTS = {
    "image": ("channels", "height", "width"),
    "signal": ("channels", "length"),
    "vector": ("features",),
}


def weight_size(op: P.ConvOp | P.LinearOp) -> int:
    """Parameters of one weight layer: its weight and, if any, its bias."""
    n = 1
    for d in op.weight_shape:
        n *= d
    return n + (op.weight_shape[0] if op.bias else 0)


def member_op_params(op) -> int:
    """Trainable parameters one member holds in an op that is not a weight layer: a BatchNorm's or
    LayerNorm's scale and shift, a class token, a position embedding (0 for every other op)."""
    if op.kind in ("bn", "layernorm"):
        return 2 * op.channels
    if op.kind == "cls_token":
        return op.channels
    if op.kind == "pos_embed":
        return op.channels * op.tokens
    return 0


def macs(op) -> int:
    """Multiply-accumulates of one conv/linear op for one sample (0 for every other op)."""
    if op.kind == "conv":
        n = op.in_channels // op.groups
        for d in (*op.out_shape, *op.kernel):
            n *= d
        return n
    if op.kind == "linear":
        positions = op.in_shape[1] if len(op.in_shape) == 2 else 1
        return positions * op.in_features * op.out_features // op.groups
    if op.kind == "attention":  # q k^T and the weighted sum of v: 2 N^2 D
        return 2 * op.in_shape[1] ** 2 * op.channels
    return 0
