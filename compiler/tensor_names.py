"""Plan tensor names, written once: the checkpoint format both backends read and write.

A layer's tensors are named ``<prefix>.<layer>[.<field>]`` by its weight source; the runtimes map
the same names onto module attributes. They are copied into standalone files, so each keeps its own
``LAYER_TENSORS`` table; tests/test_method_homes.py checks both equal this one.
"""

from __future__ import annotations

#: weight source (or the kind of a per-member op: "bn", "layernorm", "cls_token", "pos_embed") ->
#: (plan name pattern, module attribute) of each tensor a layer holds;
#: an entry on attribute "bias" exists only when the layer has a bias
LAYER_TENSORS: dict[str, tuple[tuple[str, str], ...]] = {
    "plain": (("plain.{layer}.weight", "weight"), ("plain.{layer}.bias", "bias")),
    "member": (("member.{layer}.weight", "weight"), ("member.{layer}.bias", "bias")),
    "bank": (("alpha.{layer}", "alpha"),),
    "blob": (("alpha.{layer}", "alpha"),),
    "batch_ensemble": (
        ("plain.{layer}.weight", "weight"),
        ("fast.{layer}.r", "r"),
        ("fast.{layer}.s", "s"),
        ("member.{layer}.bias", "bias"),
    ),
    "bn": (
        ("bn.{layer}.weight", "weight"),
        ("bn.{layer}.bias", "bias"),
        ("bn.{layer}.running_mean", "running_mean"),
        ("bn.{layer}.running_var", "running_var"),
    ),
    "layernorm": (("ln.{layer}.weight", "weight"), ("ln.{layer}.bias", "bias")),
    "cls_token": (("embed.{layer}.token", "token"),),
    "pos_embed": (("embed.{layer}.pos", "pos"),),
}
BLOB = "blob"  # the flat template store's tensor


def tensor_name(source: str, layer: str, attribute: str) -> str:
    """The plan name of ``layer``'s tensor held as ``attribute`` under weight source ``source`` (or
    "bn")."""
    return next(n for n, a in LAYER_TENSORS[source] if a == attribute).format(layer=layer)


def bank_name(group: str) -> str:
    """The tensor of a template group's bank."""
    return f"bank.{group}"
