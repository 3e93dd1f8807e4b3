"""The backend-neutral emitter: what every backend's generated file holds alike, written once.

A backend's ``codegen.py`` subclasses ``Emitter`` (``TorchEmitter``, ``FlaxEmitter``: siblings, so
no backend depends on another's code) and supplies only its framework's idioms: the lowering table
``LOWER = {op kind: function}`` as a class attribute (adding an op kind is one entry per backend),
the imports, the docstring and the bodies of a block's and the model's class. Everything that must
not drift between backends lives here: identifiers, the plan checks, the header and constants, the
tables (``BANKS``, ``BATCH_NORMS``, ``LAYERS``, ``CONFIG``), initialisation variances, which values
all members share, the module tree and forward statements, and how a standalone file takes in its
backend's runtime module.

Every plan string written into source goes through ``pysource.literal``/``comment``; lines are at
most ``pysource.LINE_WIDTH`` (100) characters; output is deterministic (no paths, no clocks), so the
same Plan gives byte-identical files on every checkout.
"""

from __future__ import annotations

import importlib.util
import keyword
import math
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any, ClassVar

from mixc.backends.pysource import (
    KEEP,
    LINE_WIDTH,
    call,
    fill,
    ident,
    packed,
    tup,
    validated,
    wrapped_comment,
)
from mixc.backends.pysource import comment as _c
from mixc.backends.pysource import literal as _q
from mixc.backends.structure import Node, assign_vars, attr, build_tree, class_bodies, relative
from mixc.compiler.methods import method_of
from mixc.compiler.plan import PLAN_VERSION, ConvOp, LinearOp, Plan
from mixc.core.errors import MixcError


class CodegenError(MixcError, ValueError):
    """The plan asks for something this backend cannot lower (a user-facing error: exit 1, no
    traceback)."""


# ---------------------------------------------------------------------------
# Names


def attr_name(tensor_name: str) -> str:
    """The module attribute holding a plan tensor: dots become ``__``."""
    return ident(tensor_name.replace(".", "__"))


def module_name(plan: Plan) -> str:
    """File/module name for a plan's source: the plan name made an identifier."""
    name = ident(plan.name) or "model"
    return f"m_{name}" if name[0].isdigit() or keyword.iskeyword(name) else name


def class_name(plan: Plan) -> str:
    name = module_name(plan)
    return name[0].upper() + name[1:]


# ---------------------------------------------------------------------------
# Formatting


def fmt_int(n: int) -> str:
    return f"{n:,}"


# ---------------------------------------------------------------------------
# Initialisation variances (both backends draw the same laws)


def fan_in(op: ConvOp | LinearOp) -> int:
    return math.prod(op.weight_shape[1:])


def weight_var_value(op: ConvOp | LinearOp) -> float:
    fan = fan_in(op)
    return 2 / fan if op.kind == "conv" else 1 / (3 * fan)


def blob_var(plan: Plan) -> float:
    """Read-weighted mean of the target variances of the layers reading the blob."""
    ops = {op.name: op for op in plan.ops}
    num = den = 0.0
    for slot in plan.slots:
        if slot.offsets is None:
            continue
        op = ops[slot.layer]
        wsize = math.prod(op.weight_shape)
        reads = len(slot.offsets) * slot.k
        num += reads * (wsize * weight_var_value(op) + (slot.size - wsize) / (3 * fan_in(op)))
        den += reads * slot.size
    return num / den if den else 1.0


# ---------------------------------------------------------------------------
# Plan checks


#: ops that hold parameters of each member's own besides the weight layers
MEMBER_OPS = ("bn", "layernorm", "cls_token", "pos_embed")


def shared_flags(plan: Plan) -> dict[str, bool]:
    """An op's output is shared when it is the same for every member (computed once); in a
    single-path plan (MIMO, Packed-Ensembles) every op runs once for all members."""
    if plan.execution == "single_path":
        return {op.name: True for op in plan.ops}
    shared: dict[str, bool] = {}
    for op in plan.ops:
        ins = all(shared[i] for i in op.inputs)
        if op.kind == "input":
            shared[op.name] = True
        elif op.kind in MEMBER_OPS:  # every member's own parameters
            shared[op.name] = False
        elif op.kind in ("conv", "linear"):
            shared[op.name] = ins and op.source == "plain"
        else:
            shared[op.name] = ins
    return shared


def check(plan: Plan) -> None:
    """What every backend needs of a plan beyond pydantic's validation, or ``CodegenError``."""
    p = plan
    names = [t.name for t in p.tensors]
    if len(set(names)) != len(names):
        raise CodegenError(f"plan {p.name!r} lists a tensor twice")
    attrs = [attr_name(n) for n in names]
    if len(set(attrs)) != len(attrs):
        raise CodegenError(
            f"plan {p.name!r}: two tensor names map to one attribute ({sorted(attrs)})"
        )
    out = next((op for op in p.ops if op.name == p.output), None)
    if out is None:
        raise CodegenError(f"plan {p.name!r}: output op {p.output!r} does not exist")
    # one network: M heads side by side
    classes = p.classes * (p.members if p.execution == "single_path" else 1)
    if out.out_shape != [classes]:
        raise CodegenError(
            f"plan {p.name!r}: output {p.output!r} has shape {out.out_shape}, not [{classes}]"
        )
    if [op.kind for op in p.ops].count("input") != 1 or p.ops[0].kind != "input":
        raise CodegenError(f"plan {p.name!r} must start with exactly one input op")
    for op in p.ops:
        if op.kind == "linear" and len(op.in_shape) not in (1, 2):  # a vector or token sequence
            raise CodegenError(
                f"linear {op.name!r} reads shape {op.in_shape}; only vectors and token sequences"
                " [D, N] are supported"
            )
        if (
            op.kind in ("conv", "linear")
            and op.source in ("bank", "blob")
            and p.slot(op.name) is None
        ):
            raise CodegenError(f"layer {op.name!r} is {op.source}-sourced but has no slot")


def checked(plan: Plan) -> Plan:
    """``plan`` if a backend may lower it: the supported version, re-validated, checked."""
    if plan.version != PLAN_VERSION:
        raise CodegenError(
            f"plan version {plan.version} is not the supported version {PLAN_VERSION}; recompile"
            " the spec"
        )
    plan = validated(plan, CodegenError)
    check(plan)
    return plan


# ---------------------------------------------------------------------------
# Header and constants


def header(plan: Plan, backend: str) -> list[str]:
    """The generated file's opening comment: provenance and the parameter accounting.

    The spec is named by its file name, never its path, so output is the same on every checkout.
    """
    p, a = plan, plan.accounting
    roles: dict[str, int] = {}
    for t in p.tensors:
        if t.trainable:
            roles[t.role] = roles.get(t.role, 0) + t.numel
    total = sum(roles.values())

    def n(*rs: str) -> int:
        return sum(roles.get(r, 0) for r in rs)

    budget = "none (template counts fixed)" if a.budget is None else fmt_int(a.budget)
    banks = ", ".join(f"bank.{_c(g.name)}{KEEP}{g.templates}x{g.size}" for g in p.groups)
    if p.blob:
        banks = (banks + ", " if banks else "") + f"blob{KEEP}{p.blob.size}"
    paragraphs = [
        (
            "# ",
            (
                f"Generated by mixc ({backend} backend) from spec {_q(p.name)}"
                f" ({_c(PurePath(p.source).name)})."
            ),
        ),
        (
            "# ",
            (
                f"Plan version {p.version}, spec_hash {_c(p.spec_hash or p.content_hash())}. Do not"
                " edit: regenerate."
            ),
        ),
        (
            "# ",
            (
                f"{p.members} members, grouping {_c(p.grouping)}, assign {_c(p.assign)}, "
                f"up to {p.templates_per_layer} templates per layer."
            ),
        ),
        (
            "# ",
            f"Trainable parameters: {fmt_int(total)} (budget {budget}; minimum"
            f" {fmt_int(a.minimum_budget)}): templates {fmt_int(n('bank', 'blob'))}"
            + (f" ({banks})" if banks else "")
            + ",",
        ),
        (
            "#   ",
            (
                f"plain {fmt_int(n('plain_weight', 'plain_bias'))} ({len(p.plain_layers)} layers"
                f" shared by all members), per member {fmt_int(n('member_weight', 'member_bias'))},"
                f" alphas {fmt_int(n('alpha'))}, batch norm {fmt_int(n('bn_weight', 'bn_bias'))}."
            ),
        ),
        (
            "# ",
            (
                f"One plain backbone: {fmt_int(a.backbone_params)}; naive ensemble of {p.members}: "
                f"{fmt_int(a.naive_params)}."
            ),
        ),
    ]
    return [line for first, text in paragraphs for line in wrapped_comment(text, first)]


#: what a generated file's docstring says of each method beside MixtureEnsembles (title, what its
#: layers hold)
METHOD_DOCS = {
    "naive": (
        "Deep ensemble",
        "Each member has its own weights (``member`` layers) and its own BatchNorm.",
    ),
    "batch_ensemble": (
        "BatchEnsemble",
        (
            "Every conv and linear layer holds one weight W shared by all members and fast"
            " weights\nr [M, in], s [M, out]: member i computes ((x * r[i]) conv W) * s[i] + b[i],"
            " with its own bias and\nBatchNorm."
        ),
    ),
    "mimo": (
        "MIMO",
        (
            "One network: its first layer reads the M members' inputs side by side on the channel"
            " axis\n(stack_inputs), its last layer gives M heads; one BatchNorm per layer."
        ),
    ),
    "packed": (
        "Packed-Ensembles",
        (
            "One network, every layer widened and split into groups so that member i owns the i-th"
            " share\nof every width; one BatchNorm per layer over the widened channels."
        ),
    ),
}


def describe(plan: Plan, mixture: str) -> tuple[str, str]:
    """(title, what its layers hold) of the plan's method, for a generated file's docstring;
    ``mixture`` is the backend's own paragraph on MixtureEnsembles (the rest of a docstring holds
    for every method).
    """
    return METHOD_DOCS.get(plan.method.name, ("MixtureEnsemble", mixture))


def constants(plan: Plan) -> list[str]:
    """The module-level constants every generated file defines (a model class repeats them as
    attributes)."""
    p = plan
    return [
        f"SPEC_NAME = {_q(p.name)}",
        f"SPEC_HASH = {_q(p.spec_hash or p.content_hash())}",
        f"PLAN_VERSION = {p.version}",
        f"MEMBERS = {p.members}",
        f"CLASSES = {p.classes}",
        f"INPUT_SHAPE = {tuple(p.input_shape)!r}",
    ]


# ---------------------------------------------------------------------------
# The runtime module a generated file imports (or, standalone, holds)

RUNTIME_MARK = "# --- the runtime"


def runtime_source(module: str) -> tuple[list[str], list[str]]:
    """A runtime module's import lines and its code below the ``RUNTIME_MARK`` line: what a
    standalone file writes in place of ``from <module> import ...`` (the code reads no globals of
    the generated file, so it runs the same inlined)."""
    path = importlib.util.find_spec(module).origin
    lines = Path(path).read_text().splitlines()
    mark = next(i for i, line in enumerate(lines) if line.startswith(RUNTIME_MARK))
    first = next(
        i
        for i, line in enumerate(lines)
        if line.startswith(("import ", "from ")) and "__future__" not in line
    )
    body = lines[mark + 1 :]
    while body and not body[0].strip():
        body.pop(0)
    return lines[first:mark], body


#: the runtime's class for each kind of layer op
LAYER_CLASS = {
    "conv": "Conv",
    "linear": "Linear",
    "bn": "BatchNorm",
    "layernorm": "LayerNorm",
    "cls_token": "ClassToken",
    "pos_embed": "PosEmbed",
}

#: one lowering: (emitter, the node being written, the op, its input variables) -> an expression
Lowering = Callable[["Emitter", Any, Any, list[str]], str]


class Emitter:
    """What every backend writes alike: the tables (``BANKS``, ``BATCH_NORMS``, ``LAYERS``,
    ``CONFIG``), one class per block, a stage of repeats as a module list run in a loop, and each
    forward's statements. A backend's subclass sets the class attributes below (``LOWER``: op kind
    -> lowering) and writes what differs: the docstring, a block's and the model's class bodies."""

    LOWER: ClassVar[dict[str, Lowering]] = {}
    BACKEND: ClassVar[str] = ""
    IMPORTS: ClassVar[list[str]] = []  # the generated file's framework imports
    RUNTIME: ClassVar[str] = ""  # the module holding the layer classes
    RUNTIME_NAMES: ClassVar[list[str]] = ["BatchNorm", "Composed", "Config", "Conv", "Ensemble"]
    # op kind -> runtime name it needs
    OPTIONAL_NAMES: ClassVar[dict[str, str]] = {
        "linear": "Linear",
        "layernorm": "LayerNorm",
        "cls_token": "ClassToken",
        "pos_embed": "PosEmbed",
        "attention": "attend",
    }
    RESERVED_CLASSES = {
        "LayerNorm",
        "ClassToken",
        "PosEmbed",
        "Composed",
        "Config",
        "Conv",
        "Linear",
        "BatchNorm",
        "Ensemble",
        "Members",
        "Weighted",
    }
    MODULE_LIST: ClassVar[str] = ""  # what holds a stage's blocks
    MODULE_BASE: ClassVar[str] = ""  # what a block class derives from

    def __init__(self, plan: Plan, standalone: bool = False) -> None:
        self.plan = plan
        self.standalone = standalone
        self.single_path = plan.execution == "single_path"  # MIMO, Packed-Ensembles: one network
        self.M = plan.members
        self.ops = {op.name: op for op in plan.ops}
        self.op_index = {op.name: i for i, op in enumerate(plan.ops)}
        self.shared = shared_flags(plan)
        for op in plan.ops:
            if op.kind != "input" and op.kind not in self.LOWER:
                raise CodegenError(
                    f"op kind {op.kind!r} is not supported by the {self.BACKEND} backend"
                )
        # A shared layer output that per-member values are added to is repeated by the layer
        # itself, so a block reads the same whether or not its input is shared.
        self.spread = {
            i
            for op in plan.ops
            if op.kind == "add" and not self.shared[op.name]
            for i in op.inputs
            if self.shared[i] and self.ops[i].kind in ("conv", "linear")
        }
        self.shared.update({name: False for name in self.spread})
        self.tree = build_tree(plan)
        self.classes = class_bodies(
            self.tree, self.block_body, self.RESERVED_CLASSES | {class_name(plan)}
        )

    # -- the file ----------------------------------------------------------

    def source(self) -> str:
        """The whole file: header, docstring, imports, helpers (standalone: the runtime), constants,
        classes."""
        out = header(self.plan, self.BACKEND) + self.docstring() + self.imports() + [""]
        out += self.helpers()
        out += self.constants()
        out += ["", ""] + self.klass()
        return "\n".join(out).rstrip() + "\n"

    def docstring(self) -> list[str]:
        raise NotImplementedError

    def where(self) -> str:
        """Where a docstring says the layer classes are."""
        return "below" if self.standalone else self.RUNTIME

    def imports(self) -> list[str]:
        """The framework's imports, then the runtime's (or, standalone, what its code needs)."""
        if self.standalone:
            return runtime_source(self.RUNTIME)[0]
        names = sorted(self.runtime_names(), key=str.lower)
        one = f"from {self.RUNTIME} import {', '.join(names)}"
        return (
            self.IMPORTS + ["", one]
            if len(one) <= LINE_WIDTH
            else self.IMPORTS + [""] + packed(f"from {self.RUNTIME} import ", names, "")
        )

    def runtime_names(self) -> list[str]:
        """What the file takes from the runtime module."""
        kinds = {op.kind for op in self.plan.ops}
        return self.RUNTIME_NAMES + [
            name for kind, name in self.OPTIONAL_NAMES.items() if kind in kinds
        ]

    def helpers(self) -> list[str]:
        """Standalone: the runtime's code, written into the file (otherwise it is imported)."""
        return ["", ""] + runtime_source(self.RUNTIME)[1] + ["", ""] if self.standalone else []

    # -- the tables --------------------------------------------------------

    def constants(self) -> list[str]:
        p = self.plan
        lines = constants(p)
        lines += [
            "",
            (
                "# Banks: plan name -> (key in model.banks, [templates, size], (weight size, weight"
                " std, bias std))."
            ),
            "BANKS = {",
            *(
                ln
                for g in p.groups
                for ln in packed(f"{_q('bank.' + g.name)}: ", self.bank_entry(g), "    ", ",")
            ),
            "}",
            "",
            (
                "# Every BatchNorm's channels, by plan name (options other than the defaults are in"
                " LAYERS)."
            ),
            *packed_dict(
                "BATCH_NORMS", [(_q(op.name), str(op.channels)) for op in p.ops if op.kind == "bn"]
            ),
            "",
            (
                "# Conv and linear layers: shape [out, in/groups, *kernel], options, source of the"
                " weights."
            ),
            "LAYERS = {",
        ]
        for op in p.ops:
            config = self.layer_config(op) if op.kind in LAYER_CLASS else []
            if config:
                lines += packed(f"{_q(op.name)}: dict", config, "    ", ",")
        return lines + ["}", ""] + self.config_lines()

    def config_lines(self) -> list[str]:
        """``CONFIG``: the tables and init rules the layer classes read (each its row by plan
        name)."""
        p = self.plan
        alpha_std = p.init.alphas.std if p.init.alphas.law == "normal" else None
        classifier_std = p.init.classifier.std if p.init.classifier.law == "normal" else None
        blob = (p.blob.size, math.sqrt(blob_var(p))) if p.blob else None
        return [
            "CONFIG = Config(",
            (
                "    members=MEMBERS, classes=CLASSES, layers=LAYERS, batch_norms=BATCH_NORMS,"
                " banks=BANKS,"
            ),
            f"    blob={blob!r},  # the flat template store: (size, std)",
            "    # None: orthonormal alphas (alpha_std), PyTorch's usual init (classifier_std)",
            *fill(
                [
                    f"output={_q(p.output)}",
                    f"alpha_std={alpha_std!r}",
                    f"classifier_std={classifier_std!r}",
                ],
                "    ",
                "    ",
                ",",
            ),
            *self.method_config(),
            ")",
        ]

    def method_config(self) -> list[str]:
        """``CONFIG``'s lines for the ensemble methods beside MixtureEnsembles (none for mixture and
        naive)."""
        method = self.plan.method
        if method_of(self.plan).has_fast_weights:
            fast = (method.fast_init, method.fast_std if method.fast_init == "normal" else 0.0)
            return [
                f"    fast_init={fast!r},  # BatchEnsemble's r and s: N(1, std^2), or random signs"
            ]
        if not self.single_path:
            return []
        stacked = self.M if method_of(self.plan).stacks_inputs else 1
        return [
            f"    single_path=True, input_members={stacked},  # {method.name}: one network holds"
            " every member"
        ]

    def bank_entry(self, g: Any) -> list[str]:
        op = self.ops[g.layers[0]]
        weight_size = math.prod(g.weight_shape)
        stds = f"{math.sqrt(weight_var_value(op))!r}, {math.sqrt(1 / (3 * fan_in(op)))!r}"
        return [_q(ident(g.name)), f"({g.templates}, {g.size})", f"({weight_size}, {stds})"]

    def layer_config(self, op: Any) -> list[str]:
        shared_in = self.shared[op.inputs[0]]
        if op.kind == "bn":
            cfg = [f"momentum={op.momentum!r}"] if op.momentum != 0.1 else []
            cfg += [f"eps={op.eps!r}"] if op.eps != 1e-5 else []
            return cfg + (["shared_input=True"] if shared_in and not self.single_path else [])
        if op.kind in MEMBER_OPS:
            return self.member_op_config(op, shared_in)
        cfg = [f"shape={tuple(op.weight_shape)!r}"]
        if op.kind == "conv":
            for key, v, default in (
                ("stride", op.stride, 1),
                ("padding", op.padding, 0),
                ("dilation", op.dilation, 1),
            ):
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
        cfg += ["tokens=True"] if op.kind == "linear" and len(op.in_shape) == 2 else []
        cfg += ["shared_input=True"] if shared_in else []
        return cfg + (["spread=True"] if op.name in self.spread else [])

    def member_op_config(self, op: Any, shared_in: bool) -> list[str]:
        """A LAYERS row of a LayerNorm, class token or position embedding: its shape and options."""
        cfg = [f"channels={op.channels}"]
        if op.kind == "layernorm":
            cfg += [f"eps={op.eps!r}"] + ([f"groups={op.groups}"] if op.groups != 1 else [])
        elif op.kind == "pos_embed":
            cfg.append(f"tokens={op.tokens}")
        return cfg + (["shared_input=True"] if shared_in and not self.single_path else [])

    # -- the classes -------------------------------------------------------

    def klass(self) -> list[str]:
        lines: list[str] = []
        for name, nodes in self.classes.items():
            lines += [f"class {name}({self.MODULE_BASE}):"] + self.block_body(nodes[0]) + ["", ""]
        return lines + self.model_class()

    def block_body(self, node: Node) -> list[str]:
        """A block class without its ``class`` line: the same for every call of the block that
        has the same layers (the calls differ only in ``name``, which picks their LAYERS rows)."""
        raise NotImplementedError

    def block_doc(self, node: Node) -> str:
        what = (
            f"Block {_q(node.block)} of the spec"
            if node.block
            else f"Scope {_q(node.path)} of the spec"
        )
        return f'    """{what}."""'

    def model_class(self) -> list[str]:
        raise NotImplementedError

    def class_head(self, base: str) -> list[str]:
        """``class Name(base):`` with its docstring and the plan's facts as class attributes."""
        return [
            f"class {class_name(self.plan)}({base}):",
            f'    """The {_q(self.plan.name)} ensemble; see the module docstring."""',
            "",
            "    spec_name, spec_hash, members, classes = SPEC_NAME, SPEC_HASH, MEMBERS, CLASSES",
            "    input_shape = INPUT_SHAPE",
            "",
        ]

    def stacked_inputs(self) -> list[str]:
        """MIMO's first statement."""
        if not method_of(self.plan).stacks_inputs:
            return []
        return [
            "        x = self.stack_inputs(x)  # MIMO: the members' images side by side on the"
            " channels"
        ]

    def children(self, node: Node, in_block: bool) -> list[str]:
        """``self.<local> = Layer(name)`` for each layer and child block, in order."""
        lines = []
        for it in node.items:
            local = relative(node, it.path if isinstance(it, Node) else it.name)
            target = f"        self.{attr(local)} = "
            if isinstance(it, Node) and it.is_list:
                lines += call(
                    f"self.{attr(local)} = {self.MODULE_LIST}",
                    [self.module_list(node, it, in_block)],
                    "        ",
                )
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
            if j - i >= 2 and all(
                loc == f"{head}{k.index}" for loc, k in zip(locals_, kids[i : j + 1])
            ):
                first, last = kids[i].index, kids[j].index + 1
                parts.append(
                    f"*({kids[i].cls}({_name(head, in_block, '{i}')}) for i in range({first},"
                    f" {last}))"
                )
            else:
                parts += [
                    f"{k.cls}({_name(loc, in_block)})" for k, loc in zip(kids[i : j + 1], locals_)
                ]
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
                lines += [
                    f"        for block in self.{attr(relative(node, it.path))}:",
                    f"            {out} = block({out}, w)",
                ]
            elif isinstance(it, Node):
                lines.append(f"        {out} = self.{attr(relative(node, it.path))}({ins[0]}, w)")
            else:
                lines.append(f"        {out} = {self.LOWER[it.kind](self, node, it, ins)}")
        result = var[node.output]
        if final and self.shared[node.output] and not self.single_path:
            return lines + [f"        return {self.spread_to_members(result)}"]
        return lines + [
            f"        return self.logits({result})" if final else f"        return {result}"
        ]

    def spread_to_members(self, result: str) -> str:
        """A value every member shares (no member axis) as member logits [B, MEMBERS, CLASSES]."""
        raise NotImplementedError


# ---------------------------------------------------------------------------
# Lowerings both backends write alike (a backend's LOWER names them beside its own)


def layer_call(em: Emitter, node: Node, op: Any, a: list[str]) -> str:
    """A conv, linear, BatchNorm, LayerNorm or embedding layer: the block's attribute, called with
    the composed weights."""
    return f"self.{attr(relative(node, op.name))}({a[0]}, w)"


def attend(em: Emitter, node: Node, op: Any, a: list[str]) -> str:
    """Attention of (q, k, v); the head size, not the count, is what every layout shares (grouped,
    the members' heads sit side by side on the channel axis)."""
    return f"attend({a[0]}, {a[1]}, {a[2]}, head_dim={op.head_dim})"


def add(em: Emitter, node: Node, op: Any, a: list[str]) -> str:
    """A residual sum; a term shared by all members meets per-member ones repeated side by side."""
    return " + ".join(
        f"w.repeat({v})" if em.shared[i] and not em.shared[op.name] else v
        for i, v in zip(op.inputs, a)
    )


def packed_dict(name: str, items: list[tuple[str, str]]) -> list[str]:
    """``NAME = {key: value, ...}`` with as many entries per line as fit."""
    lines, cur = [f"{name} = {{"], "   "
    for key, value in items:
        piece = f" {key}: {value},"
        if len(cur) + len(piece) > LINE_WIDTH and cur.strip():
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


#: the lowerings every backend writes alike; a backend's LOWER adds its own (activations, pools,
#: reshapes) to these
COMMON_LOWER: dict[str, Lowering] = {
    "conv": layer_call,
    "linear": layer_call,
    "bn": layer_call,
    "layernorm": layer_call,
    "cls_token": layer_call,
    "pos_embed": layer_call,
    "add": add,
    "attention": attend,
}
