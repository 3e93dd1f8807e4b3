"""Lower a Plan to the Python source of a torch ``nn.Module`` that reads like the spec.

The output holds what is particular to the spec: its tables (``LAYERS``, ``BANKS``,
``BATCH_NORMS``, literals gathered into one ``CONFIG``), one class per ``.mix`` block, a stage of
repeats as a module list iterated in a loop, and the model's forward. The ensemble's layer classes
(``Conv``, ``Linear``, ``BatchNorm``, ``Ensemble``) are imported from ``runtime.py``, or written
into the file with ``standalone`` (a single file that needs torch alone). Module paths follow the
spec's names (``model.s1[0].conv1``). ``build`` in ``model.py`` runs this very text, so the
file on disk is exactly what runs.

Composition happens once per forward, in the model's ``compose``: per bank, one product of all its
layers' alphas with the templates; each layer then reads its weights by name. Everything the
backends write alike (tables, classes, statements) is ``Emitter`` in ``backends/emit.py``; this
module holds torch's idioms only: its docstring, class bodies and the table ``LOWER`` from op kind
to expression. The same Plan gives byte-identical source.
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
    if op.fn in ("tanh", "sigmoid"):
        return f"torch.{op.fn}({a[0]})"
    if op.fn == "leaky_relu":
        return f"F.leaky_relu({a[0]}, negative_slope={op.slope!r})"
    return f"F.{op.fn}({a[0]})"


def _pool(em: Emitter, node: Node, op: Any, a: list[str]) -> str:
    args = [a[0], f"kernel_size={tup(op.kernel)}", f"stride={tup(op.stride)}"]
    if any(p != 0 for p in op.padding):
        args.append(f"padding={tup(op.padding)}")
    return f"F.{op.op}_pool{op.dim}d({', '.join(args)})"


def _global_pool(em: Emitter, node: Node, op: Any, a: list[str]) -> str:
    dims = tuple(range(2, 1 + len(op.in_shape)))
    return f"{a[0]}.{'mean' if op.op == 'avg' else 'amax'}({dims if len(dims) > 1 else dims[0]})"


def _flatten(em: Emitter, node: Node, op: Any, a: list[str]) -> str:
    return f"{a[0]}.flatten(1)"


def _tokens(em: Emitter, node: Node, op: Any, a: list[str]) -> str:
    """An image [B, C, H, W] as a token sequence [B, C, H*W], row-major."""
    return f"{a[0]}.flatten(2)"


def _token_pool(em: Emitter, node: Node, op: Any, a: list[str]) -> str:
    """[B, D, N] -> [B, D]: the class token (position 0) or the mean over tokens."""
    return f"{a[0]}.select(2, 0)" if op.op == "cls" else f"{a[0]}.mean(2)"


def _dropout(em: Emitter, node: Node, op: Any, a: list[str]) -> str:
    return f"F.dropout({a[0]}, p={op.p!r}, training=self.training)"


#: what a MixtureEnsemble's docstring says its layers hold (emit.describe: other methods say their
#: own)
MIXTURE_DOC = """\
Member i's weight in a composed layer is sum_l alpha[i, l] * T[l], T rows of a bank (a layer's
weight flattened, then its bias) or windows of the flat ``blob``, composed once per forward before
any layer runs (Ensemble.mix). ``plain`` layers share one weight, ``member`` layers have one per
member, each member has its own BatchNorm."""


class TorchEmitter(Emitter):
    BACKEND = "torch"
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
    IMPORTS = ["import torch", "import torch.nn.functional as F", "from torch import nn"]
    RUNTIME = "mixc.backends.torch.runtime"
    MODULE_LIST = "nn.ModuleList"
    MODULE_BASE = "nn.Module"

    def docstring(self) -> list[str]:
        p = self.plan
        title, layers = describe(p, MIXTURE_DOC)
        doc = f'''"""{title} {_q(p.name)}: {p.members} members.

{layers}
forward(x [B, *INPUT_SHAPE]) returns member logits [B, MEMBERS, CLASSES]. Layout "grouped":
activations [B, M*C, ...], one grouped convolution for all members; "loop": a Members tuple, one
convolution per member; "auto": grouped on CUDA.
Layer classes: {self.where()};
initialisation and layouts: docs/execution.md in the mixc repository.
"""'''
        return [doc, ""]

    def block_body(self, node: Node) -> list[str]:
        return [
            self.block_doc(node),
            "",
            "    def __init__(self, name: str) -> None:",
            "        super().__init__()",
            *self.children(node, in_block=True),
            "",
            "    def forward(self, x: torch.Tensor, w: Composed) -> torch.Tensor:",
            *self.statements_of(node),
        ]

    def model_class(self) -> list[str]:
        return self.class_head("Ensemble") + [
            '    def __init__(self, layout: str = "auto", channels_last: bool = False) -> None:',
            "        super().__init__(CONFIG, layout, channels_last)",
            *self.children(self.tree, in_block=False),
            "        self.setup()",
            "",
            "    def forward(self, x: torch.Tensor) -> torch.Tensor:",
            '        """x [B, *INPUT_SHAPE] -> member logits [B, MEMBERS, CLASSES]."""',
            *self.stacked_inputs(),
            *(
                [
                    "        x = x.contiguous(memory_format=torch.channels_last) if"
                    " self.channels_last else x"
                ]
                if len(self.plan.input_shape) == 3
                else []
            ),
            "        w = self.mix(x.device)  # every composed layer's weights, once per forward",
            *self.statements_of(self.tree, final=True),
        ]

    def spread_to_members(self, result: str) -> str:
        return f"{result}.unsqueeze(1).expand(-1, MEMBERS, -1)"


def emit_source(plan: Plan, standalone: bool = False) -> str:
    """The Python source of ``plan`` as a torch nn.Module (deterministic); ``standalone`` writes the
    runtime's layer classes into the file instead of importing them."""
    return TorchEmitter(checked(plan), standalone).source()
