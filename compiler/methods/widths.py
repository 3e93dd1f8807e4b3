"""Layer roles and width rewriting shared by the single-path methods (MIMO, Packed-Ensembles)."""

from __future__ import annotations

from collections.abc import Callable

from mixc.compiler import plan as P
from mixc.compiler.layers import member_op_params, weight_size
from mixc.compiler.methods.base import MethodError
from mixc.spec.diagnostics import Pos

WEIGHT_KINDS = ("conv", "linear")
# channels a packed layer may reach while alpha is solved (far above any real network)
MAX_WIDTH = 1 << 24


def layer_roles(ops: list) -> tuple[set[str], set[str]]:
    """(first, last): weight layers no weight layer precedes (they read the input), and weight
    layers whose output reaches the logits through no other weight layer."""
    after_weight: dict[str, bool] = {}
    first: set[str] = set()
    for o in ops:
        upstream = any(after_weight[i] for i in o.inputs)
        if o.kind in WEIGHT_KINDS:
            if not upstream:
                first.add(o.name)
            after_weight[o.name] = True
        else:
            after_weight[o.name] = upstream
    by_name = {o.name: o for o in ops}
    last: set[str] = set()
    stack, seen = [ops[-1].name], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if by_name[name].kind in WEIGHT_KINDS:
            last.add(name)
        else:
            stack.extend(by_name[name].inputs)
    return first, last


#: (op, its new input channels) -> (output channels, groups) of a weight layer
WidthRule = Callable[[P.ConvOp | P.LinearOp, int], tuple[int, int]]


def retarget(
    ops: list, input_factor: int, rule: WidthRule, where: dict[str, Pos], what: str, split: int = 1
) -> list:
    """The graph with the input's channels multiplied by ``input_factor`` and every weight layer's
    output channels and groups from ``rule``; every other op follows its input's new shape.
    ``split``: the members the network's channels are split between (Packed-Ensembles: each
    LayerNorm normalises each member's block, each attention has every member's heads).
    Raises MethodError where two paths meet with different widths."""
    shapes: dict[str, list[int]] = {}
    out = []
    for o in ops:
        if o.kind == "input":
            new = o.model_copy(
                update={"out_shape": [o.out_shape[0] * input_factor, *o.out_shape[1:]]}
            )
            shapes[o.name] = new.out_shape
            out.append(new)
            continue
        ins = [shapes[i] for i in o.inputs]
        x = ins[0]
        if any(s != x for s in ins[1:]):
            raise MethodError(
                f"{what}: the residual add '{o.name}' would add {ins[0][0]} channels to "
                f"{ins[1][0]}: one path reads the network's input before any weight layer, the "
                "other after one",
                where.get(o.name),
                "give the shortcut a projection (conv) so both paths are weight layers' outputs",
            )
        new = o.model_copy(update=_retargeted(o, x, rule, split))
        shapes[o.name] = new.out_shape
        out.append(new)
    return out


def _retargeted(o, x: list[int], rule: WidthRule, split: int) -> dict:
    """The fields of op ``o`` that change when its input has shape ``x``."""
    update: dict = {"in_shape": x}
    if o.kind == "conv":
        cout, groups = rule(o, x[0])
        update |= {
            "in_channels": x[0],
            "out_channels": cout,
            "groups": groups,
            "out_shape": [cout, *o.out_shape[1:]],
        }
    elif o.kind == "linear":
        cout, groups = rule(o, x[0])
        update |= {
            "in_features": x[0],
            "out_features": cout,
            "groups": groups,
            "out_shape": [cout, *x[1:]],
        }
    elif o.kind == "bn":
        update |= {"channels": x[0], "out_shape": x}
    elif o.kind == "layernorm":
        update |= {"channels": x[0], "out_shape": x, "groups": o.groups * split}
    elif o.kind == "attention":
        update |= {"channels": x[0], "out_shape": x, "heads": o.heads * split}
    elif o.kind in ("cls_token", "pos_embed"):
        update |= {"channels": x[0], "out_shape": [x[0], *o.out_shape[1:]]}
    elif o.kind == "flatten":
        n = 1
        for d in x:
            n *= d
        update["out_shape"] = [n]
    elif o.kind == "global_pool":
        update["out_shape"] = [x[0]]
    else:  # activations, pools, dropout, add: the channels of their input, their own spatial size
        update["out_shape"] = [x[0], *o.out_shape[1:]]
    return update


def in_width(o) -> int:
    return o.in_channels if o.kind == "conv" else o.in_features


def out_width(o) -> int:
    return o.out_channels if o.kind == "conv" else o.out_features


def params_of(ops: list) -> int:
    """Trainable parameters of a single-path network: weights, biases, one BatchNorm (LayerNorm)
    scale and shift, one class token and position embedding."""
    return sum(weight_size(o) if o.kind in WEIGHT_KINDS else member_op_params(o) for o in ops)
