"""Group: decide which weight layers share a bank, which stay plain.

``by_shape``: layers of one kind and weight shape (and bias) form a group; a
group of one layer is plain unless ``bank_singletons`` (the paper's thin
variant). ``single``: every layer that ``by_shape`` would bank reads one flat
blob. ``explicit``: globs over layer names, first matching group wins; layers
no group names are plain. ``none``: no sharing at all, every member has its
own weights (the naive ensemble, used as a baseline).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from mixc.compiler import plan as P
from mixc.compiler.layers import weight_size
from mixc.spec.diagnostics import Diagnostics, did_you_mean
from mixc.spec.sections import EnsembleSpec


@dataclass
class GroupDraft:
    name: str
    layers: list[str]
    weight_shape: list[int]
    bias: bool
    size: int
    share: float | None = None  # explicit share (normalised later)
    templates: int | None = None  # explicit fixed count
    templates_per_layer: int | None = None  # explicit override of the ensemble's

    @property
    def total(self) -> int:
        return len(self.layers) * self.size


def shape_key(op: P.ConvOp | P.LinearOp) -> tuple:
    return (op.kind, tuple(op.weight_shape), op.bias)


def group_name(op: P.ConvOp | P.LinearOp) -> str:
    return f"{op.kind}_{'x'.join(map(str, op.weight_shape))}" + ("_bias" if op.bias else "")


def form_groups(
    weights: list, ens: EnsembleSpec, diags: Diagnostics
) -> tuple[list[GroupDraft], list[str]] | None:
    """Return (groups, plain layer names) for ``by_shape``, ``single``, ``explicit``."""
    if ens.groups == "explicit":
        return _explicit(weights, ens, diags)
    by_key: dict[tuple, GroupDraft] = {}
    for op in weights:
        k = shape_key(op)
        if k not in by_key:
            by_key[k] = GroupDraft(
                group_name(op), [], list(op.weight_shape), op.bias, weight_size(op)
            )
        by_key[k].layers.append(op.name)
    groups, plain = [], []
    for g in by_key.values():
        if len(g.layers) == 1 and not ens.bank_singletons:
            plain.extend(g.layers)
        else:
            groups.append(g)
    order = {op.name: i for i, op in enumerate(weights)}
    plain.sort(key=order.__getitem__)
    return groups, plain


def _explicit(
    weights: list, ens: EnsembleSpec, diags: Diagnostics
) -> tuple[list[GroupDraft], list[str]] | None:
    taken: dict[str, str] = {}
    groups: list[GroupDraft] = []
    names = [op.name for op in weights]
    ok = True
    for gs in ens.explicit:
        members = []
        for pat, pos in zip(gs.patterns, gs.pattern_pos):
            hits = [
                op for op in weights if fnmatch.fnmatchcase(op.name, pat) and op.name not in taken
            ]
            if not hits:
                already = [n for n in names if fnmatch.fnmatchcase(n, pat)]
                if already:
                    hint = (
                        f"every layer it matches is already in group '{taken[already[0]]}' (the"
                        " first match wins)"
                    )
                else:
                    hint = did_you_mean(pat, names) or (
                        "conv and linear layers here: "
                        + ", ".join(names[:8])
                        + (" ..." if len(names) > 8 else "")
                    )
                diags.error(
                    f"pattern \"{pat}\" of group '{gs.name}' matches no conv or linear layer",
                    pos,
                    hint,
                )
                ok = False
            for op in hits:
                taken[op.name] = gs.name
                members.append(op)
        if not members:
            continue
        keys = {shape_key(op) for op in members}
        if len(keys) > 1:
            shapes = sorted({f"{op.kind} {op.weight_shape}" for op in members})
            diags.error(
                f"group '{gs.name}' mixes layers of different shapes: {', '.join(shapes)}",
                gs.pos,
                "a bank's templates have one shape: split the group by shape, or use `groups"
                " single`",
            )
            ok = False
            continue
        op0 = members[0]
        order = {n: i for i, n in enumerate(names)}
        groups.append(
            GroupDraft(
                gs.name,
                sorted((op.name for op in members), key=order.__getitem__),
                list(op0.weight_shape),
                op0.bias,
                weight_size(op0),
                gs.share,
                gs.templates,
                gs.templates_per_layer,
            )
        )
    if not ok:
        return None
    plain = [n for n in names if n not in taken]
    return groups, plain
