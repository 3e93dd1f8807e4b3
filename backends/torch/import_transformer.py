"""`mixc import` of Vision Transformers (docs/importing.md): attention modules recognised as one
``attention`` layer, and the token ops of a ViT's forward (the patch flatten, the class token, the
position embedding, the pooling) recognised in the traced graph.

torch holds a sequence as ``[B, N, D]``; the language as ``[D, N]``. Only the logits have to agree,
so the converter keeps torch's shapes for its own checks and marks which values are sequences
(``_Converter.seq``); the neutral graph gets the language's ``[D, N]``.
"""

from __future__ import annotations

import functools
import inspect
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

__all__ = ["attention_like", "attention_layer", "token_layer", "param_layer"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_ATTENDS = ("scaled_dot_product_attention", "softmax")
_HEADS = ("num_heads", "heads", "n_heads", "n_head")
_VARIANT_HINT = (
    "mixc's attention is q, k, v (one fused qkv Linear D -> 3D or nn.MultiheadAttention), softmax"
    " attention in heads, and a Linear D -> D projection; no qk-norm, relative position bias,"
    " attention dropout or other parameters: describe such a model in .mix by hand"
)
_PARAM_HINT = (
    "mixc reads a parameter in forward only as one class token (torch.cat((self.cls_token.expand("
    "B, -1, -1), x), dim=1)) or a position embedding (x + self.pos_embed), on a token sequence;"
    " keep other weights inside torch.nn layers"
)


def _shape(node: Any) -> list[int] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return list(meta.shape[1:]) if hasattr(meta, "shape") else None


@functools.cache
def _forward_attends(cls: type) -> bool:
    """Whether the class's forward computes attention itself (by its source)."""
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return any(word in src for word in _ATTENDS)


def _qkv_proj(m: nn.Module) -> tuple[str, str] | None:
    """The names of ``m``'s fused qkv Linear (D -> 3D) and its projection (D -> D), if it has one
    of each."""
    lin = [(n, c) for n, c in m.named_children() if isinstance(c, nn.Linear)]
    qkv = [(n, c) for n, c in lin if c.out_features == 3 * c.in_features]
    if len(qkv) != 1:
        return None
    d = qkv[0][1].in_features
    proj = [n for n, c in lin if c.in_features == c.out_features == d]
    return (qkv[0][0], proj[0]) if len(proj) == 1 else None


def attention_like(m: nn.Module) -> bool:
    """``nn.MultiheadAttention``, or a module of the user's holding a fused qkv Linear and a
    projection whose forward attends: a leaf of the trace, one ``attention`` layer."""
    if isinstance(m, nn.MultiheadAttention):
        return True
    if isinstance(m, _CONTAINERS) or type(m).__module__.startswith("torch.nn"):
        return False
    return _qkv_proj(m) is not None and _forward_attends(type(m))


def _split(path: str, fields: dict[str, tuple[str, int]]) -> dict[str, str]:
    """``q.weight`` -> ``path.qkv.weight[0/3]``: sub-layer fields onto (row blocks of) state."""
    return {k: f"{path}.{name}" + (f"[{i}/3]" if i >= 0 else "") for k, (name, i) in fields.items()}


def _mha(m: nn.MultiheadAttention, conv: Any, node: fx.Node, path: str) -> tuple[dict, dict]:
    """heads and tensors of an ``nn.MultiheadAttention`` called as self-attention."""
    try:
        a = inspect.signature(m.forward).bind(*node.args, **node.kwargs).arguments
    except TypeError:
        a = {}
    same = a.get("query") is a.get("key") is a.get("value")
    masks = any(a.get(k) is not None for k in ("attn_mask", "key_padding_mask"))
    if not same or masks or a.get("is_causal"):
        raise conv.fail(node, "is not plain self-attention", "call it as attn(x, x, x)")
    ok = m.batch_first and m._qkv_same_embed_dim and m.bias_k is None and not m.add_zero_attn
    if not ok or m.dropout:
        raise conv.fail(
            node,
            "is a MultiheadAttention with batch_first=False, kdim/vdim, add_bias_kv,"
            " add_zero_attn or dropout",
            "nn.MultiheadAttention(D, heads, batch_first=True) with the other defaults",
        )
    bias = m.in_proj_bias is not None
    if bias != (m.out_proj.bias is not None):
        raise conv.fail(node, "has a bias on only some projections", _VARIANT_HINT)
    fields = {f"{p}.weight": ("in_proj_weight", i) for i, p in enumerate("qkv")}
    fields["proj.weight"] = ("out_proj.weight", -1)
    if bias:
        fields.update({f"{p}.bias": ("in_proj_bias", i) for i, p in enumerate("qkv")})
        fields["proj.bias"] = ("out_proj.bias", -1)
    return {"heads": m.num_heads, "bias": bias}, _split(path, fields)


def _fused(m: nn.Module, conv: Any, node: fx.Node, path: str) -> tuple[dict, dict]:
    """heads and tensors of a hand-written attention with a fused qkv Linear."""
    qkv, proj = _qkv_proj(m)
    for name, child in m.named_children():
        plain = isinstance(child, nn.Identity) or type(child) is nn.Dropout and child.p == 0
        if name not in (qkv, proj) and not plain:
            raise conv.fail(node, f"holds {name} ({type(child).__name__})", _VARIANT_HINT)
    own = [n for n, _ in m.named_parameters(recurse=False)]
    own += [n for n, _ in m.named_buffers(recurse=False)]
    if own:
        raise conv.fail(node, f"holds its own tensors ({', '.join(own)})", _VARIANT_HINT)
    dim = m.get_submodule(qkv).in_features
    heads = next((getattr(m, h) for h in _HEADS if isinstance(getattr(m, h, None), int)), None)
    if heads is None and isinstance(getattr(m, "head_dim", None), int):
        heads = dim // m.head_dim
    if heads is None:
        raise conv.fail(node, "has no num_heads attribute", "store the head count as num_heads")
    bias = m.get_submodule(qkv).bias is not None
    if bias != (m.get_submodule(proj).bias is not None):
        raise conv.fail(node, "has a bias on only some projections", _VARIANT_HINT)
    fields = {f"{p}.weight": (f"{qkv}.weight", i) for i, p in enumerate("qkv")}
    fields["proj.weight"] = (f"{proj}.weight", -1)
    if bias:
        fields.update({f"{p}.bias": (f"{qkv}.bias", i) for i, p in enumerate("qkv")})
        fields["proj.bias"] = (f"{proj}.bias", -1)
    return {"heads": heads, "bias": bias}, _split(path, fields)


def attention_layer(m: nn.Module, conv: Any, node: fx.Node, path: str) -> Any:
    """The ``attention`` layer of an attention module's call."""
    x = node.args[0] if node.args else None
    if not (isinstance(x, fx.Node) and conv.is_seq(x)):
        raise conv.fail(node, "attends over a value that is not a token sequence", _VARIANT_HINT)
    if isinstance(m, nn.MultiheadAttention):
        args, tensors = _mha(m, conv, node, path)
        meta = node.meta.get("tensor_meta")
        shape = list(meta[0].shape[1:]) if isinstance(meta, tuple) else _shape(node)
        conv.tuples.add(node.name)
    else:
        if len(node.args) != 1 or node.kwargs:
            raise conv.fail(node, "calls attention with several inputs", _VARIANT_HINT)
        args, tensors = _fused(m, conv, node, path)
        shape = _shape(node)
    if args["bias"]:
        del args["bias"]
    return conv.made(node, "attention", args, [x], path=path, tensors=tensors, shape=shape)


def _swaps_last_two(node: fx.Node) -> bool:
    """``x.transpose(1, 2)``, ``x.permute(0, 2, 1)`` (and negative spellings) of a rank-3 value."""
    t, args = node.target, [a % 3 if isinstance(a, int) else a for a in node.args[1:]]
    if node.op == "call_method" and t == "transpose" or t is torch.transpose:
        return sorted(args) == [1, 2]
    if node.op == "call_method" and t == "permute" or t is torch.permute:
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        return [d % 3 for d in dims] == [0, 2, 1]
    return False


def _is(node: fx.Node, method: str, *functions: Any) -> bool:
    t = node.target
    return node.op == "call_method" and t == method or node.op == "call_function" and t in functions


def token_layer(node: fx.Node, conv: Any) -> Any:
    """The token op of a function or method call, ``False`` when it is none (the caller goes on),
    ``None`` when it makes no layer (an image flattened for ``tokens``)."""
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node):
        return False
    src, out = _shape(x), _shape(node)
    users = list(node.users)
    if (
        _is(node, "flatten", torch.flatten)
        or _is(node, "reshape", torch.reshape)
        or _is(node, "view")
    ):
        image = src is not None and len(src) == 3 and not conv.is_seq(x)
        if image and out == [src[0], src[1] * src[2]] and len(users) == 1:
            if _swaps_last_two(users[0]):
                conv.alias[node.name] = conv.ref(x, node)
                conv.flat.add(node.name)
                return None
        return False
    if _swaps_last_two(node) and x.name in conv.flat:
        return conv.made(node, "tokens", {}, [x], tokens=True)
    if not conv.is_seq(x):
        return False
    if node.op == "call_function" and node.target is operator.getitem:
        if node.args[1] == (slice(None), 0):
            return conv.made(node, "token_pool", {"mode": "cls"}, [x], tokens=False)
        raise conv.fail(
            node, "indexes a token sequence", "mixc pools tokens by x[:, 0] or x.mean(dim=1)"
        )
    if _is(node, "mean", torch.mean):
        a = dict(zip(("input", "dim", "keepdim"), node.args)) | dict(node.kwargs)
        dim = a.get("dim")
        dim = dim[0] if isinstance(dim, (tuple, list)) and len(dim) == 1 else dim
        if isinstance(dim, int) and dim % 3 == 1 and not a.get("keepdim"):
            return conv.made(node, "token_pool", {"mode": "mean"}, [x], tokens=False)
        raise conv.fail(node, "averages a token sequence other than over its tokens", "mean(1)")
    return False


def param_layer(node: fx.Node, conv: Any) -> Any:
    """A class token (a parameter expanded and put before the sequence) or a position embedding
    (a parameter added); ``False`` when the node reads no parameter."""
    args = [a for a in node.args if isinstance(a, fx.Node)]
    if node.op == "call_function" and node.target is torch.cat:
        args = [a for a in node.args[0] if isinstance(a, fx.Node)] if node.args else []
    read = [a for a in args if a.name in conv.params]
    if not read:
        return False
    if _is(node, "expand") and node.args[0].name in conv.params:
        conv.params[node.name] = conv.params[node.args[0].name]
        return None
    seq = [a for a in args if a.name not in conv.params and conv.is_seq(a)]
    name = conv.params[read[0].name]
    value = conv.root.get_parameter(name)
    if node.op == "call_function" and node.target is torch.cat and len(node.args[0]) == 2:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        first = node.args[0][0] is read[0]
        if first and seq and dim % 3 == 1 and list(value.shape) == [1, 1, _shape(seq[0])[1]]:
            return conv.made(node, "cls_token", {}, seq, path=name, tensors={"token": name})
    adds = (operator.add, operator.iadd, torch.add)
    if _is(node, "add", *adds) and len(read) == 1 and len(seq) == 1 and len(node.args) == 2:
        if list(value.shape) == [1, *_shape(seq[0])] and not node.kwargs:
            return conv.made(node, "pos_embed", {}, seq, path=name, tensors={"pos": name})
    raise conv.fail(node, f"reads the parameter {name!r}", _PARAM_HINT)
