"""Lower a Plan to the Python source of a torch ``nn.Module``.

The output is a self-contained file (it imports only ``math`` and ``torch``)
that a user can copy into their own project: shapes, template indices, blob
offsets and the op graph are baked in as literals, so the class needs nothing
but options (``layout``, ``channels_last``). ``build`` in ``model.py`` execs
this very text, so the file on disk is exactly what runs.

The backend-neutral half (names, checks, header, composition, statement order)
is ``backends/emit.py``; this module holds torch's idioms and its lowering
table ``LOWER``. Generation is deterministic: the same Plan gives
byte-identical source.
"""

from __future__ import annotations

import math
from typing import ClassVar

from mixc.backends.emit import (
    BankMix, CodegenError, Emitter, Lowered, Site, Val, add_terms, attr_name, methods, bank_mix, blob_var,
    call, checked, class_name, conv_kwargs, fan_in, module_name, tup, weight_var
)
from mixc.backends.pysource import literal as _q
from mixc.compiler.plan import Plan, Slot

__all__ = ["CodegenError", "attr_name", "class_name", "emit_source", "module_name"]


# ---------------------------------------------------------------------------
# The lowering table: one function per op kind


def _weight_args(e: "TorchEmitter", s: Site, how: str) -> list[str]:
    """Weight and bias arguments: ``member`` ([m]), ``stack`` (members on the out axis), ``repeat``, or as is."""
    op = s.op
    W, B = s.w("weight"), s.w("bias")
    if how == "member" and op.source != "plain":
        W, B = f"{W}[m]", f"{B}[m]"
    elif how == "stack":
        W, B = f"{W}.flatten(0, 1)", f"{B}.flatten()"
    elif how == "repeat":
        ones = ", ".join(["1"] * (len(op.weight_shape) - 1))
        W, B = f"{W}.repeat({e.M}, {ones})", f"{B}.repeat({e.M})"
    return [W, B if op.bias else "None"]


def _conv(e: "TorchEmitter", s: Site) -> Lowered:
    op, M, a = s.op, e.M, s.a
    fn = f"F.conv{op.dim}d"
    shared_in = s.ins[0].shared
    if op.source == "plain":
        if s.grouped and not shared_in:
            return Lowered(fn, [a, *_weight_args(e, s, "repeat"), *conv_kwargs(op, M * op.groups)])
        return Lowered(fn, [a, *_weight_args(e, s, ""), *conv_kwargs(op, op.groups)])
    if not s.grouped:
        return Lowered(fn, [a, *_weight_args(e, s, "member"), *conv_kwargs(op, op.groups)])
    if shared_in and op.groups == 1:  # one conv with the members' filters stacked
        return Lowered(fn, [a, *_weight_args(e, s, "stack"), *conv_kwargs(op, 1)])
    src = s.rep(s.ins[0]) if shared_in else a
    return Lowered(fn, [src, *_weight_args(e, s, "stack"), *conv_kwargs(op, M * op.groups)])


def _linear(e: "TorchEmitter", s: Site) -> Lowered:
    op, M, a = s.op, e.M, s.a
    if op.source == "plain":
        W, B = _weight_args(e, s, "")
        if s.grouped and not s.ins[0].shared:
            return Lowered("", [f"F.linear({a}.unflatten(1, ({M}, {op.in_features})), {W}, {B}).flatten(1)"])
        return Lowered("F.linear", [a, W, B])
    if not s.grouped:
        return Lowered("F.linear", [a, *_weight_args(e, s, "member")])
    if s.ins[0].shared:
        return Lowered("F.linear", [a, *_weight_args(e, s, "stack")])
    prod = f'torch.einsum("bmi,moi->bmo", {a}.unflatten(1, ({M}, {op.in_features})), {s.w("weight")})'
    return Lowered("", [f"({prod} + {s.w('bias')}).flatten(1)" if op.bias else f"{prod}.flatten(1)"])


def _bn(e: "TorchEmitter", s: Site) -> Lowered:
    op = s.op
    names = [e.attr(r, op.name) for r in ("bn_mean", "bn_var", "bn_weight", "bn_bias")]
    if s.grouped:
        src = s.rep(s.ins[0]) if s.ins[0].shared else s.a
        params = [f"{n}.view(-1)" for n in names]
    else:
        src, params = s.a, [f"{n}[m]" for n in names]
    return Lowered("F.batch_norm", [src, *params, "self.training", repr(op.momentum), repr(op.eps)])


def _act(e: "TorchEmitter", s: Site) -> Lowered:
    op = s.op
    if op.fn in ("tanh", "sigmoid"):
        return Lowered(f"torch.{op.fn}", [s.a])
    if op.fn == "leaky_relu":
        return Lowered("F.leaky_relu", [s.a, repr(op.slope)])
    return Lowered(f"F.{op.fn}", [s.a])


def _pool(e: "TorchEmitter", s: Site) -> Lowered:
    op = s.op
    args = [s.a, tup(op.kernel), tup(op.stride)]
    if any(p != 0 for p in op.padding):
        args.append(tup(op.padding))
    return Lowered(f"F.{op.op}_pool{op.dim}d", args)


def _global_pool(e: "TorchEmitter", s: Site) -> Lowered:
    dims = tuple(range(2, 1 + len(s.op.in_shape)))
    fn = "mean" if s.op.op == "avg" else "amax"
    return Lowered("", [f"{s.a}.{fn}({dims if len(dims) > 1 else dims[0]})"])


def _flatten(e: "TorchEmitter", s: Site) -> Lowered:
    return Lowered("", [f"{s.a}.flatten(1)"])


def _dropout(e: "TorchEmitter", s: Site) -> Lowered:
    if s.op.p == 0:
        return Lowered("", [s.a])  # no-op: keep the name, skip the call
    return Lowered("F.dropout", [s.a, repr(s.op.p), "self.training"])


def _add(e: "TorchEmitter", s: Site) -> Lowered:
    return Lowered("", [add_terms(s)])


class TorchEmitter(Emitter):
    LOWER: ClassVar = dict(  # op kind -> lowering function
        conv=_conv, linear=_linear, bn=_bn, act=_act, pool=_pool,
        global_pool=_global_pool, flatten=_flatten, dropout=_dropout, add=_add,
    )
    RESERVED: ClassVar = Emitter.RESERVED | {"torch", "nn", "F"}
    BACKEND: ClassVar = "torch"
    STACK: ClassVar = "torch.stack"
    CONCAT: ClassVar = "torch.cat([{}])"
    TILE: ClassVar = "blob.repeat({})"

    IMPORTS: ClassVar = ["import math", "", "import torch", "import torch.nn.functional as F", "from torch import nn"]

    def repeat(self, var: str) -> str:
        return f"torch.cat([{var}] * {self.M}, 1)"  # cat keeps channels_last

    def bank_rows(self, bank: str, mix: BankMix, slot: Slot) -> str:
        if mix.rows is not None:
            return f"{bank}.index_select(0, self.rows__{attr_name(slot.layer)})"
        return bank if mix.whole else f"{bank}[{mix.lo}:{mix.hi}]"

    def bank_coeffs(self, alpha: str, mix: BankMix, slot: Slot) -> str:
        if mix.selector is None:
            return alpha
        return f'torch.einsum("mk,mku->mu", {alpha}, self.sel__{attr_name(slot.layer)})'

    # -- the file ----------------------------------------------------------

    def docstring(self) -> list[str]:
        p = self.plan
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
        return [doc, ""]

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
        lines = self.class_head("nn.Module") + [
            '    def __init__(self, layout: str = "auto", channels_last: bool = False) -> None:',
            "        super().__init__()",
            '        if layout not in LAYOUTS:',
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
        return lines + methods(self.reset_parameters(), self.compose(), self.forward(), self.forward_grouped(), self.forward_loop())

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
            mix = bank_mix(self.plan, slot)
            if mix.rows is not None:
                consts.append(
                    f"        self.register_buffer({_q('rows__' + attr_name(slot.layer))}, "
                    f"torch.tensor({mix.rows}), persistent=False)"
                )
            if mix.selector is not None:
                sel = "[" + ", ".join(str(r) for r in mix.selector) + "]"
                consts += call(
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
            fan = fan_in(op)
            if g.bias:
                lines.append(f"        nn.init.normal_({bank}[:, :{wsize}], std=math.sqrt({weight_var(op)}))")
                lines.append(f"        nn.init.normal_({bank}[:, {wsize}:], std=math.sqrt(1 / (3 * {fan})))")
            else:
                lines.append(f"        nn.init.normal_({bank}, std=math.sqrt({weight_var(op)}))")
        if p.blob is not None:
            lines.append(f"        nn.init.normal_(self.{attr_name('blob')}, std=math.sqrt({blob_var(self.plan)!r}))")
        for op in p.ops:
            if op.kind in ("conv", "linear") and op.source in ("plain", "member"):
                role = op.source
                weight = self.attr(f"{role}_weight", op.name)
                fan = fan_in(op)
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

    # -- composition ---------------------------------------------------------

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
                body += self.compose_layer(op, "        ")
        store = next((t for t in self.plan.tensors if t.role in ("bank", "blob")), None)
        if store is not None:
            # Mix in the parameters' precision even under autocast: the convs cast the result
            # once, and bf16 reductions of the alpha gradient over huge templates are slow on GPUs.
            lines.append(f"        with torch.autocast(self.{attr_name(store.name)}.device.type, enabled=False):")
            body = ["    " + ln for ln in body]
        lines += body
        lines.append("        return w")
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

    def forward_grouped(self) -> list[str]:
        p = self.plan
        lines = [
            "    def forward_grouped(self, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:",
            '        """Members side by side on the channel axis: activations are [B, M*C, ...]."""',
        ]
        vals: dict[str, Val] = {}
        out = self.vars[p.output]
        lines += self.statements(p.ops, True, "        ", vals, keep={out})
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
        vals: dict[str, Val] = {}
        lines += self.statements(shared_ops, False, "        ", vals, keep=used_in_loop | {out, "x"})
        if self.shared[p.output]:
            lines.append(f"        return {out}.unsqueeze(1).expand(-1, {self.M}, -1)")
            return lines
        lines += ["        outs = []", f"        for m in range({self.M}):"]
        lines += self.statements(member_ops, False, "            ", vals, keep={out} | used_in_loop)
        lines += [f"            outs.append({out})", "        return torch.stack(outs, 1)"]
        return lines


def emit_source(plan: Plan) -> str:
    """The Python source of ``plan`` as a torch nn.Module (deterministic)."""
    return TorchEmitter(checked(plan)).source()
