"""An independent reference for the torch backend: each member as a separate plain network.

Weights are composed here straight from the plan's definition (sum of alpha
times template, blob windows by modular indexing), and each member runs the op
graph with plain ``torch.nn.functional`` calls, one member at a time (LayerNorm
and attention written out by hand). Nothing is shared with the code generator.
BatchEnsemble scales activations (the backend folds nothing either, but batches
the members); a single-path plan (MIMO, Packed-Ensembles) runs once, its grouped
linear layer as a loop of blocks, and its logits are cut into the members' heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mixc.compiler.plan import Plan


def member_weights(plan: Plan, T: dict[str, torch.Tensor], layer: str, m: int):
    """(weight, bias or None) of ``layer`` for member ``m``."""
    op = plan.op(layer)
    if op.source == "plain":
        return T[f"plain.{layer}.weight"], T.get(f"plain.{layer}.bias")
    if op.source == "batch_ensemble":  # the shared weight, the member's own bias
        b = T.get(f"member.{layer}.bias")
        return T[f"plain.{layer}.weight"], None if b is None else b[m]
    if op.source == "member":
        b = T.get(f"member.{layer}.bias")
        return T[f"member.{layer}.weight"][m], None if b is None else b[m]
    slot = plan.slot(layer)
    alpha = T[f"alpha.{layer}"][m]
    if slot.templates is not None:
        bank = T[f"bank.{slot.group}"]
        flat = sum(alpha[j] * bank[t] for j, t in enumerate(slot.templates[m]))
    else:
        blob = T["blob"]
        n = blob.shape[0]
        flat = sum(
            alpha[j] * blob[(slot.offsets[m] + j * slot.size + torch.arange(slot.size)) % n]
            for j in range(slot.k)
        )
    wsize = math.prod(op.weight_shape)
    return flat[:wsize].reshape(op.weight_shape), (flat[wsize:] if op.bias else None)


def _fast(
    op, T: dict[str, torch.Tensor], m: int, run, a: torch.Tensor, b: torch.Tensor | None
) -> torch.Tensor:
    """BatchEnsemble: ((a * r[m]) run W) * s[m] + b[m], r and s along the channel axis."""
    r, s = T[f"fast.{op.name}.r"][m], T[f"fast.{op.name}.s"][m]
    tail = (1,) * (a.dim() - 2)
    y = run(a * r.view(1, -1, *tail)) * s.view(1, -1, *tail)
    return y if b is None else y + b.view(1, -1, *tail)


def _linear(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear on vectors [B, I]; on a sequence [B, I, N] each token mapped (channels first)."""
    if a.dim() == 2:
        return F.linear(a, w, b)
    return F.linear(a.transpose(1, 2), w, b).transpose(1, 2)


def _grouped_linear(
    a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, groups: int
) -> torch.Tensor:
    """Block-diagonal linear: block j maps input slice j to output slice j."""
    ins, outs = a.chunk(groups, dim=1), w.chunk(groups, dim=0)
    y = torch.cat([_linear(x_j, w_j) for x_j, w_j in zip(ins, outs)], dim=1)
    return y if b is None else y + b.view(1, -1, *(1,) * (a.dim() - 2))


def _layer_norm(op, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """By hand: each block of channels (``groups`` blocks; one per member here) normalised at
    every position with its biased variance, then the per-channel affine."""
    h = a.unflatten(1, (op.groups, -1))
    mean = h.mean(2, keepdim=True)
    var = ((h - mean) ** 2).mean(2, keepdim=True)
    h = ((h - mean) / torch.sqrt(var + op.eps)).flatten(1, 2)
    tail = (1,) * (a.dim() - 2)
    return h * weight.view(1, -1, *tail) + bias.view(1, -1, *tail)


def _attention(op, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """By hand: per head, softmax(q k^T / sqrt(d)) v on [B, D, N] sequences, heads of d = D /
    heads consecutive channels."""
    d = op.channels // op.heads
    q, k, v = (t.unflatten(1, (op.heads, d)) for t in (q, k, v))  # [B, H, d, N]
    scores = torch.einsum("bhdi,bhdj->bhij", q, k) / math.sqrt(d)
    return torch.einsum("bhij,bhdj->bhdi", torch.softmax(scores, dim=-1), v).flatten(1, 2)


def _sequence_op(op, a: torch.Tensor, vals: dict, T: dict, row) -> torch.Tensor:
    """A transformer op of one member (``row`` picks its parameters)."""
    k = op.kind
    if k == "tokens":
        return a.reshape(a.shape[0], a.shape[1], -1)
    if k == "cls_token":
        token = row(T[f"embed.{op.name}.token"])
        return torch.cat([token.view(1, -1, 1).expand(a.shape[0], -1, 1), a], dim=2)
    if k == "pos_embed":
        return a + row(T[f"embed.{op.name}.pos"]).T.unsqueeze(0)
    if k == "layernorm":
        return _layer_norm(op, a, row(T[f"ln.{op.name}.weight"]), row(T[f"ln.{op.name}.bias"]))
    if k == "attention":
        return _attention(op, *(vals[i] for i in op.inputs))
    if k == "token_pool":
        return a[:, :, 0] if op.op == "cls" else a.mean(2)
    raise AssertionError(k)


def run_member(
    plan: Plan, T: dict[str, torch.Tensor], m: int, x: torch.Tensor, training: bool
) -> torch.Tensor:
    """Member ``m``'s logits; updates the running stats in ``T`` (row ``m``) like a real BatchNorm.
    A single-path plan's one network runs as "member" 0 with unindexed BatchNorm and gives every
    head.
    """
    single = plan.execution == "single_path"
    row = (lambda t: t) if single else (lambda t: t[m])
    vals: dict[str, torch.Tensor] = {}
    for op in plan.ops:
        a = vals[op.inputs[0]] if op.inputs else None
        k = op.kind
        if k == "input":
            y = x
        elif k == "conv":
            w, b = member_weights(plan, T, op.name, m)
            conv = F.conv1d if op.dim == 1 else F.conv2d
            if op.source == "batch_ensemble":
                y = _fast(
                    op,
                    T,
                    m,
                    lambda h: conv(h, w, None, op.stride, op.padding, op.dilation, op.groups),
                    a,
                    b,
                )
            else:
                y = conv(a, w, b, op.stride, op.padding, op.dilation, op.groups)
        elif k == "linear":
            w, b = member_weights(plan, T, op.name, m)
            if op.source == "batch_ensemble":
                y = _fast(op, T, m, lambda h: _linear(h, w), a, b)
            else:
                y = _grouped_linear(a, w, b, op.groups) if op.groups > 1 else _linear(a, w, b)
        elif k == "bn":
            p = f"bn.{op.name}."
            y = F.batch_norm(
                a,
                row(T[p + "running_mean"]),
                row(T[p + "running_var"]),
                row(T[p + "weight"]),
                row(T[p + "bias"]),
                training,
                op.momentum,
                op.eps,
            )
        elif k == "act":
            y = {
                "relu": F.relu,
                "gelu": F.gelu,
                "silu": F.silu,
                "tanh": torch.tanh,
                "sigmoid": torch.sigmoid,
                "leaky_relu": lambda t: F.leaky_relu(t, op.slope),
            }[op.fn](a)
        elif k == "pool":
            fn = {
                ("max", 1): F.max_pool1d,
                ("max", 2): F.max_pool2d,
                ("avg", 1): F.avg_pool1d,
                ("avg", 2): F.avg_pool2d,
            }
            y = fn[(op.op, op.dim)](a, op.kernel, op.stride, op.padding)
        elif k == "global_pool":
            dims = tuple(range(2, a.dim()))
            y = a.mean(dims) if op.op == "avg" else a.amax(dims)
        elif k == "flatten":
            y = a.flatten(1)
        elif k == "dropout":
            y = F.dropout(a, op.p, training)
        elif k == "add":
            y = vals[op.inputs[0]] + vals[op.inputs[1]]
        else:
            y = _sequence_op(op, a, vals, T, row)
        vals[op.name] = y
    return vals[plan.output]


def reference_forward(
    plan: Plan, T: dict[str, torch.Tensor], x: torch.Tensor, training: bool
) -> torch.Tensor:
    """Member logits [B, M, classes], one member at a time (single path: one run, its logits cut
    into M heads; MIMO's input is the members' images stacked member-major, the same image for
    all here).
    """
    if plan.execution == "single_path":
        if plan.method.name == "mimo":
            x = torch.cat([x] * plan.members, dim=1)
        return run_member(plan, T, 0, x, training).unflatten(1, (plan.members, plan.classes))
    return torch.stack([run_member(plan, T, m, x, training) for m in range(plan.members)], 1)


def assert_grouped_equals_loop(plan: Plan, build, named_plan_tensors) -> None:
    """The grouped and loop layouts give the same logits and gradients (float64), from one state."""
    torch.manual_seed(0)
    a = build(plan, layout="grouped", dtype=torch.float64)
    b = build(plan, layout="loop", dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    x = torch.randn(
        4, *plan.input_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    ya, yb = a(x), b(x)
    assert (ya - yb).abs().max().item() < 1e-10
    target = torch.randn_like(ya)
    (ya * target).sum().backward()
    (yb * target).sum().backward()
    ga, gb = named_plan_tensors(a), named_plan_tensors(b)
    for t in plan.tensors:
        if t.trainable:
            assert (ga[t.name].grad - gb[t.name].grad).abs().max().item() < 1e-9, t.name


def randomise_batch_norm(named: dict[str, torch.Tensor], seed: int = 1) -> None:
    """Non-trivial BatchNorm affine and running statistics in a model's plan tensors (``named``), so
    evaluation mode exercises them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in named.items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.startswith("bn."):
                t.copy_(
                    torch.randn(t.shape, generator=g) * 0.3
                    + (1.0 if name.endswith("weight") else 0.0)
                )
