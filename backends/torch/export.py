"""A deployable torch module: every member's composed weights as constants, all members in one pass.

The training module (generated from the Plan) composes each member's weights
from its bank on every forward, because training needs gradients through the
alphas and templates. Inference does not: :class:`DeployedEnsemble` takes the
weights composed once by ``mixc.export.compose_all`` and runs the Plan's op
graph directly (it is written from the Plan, not from the generated module's
attributes, so it survives changes to the generated code). Members run side
by side: a per-member activation is ``[B, M*C, ...]`` (member-major channels),
so a convolution is one grouped convolution (``groups = M * op.groups``), a
BatchNorm one batch norm over the concatenated statistics, a linear layer one
batched matmul. Layers every member shares (a plain stem reading the shared
input) run once, as in the training module.

``forward(x)`` returns ``(member_probs [B, M, classes], ensemble [B, classes])``,
the mean of the members' softmaxes: the exported graph's two outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixc.compiler.plan import AddOp, BatchNormOp, ConvOp, LinearOp, Op, Plan
from mixc.core.errors import BackendError
from mixc.core.member_weights import MemberWeights

__all__ = [
    "DeployedEnsemble",
    "export_onnx",
    "export_pt2",
    "onnx_runner",
    "pt2_runner",
    "ONNX_OPSET",
]

#: The opset the ONNX export targets (onnxruntime 1.17+ runs it).
ONNX_OPSET = 18

_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


#: the op kinds DeployedEnsemble runs
EXPORTED_KINDS = {
    "layernorm",
    "attention",
    "tokens",
    "cls_token",
    "pos_embed",
    "token_pool",
    "input",
    "conv",
    "linear",
    "bn",
    "act",
    "pool",
    "global_pool",
    "flatten",
    "dropout",
    "add",
}


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


class DeployedEnsemble(nn.Module):
    """The ensemble in eval mode with composed per-member weights held as buffers (no
    parameters)."""

    def __init__(self, plan: Plan, members: list[MemberWeights]) -> None:
        super().__init__()
        unsupported = sorted({op.kind for op in plan.ops} - EXPORTED_KINDS)
        if unsupported:  # a kind added to the plan but not yet here
            raise BackendError(
                f"the torch export (ONNX, torch.export) does not support op kind"
                f" {unsupported[0]!r} yet ({', '.join(unsupported)} in {plan.name!r}); hint: deploy"
                " the generated model itself (mixc compile --backend torch) instead"
            )
        self.plan = plan
        self.m = plan.members
        # A layer whose weights every member shares keeps one copy (it may then run once on a shared
        # input).
        self.shared_weights: set[str] = set()
        self._names: dict[str, str] = {}
        for op in plan.ops:
            key = op.name.replace(".", "_")
            if op.kind in ("conv", "linear"):
                ws = [mw.layers[op.name] for mw in members]
                if op.source == "plain":
                    self.shared_weights.add(op.name)
                    self.register_buffer(f"w_{key}", _t(ws[0].weight))
                    if op.bias:
                        self.register_buffer(f"b_{key}", _t(ws[0].bias))
                else:
                    # [M, *weight_shape]
                    self.register_buffer(f"w_{key}", _t(np.stack([w.weight for w in ws])))
                    if op.bias:
                        # [M, out]
                        self.register_buffer(f"b_{key}", _t(np.stack([w.bias for w in ws])))
            elif op.kind == "bn":
                parts = [mw.bn[op.name] for mw in members]
                for i, s in enumerate(("g", "b", "mean", "var")):
                    # [M*C]
                    self.register_buffer(f"bn{s}_{key}", _t(np.concatenate([p[i] for p in parts])))
            else:  # LayerNorm, class token, position embedding: each member's rows, stacked
                for name in (t.name for t in plan.tensors if t.layer == op.name):
                    part = name.rsplit(".", 1)[1]
                    self.register_buffer(
                        f"{part}_{key}", _t(np.stack([mw.own[name] for mw in members]))
                    )
            self._names[op.name] = key

    def _buf(self, prefix: str, op_name: str) -> torch.Tensor:
        return getattr(self, f"{prefix}_{self._names[op_name]}")

    def _expand(self, x: torch.Tensor) -> torch.Tensor:
        """A shared activation [B, C, ...] -> every member's copy [B, M*C, ...]."""
        return x.repeat(1, self.m, *([1] * (x.dim() - 2)))

    def _conv(self, op: ConvOp, a: torch.Tensor, per: bool) -> tuple[torch.Tensor, bool]:
        M = self.m
        w = self._buf("w", op.name)
        b = self._buf("b", op.name) if op.bias else None
        conv = F.conv1d if op.dim == 1 else F.conv2d
        if op.name in self.shared_weights and not per:  # runs once, on the shared input
            return conv(a, w, b, op.stride, op.padding, op.dilation, op.groups), per
        # one weight, applied to every member's activation
        if op.name in self.shared_weights:
            w = w.expand(M, *w.shape)
            b = None if b is None else b.expand(M, *b.shape)
        a = a if per else self._expand(a)
        y = conv(
            a,
            w.flatten(0, 1),
            None if b is None else b.flatten(),
            op.stride,
            op.padding,
            op.dilation,
            op.groups * M,
        )
        return y, True

    def _linear(self, op: LinearOp, a: torch.Tensor, per: bool) -> tuple[torch.Tensor, bool]:
        M = self.m
        w = self._buf("w", op.name)
        b = self._buf("b", op.name) if op.bias else None
        if len(op.in_shape) == 2:  # each token of a sequence: a 1x1 convolution over the tokens
            return self._conv1x1(op, a, per, w, b)
        if op.name in self.shared_weights and not per:
            return F.linear(a, w, b), False
        a = a if per else self._expand(a)
        h = a.reshape(a.shape[0], M, op.in_features)  # [B, M, D]
        if op.name in self.shared_weights:
            y = F.linear(h, w, b)  # one weight for every member
        else:
            # [B, M, out]
            y = torch.matmul(h.transpose(0, 1), w.transpose(1, 2)).transpose(0, 1)
            if b is not None:
                y = y + b
        return y.reshape(a.shape[0], M * op.out_features), True

    def _conv1x1(self, op: LinearOp, a: torch.Tensor, per: bool, w, b) -> tuple[torch.Tensor, bool]:
        """A token-wise linear layer on [B, (M*)D, N]: members side by side, one grouped conv."""
        if op.name in self.shared_weights and not per:
            return F.conv1d(a, w.unsqueeze(-1), b), False
        if op.name in self.shared_weights:
            w = w.expand(self.m, *w.shape)
            b = None if b is None else b.expand(self.m, *b.shape)
        a = a if per else self._expand(a)
        y = F.conv1d(
            a, w.flatten(0, 1).unsqueeze(-1), None if b is None else b.flatten(), groups=self.m
        )
        return y, True

    def _sequence(
        self, op: Op, vals: dict[str, tuple[torch.Tensor, bool]]
    ) -> tuple[torch.Tensor, bool]:
        """The transformer ops on [B, (M*)D, N]: each member's channels form one block."""
        a, per = vals[op.inputs[0]]
        k, M = op.kind, self.m
        if k == "tokens":
            return a.flatten(2), per
        if k == "token_pool":
            return (a.select(2, 0) if op.op == "cls" else a.mean(2)), per
        if k == "attention":  # the members' heads side by side: M * heads heads of head_dim
            q, k_, v = (vals[i][0] if vals[i][1] else self._expand(vals[i][0]) for i in op.inputs)
            B, N = q.shape[0], q.shape[2]
            heads = lambda t: t.reshape(B, -1, op.head_dim, N).transpose(2, 3)  # noqa: E731
            y = F.scaled_dot_product_attention(heads(q), heads(k_), heads(v))
            return y.transpose(2, 3).reshape(B, -1, N), True
        a = a if per else self._expand(a)
        if k == "cls_token":  # token [M, D] -> [B, M*D, 1] before the sequence
            token = self._buf("token", op.name).reshape(1, -1, 1).expand(a.shape[0], -1, -1)
            return torch.cat([token, a], dim=2), True
        if k == "pos_embed":  # pos [M, N, D] -> [1, M*D, N]
            return a + self._buf("pos", op.name).transpose(1, 2).reshape(1, -1, a.shape[2]), True
        # layernorm: over each member's C channels at every position
        B, rest = a.shape[0], a.shape[2:]
        h = a.reshape(B, M, op.channels, *rest)
        mean = h.mean(2, keepdim=True)
        var = (h - mean).pow(2).mean(2, keepdim=True)
        h = (h - mean) / torch.sqrt(var + op.eps)
        shape = (1, M, op.channels, *(1,) * len(rest))
        h = h * self._buf("weight", op.name).reshape(shape) + self._buf("bias", op.name).reshape(
            shape
        )
        return h.reshape(a.shape), True

    def _bn(self, op: BatchNormOp, a: torch.Tensor, per: bool) -> tuple[torch.Tensor, bool]:
        a = a if per else self._expand(a)
        y = F.batch_norm(
            a,
            self._buf("bnmean", op.name),
            self._buf("bnvar", op.name),
            self._buf("bng", op.name),
            self._buf("bnb", op.name),
            False,
            0.0,
            op.eps,
        )
        return y, True

    def _pointwise(self, op: Op, a: torch.Tensor, per: bool) -> tuple[torch.Tensor, bool]:
        """The ops that act on each member's activation alone (act, pools, flatten, dropout)."""
        k = op.kind
        if k == "act":
            fn = (
                (lambda t, s=op.slope: F.leaky_relu(t, s))
                if op.fn == "leaky_relu"
                else _ACTS[op.fn]
            )
            return fn(a), per
        if k == "pool":
            fn = {
                ("max", 1): F.max_pool1d,
                ("max", 2): F.max_pool2d,
                ("avg", 1): F.avg_pool1d,
                ("avg", 2): F.avg_pool2d,
            }[(op.op, op.dim)]
            return fn(a, op.kernel, op.stride, op.padding), per
        if k == "global_pool":
            dims = tuple(range(2, a.dim()))
            return (a.mean(dims) if op.op == "avg" else a.amax(dims)), per
        if k == "flatten":
            # member-major channels: flattening keeps members apart
            return a.flatten(1), per
        if k == "dropout":
            return a, per  # eval mode
        # the Plan's op kinds are a closed set
        raise AssertionError(f"op kind {k}")

    def _add(
        self, op: AddOp, vals: dict[str, tuple[torch.Tensor, bool]]
    ) -> tuple[torch.Tensor, bool]:
        a, per = vals[op.inputs[0]]
        b_, per_b = vals[op.inputs[1]]
        if per != per_b:
            a = a if per else self._expand(a)
            b_ = b_ if per_b else self._expand(b_)
        return a + b_, per or per_b

    def _run_op(
        self, op: Op, vals: dict[str, tuple[torch.Tensor, bool]]
    ) -> tuple[torch.Tensor, bool]:
        """One op's (value, per-member?) from its inputs' values."""
        a, per = vals[op.inputs[0]]
        if op.kind == "conv":
            return self._conv(op, a, per)
        if op.kind == "linear":
            return self._linear(op, a, per)
        if op.kind == "bn":
            return self._bn(op, a, per)
        if op.kind == "add":
            return self._add(op, vals)
        if op.kind in ("layernorm", "attention", "tokens", "cls_token", "pos_embed", "token_pool"):
            return self._sequence(op, vals)
        return self._pointwise(op, a, per)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        plan, M = self.plan, self.m
        vals: dict[str, tuple[torch.Tensor, bool]] = {}  # op -> (value, per-member?)
        for op in plan.ops:
            if op.kind == "input":
                vals[op.name] = (x, False)
            else:
                vals[op.name] = self._run_op(op, vals)
        out, per = vals[plan.output]
        if not per:
            out = self._expand(out)
        logits = out.reshape(out.shape[0], M, plan.classes)
        probs = torch.softmax(logits, dim=-1)
        return probs, probs.mean(dim=1)


def _example(plan: Plan, batch: int = 2) -> torch.Tensor:
    return torch.zeros(batch, *plan.input_shape)


def export_pt2(module: DeployedEnsemble, path: Path) -> None:
    """``torch.export`` with a dynamic batch axis, saved with ``torch.export.save``."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    ep = torch.export.export(
        module.eval(), (_example(module.plan),), dynamic_shapes=({0: batch},), strict=False
    )
    torch.export.save(ep, str(path))


def export_onnx(module: DeployedEnsemble, path: Path, opset: int = ONNX_OPSET) -> str:
    """ONNX through torch.onnx's dynamo exporter (needs onnxscript); returns which exporter wrote
    it."""
    import warnings

    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module.eval(),
            (_example(module.plan),),
            dynamo=True,
            opset_version=opset,
            input_names=["x"],
            output_names=["member_probs", "ensemble_probs"],
            dynamic_shapes=({0: batch},),
            optimize=True,
            verbose=False,
            external_data=False,
        )
    prog.save(str(path), external_data=False)
    return f"torch.onnx.export(dynamo=True), torch {torch.__version__}"


def pt2_runner(path: Path) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Load a ``.pt2`` and return a numpy function x -> (member_probs, ensemble)."""
    mod = torch.export.load(str(path)).module()

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            p, e = mod(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return p.numpy(), e.numpy()

    return run


def onnx_runner(
    path: Path, threads: int | None = None
) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """An onnxruntime CPU session on ``path``, as a numpy function x -> (member_probs, ensemble)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p, e = sess.run(
            ["member_probs", "ensemble_probs"], {"x": np.ascontiguousarray(x, dtype=np.float32)}
        )
        return p, e

    return run
