"""The backend-neutral half of code generation: one place for what every backend's emitter shares.

A backend's ``codegen.py`` subclasses ``Emitter`` and supplies its framework's idioms: a lowering
table ``LOWER = {op kind: function}`` (adding an op kind is one entry per backend), how a value
shared by all members is repeated side by side, the file's imports, docstring and class. Everything
that must not drift between backends lives here once: identifiers, the plan checks, the header and
constants, initialisation variances, blob windows, bank selections and the order of statements.

Every plan string written into source goes through ``pysource.literal``/``comment``; output is
deterministic (no paths, no clocks), so the same Plan gives byte-identical files on every checkout.
"""

from __future__ import annotations

import keyword
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, ClassVar

from mixc.backends.pysource import comment as _c
from mixc.backends.pysource import literal as _q
from mixc.backends.pysource import validated
from mixc.compiler.plan import PLAN_VERSION, ConvOp, LinearOp, Plan, Slot, Tensor
from mixc.errors import MixcError

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


def var_names(plan: Plan, reserved: set[str]) -> dict[str, str]:
    """A distinct Python identifier for each op's output (the input op is ``x``)."""
    out: dict[str, str] = {}
    taken = set(reserved)
    for op in plan.ops:
        if op.kind == "input":  # the forward's argument
            out[op.name] = "x"
            continue
        base = ident(op.name) or "v"
        if base[0].isdigit() or keyword.iskeyword(base) or base in reserved or base.startswith("_"):
            base = f"v_{base}"
        name, i = base, 1
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        out[op.name] = name
    return out


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


def stacked(head: str, items: list[str], indent: str) -> list[str]:
    """``head([item, ...])`` on one line, or one item per line when too long."""
    one = f"{indent}{head}([{', '.join(items)}])"
    if len(one) <= LINE_WIDTH:
        return [one]
    return [f"{indent}{head}(", f"{indent}    ["] + [f"{indent}        {it}," for it in items] + [f"{indent}    ]", f"{indent})"]


def fmt_int(n: int) -> str:
    return f"{n:,}"


def conv_kwargs(op: ConvOp, groups: int) -> list[str]:
    """The non-default stride/padding/dilation/groups of a convolution, as keyword arguments."""
    args = []
    if any(s != 1 for s in op.stride):
        args.append(f"stride={tup(op.stride)}")
    if any(p != 0 for p in op.padding):
        args.append(f"padding={tup(op.padding)}")
    if any(d != 1 for d in op.dilation):
        args.append(f"dilation={tup(op.dilation)}")
    if groups != 1:
        args.append(f"groups={groups}")
    return args


# ---------------------------------------------------------------------------
# Initialisation variances (both backends draw the same laws)


def fan_in(op: ConvOp | LinearOp) -> int:
    return math.prod(op.weight_shape[1:])


def weight_var(op: ConvOp | LinearOp) -> str:
    """Variance of a plain layer's default weight init, as a Python expression.

    Conv: kaiming normal (fan_in, ReLU gain) -> 2 / fan_in. Linear: PyTorch's
    default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) -> 1 / (3 fan_in). Biases use
    the same uniform law as PyTorch -> 1 / (3 fan_in).
    """
    fan = fan_in(op)
    return f"2 / {fan}" if op.kind == "conv" else f"1 / (3 * {fan})"


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
# Composition: which bank rows and blob windows a layer reads


@dataclass
class BankMix:
    """How to write ``weights [M, size] = coeffs [M, u] @ T [u, size]`` for a bank slot."""

    lo: int  # T is bank rows lo:hi, or
    hi: int
    rows: list[int] | None  # ... these rows gathered (then lo:hi is unused)
    selector: list[list[int]] | None  # [M][k] positions into T; None: the alphas are the coefficients
    n: int  # u, the rows of T
    whole: bool  # T is the whole bank


def bank_mix(plan: Plan, slot: Slot) -> BankMix:
    """The smallest cheap set of bank rows covering every member's templates.

    A view when they are a contiguous run (the usual case, as the cyclic counter
    hands out consecutive templates), the whole bank when that is at most twice
    the rows needed, else a gather. The coefficients are the alphas themselves
    when every member uses T in order, else the alphas spread by a constant
    one-hot selector: either way one matrix product composes all members.
    """
    n = next(g for g in plan.groups if g.name == slot.group).templates
    used = sorted({t for row in slot.templates for t in row})
    rows = None
    if used == list(range(used[0], used[-1] + 1)):
        lo, hi = used[0], used[-1] + 1
    elif n <= 2 * len(used):
        used, lo, hi = list(range(n)), 0, n
    else:
        rows, lo, hi = used, 0, 0
    pos = {t: i for i, t in enumerate(used)}
    selector = [[pos[t] for t in row] for row in slot.templates]
    if all(row == list(range(len(used))) for row in selector):
        selector = None
    return BankMix(lo, hi, rows, selector, len(used), rows is None and (lo, hi) == (0, n))


def blob_window(plan: Plan, off: int, length: int, concat: str, tile: str) -> str:
    """Expression for ``length`` consecutive blob entries from ``off``, wrapping round the end.

    ``concat``/``tile`` are the framework's spellings (``"torch.cat([{}])"``, ``"blob.repeat({})"``).
    """
    total = plan.blob.size
    if off + length <= total:
        return f"blob[{off}:{off + length}]"
    pieces, pos, left = [], off, length
    while left > 0:
        take = min(left, total - pos)
        pieces.append("blob" if (pos, take) == (0, total) else f"blob[{pos}:{pos + take}]")
        left -= take
        pos = 0
    if len(pieces) <= 4:
        return concat.format(", ".join(pieces))
    reps = -(-(off + length) // total)
    return f"{tile.format(reps)}[{off}:{off + length}]"


# ---------------------------------------------------------------------------
# Plan checks


def shared_flags(plan: Plan) -> dict[str, bool]:
    """An op's output is shared when it is the same for every member (computed once)."""
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
    if out.out_shape != [p.classes]:
        raise CodegenError(f"plan {p.name!r}: output {p.output!r} has shape {out.out_shape}, not [{p.classes}]")
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


def constants(plan: Plan, tensor_table: bool = True) -> list[str]:
    """The module-level constants every generated file defines, then (``tensor_table``) the
    ``PLAN_TENSORS`` table from plan tensor names to flat attributes."""
    p = plan
    lines = [
        f"SPEC_NAME = {_q(p.name)}",
        f"SPEC_HASH = {_q(p.spec_hash or p.content_hash())}",
        f"PLAN_VERSION = {p.version}",
        f"MEMBERS = {p.members}",
        f"CLASSES = {p.classes}",
        f"INPUT_SHAPE = {tuple(p.input_shape)!r}",
        'LAYOUTS = ("auto", "grouped", "loop")',
    ]
    if not tensor_table:
        return lines
    lines += ["", "# Plan tensor name -> module attribute (attribute names cannot contain dots).", "PLAN_TENSORS = {"]
    lines += [f"    {_q(t.name)}: {_q(attr_name(t.name))}," for t in p.tensors]
    lines.append("}")
    return lines


# ---------------------------------------------------------------------------
# Statements: the op graph in order, each op lowered by the backend's table


@dataclass
class Val:
    var: str
    shared: bool  # identical for every member (computed once)


@dataclass
class Site:
    """What a lowering function sees: the op, its inputs, the layout, and the emitter's services."""

    op: Any
    ins: list[Val]
    grouped: bool
    index: int  # the op's position in the plan (a stable salt, e.g. for dropout keys)
    rep: Callable[[Val], str]  # a shared value repeated for the members side by side
    shared: bool  # the op's own output is shared

    @property
    def a(self) -> str:
        """The first input's variable."""
        return self.ins[0].var if self.ins else "x"

    def w(self, part: str = "weight") -> str:
        """The composed weight (or bias) of this layer in the ``w`` dict from compose()."""
        return f"w[{_q(self.op.name + '.' + part)}]"


@dataclass
class Lowered:
    """``target = fn(args...)``; with ``fn`` empty, ``args[0]`` is the whole expression.

    ``extra`` names a second target the call also returns (flax's BatchNorm statistics)."""

    fn: str
    args: list[str]
    extra: str = ""


Lower = Callable[[Any, Site], Lowered]


def methods(*blocks: list[str]) -> list[str]:
    """Method definitions one after another, a blank line between each."""
    out: list[str] = []
    for block in blocks:
        out += ([""] if out else []) + block
    return out


def add_terms(s: Site) -> str:
    """A residual sum; a shared term meets per-member ones repeated side by side (grouped layout)."""
    return " + ".join(s.rep(v) if (s.grouped and v.shared and not s.shared) else v.var for v in s.ins)


class Emitter:
    """The shared machinery; a backend subclass sets ``LOWER``, ``RESERVED`` and ``repeat``."""

    LOWER: ClassVar[dict[str, Lower]] = {}
    RESERVED: ClassVar[set[str]] = {"x", "w", "m", "flat", "blob", "outs", "layout", "self", "math"}
    BACKEND: ClassVar[str] = ""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.M = plan.members
        self.vars = var_names(plan, self.RESERVED)
        self.ops = {op.name: op for op in plan.ops}
        self.index = {op.name: i for i, op in enumerate(plan.ops)}
        self.tensors: dict[tuple[str, str | None], Tensor] = {}
        for t in plan.tensors:
            self.tensors[(t.role, t.layer if t.role not in ("bank", "blob") else t.name)] = t
        self.shared = shared_flags(plan)
        for op in plan.ops:
            if op.kind != "input" and op.kind not in self.LOWER:
                raise CodegenError(f"op kind {op.kind!r} is not supported by the {self.BACKEND} backend")

    def tensor(self, role: str, key: str) -> Tensor:
        try:
            return self.tensors[(role, key)]
        except KeyError:
            raise CodegenError(
                f"plan {self.plan.name!r} has no {role} tensor for {key!r}; "
                "hint: the plan's tensors list and its ops disagree (a compiler bug)"
            ) from None

    def attr(self, role: str, key: str) -> str:
        return "self." + attr_name(self.tensor(role, key).name)

    IMPORTS: ClassVar[list[str]] = []  # the generated file's import lines

    def source(self) -> str:
        """The whole file: header, docstring, imports, constants, helpers, the model class."""
        out = header(self.plan, self.BACKEND) + self.docstring() + self.IMPORTS + [""]
        out += self.constants()
        out += ["", ""] + self.helpers()
        out += ["", ""] + self.klass()
        return "\n".join(out).rstrip() + "\n"

    def docstring(self) -> list[str]:
        raise NotImplementedError

    def constants(self) -> list[str]:
        return constants(self.plan)

    def helpers(self) -> list[str]:
        raise NotImplementedError

    def klass(self) -> list[str]:
        raise NotImplementedError

    def class_head(self, base: str, tensor_table: bool = True) -> list[str]:
        """``class Name(base):`` with its docstring and the plan's facts as class attributes."""
        return [
            f"class {class_name(self.plan)}({base}):",
            f'    """The {_q(self.plan.name)} ensemble; see the module docstring."""',
            "",
            "    spec_name, spec_hash, members, classes = SPEC_NAME, SPEC_HASH, MEMBERS, CLASSES",
            "    input_shape = INPUT_SHAPE",
            *(["    plan_tensors = PLAN_TENSORS"] if tensor_table else []),
            "",
        ]

    def repeat(self, var: str) -> str:
        """Expression for a shared value repeated M times side by side on the channel axis."""
        raise NotImplementedError

    def statements(self, ops: list, grouped: bool, indent: str, vals: dict[str, Val], keep: set[str] | None = None) -> list[str]:
        """Emit ``ops`` in order. With ``keep`` given, ``del`` each value after its last use here
        unless it is kept (frees activations early inside one long function)."""
        lines: list[str] = []
        reps: dict[str, str] = {}

        def rep(v: Val) -> str:
            if v.var not in reps:
                reps[v.var] = f"{v.var}_rep"
                lines.append(f"{indent}{v.var}_rep = {self.repeat(v.var)}")
            return reps[v.var]

        last: dict[str, int] = {}
        for i, op in enumerate(ops):
            for name in op.inputs:
                last[self.vars[name]] = i
        for i, op in enumerate(ops):
            if op.kind == "input":
                vals[op.name] = Val(self.vars[op.name], True)
                continue
            site = Site(op, [vals[n] for n in op.inputs], grouped, self.index[op.name], rep, self.shared[op.name])
            low = self.LOWER[op.kind](self, site)
            var = self.vars[op.name]
            lhs = f"{var}, {low.extra}" if low.extra else var
            if low.fn:
                lines += call(f"{lhs} = {low.fn}", low.args, indent)
            else:
                lines.append(f"{indent}{lhs} = {low.args[0]}")
            vals[op.name] = Val(var, self.shared[op.name])
            if keep is None:
                continue
            done = sorted(v for v, j in last.items() if j == i and v not in keep)
            done += sorted(r for v, r in reps.items() if last.get(v) == i and v not in keep)
            if done:
                lines.append(f"{indent}del {', '.join(done)}")
        return lines

    # -- composition ---------------------------------------------------------

    def read(self, attr: str) -> str:
        """A parameter's value as an expression (flax reads a Variable with ``[...]``)."""
        return attr

    def bank_rows(self, bank: str, mix: BankMix, slot: Slot) -> str:
        """Expression for the bank rows T [u, size] that ``mix`` reads."""
        raise NotImplementedError

    def bank_coeffs(self, alpha: str, mix: BankMix, slot: Slot) -> str:
        """Expression for the mixing weights [M, u] (the alphas spread by ``mix.selector``)."""
        raise NotImplementedError

    STACK: ClassVar[str] = ""  # the framework's stack, e.g. "torch.stack"
    CONCAT: ClassVar[str] = ""  # "torch.cat([{}])"
    TILE: ClassVar[str] = ""  # "blob.repeat({})"

    def compose_layer(self, op: ConvOp | LinearOp, ind: str) -> list[str]:
        """Statements putting one layer's weights for all members into ``w`` (one product each)."""
        key = op.name
        W, B = f'w[{_q(key + ".weight")}]', f'w[{_q(key + ".bias")}]'
        if op.source in ("plain", "member"):
            lines = [f"{ind}{W} = {self.read(self.attr(op.source + '_weight', key))}"]
            if op.bias:
                lines.append(f"{ind}{B} = {self.read(self.attr(op.source + '_bias', key))}")
            return lines
        slot = self.plan.slot(key)
        alpha = self.attr("alpha", key)
        if slot.templates is not None:
            mix = bank_mix(self.plan, slot)
            same = all(r == slot.templates[0] for r in slot.templates)
            desc = str(slot.templates[0]) + " for every member" if same else ", ".join(map(str, slot.templates))
            rows = self.bank_rows(self.attr("bank", f"bank.{slot.group}"), mix, slot)
            lines = [f"{ind}# {_c(key)}: bank.{_c(slot.group)} templates {desc}"]
            lines.append(f"{ind}flat = {self.bank_coeffs(self.read(alpha), mix, slot)} @ {rows}")
        else:
            span = slot.k * slot.size

            def window(o: int) -> str:
                return f"{blob_window(self.plan, o, span, self.CONCAT, self.TILE)}.reshape({slot.k}, {slot.size})"

            lines = [f"{ind}# {_c(key)}: blob windows of {slot.k} x {slot.size} from offsets {slot.offsets}"]
            if all(o == slot.offsets[0] for o in slot.offsets):
                lines.append(f"{ind}flat = {self.read(alpha)} @ {window(slot.offsets[0])}")
            else:
                lines += stacked(f"flat = {self.STACK}", [f"{alpha}[{m}] @ {window(o)}" for m, o in enumerate(slot.offsets)], ind)
        shape = ", ".join(map(str, [self.M, *op.weight_shape]))
        wsize = math.prod(op.weight_shape)
        if op.bias:
            lines.append(f"{ind}{W} = flat[:, :{wsize}].reshape({shape})")
            lines.append(f"{ind}{B} = flat[:, {wsize}:]")
        else:
            lines.append(f"{ind}{W} = flat.reshape({shape})")
        return lines
