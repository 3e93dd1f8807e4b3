"""Lower a Plan to the Python source of a ``flax.nnx`` Module that reads like the spec.

The output holds what is particular to the spec: the same tables the torch backend writes, one
``nnx.Module`` class per ``.mix`` block, a stage of repeats an ``nnx.List`` iterated in a loop, and
the model's call; the layer classes (``Conv``, ``Linear``, ``BatchNorm``, ``Ensemble``) are
imported from ``runtime.py``, or written into the file with ``standalone``. It computes exactly
what the torch backend's module computes, so a checkpoint written by either backend gives the same
logits in the other:

- Layout: parameters are stored in the plan's (PyTorch) layout, so checkpoint tensors need no
  conversion; activations run channels-last (NHWC / NWC, XLA's native conv layout) and conv
  weights are transposed to ``HWIO`` when used. ``flatten`` restores channels-first order.
- BatchNorm: written out, not ``nnx.BatchNorm``: PyTorch's momentum convention, the plan's
  epsilon, biased variance for normalising and unbiased variance for the running estimate.
- Padding is explicit ``(p, p)`` per side; average pooling counts padded zeros; gelu is exact.

Everything the backends write alike (tables, module tree, statements) is ``Emitter`` in
``backends/emit.py``, a sibling of the torch backend's emitter, not a child: this module holds
flax's idioms only and the table ``LOWER`` from op kind to expression. Parameter paths
(``s1.0.conv1.alpha``) map to the plan's tensor names in one place, ``Ensemble.plan_tensors``.
The same Plan gives byte-identical source.
"""

from __future__ import annotations

from typing import Any

from mixc.backends.emit import (
    COMMON_LOWER,
    CodegenError,
    Emitter,
    attr_name,
    checked,
    class_name,
    describe,
    module_name,
)
from mixc.backends.pysource import literal as _q
from mixc.backends.pysource import tup
from mixc.backends.structure import Node
from mixc.compiler.plan import Plan

__all__ = ["CodegenError", "attr_name", "class_name", "emit_source", "module_name"]


# ---------------------------------------------------------------------------
# The lowerings: op kind -> the expression of one forward statement


def _act(em: Emitter, node: Node, op: Any, a: list[str]) -> str:
    if op.fn == "tanh":
        return f"each(jnp.tanh, {a[0]})"
    if op.fn == "leaky_relu":
        return f"each(jax.nn.leaky_relu, {a[0]}, {op.slope!r})"
    if op.fn == "gelu":
        return f"each(jax.nn.gelu, {a[0]}, approximate=False)"
    return f"each(jax.nn.{op.fn}, {a[0]})"


def _pool(em: Emitter, node: Node, op: Any, a: list[str]) -> str:
    args = [a[0], _q(op.op), tup(op.kernel), tup(op.stride)]
    if any(p != 0 for p in op.padding):
        args.append(tup(op.padding))
    return f"each(pool, {', '.join(args)})"


def _global_pool(em: Emitter, node: Node, op: Any, a: list[str]) -> str:
    axes = tuple(range(1, len(op.in_shape)))
    return (
        f"each(jnp.{'mean' if op.op == 'avg' else 'max'}, {a[0]},"
        f" axis={axes if len(axes) > 1 else axes[0]})"
    )


def _flatten(em: Emitter, node: Node, op: Any, a: list[str]) -> str:
    return f"each(flatten, {a[0]})"


def _tokens(em: Emitter, node: Node, op: Any, a: list[str]) -> str:
    return f"each(tokens, {a[0]})"


def _token_pool(em: Emitter, node: Node, op: Any, a: list[str]) -> str:
    return f"each(token_pool, {a[0]}, {_q(op.op)})"


def _dropout(em: Emitter, node: Node, op: Any, a: list[str]) -> str:
    """Dropout salts its key with the op's position in the plan (stable across layouts)."""
    return f"w.dropout({a[0]}, {op.p!r}, {em.op_index[op.name]})"


#: what a MixtureEnsemble's docstring says its layers hold (emit.describe: other methods say their
#: own)
MIXTURE_DOC = """\
Member i's weight in a composed layer is sum_l alpha[i, l] * T[l], T rows of a bank (a layer's
weight flattened in PyTorch order, then its bias) or windows of the flat ``blob``, composed once
per call before any layer runs (Ensemble.mix). ``plain`` layers share one weight, ``member``
layers have one per member, each member has its own BatchNorm (PyTorch's semantics)."""


class FlaxEmitter(Emitter):
    BACKEND = "flax"
    LOWER = {
        **COMMON_LOWER,
        "act": _act,
        "pool": _pool,
        "global_pool": _global_pool,
        "flatten": _flatten,
        "dropout": _dropout,
        "tokens": _tokens,
        "token_pool": _token_pool,
    }
    IMPORTS = ["import jax", "import jax.numpy as jnp", "from flax import nnx"]
    RUNTIME = "mixc.backends.flax.runtime"
    RUNTIME_NAMES = [*Emitter.RUNTIME_NAMES, "each"]
    OPTIONAL_NAMES = {
        **Emitter.OPTIONAL_NAMES,
        "flatten": "flatten",
        "pool": "pool",
        "tokens": "tokens",
        "token_pool": "token_pool",
    }
    MODULE_LIST = "nnx.List"
    MODULE_BASE = "nnx.Module"

    def __init__(self, plan: Plan, standalone: bool = False) -> None:
        for op in plan.ops:
            if op.kind in ("conv", "pool") and op.dim not in (1, 2):
                raise CodegenError(
                    f"{op.kind} {op.name!r} is {op.dim}-D; only 1-D and 2-D are supported"
                )
        super().__init__(plan, standalone)

    def docstring(self) -> list[str]:
        p = self.plan
        title, layers = describe(p, MIXTURE_DOC)
        doc = f'''"""{title} {_q(p.name)} as a flax.nnx Module: {p.members} members.

{layers}
Parameters are in the plan's (PyTorch) layout; ``model.plan_tensors`` maps the plan's tensor names
to their paths, so the torch backend's checkpoints load unchanged. model(x, train=False,
dropout_key=None) takes x [B, *INPUT_SHAPE] channels-first and returns member logits [B, MEMBERS,
CLASSES]; inside, activations are channels-last. Layout "grouped": members side by side on the
channel axis, one grouped convolution; "loop": a Members tuple, one convolution per member; "auto":
loop on CPU, grouped on accelerators. Layer classes: {self.where()};
initialisation and layouts: docs/execution.md in the mixc repository.
"""'''
        return [doc, ""]

    def block_body(self, node: Node) -> list[str]:
        return [
            self.block_doc(node),
            "",
            "    def __init__(self, name: str) -> None:",
            *self.children(node, in_block=True),
            "",
            "    def __call__(self, x, w: Composed):",
            *self.statements_of(node),
        ]

    def model_class(self) -> list[str]:
        return self.class_head("Ensemble") + [
            "    def __init__(",
            '        self, rngs: nnx.Rngs | None = None, layout: str = "auto", dtype=jnp.float32,',
            '        platform: str = "auto",',
            "    ) -> None:",
            (
                '        """``platform``: where it runs ("cpu", "gpu"...; "auto": jax\'s default'
                " backend when called);"
            ),
            '        it picks the "auto" layout and the CPU convolution gradient."""',
            "        super().__init__(CONFIG, layout, dtype, platform)",
            *[ln for ln in self.children(self.tree, in_block=False) if ln.strip() != "pass"],
            (
                "        self.reset_parameters(rngs.params() if rngs is not None else"
                " jax.random.key(0))"
            ),
            "",
            (
                "    def __call__(self, x: jax.Array, train: bool = False, dropout_key: jax.Array |"
                " None = None):"
            ),
            (
                '        """x [B, *INPUT_SHAPE] channels-first -> member logits [B, MEMBERS,'
                ' CLASSES]."""'
            ),
            *self.stacked_inputs(),
            "        x = jnp.moveaxis(x, 1, -1) if x.ndim > 2 else x  # channels last",
            (
                "        w = self.composed(train, dropout_key)  # every composed layer's weights,"
                " once per call"
            ),
            *self.statements_of(self.tree, final=True),
        ]

    def spread_to_members(self, result: str) -> str:
        return f"jnp.broadcast_to({result}[:, None], ({result}.shape[0], MEMBERS, CLASSES))"


def emit_source(plan: Plan, standalone: bool = False) -> str:
    """The Python source of ``plan`` as a flax.nnx Module (deterministic); ``standalone`` writes the
    runtime's layer classes into the file instead of importing them."""
    return FlaxEmitter(checked(plan), standalone).source()
