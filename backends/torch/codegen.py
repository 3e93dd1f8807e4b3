"""Lower a Plan to the Python source of a torch ``nn.Module``.

The output is a self-contained file (it imports only ``math`` and ``torch``)
that a user can copy into their own project: shapes, template indices, blob
offsets and the op graph are baked in as literals, so the class needs nothing
but options (``layout``, ``channels_last``). ``build`` in ``model.py`` execs
this very text, so the file on disk is exactly what runs.

Generation is deterministic: the same Plan gives byte-identical source.
"""

from __future__ import annotations

import keyword
import math
import re
from dataclasses import dataclass
from pathlib import PurePath

from mixc.backends.pysource import comment as _c
from mixc.backends.pysource import literal as _q
from mixc.backends.pysource import validated
from mixc.compiler.plan import PLAN_VERSION, ConvOp, LinearOp, Plan, Slot, Tensor

LINE_WIDTH = 100


class CodegenError(ValueError):
    """The plan asks for something this backend cannot lower."""


# ---------------------------------------------------------------------------
# Names


def attr_name(tensor_name: str) -> str:
    """The module attribute holding a plan tensor: dots become ``__``."""
    return re.sub(r"\W", "_", tensor_name.replace(".", "__"), flags=re.ASCII)


def module_name(plan: Plan) -> str:
    """File/module name for a plan's source: the plan name made an identifier."""
    name = re.sub(r"\W", "_", plan.name, flags=re.ASCII) or "model"
    return f"m_{name}" if name[0].isdigit() or keyword.iskeyword(name) else name


def class_name(plan: Plan) -> str:
    name = module_name(plan)
    return name[0].upper() + name[1:]


_RESERVED = {"x", "w", "m", "flat", "blob", "outs", "layout", "self", "torch", "nn", "F", "math"}


def _var_names(plan: Plan) -> dict[str, str]:
    """A distinct Python identifier for each op's output."""
    out: dict[str, str] = {}
    taken = set(_RESERVED)
    for op in plan.ops:
        if op.kind == "input":  # the forward's argument
            out[op.name] = "x"
            continue
        base = re.sub(r"\W", "_", op.name, flags=re.ASCII) or "v"
        if base[0].isdigit() or keyword.iskeyword(base) or base in _RESERVED:
            base = f"v_{base}"
        name, i = base, 1
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        out[op.name] = name
    return out


# ---------------------------------------------------------------------------
# Formatting helpers


def _tuple(v: list[int]) -> str:
    """A kernel/stride/padding argument: an int when all entries agree."""
    if len(set(v)) == 1:
        return str(v[0])
    return "(" + ", ".join(map(str, v)) + ")"


def _call(head: str, args: list[str], indent: str, tail: str = "") -> list[str]:
    """``head(arg, ...)tail`` on one line, or one argument per line when too long."""
    one = f"{indent}{head}({', '.join(args)}){tail}"
    if len(one) <= LINE_WIDTH:
        return [one]
    return [f"{indent}{head}("] + [f"{indent}    {a}," for a in args] + [f"{indent}){tail}"]


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _wrapped_list(prefix: str, items: list[str], indent: str) -> list[str]:
    """A long Python list literal broken over lines."""
    one = f"{indent}{prefix}[{', '.join(items)}]"
    if len(one) <= LINE_WIDTH:
        return [one]
    lines, cur = [f"{indent}{prefix}["], f"{indent}    "
    for it in items:
        piece = f"{it}, "
        if len(cur) + len(piece) > LINE_WIDTH and cur.strip():
            lines.append(cur.rstrip())
            cur = f"{indent}    "
        cur += piece
    if cur.strip():
        lines.append(cur.rstrip())
    lines.append(f"{indent}]")
    return lines


# ---------------------------------------------------------------------------
# Initialisation rules (documented in the generated module docstring)


def _fan_in(op: ConvOp | LinearOp) -> int:
    return math.prod(op.weight_shape[1:])


def _weight_var(op: ConvOp | LinearOp) -> str:
    """Variance of a plain layer's default weight init, as a Python expression.

    Conv: kaiming normal (fan_in, ReLU gain) -> 2 / fan_in. Linear: PyTorch's
    default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) -> 1 / (3 fan_in). Biases use
    the same uniform law as PyTorch -> 1 / (3 fan_in).
    """
    fan = _fan_in(op)
    return f"2 / {fan}" if op.kind == "conv" else f"1 / (3 * {fan})"


def _weight_var_value(op: ConvOp | LinearOp) -> float:
    fan = _fan_in(op)
    return 2 / fan if op.kind == "conv" else 1 / (3 * fan)


# ---------------------------------------------------------------------------
# The emitter


@dataclass
class _Val:
    var: str
    shared: bool  # identical for every member (computed once)
    ndim: int  # dims without batch


class _Emitter:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.M = plan.members
        self.vars = _var_names(plan)
        self.ops = {op.name: op for op in plan.ops}
        self.tensors: dict[tuple[str, str | None], Tensor] = {}
        for t in plan.tensors:
            self.tensors[(t.role, t.layer if t.role not in ("bank", "blob") else t.name)] = t
        self.shared = self._shared_flags()
        self._check()

    # -- plan queries ------------------------------------------------------

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

    def _shared_flags(self) -> dict[str, bool]:
        """An op's output is shared when it is the same for every member."""
        shared: dict[str, bool] = {}
        for op in self.plan.ops:
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

    def _check(self) -> None:
        p = self.plan
        names = [t.name for t in p.tensors]
        if len(set(names)) != len(names):
            raise CodegenError(f"plan {p.name!r} lists a tensor twice")
        attrs = [attr_name(n) for n in names]
        if len(set(attrs)) != len(attrs):
            raise CodegenError(f"plan {p.name!r}: two tensor names map to one attribute ({sorted(attrs)})")
        out = self.ops.get(p.output)
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

    # -- the file ----------------------------------------------------------

    def source(self) -> str:
        out: list[str] = []
        out += self.header()
        out += ["import math", "", "import torch", "import torch.nn.functional as F", "from torch import nn", ""]
        out += self.constants()
        out += ["", ""] + self.helpers()
        out += ["", ""] + self.klass()
        return "\n".join(out).rstrip() + "\n"

    def header(self) -> list[str]:
        p, a = self.plan, self.plan.accounting
        roles: dict[str, int] = {}
        for t in p.tensors:
            if t.trainable:
                roles[t.role] = roles.get(t.role, 0) + t.numel
        total = sum(roles.values())

        def n(*rs: str) -> int:
            return sum(roles.get(r, 0) for r in rs)

        budget = "none (template counts fixed)" if a.budget is None else _fmt_int(a.budget)
        banks = ", ".join(f"bank.{_c(g.name)} {g.templates}x{g.size}" for g in p.groups)
        if p.blob:
            banks = (banks + ", " if banks else "") + f"blob {p.blob.size}"
        lines = [
            f"# Generated by mixc from spec {_q(p.name)} ({_c(PurePath(p.source).name)}).",
            f"# Plan version {p.version}, spec_hash {_c(p.spec_hash or p.content_hash())}. Do not edit: regenerate.",
            "#",
            f"# {p.members} members, grouping {_c(p.grouping)}, assign {_c(p.assign)}, "
            f"up to {p.templates_per_layer} templates per layer.",
            f"# Trainable parameters: {_fmt_int(total)} (budget {budget}; minimum {_fmt_int(a.minimum_budget)})",
            f"#   templates   {_fmt_int(n('bank', 'blob')):>12}" + (f"  ({banks})" if banks else ""),
            f"#   plain       {_fmt_int(n('plain_weight', 'plain_bias')):>12}  ({len(p.plain_layers)} layers shared by all members)",
            f"#   per member  {_fmt_int(n('member_weight', 'member_bias')):>12}  (unfactorised weights)",
            f"#   alphas      {_fmt_int(n('alpha')):>12}",
            f"#   batch norm  {_fmt_int(n('bn_weight', 'bn_bias')):>12}",
            f"# One plain backbone: {_fmt_int(a.backbone_params)}; naive ensemble of {p.members}: "
            f"{_fmt_int(a.naive_params)}.",
        ]
        doc = f'''"""MixtureEnsemble {_q(p.name)}: {p.members} members composed from shared templates.

Every banked layer's weights for all members are composed once per forward:
member i's weight is sum_l alpha[i, l] * T[l], where the templates T are rows
of a bank (``bank.<group>``, shape [templates, size]) or windows of the flat
``blob``. A template is the layer's weight flattened ([out, in/groups,
*kernel]) followed by its bias. ``plain`` layers are one weight shared by all
members; ``member`` layers hold an unfactorised weight per member; every
member has its own BatchNorm.

forward(x) takes x [B, *INPUT_SHAPE] and returns member logits
[B, MEMBERS, CLASSES]; the ensemble prediction is the mean over members of
their softmax. Two layouts compute the same numbers:
  "grouped"  members side by side on the channel axis ([B, M*C, ...]): a conv
             is one grouped conv, a BatchNorm one batch_norm over M*C channels;
  "loop"     each member's ops run in turn with its own composed weights.
  "auto"     grouped on CUDA, loop elsewhere (on CPU the loop is as fast or
             faster and keeps activations below glibc's 32 MB mmap threshold).
Ops whose input is the same for every member (a plain stem) run once.

Initialisation (reset_parameters): each member's alphas are a unit vector
(orthonormal across members, in blocks of k, from the QR of a Gaussian), so a
composed weight sum_l alpha_l T_l has exactly the variance of one template
(Var W = Var T * sum_l alpha_l**2 = Var T). Templates are therefore drawn
N(0, v) with v the variance of the plain layer's default init: conv weights
2 / fan_in (kaiming normal, ReLU gain), linear weights 1 / (3 fan_in) (PyTorch's
U(+-1/sqrt(fan_in))), biases 1 / (3 fan_in). The blob serves layers of several
fan-ins; it is drawn with the read-weighted mean of their variances (the
BatchNorm after each layer absorbs the rest). Plain and member layers use
PyTorch's usual init (kaiming normal for conv), BatchNorm weight 1, bias 0.
These are the defaults; the plan's init rules may instead draw alphas N(0, std^2)
(then Var W = Var T * k std^2) and the plain output layer N(0, std^2) with bias 0.
"""'''
        return lines + [doc, ""]

    def constants(self) -> list[str]:
        p = self.plan
        lines = [
            f"SPEC_NAME = {_q(p.name)}",
            f"SPEC_HASH = {_q(p.spec_hash or p.content_hash())}",
            f"PLAN_VERSION = {p.version}",
            f"MEMBERS = {p.members}",
            f"CLASSES = {p.classes}",
            f"INPUT_SHAPE = {tuple(p.input_shape)!r}",
            "",
            "# Plan tensor name -> module attribute (attribute names cannot contain dots).",
            "PLAN_TENSORS = {",
        ]
        lines += [f"    {_q(t.name)}: {_q(attr_name(t.name))}," for t in p.tensors]
        lines.append("}")
        return lines

    def helpers(self) -> list[str]:
        return [
            "def _one_hot(index: list[list[int]], n: int) -> torch.Tensor:",
            '    """Selector [M, k, n]: alpha [M, k] @ selector gives the mixing weights over n templates."""',
            "    return F.one_hot(torch.tensor(index), n).to(torch.get_default_dtype())",
            "",
            "",
            "def _orthonormal_rows_(alpha: torch.Tensor) -> None:",
            '    """Unit-norm rows, mutually orthogonal within each block of k members (Haar-random)."""',
            "    members, k = alpha.shape",
            "    for start in range(0, members, k):",
            "        rows = min(k, members - start)",
            "        q, r = torch.linalg.qr(torch.randn(k, rows, device=alpha.device))",
            "        q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)",
            "        alpha[start : start + rows] = q.T",
        ]

    # -- the class -----------------------------------------------------------

    def klass(self) -> list[str]:
        p = self.plan
        lines = [
            f"class {class_name(p)}(nn.Module):",
            f'    """The {_q(p.name)} ensemble; see the module docstring."""',
            "",
            "    spec_name = SPEC_NAME",
            "    spec_hash = SPEC_HASH",
            "    members = MEMBERS",
            "    classes = CLASSES",
            "    input_shape = INPUT_SHAPE",
            "    plan_tensors = PLAN_TENSORS",
            "",
            '    def __init__(self, layout: str = "auto", channels_last: bool = False) -> None:',
            "        super().__init__()",
            '        if layout not in ("auto", "grouped", "loop"):',
            '            raise ValueError(f"layout must be auto, grouped or loop, not {layout!r}")',
            "        self.layout = layout",
            "        self.channels_last = channels_last",
        ]
        lines += self.declarations()
        lines += ["        self.reset_parameters()", ""]
        lines += [
            "    def extra_repr(self) -> str:",
            '        return f"spec={SPEC_NAME}, members={MEMBERS}, layout={self.layout}, channels_last={self.channels_last}"',
            "",
        ]
        lines += self.reset_parameters()
        lines += [""] + self.compose()
        lines += [""] + self.forward()
        lines += [""] + self.forward_grouped()
        lines += [""] + self.forward_loop()
        return lines

    def declarations(self) -> list[str]:
        lines = []
        for t in self.plan.tensors:
            shape = ", ".join(map(str, t.shape))
            if t.trainable:
                lines.append(f"        self.{attr_name(t.name)} = nn.Parameter(torch.empty({shape}))")
            else:
                fill = "ones" if t.role == "bn_var" else "zeros"
                lines.append(f"        self.register_buffer({_q(attr_name(t.name))}, torch.{fill}({shape}))")
        consts = []
        for slot in self.plan.slots:
            if slot.templates is None:
                continue
            mix = self._bank_mix(slot)
            if mix.rows is not None:
                consts.append(
                    f"        self.register_buffer({_q('rows__' + attr_name(slot.layer))}, "
                    f"torch.tensor({mix.rows}), persistent=False)"
                )
            if mix.selector is not None:
                sel = "[" + ", ".join(str(r) for r in mix.selector) + "]"
                consts += _call(
                    'self.register_buffer', [_q("sel__" + attr_name(slot.layer)), f"_one_hot({sel}, {mix.n})",
                                             "persistent=False"], "        "
                )
        if consts:
            lines += ["        # Constant template selections (derived from the plan, not saved)."] + consts
        return lines

    def reset_parameters(self) -> list[str]:
        p = self.plan
        lines = [
            "    @torch.no_grad()",
            "    def reset_parameters(self) -> None:",
            '        """Initialise as the module docstring says (uses the global torch RNG)."""',
        ]
        for g in p.groups:
            op = self.ops[g.layers[0]]
            bank = self.attr("bank", f"bank.{g.name}")
            wsize = math.prod(g.weight_shape)
            fan = _fan_in(op)
            if g.bias:
                lines.append(f"        nn.init.normal_({bank}[:, :{wsize}], std=math.sqrt({_weight_var(op)}))")
                lines.append(f"        nn.init.normal_({bank}[:, {wsize}:], std=math.sqrt(1 / (3 * {fan})))")
            else:
                lines.append(f"        nn.init.normal_({bank}, std=math.sqrt({_weight_var(op)}))")
        if p.blob is not None:
            lines.append(f"        nn.init.normal_(self.{attr_name('blob')}, std=math.sqrt({self._blob_var()!r}))")
        for op in p.ops:
            if op.kind in ("conv", "linear") and op.source in ("plain", "member"):
                role = op.source
                weight = self.attr(f"{role}_weight", op.name)
                fan = _fan_in(op)
                if op.name == p.output and p.init.classifier.law == "normal":  # the plan's classifier rule
                    lines.append(f"        nn.init.normal_({weight}, std={p.init.classifier.std!r})")
                    if op.bias:
                        lines.append(f"        nn.init.zeros_({self.attr(f'{role}_bias', op.name)})")
                    continue
                if op.kind == "conv":
                    lines.append(f"        nn.init.normal_({weight}, std=math.sqrt(2 / {fan}))  # kaiming normal")
                else:
                    lines.append(f"        nn.init.uniform_({weight}, -1 / math.sqrt({fan}), 1 / math.sqrt({fan}))")
                if op.bias:
                    bias = self.attr(f"{role}_bias", op.name)
                    lines.append(f"        nn.init.uniform_({bias}, -1 / math.sqrt({fan}), 1 / math.sqrt({fan}))")
            elif op.kind in ("conv", "linear") and p.init.alphas.law == "normal":  # the plan's alpha rule
                lines.append(f"        nn.init.normal_({self.attr('alpha', op.name)}, std={p.init.alphas.std!r})")
            elif op.kind in ("conv", "linear"):
                lines.append(f"        _orthonormal_rows_({self.attr('alpha', op.name)})")
            elif op.kind == "bn":
                lines.append(f"        nn.init.ones_({self.attr('bn_weight', op.name)})")
                lines.append(f"        nn.init.zeros_({self.attr('bn_bias', op.name)})")
                lines.append(f"        {self.attr('bn_mean', op.name)}.zero_()")
                lines.append(f"        {self.attr('bn_var', op.name)}.fill_(1.0)")
        return lines

    def _blob_var(self) -> float:
        """Read-weighted mean of the target variances of the layers reading the blob."""
        num = den = 0.0
        for slot in self.plan.slots:
            if slot.offsets is None:
                continue
            op = self.ops[slot.layer]
            wsize = math.prod(op.weight_shape)
            reads = len(slot.offsets) * slot.k
            num += reads * (wsize * _weight_var_value(op) + (slot.size - wsize) / (3 * _fan_in(op)))
            den += reads * slot.size
        return num / den if den else 1.0

    # -- composition ---------------------------------------------------------

    @dataclass
    class _Mix:
        templates: str  # expression for the rows T [u, size]
        coeffs: str  # expression for the mixing weights [M, u]
        n: int  # u
        rows: list[int] | None = None  # index buffer for a gather
        selector: list[list[int]] | None = None  # [M][k] positions into T

    def _bank_mix(self, slot: Slot) -> "_Emitter._Mix":
        """How to write ``weights [M, size] = coeffs [M, u] @ T [u, size]`` for a bank slot.

        T is the smallest cheap set of bank rows covering every member's
        templates: a view when they are a contiguous run (the usual case, as
        the cyclic counter hands out consecutive templates), the whole bank
        when that is at most twice the rows needed, else a gather. The
        coefficients are the alphas themselves when every member uses T in
        order, else the alphas spread by a constant one-hot selector.
        """
        group = next(g for g in self.plan.groups if g.name == slot.group)
        bank = self.attr("bank", f"bank.{group.name}")
        alpha = self.attr("alpha", slot.layer)
        used = sorted({t for row in slot.templates for t in row})
        n = group.templates
        rows = None
        if used == list(range(used[0], used[-1] + 1)):
            lo, hi = used[0], used[-1] + 1
            tmpl = bank if (lo, hi) == (0, n) else f"{bank}[{lo}:{hi}]"
        elif n <= 2 * len(used):
            used, tmpl = list(range(n)), bank
        else:
            rows, tmpl = used, f"{bank}.index_select(0, self.rows__{attr_name(slot.layer)})"
        pos = {t: i for i, t in enumerate(used)}
        selector = [[pos[t] for t in row] for row in slot.templates]
        if all(row == list(range(len(used))) for row in selector):
            return self._Mix(tmpl, alpha, len(used), rows)
        coeffs = f'torch.einsum("mk,mku->mu", {alpha}, self.sel__{attr_name(slot.layer)})'
        return self._Mix(tmpl, coeffs, len(used), rows, selector)

    def _blob_window(self, off: int, length: int) -> str:
        """Expression for ``length`` consecutive blob entries from ``off``, wrapping."""
        total = self.plan.blob.size
        if off + length <= total:
            return f"blob[{off}:{off + length}]"
        pieces, pos, left = [], off, length
        while left > 0:
            take = min(left, total - pos)
            pieces.append("blob" if (pos, take) == (0, total) else f"blob[{pos}:{pos + take}]")
            left -= take
            pos = 0
        if len(pieces) <= 4:
            return f"torch.cat([{', '.join(pieces)}])"
        reps = -(-(off + length) // total)
        return f"blob.repeat({reps})[{off}:{off + length}]"

    def compose(self) -> list[str]:
        lines = [
            "    def compose(self) -> dict[str, torch.Tensor]:",
            '        """Every weight layer\'s weights: "<layer>.weight" and "<layer>.bias".',
            "",
            "        Composed layers and member layers carry the member axis first ([M, ...]);",
            "        plain layers are the shared tensors themselves. Called once per forward.",
            '        """',
            "        w: dict[str, torch.Tensor] = {}",
        ]
        body = []
        if self.plan.blob is not None:
            body.append(f"        blob = self.{attr_name('blob')}")
        for op in self.plan.ops:
            if op.kind in ("conv", "linear"):
                body += self._compose_layer(op)
        store = next((t for t in self.plan.tensors if t.role in ("bank", "blob")), None)
        if store is not None:
            # Mix in the parameters' precision even under autocast: the convs cast the result
            # once, and bf16 reductions of the alpha gradient over huge templates are slow on GPUs.
            lines.append(f"        with torch.autocast(self.{attr_name(store.name)}.device.type, enabled=False):")
            body = ["    " + ln for ln in body]
        lines += body
        lines.append("        return w")
        return lines

    def _compose_layer(self, op: ConvOp | LinearOp) -> list[str]:
        M, ind = self.M, "        "
        key = op.name
        if op.source in ("plain", "member"):
            lines = [f'{ind}w[{_q(key + ".weight")}] = {self.attr(op.source + "_weight", key)}']
            if op.bias:
                lines.append(f'{ind}w[{_q(key + ".bias")}] = {self.attr(op.source + "_bias", key)}')
            return lines
        slot = self.plan.slot(key)
        alpha = self.attr("alpha", key)
        if slot.templates is not None:
            mix = self._bank_mix(slot)
            shared = all(r == slot.templates[0] for r in slot.templates)
            desc = str(slot.templates[0]) + " for every member" if shared else ", ".join(map(str, slot.templates))
            lines = [f"{ind}# {_c(key)}: bank.{_c(slot.group)} templates {desc}"]
            lines.append(f"{ind}flat = {mix.coeffs} @ {mix.templates}")
        else:
            span = slot.k * slot.size
            lines = [f"{ind}# {_c(key)}: blob windows of {slot.k} x {slot.size} from offsets {slot.offsets}"]
            if all(o == slot.offsets[0] for o in slot.offsets):
                lines.append(f"{ind}flat = {alpha} @ {self._blob_window(slot.offsets[0], span)}.view({slot.k}, {slot.size})")
            else:
                items = [
                    f"{alpha}[{m}] @ {self._blob_window(o, span)}.view({slot.k}, {slot.size})"
                    for m, o in enumerate(slot.offsets)
                ]
                lines += [f"{ind}flat = torch.stack(", f"{ind}    ["] + [f"{ind}        {it}," for it in items]
                lines += [f"{ind}    ]", f"{ind})"]
        shape = ", ".join(map(str, [M, *op.weight_shape]))
        wsize = math.prod(op.weight_shape)
        if op.bias:
            lines.append(f'{ind}w[{_q(key + ".weight")}] = flat[:, :{wsize}].view({shape})')
            lines.append(f'{ind}w[{_q(key + ".bias")}] = flat[:, {wsize}:]')
        else:
            lines.append(f'{ind}w[{_q(key + ".weight")}] = flat.view({shape})')
        return lines

    # -- forward -------------------------------------------------------------

    def forward(self) -> list[str]:
        return [
            "    def forward(self, x: torch.Tensor) -> torch.Tensor:",
            '        """x [B, *INPUT_SHAPE] -> member logits [B, MEMBERS, CLASSES]."""',
            "        layout = self.layout",
            '        if layout == "auto":',
            '            layout = "grouped" if x.is_cuda else "loop"',
            "        if self.channels_last and x.dim() == 4:",
            "            x = x.contiguous(memory_format=torch.channels_last)",
            "        w = self.compose()",
            '        if layout == "grouped":',
            "            return self.forward_grouped(x, w)",
            "        return self.forward_loop(x, w)",
        ]

    def _weight_args(self, op: ConvOp | LinearOp, member: str | None, stack: bool, repeat: bool) -> list[str]:
        """Weight and bias arguments: per member (``[m]``), stacked on the out axis, or repeated."""
        W, B = f'w[{_q(op.name + ".weight")}]', f'w[{_q(op.name + ".bias")}]'
        if member is not None and op.source != "plain":
            W, B = f"{W}[{member}]", f"{B}[{member}]"
        elif stack:
            W, B = f"{W}.flatten(0, 1)", f"{B}.flatten()"
        elif repeat:
            ones = ", ".join(["1"] * (len(op.weight_shape) - 1))
            W, B = f"{W}.repeat({self.M}, {ones})", f"{B}.repeat({self.M})"
        return [W, B if op.bias else "None"]

    def _conv_args(self, op: ConvOp, groups: int) -> list[str]:
        args = []
        if any(s != 1 for s in op.stride):
            args.append(f"stride={_tuple(op.stride)}")
        if any(p != 0 for p in op.padding):
            args.append(f"padding={_tuple(op.padding)}")
        if any(d != 1 for d in op.dilation):
            args.append(f"dilation={_tuple(op.dilation)}")
        if groups != 1:
            args.append(f"groups={groups}")
        return args

    def _expr(self, op, ins: list[_Val], grouped: bool, rep) -> tuple[str, list[str]]:
        """The expression computing ``op`` (grouped or per member ``m``), and its argument list form."""
        M = self.M
        k = op.kind
        a = ins[0].var if ins else "x"
        member = None if grouped else "m"
        if k == "conv":
            fn = f"F.conv{op.dim}d"
            if op.source == "plain":
                if grouped and not ins[0].shared:
                    return fn, [a, *self._weight_args(op, None, False, True), *self._conv_args(op, M * op.groups)]
                return fn, [a, *self._weight_args(op, None, False, False), *self._conv_args(op, op.groups)]
            if not grouped:
                return fn, [a, *self._weight_args(op, member, False, False), *self._conv_args(op, op.groups)]
            if ins[0].shared and op.groups == 1:  # one conv with the members' filters stacked
                return fn, [a, *self._weight_args(op, None, True, False), *self._conv_args(op, 1)]
            src = rep(ins[0]) if ins[0].shared else a
            return fn, [src, *self._weight_args(op, None, True, False), *self._conv_args(op, M * op.groups)]
        if k == "linear":
            if op.source == "plain":
                W, B = self._weight_args(op, None, False, False)
                if grouped and not ins[0].shared:
                    return "", [f"F.linear({a}.unflatten(1, ({M}, {op.in_features})), {W}, {B}).flatten(1)"]
                return "F.linear", [a, W, B]
            if not grouped:
                return "F.linear", [a, *self._weight_args(op, member, False, False)]
            if ins[0].shared:
                return "F.linear", [a, *self._weight_args(op, None, True, False)]
            W, B = f'w[{_q(op.name + ".weight")}]', f'w[{_q(op.name + ".bias")}]'
            prod = f'torch.einsum("bmi,moi->bmo", {a}.unflatten(1, ({M}, {op.in_features})), {W})'
            return "", [f"({prod} + {B}).flatten(1)" if op.bias else f"{prod}.flatten(1)"]
        if k == "bn":
            names = [self.attr(r, op.name) for r in ("bn_mean", "bn_var", "bn_weight", "bn_bias")]
            if grouped:
                src = rep(ins[0]) if ins[0].shared else a
                params = [f"{n}.view(-1)" for n in names]
            else:
                src, params = a, [f"{n}[m]" for n in names]
            return "F.batch_norm", [src, *params, "self.training", repr(op.momentum), repr(op.eps)]
        if k == "act":
            if op.fn in ("tanh", "sigmoid"):
                return f"torch.{op.fn}", [a]
            if op.fn == "leaky_relu":
                return "F.leaky_relu", [a, repr(op.slope)]
            return f"F.{op.fn}", [a]
        if k == "pool":
            args = [a, _tuple(op.kernel), _tuple(op.stride)]
            if any(p != 0 for p in op.padding):
                args.append(_tuple(op.padding))
            return f"F.{op.op}_pool{op.dim}d", args
        if k == "global_pool":
            dims = tuple(range(2, 1 + len(op.in_shape)))
            fn = "mean" if op.op == "avg" else "amax"
            return "", [f"{a}.{fn}({dims if len(dims) > 1 else dims[0]})"]
        if k == "flatten":
            return "", [f"{a}.flatten(1)"]
        if k == "dropout":
            if op.p == 0:
                return "", [a]  # no-op: keep the name, skip the call
            return "F.dropout", [a, repr(op.p), "self.training"]
        if k == "add":
            xs = [rep(v) if (grouped and v.shared and not self.shared[op.name]) else v.var for v in ins]
            return "", [" + ".join(xs)]
        raise CodegenError(f"op kind {k!r} is not supported by the torch backend")

    def _statements(self, ops, grouped: bool, indent: str, vals: dict[str, _Val], keep: set[str]) -> list[str]:
        """Emit ``ops`` in order; ``del`` each value after its last use here unless in ``keep``."""
        lines: list[str] = []
        reps: dict[str, str] = {}
        M = self.M

        def rep(v: _Val) -> str:  # shared value -> members side by side (cat keeps channels_last)
            if v.var not in reps:
                reps[v.var] = f"{v.var}_rep"
                lines.append(f"{indent}{v.var}_rep = torch.cat([{v.var}] * {M}, 1)")
            return reps[v.var]

        last: dict[str, int] = {}
        for i, op in enumerate(ops):
            for name in op.inputs:
                last[self.vars[name]] = i
        for i, op in enumerate(ops):
            if op.kind == "input":
                vals[op.name] = _Val(self.vars[op.name], True, len(op.out_shape))
                continue
            ins = [vals[n] for n in op.inputs]
            fn, args = self._expr(op, ins, grouped, rep)
            var = self.vars[op.name]
            if fn:
                lines += _call(f"{var} = {fn}", args, indent)
            else:
                lines.append(f"{indent}{var} = {args[0]}")
            vals[op.name] = _Val(var, self.shared[op.name], len(op.out_shape))
            done = sorted(v for v, j in last.items() if j == i and v not in keep)
            done += sorted(r for v, r in reps.items() if last.get(v) == i and v not in keep)
            if done:
                lines.append(f"{indent}del {', '.join(done)}")
        return lines

    def forward_grouped(self) -> list[str]:
        p = self.plan
        lines = [
            "    def forward_grouped(self, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:",
            '        """Members side by side on the channel axis: activations are [B, M*C, ...]."""',
        ]
        vals: dict[str, _Val] = {}
        out = self.vars[p.output]
        lines += self._statements(p.ops, True, "        ", vals, keep={out})
        if self.shared[p.output]:
            lines.append(f"        return {out}.unsqueeze(1).expand(-1, {self.M}, -1)")
        else:
            lines.append(f"        return {out}.unflatten(1, ({self.M}, {p.classes}))")
        return lines

    def forward_loop(self) -> list[str]:
        p = self.plan
        lines = [
            "    def forward_loop(self, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:",
            '        """Each member in turn with its own weights; shared ops run once, before the loop."""',
        ]
        shared_ops = [op for op in p.ops if self.shared[op.name]]
        member_ops = [op for op in p.ops if not self.shared[op.name]]
        used_in_loop = {self.vars[i] for op in member_ops for i in op.inputs if self.shared[i]}
        out = self.vars[p.output]
        vals: dict[str, _Val] = {}
        lines += self._statements(shared_ops, False, "        ", vals, keep=used_in_loop | {out, "x"})
        if self.shared[p.output]:
            lines.append(f"        return {out}.unsqueeze(1).expand(-1, {self.M}, -1)")
            return lines
        lines += ["        outs = []", f"        for m in range({self.M}):"]
        lines += self._statements(member_ops, False, "            ", vals, keep={out} | used_in_loop)
        lines += [f"            outs.append({out})", "        return torch.stack(outs, 1)"]
        return lines


def emit_source(plan: Plan) -> str:
    """The Python source of ``plan`` as a torch nn.Module (deterministic)."""
    if plan.version != PLAN_VERSION:
        raise CodegenError(f"plan version {plan.version} is not the supported version {PLAN_VERSION}; recompile the spec")
    return _Emitter(validated(plan, CodegenError)).source()
