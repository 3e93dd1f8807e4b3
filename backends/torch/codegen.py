"""Lower a Plan to the Python source of a torch ``nn.Module`` that reads like the spec.

The output holds what is particular to the spec: its tables (``LAYERS``, ``BANKS``,
``BATCH_NORMS``, literals gathered into one ``CONFIG``), one class per ``.mix`` block, a stage of
repeats as a module list iterated in a loop, and the model's forward. The ensemble's layer classes
(``Conv``, ``Linear``, ``BatchNorm``, ``Ensemble``) are imported from ``runtime.py``, or written
into the file with ``standalone`` (a single file that needs torch alone). Module paths follow the
spec's names (``model.s1[0].conv1``). ``build`` in ``model.py`` imports this very text, so the
file on disk is exactly what runs.

Composition happens once per forward, in the model's ``compose``: per bank, one product of all its
layers' alphas with the templates; each layer then reads its weights by name. The backend-neutral
half (names, checks, header, initialisation variances) is ``backends/emit.py``, the module tree
``backends/structure.py``; this module holds torch's idioms and the table ``LOWER`` from op kind
to statement. The same Plan gives byte-identical source.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from mixc.backends.emit import (
    CodegenError, Emitter, attr_name, blob_var, call, checked, class_name, constants, fan_in, ident, module_name,
    describe, runtime_source, tup, weight_var_value,
)
from mixc.backends.pysource import literal as _q
from mixc.backends.structure import Node, assign_vars, attr, build_tree, class_bodies, relative
from mixc.compiler.plan import Plan

__all__ = ["CodegenError", "attr_name", "class_name", "emit_source", "module_name"]


# ---------------------------------------------------------------------------
# The lowering table: op kind -> the expression of one forward statement


def _layer_call(node: Node, op: Any, a: list[str], shared: dict[str, bool]) -> str:
    return f"self.{attr(relative(node, op.name))}({a[0]}, w)"


def _bn(node: Node, op: Any, a: list[str], shared: dict[str, bool]) -> str:
    return f"self.{attr(relative(node, op.name))}({a[0]}, w)"


def _act(node: Node, op: Any, a: list[str], shared: dict[str, bool]) -> str:
    if op.fn in ("tanh", "sigmoid"):
        return f"torch.{op.fn}({a[0]})"
    if op.fn == "leaky_relu":
        return f"F.leaky_relu({a[0]}, negative_slope={op.slope!r})"
    return f"F.{op.fn}({a[0]})"


def _pool(node: Node, op: Any, a: list[str], shared: dict[str, bool]) -> str:
    args = [a[0], f"kernel_size={tup(op.kernel)}", f"stride={tup(op.stride)}"]
    if any(p != 0 for p in op.padding):
        args.append(f"padding={tup(op.padding)}")
    return f"F.{op.op}_pool{op.dim}d({', '.join(args)})"


def _global_pool(node: Node, op: Any, a: list[str], shared: dict[str, bool]) -> str:
    dims = tuple(range(2, 1 + len(op.in_shape)))
    return f"{a[0]}.{'mean' if op.op == 'avg' else 'amax'}({dims if len(dims) > 1 else dims[0]})"


def _flatten(node: Node, op: Any, a: list[str], shared: dict[str, bool]) -> str:
    return f"{a[0]}.flatten(1)"


def _dropout(node: Node, op: Any, a: list[str], shared: dict[str, bool]) -> str:
    return f"F.dropout({a[0]}, p={op.p!r}, training=self.training)"


def _add(node: Node, op: Any, a: list[str], shared: dict[str, bool]) -> str:
    """A residual sum; a term shared by all members meets per-member ones repeated side by side."""
    return " + ".join(f"w.repeat({v})" if shared[i] and not shared[op.name] else v for i, v in zip(op.inputs, a))


LOWER: dict[str, Callable[[Node, Any, list[str], dict[str, bool]], str]] = dict(
    conv=_layer_call, linear=_layer_call, bn=_bn, act=_act, pool=_pool,
    global_pool=_global_pool, flatten=_flatten, dropout=_dropout, add=_add,
)
LAYER_CLASS = {"conv": "Conv", "linear": "Linear", "bn": "BatchNorm"}

#: what a MixtureEnsemble's docstring says its layers hold (emit.describe: other methods say their own)
MIXTURE_DOC = """Member i's weight in a composed layer is sum_l alpha[i, l] * T[l], T rows of a bank (a layer's
weight flattened, then its bias) or windows of the flat ``blob``, composed once per forward before
any layer runs (Ensemble.mix). ``plain`` layers share one weight, ``member`` layers have one per
member, each member has its own BatchNorm."""


class TorchEmitter(Emitter):
    BACKEND = "torch"
    IMPORTS = ["import torch", "import torch.nn.functional as F", "from torch import nn"]
    RUNTIME = "mixc.backends.torch.runtime"  # where the layer classes live (see helpers)
    RESERVED_CLASSES = {"Composed", "Config", "Conv", "Linear", "BatchNorm", "Ensemble", "Members", "Weighted"}
    MODULE_LIST = "nn.ModuleList"  # what holds a stage's blocks
    MODULE_BASE = "nn.Module"  # what a block class derives from

    def __init__(self, plan: Plan, standalone: bool = False) -> None:
        self.LOWER = LOWER
        self.standalone = standalone
        self.single_path = plan.execution == "single_path"  # MIMO, Packed-Ensembles: one network
        super().__init__(plan)
        # A shared layer output that per-member values are added to is repeated by the layer
        # itself, so a block reads the same whether or not its input is shared.
        self.spread = {
            i for op in plan.ops if op.kind == "add" and not self.shared[op.name]
            for i in op.inputs if self.shared[i] and self.ops[i].kind in ("conv", "linear")
        }
        self.shared.update({name: False for name in self.spread})
        self.tree = build_tree(plan)
        self.classes = class_bodies(self.tree, self.block_body, self.RESERVED_CLASSES | {class_name(plan)})

    # -- the file ----------------------------------------------------------

    def docstring(self) -> list[str]:
        p = self.plan
        where = "below" if self.standalone else self.RUNTIME
        title, layers = describe(p, MIXTURE_DOC)
        doc = f'''"""{title} {_q(p.name)}: {p.members} members.

{layers}
forward(x [B, *INPUT_SHAPE]) returns member logits [B, MEMBERS, CLASSES]. Layout "grouped":
activations [B, M*C, ...], one grouped convolution for all members; "loop": a Members tuple, one
convolution per member; "auto": grouped on CUDA.
Layer classes: {where}; initialisation and layouts: docs/execution.md in the mixc repository.
"""'''
        return [doc, ""]

    def imports(self) -> list[str]:
        """The framework's imports, then the runtime's (or, standalone, what its code needs)."""
        if self.standalone:
            return runtime_source(self.RUNTIME)[0]
        return self.IMPORTS + ["", f"from {self.RUNTIME} import {', '.join(sorted(self.runtime_names(), key=str.lower))}"]

    def runtime_names(self) -> list[str]:
        """What the file takes from the runtime module."""
        return ["BatchNorm", "Composed", "Config", "Conv", "Ensemble"] + ["Linear"] * self.needs()["linear"]

    def constants(self) -> list[str]:
        p = self.plan
        lines = constants(p)
        lines += [
            "",
            "# Banks: plan name -> (key in model.banks, [templates, size], (weight size, weight std, bias std)).",
            "BANKS = {",
            *(f"    {_q('bank.' + g.name)}: ({_q(ident(g.name))}, {self.bank_entry(g)})," for g in p.groups),
            "}",
            "",
            "# Every BatchNorm's channels, by plan name (options other than the defaults are in LAYERS).",
            *packed_dict("BATCH_NORMS", [(_q(op.name), str(op.channels)) for op in p.ops if op.kind == "bn"]),
            "",
            "# Conv and linear layers: shape [out, in/groups, *kernel], options, source of the weights.",
            "LAYERS = {",
        ]
        for op in p.ops:
            config = self.layer_config(op) if op.kind in LAYER_CLASS else []
            if config:
                lines.append(f"    {_q(op.name)}: dict({', '.join(config)}),")
        return lines + ["}", ""] + self.config_lines()

    def config_lines(self) -> list[str]:
        """``CONFIG``: the tables and init rules the layer classes read (each its row by plan name)."""
        p = self.plan
        alpha_std = p.init.alphas.std if p.init.alphas.law == "normal" else None
        classifier_std = p.init.classifier.std if p.init.classifier.law == "normal" else None
        blob = (p.blob.size, math.sqrt(blob_var(p))) if p.blob else None
        return [
            "CONFIG = Config(",
            "    members=MEMBERS, classes=CLASSES, layers=LAYERS, batch_norms=BATCH_NORMS, banks=BANKS,",
            f"    blob={blob!r},  # the flat template store: (size, std)",
            f"    output={_q(p.output)}, alpha_std={alpha_std!r}, classifier_std={classifier_std!r},"
            "  # None: orthonormal alphas; PyTorch's usual init",
            *self.method_config(),
            ")",
        ]

    def method_config(self) -> list[str]:
        """``CONFIG``'s lines for the ensemble methods beside MixtureEnsembles (none for mixture and naive)."""
        method = self.plan.method
        if method.name == "batch_ensemble":
            fast = (method.fast_init, method.fast_std if method.fast_init == "normal" else 0.0)
            return [f"    fast_init={fast!r},  # BatchEnsemble's r and s: N(1, std^2), or random signs"]
        if not self.single_path:
            return []
        stacked = self.M if method.name == "mimo" else 1
        return [f"    single_path=True, input_members={stacked},  # {method.name}: one network holds every member"]

    def bank_entry(self, g: Any) -> str:
        op = self.ops[g.layers[0]]
        weight_size = math.prod(g.weight_shape)
        stds = f"{math.sqrt(weight_var_value(op))!r}, {math.sqrt(1 / (3 * fan_in(op)))!r}"
        return f"({g.templates}, {g.size}), ({weight_size}, {stds})"

    def layer_config(self, op: Any) -> list[str]:
        shared_in = self.shared[op.inputs[0]]
        if op.kind == "bn":
            cfg = [f"momentum={op.momentum!r}"] if op.momentum != 0.1 else []
            cfg += [f"eps={op.eps!r}"] if op.eps != 1e-5 else []
            return cfg + (["shared_input=True"] if shared_in and not self.single_path else [])
        cfg = [f"shape={tuple(op.weight_shape)!r}"]
        if op.kind == "conv":
            for key, v, default in (("stride", op.stride, 1), ("padding", op.padding, 0), ("dilation", op.dilation, 1)):
                if any(e != default for e in v):
                    cfg.append(f"{key}={tup(v)}")
        cfg += [f"groups={op.groups}"] if op.groups != 1 else []
        cfg += ["bias=True"] if op.bias else []
        cfg.append(f"source={_q(op.source)}")
        slot = self.plan.slot(op.name)
        if op.source == "bank":
            rows = next(g.templates for g in self.plan.groups if g.name == slot.group)
            same = all(r == slot.templates[0] for r in slot.templates)
            templates = f"[{slot.templates[0]}] * {self.M}" if same else str(slot.templates)
            cfg += [f"bank={_q(ident(slot.group))}", f"rows={rows}", f"templates={templates}"]
        elif op.source == "blob":
            cfg += [f"k={slot.k}", f"offsets={slot.offsets}"]
        cfg += ["shared_input=True"] if shared_in else []
        return cfg + (["spread=True"] if op.name in self.spread else [])

    def needs(self) -> dict[str, bool]:
        """Which of the runtime's optional names this plan uses."""
        kinds = {op.kind for op in self.plan.ops}
        return dict(linear="linear" in kinds, pool="pool" in kinds, flatten="flatten" in kinds)

    def helpers(self) -> list[str]:
        """Standalone: the runtime's code, written into the file (otherwise it is imported)."""
        return ["", ""] + runtime_source(self.RUNTIME)[1] + ["", ""] if self.standalone else []

    # -- the classes -------------------------------------------------------

    def klass(self) -> list[str]:
        lines: list[str] = []
        for name, nodes in self.classes.items():
            lines += [f"class {name}({self.MODULE_BASE}):"] + self.block_body(nodes[0]) + ["", ""]
        return lines + self.model_class()

    def block_body(self, node: Node) -> list[str]:
        """A block class without its ``class`` line: the same for every call of the block that
        has the same layers (the calls differ only in ``name``, which picks their LAYERS rows)."""
        what = f"Block {_q(node.block)} of the spec" if node.block else f"Scope {_q(node.path)} of the spec"
        return [
            f'    """{what}."""',
            "",
            "    def __init__(self, name: str) -> None:",
            "        super().__init__()",
            *self.children(node, in_block=True),
            "",
            "    def forward(self, x: torch.Tensor, w: Composed) -> torch.Tensor:",
            *self.statements_of(node),
        ]

    def model_class(self) -> list[str]:
        p = self.plan
        return self.class_head("Ensemble") + [
            '    def __init__(self, layout: str = "auto", channels_last: bool = False) -> None:',
            "        super().__init__(CONFIG, layout, channels_last)",
            *self.children(self.tree, in_block=False),
            "        self.setup()",
            "",
            "    def forward(self, x: torch.Tensor) -> torch.Tensor:",
            '        """x [B, *INPUT_SHAPE] -> member logits [B, MEMBERS, CLASSES]."""',
            *(["        x = self.stack_inputs(x)  # MIMO: the members' images side by side on the channels"]
              if p.method.name == "mimo" else []),
            *(["        x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x"]
              if len(p.input_shape) == 3 else []),
            "        w = self.mix(x.device)  # every composed layer's weights, once per forward",
            *self.statements_of(self.tree, final=True),
        ]

    def children(self, node: Node, in_block: bool) -> list[str]:
        """``self.<local> = Layer(name)`` for each layer and child block, in order."""
        lines = []
        for it in node.items:
            local = relative(node, it.path if isinstance(it, Node) else it.name)
            target = f"        self.{attr(local)} = "
            if isinstance(it, Node) and it.is_list:
                lines += call(f"self.{attr(local)} = {self.MODULE_LIST}", [self.module_list(node, it, in_block)], "        ")
            elif isinstance(it, Node):
                lines.append(f"{target}{it.cls}({_name(local, in_block)})")
            elif it.kind in LAYER_CLASS:
                lines.append(f"{target}{LAYER_CLASS[it.kind]}(CONFIG, {_name(local, in_block)})")
        return lines or ["        pass"]

    def module_list(self, node: Node, stage: Node, in_block: bool) -> str:
        """``[A("s1.b0"), *(B(f"s1.b{i}") for i in range(1, 4))]``: runs of one class as a loop."""
        parts, kids, i = [], stage.items, 0
        while i < len(kids):
            j = i
            while j + 1 < len(kids) and kids[j + 1].cls == kids[i].cls:
                j += 1
            locals_ = [relative(node, k.path) for k in kids[i : j + 1]]
            head = locals_[0].rstrip("0123456789")
            if j - i >= 2 and all(loc == f"{head}{k.index}" for loc, k in zip(locals_, kids[i : j + 1])):
                first, last = kids[i].index, kids[j].index + 1
                parts.append(f"*({kids[i].cls}({_name(head, in_block, '{i}')}) for i in range({first}, {last}))")
            else:
                parts += [f"{k.cls}({_name(loc, in_block)})" for k, loc in zip(kids[i : j + 1], locals_)]
            i = j + 1
        return "[" + ", ".join(parts) + "]"

    def statements_of(self, node: Node, final: bool = False) -> list[str]:
        """The forward's statements; the model's last value is reshaped to member logits."""
        noop = {op.name for op in node.ops() if op.kind == "dropout" and op.p == 0}
        var, steps = assign_vars(node, noop)
        lines = []
        for it, out, ins in steps:
            if isinstance(it, Node) and it.is_list:
                if out != ins[0]:
                    lines.append(f"        {out} = {ins[0]}")
                lines += [f"        for block in self.{attr(relative(node, it.path))}:", f"            {out} = block({out}, w)"]
            elif isinstance(it, Node):
                lines.append(f"        {out} = self.{attr(relative(node, it.path))}({ins[0]}, w)")
            else:
                lines.append(f"        {out} = {self.lower_table()[it.kind](node, it, ins, self.shared)}")
        result = var[node.output]
        if final and self.shared[node.output] and not self.single_path:
            return lines + [f"        return {self.spread_to_members(result)}"]
        return lines + [f"        return self.logits({result})" if final else f"        return {result}"]

    def lower_table(self) -> dict:
        """{op kind: lower function} of this framework (the flax emitter swaps in its own)."""
        return LOWER

    def spread_to_members(self, result: str) -> str:
        """A value every member shares (no member axis) as member logits [B, MEMBERS, CLASSES]."""
        return f"{result}.unsqueeze(1).expand(-1, MEMBERS, -1)"


def packed_dict(name: str, items: list[tuple[str, str]]) -> list[str]:
    """``NAME = {key: value, ...}`` with as many entries per line as fit."""
    lines, cur = [f"{name} = {{"], "   "
    for key, value in items:
        piece = f" {key}: {value},"
        if len(cur) + len(piece) > 100 and cur.strip():
            lines.append(cur)
            cur = "   "
        cur += piece
    return lines + ([cur] if cur.strip() else []) + ["}"]


def _name(local: str, in_block: bool, tail: str = "") -> str:
    """The plan name a layer is built with: a literal in the model, ``f"{name}.<local>"`` in a
    block (whose ``name`` is its scope). Plan names are dotted identifiers: no braces."""
    if in_block:
        return "f" + _q("{name}." + local + tail)
    return "f" + _q(local + tail) if tail else _q(local)


def emit_source(plan: Plan, standalone: bool = False) -> str:
    """The Python source of ``plan`` as a torch nn.Module (deterministic); ``standalone`` writes the
    runtime's layer classes into the file instead of importing them."""
    return TorchEmitter(checked(plan), standalone).source()
