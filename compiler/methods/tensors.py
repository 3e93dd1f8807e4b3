"""The plan tensors of a layer under each weight source (names from compiler/tensor_names.py)."""

from __future__ import annotations

from mixc.compiler import plan as P
from mixc.compiler.methods.widths import WEIGHT_KINDS, in_width, out_width
from mixc.compiler.tensor_names import BLOB, bank_name, tensor_name

#: the roles of the tensors of ops that are not weight layers (member_op_tensors), trainable ones
MEMBER_OP_ROLES = ("bn_weight", "bn_bias", "norm_weight", "norm_bias", "embedding")


#: per kind of op that is not a weight layer: (field, role, trainable) of each tensor it holds
_MEMBER_OP_FIELDS = {
    "bn": (
        ("weight", "bn_weight", True),
        ("bias", "bn_bias", True),
        ("running_mean", "bn_mean", False),
        ("running_var", "bn_var", False),
    ),
    "layernorm": (("weight", "norm_weight", True), ("bias", "norm_bias", True)),
    "cls_token": (("token", "embedding", True),),
    "pos_embed": (("pos", "embedding", True),),
}


def member_op_tensors(o, M: int | None) -> list[P.Tensor]:
    """The tensors of an op that is not a weight layer (none for most): BatchNorm's and
    LayerNorm's ``[C]``, a class token ``[D]``, a position embedding ``[N, D]`` (token-major, as
    timm stores it); every member's own (``[M, ...]``), or one network's (``M`` None)."""
    if o.kind not in _MEMBER_OP_FIELDS:
        return []
    shape = [o.tokens, o.channels] if o.kind == "pos_embed" else [o.channels]
    return [
        P.Tensor(
            name=tensor_name(o.kind, o.name, field),
            shape=shape if M is None else [M, *shape],
            role=role,
            trainable=trainable,
            layer=o.name,
            per_member=M is not None,
        )
        for field, role, trainable in _MEMBER_OP_FIELDS[o.kind]
    ]


def bn_tensors(o: P.BatchNormOp, M: int | None) -> list[P.Tensor]:
    """One BatchNorm's tensors: ``[M, C]`` per member, or ``[C]`` for a single-path network."""
    return member_op_tensors(o, M)


def _layer_tensor(
    o, source: str, attribute: str, shape: list[int], role: str, M: int | None = None
):
    """One trainable tensor of layer ``o``; per member when ``M`` is given (its axis first)."""
    return P.Tensor(
        name=tensor_name(source, o.name, attribute),
        shape=shape if M is None else [M, *shape],
        role=role,
        trainable=True,
        layer=o.name,
        per_member=M is not None,
    )


def plain_tensors(o) -> list[P.Tensor]:
    """One weight (and bias) shared by all members."""
    out = [_layer_tensor(o, "plain", "weight", o.weight_shape, "plain_weight")]
    if o.bias:
        out.append(_layer_tensor(o, "plain", "bias", [out_width(o)], "plain_bias"))
    return out


def member_tensors(o, M: int) -> list[P.Tensor]:
    """A weight (and bias) per member."""
    out = [_layer_tensor(o, "member", "weight", o.weight_shape, "member_weight", M)]
    if o.bias:
        out.append(_layer_tensor(o, "member", "bias", [o.weight_shape[0]], "member_bias", M))
    return out


def alpha_tensors(o, M: int, k: int) -> list[P.Tensor]:
    """A composed layer's mixing weights, k per member."""
    return [_layer_tensor(o, o.source, "alpha", [k], "alpha", M)]


def template_tensors(groups: list, blob) -> list[P.Tensor]:
    """The banks, then the blob."""
    out = [
        P.Tensor(name=bank_name(g.name), shape=[g.templates, g.size], role="bank", trainable=True)
        for g in groups
    ]
    if blob is not None:
        out.append(P.Tensor(name=BLOB, shape=[blob.size], role="blob", trainable=True))
    return out


def batch_ensemble_tensors(o, M: int) -> list[P.Tensor]:
    """A BatchEnsemble layer: shared ``W``, fast weights ``r [M, in]`` and ``s [M, out]``, a bias
    per member."""
    source = "batch_ensemble"
    out = [
        _layer_tensor(o, source, "weight", o.weight_shape, "plain_weight"),
        _layer_tensor(o, source, "r", [in_width(o)], "fast_in", M),
        _layer_tensor(o, source, "s", [out_width(o)], "fast_out", M),
    ]
    if o.bias:
        out.append(_layer_tensor(o, source, "bias", [out_width(o)], "member_bias", M))
    return out


def layer_tensors(ops: list, M: int, weight, single_path: bool) -> list[P.Tensor]:
    """Every tensor of a model without templates, in op order (the checkpoint names); ``weight(o)``
    gives a weight layer's tensors; BatchNorm and the other per-member ops are [C] on a single
    path, else [M, C]."""
    out: list[P.Tensor] = []
    for o in ops:
        if o.kind in WEIGHT_KINDS:
            out += weight(o)
        else:
            out += member_op_tensors(o, None if single_path else M)
    return out


def trainable(tensors: list[P.Tensor]) -> int:
    return sum(t.numel for t in tensors if t.trainable)
