"""The plan tensors of a layer under each weight source (names from compiler/tensor_names.py)."""

from __future__ import annotations

from mixc.compiler import plan as P
from mixc.compiler.methods.widths import WEIGHT_KINDS, in_width, out_width
from mixc.compiler.tensor_names import BLOB, bank_name, tensor_name

#: the roles of the tensors of ops that are not weight layers (member_op_tensors), trainable ones
MEMBER_OP_ROLES = ("bn_weight", "bn_bias", "norm_weight", "norm_bias", "embedding")


def bn_tensors(o: P.BatchNormOp, M: int | None) -> list[P.Tensor]:
    """One BatchNorm's tensors: ``[M, C]`` per member, or ``[C]`` for a single-path network (``M``
    None)."""
    shape = [o.channels] if M is None else [M, o.channels]
    return [
        P.Tensor(
            name=tensor_name("bn", o.name, field),
            shape=shape,
            role=role,
            trainable=trainable,
            layer=o.name,
            per_member=M is not None,
        )
        for field, role, trainable in (
            ("weight", "bn_weight", True),
            ("bias", "bn_bias", True),
            ("running_mean", "bn_mean", False),
            ("running_var", "bn_var", False),
        )
    ]


def norm_tensors(o: P.LayerNormOp, M: int | None) -> list[P.Tensor]:
    """One LayerNorm's scale and shift: ``[M, C]`` per member, or ``[C]`` on a single path."""
    shape = [o.channels] if M is None else [M, o.channels]
    return [
        P.Tensor(
            name=tensor_name("layernorm", o.name, field),
            shape=shape,
            role=role,
            trainable=True,
            layer=o.name,
            per_member=M is not None,
        )
        for field, role in (("weight", "norm_weight"), ("bias", "norm_bias"))
    ]


def embedding_tensors(o: P.ClassTokenOp | P.PosEmbedOp, M: int | None) -> list[P.Tensor]:
    """A class token ``[D]`` or a position embedding ``[N, D]`` (token-major, as timm stores it),
    per member ``[M, ...]`` or one on a single path."""
    if o.kind == "cls_token":
        field, shape = "token", [o.channels]
    else:
        field, shape = "pos", [o.tokens, o.channels]
    return [
        P.Tensor(
            name=tensor_name(o.kind, o.name, field),
            shape=shape if M is None else [M, *shape],
            role="embedding",
            trainable=True,
            layer=o.name,
            per_member=M is not None,
        )
    ]


def member_op_tensors(o, M: int | None) -> list[P.Tensor]:
    """The tensors of an op that is not a weight layer (BatchNorm, LayerNorm, class token,
    position embedding; none for the rest): every member's own, or ``M`` None for one network."""
    if o.kind == "bn":
        return bn_tensors(o, M)
    if o.kind == "layernorm":
        return norm_tensors(o, M)
    if o.kind in ("cls_token", "pos_embed"):
        return embedding_tensors(o, M)
    return []


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
