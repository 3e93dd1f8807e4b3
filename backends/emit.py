"""The backend-neutral half of code generation: one place for what every backend's emitter shares.

A backend's ``codegen.py`` subclasses ``Emitter`` and supplies its framework's idioms: a lowering
table ``LOWER = {op kind: function}`` (adding an op kind is one entry per backend), the file's
imports, docstring and classes. Everything that must not drift between backends lives here once:
identifiers, the plan checks, the header and constants, initialisation variances, which values all
members share, and how a standalone file takes in its backend's runtime module.

Every plan string written into source goes through ``pysource.literal``/``comment``; output is
deterministic (no paths, no clocks), so the same Plan gives byte-identical files on every checkout.
"""

from __future__ import annotations

import importlib.util
import keyword
import math
import re
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any, ClassVar

from mixc.backends.pysource import comment as _c
from mixc.backends.pysource import literal as _q
from mixc.backends.pysource import validated
from mixc.compiler.plan import PLAN_VERSION, ConvOp, LinearOp, Plan
from mixc.core.errors import MixcError

LINE_WIDTH = 100


class CodegenError(MixcError, ValueError):
    """The plan asks for something this backend cannot lower (a user-facing error: exit 1, no traceback)."""


# ---------------------------------------------------------------------------
# Names


def ident(s: str) -> str:
    """``s`` with every character outside ASCII letters, digits and ``_`` replaced by ``_``."""
    return re.sub(r"\W", "_", s, flags=re.ASCII)


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


def tup(v: list[int]) -> str:
    """A kernel/stride/padding argument: an int when all entries agree."""
    if len(set(v)) == 1:
        return str(v[0])
    return "(" + ", ".join(map(str, v)) + ")"


def call(head: str, args: list[str], indent: str, tail: str = "") -> list[str]:
    """``head(arg, ...)tail`` on one line, or one argument per line when too long."""
    one = f"{indent}{head}({', '.join(args)}){tail}"
    if len(one) <= LINE_WIDTH:
        return [one]
    return [f"{indent}{head}("] + [f"{indent}    {a}," for a in args] + [f"{indent}){tail}"]


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
        elif op.kind == "bn":
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
        raise CodegenError(f"plan {p.name!r}: two tensor names map to one attribute ({sorted(attrs)})")
    out = next((op for op in p.ops if op.name == p.output), None)
    if out is None:
        raise CodegenError(f"plan {p.name!r}: output op {p.output!r} does not exist")
    classes = p.classes * (p.members if p.execution == "single_path" else 1)  # one network: M heads side by side
    if out.out_shape != [classes]:
        raise CodegenError(f"plan {p.name!r}: output {p.output!r} has shape {out.out_shape}, not [{classes}]")
    if [op.kind for op in p.ops].count("input") != 1 or p.ops[0].kind != "input":
        raise CodegenError(f"plan {p.name!r} must start with exactly one input op")
    for op in p.ops:
        if op.kind == "linear" and len(op.in_shape) != 1:
            raise CodegenError(f"linear {op.name!r} reads shape {op.in_shape}; only vectors are supported")
        if op.kind in ("conv", "linear") and op.source in ("bank", "blob") and p.slot(op.name) is None:
            raise CodegenError(f"layer {op.name!r} is {op.source}-sourced but has no slot")


def checked(plan: Plan) -> Plan:
    """``plan`` if a backend may lower it: the supported version, re-validated, checked."""
    if plan.version != PLAN_VERSION:
        raise CodegenError(f"plan version {plan.version} is not the supported version {PLAN_VERSION}; recompile the spec")
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
    banks = ", ".join(f"bank.{_c(g.name)} {g.templates}x{g.size}" for g in p.groups)
    if p.blob:
        banks = (banks + ", " if banks else "") + f"blob {p.blob.size}"
    return [
        f"# Generated by mixc ({backend} backend) from spec {_q(p.name)} ({_c(PurePath(p.source).name)}).",
        f"# Plan version {p.version}, spec_hash {_c(p.spec_hash or p.content_hash())}. Do not edit: regenerate.",
        f"# {p.members} members, grouping {_c(p.grouping)}, assign {_c(p.assign)}, "
        f"up to {p.templates_per_layer} templates per layer.",
        f"# Trainable parameters: {fmt_int(total)} (budget {budget}; minimum {fmt_int(a.minimum_budget)}): "
        f"templates {fmt_int(n('bank', 'blob'))}" + (f" ({banks})" if banks else "") + ",",
        f"#   plain {fmt_int(n('plain_weight', 'plain_bias'))} ({len(p.plain_layers)} layers shared by all members), "
        f"per member {fmt_int(n('member_weight', 'member_bias'))}, alphas {fmt_int(n('alpha'))}, "
        f"batch norm {fmt_int(n('bn_weight', 'bn_bias'))}.",
        f"# One plain backbone: {fmt_int(a.backbone_params)}; naive ensemble of {p.members}: "
        f"{fmt_int(a.naive_params)}.",
    ]


#: what a generated file's docstring says of each method beside MixtureEnsembles (title, what its layers hold)
METHOD_DOCS = {
    "naive": ("Deep ensemble", "Each member has its own weights (``member`` layers) and its own BatchNorm."),
    "batch_ensemble": ("BatchEnsemble", "Every conv and linear layer holds one weight W shared by all members and "
                       "fast weights\nr [M, in], s [M, out]: member i computes ((x * r[i]) conv W) * s[i] + b[i], "
                       "with its own bias and\nBatchNorm."),
    "mimo": ("MIMO", "One network: its first layer reads the M members' inputs side by side on the channel axis\n"
             "(stack_inputs), its last layer gives M heads; one BatchNorm per layer."),
    "packed": ("Packed-Ensembles", "One network, every layer widened and split into groups so that member i "
               "owns the i-th share\nof every width; one BatchNorm per layer over the widened channels."),
}


def describe(plan: Plan, mixture: str) -> tuple[str, str]:
    """(title, what its layers hold) of the plan's method, for a generated file's docstring; ``mixture``
    is the backend's own paragraph on MixtureEnsembles (the rest of a docstring holds for every method)."""
    return METHOD_DOCS.get(plan.method.name, ("MixtureEnsemble", mixture))


def constants(plan: Plan) -> list[str]:
    """The module-level constants every generated file defines (a model class repeats them as attributes)."""
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
    first = next(i for i, line in enumerate(lines) if line.startswith(("import ", "from ")) and "__future__" not in line)
    body = lines[mark + 1 :]
    while body and not body[0].strip():
        body.pop(0)
    return lines[first:mark], body


class Emitter:
    """The shared machinery; a backend subclass sets ``LOWER`` (op kind -> statement) and writes
    the file's parts: imports, docstring, constants, helpers and classes."""

    LOWER: ClassVar[dict[str, Callable]] = {}
    BACKEND: ClassVar[str] = ""
    IMPORTS: ClassVar[list[str]] = []  # the generated file's import lines

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.M = plan.members
        self.ops = {op.name: op for op in plan.ops}
        self.shared = shared_flags(plan)
        for op in plan.ops:
            if op.kind != "input" and op.kind not in self.LOWER:
                raise CodegenError(f"op kind {op.kind!r} is not supported by the {self.BACKEND} backend")

    def source(self) -> str:
        """The whole file: header, docstring, imports, helpers (standalone: the runtime), constants, classes."""
        out = header(self.plan, self.BACKEND) + self.docstring() + self.imports() + [""]
        out += self.helpers()
        out += self.constants()
        out += ["", ""] + self.klass()
        return "\n".join(out).rstrip() + "\n"

    def imports(self) -> list[str]:
        return list(self.IMPORTS)

    def docstring(self) -> list[str]:
        raise NotImplementedError

    def constants(self) -> list[str]:
        return constants(self.plan)

    def helpers(self) -> list[str]:
        """Code written before the constants (empty, or lines ending in blank lines)."""
        return []

    def klass(self) -> list[str]:
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
