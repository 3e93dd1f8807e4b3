"""The plan tensors of a layer under each weight source (names from compiler/tensor_names.py)."""

from __future__ import annotations

from mixc.compiler import plan as P
from mixc.compiler.methods.widths import WEIGHT_KINDS, in_width, out_width
from mixc.compiler.tensor_names import BLOB, bank_name, tensor_name


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


def plain_tensors(o) -> list[P.Tensor]:
    """One weight (and bias) shared by all members."""
    out = [
        P.Tensor(
            name=tensor_name("plain", o.name, "weight"),
            shape=o.weight_shape,
            role="plain_weight",
            trainable=True,
            layer=o.name,
        )
    ]
    if o.bias:
        out.append(
            P.Tensor(
                name=tensor_name("plain", o.name, "bias"),
                shape=[out_width(o)],
                role="plain_bias",
                trainable=True,
                layer=o.name,
            )
        )
    return out


def member_tensors(o, M: int) -> list[P.Tensor]:
    """A weight (and bias) per member."""
    out = [
        P.Tensor(
            name=tensor_name("member", o.name, "weight"),
            shape=[M, *o.weight_shape],
            role="member_weight",
            trainable=True,
            layer=o.name,
            per_member=True,
        )
    ]
    if o.bias:
        out.append(
            P.Tensor(
                name=tensor_name("member", o.name, "bias"),
                shape=[M, o.weight_shape[0]],
                role="member_bias",
                trainable=True,
                layer=o.name,
                per_member=True,
            )
        )
    return out


def alpha_tensors(o, M: int, k: int) -> list[P.Tensor]:
    """A composed layer's mixing weights, k per member."""
    return [
        P.Tensor(
            name=tensor_name(o.source, o.name, "alpha"),
            shape=[M, k],
            role="alpha",
            trainable=True,
            layer=o.name,
            per_member=True,
        )
    ]


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
    name = lambda attribute: tensor_name("batch_ensemble", o.name, attribute)  # noqa: E731
    out = [
        P.Tensor(
            name=name("weight"),
            shape=o.weight_shape,
            role="plain_weight",
            trainable=True,
            layer=o.name,
        ),
        P.Tensor(
            name=name("r"),
            shape=[M, in_width(o)],
            role="fast_in",
            trainable=True,
            layer=o.name,
            per_member=True,
        ),
        P.Tensor(
            name=name("s"),
            shape=[M, out_width(o)],
            role="fast_out",
            trainable=True,
            layer=o.name,
            per_member=True,
        ),
    ]
    if o.bias:
        out.append(
            P.Tensor(
                name=name("bias"),
                shape=[M, out_width(o)],
                role="member_bias",
                trainable=True,
                layer=o.name,
                per_member=True,
            )
        )
    return out


def layer_tensors(ops: list, M: int, weight, single_path: bool) -> list[P.Tensor]:
    """Every tensor of a model without templates, in op order (the checkpoint names); ``weight(o)``
    gives a weight layer's tensors, BatchNorm is [C] on a single path, else [M, C]."""
    out: list[P.Tensor] = []
    for o in ops:
        if o.kind in WEIGHT_KINDS:
            out += weight(o)
        elif o.kind == "bn":
            out += bn_tensors(o, None if single_path else M)
    return out


def trainable(tensors: list[P.Tensor]) -> int:
    return sum(t.numel for t in tensors if t.trainable)
