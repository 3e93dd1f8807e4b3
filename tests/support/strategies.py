"""Hypothesis strategies: random backbones (as .mix source) and ensemble settings.

Widths come from a small set so that layer shapes repeat and groups form;
residual blocks, 1-D signals, images and plain MLPs are all generated.
"""

from __future__ import annotations

from hypothesis import strategies as st

WIDTHS = (4, 6, 8)


@st.composite
def backbones(draw, max_units: int = 5) -> str:
    """The text of ``backbone gen(classes = C) { ... }`` plus any blocks it uses."""
    layout = draw(st.sampled_from(["image", "signal", "vector"]))
    classes = draw(st.integers(2, 5))
    lines: list[str] = []
    blocks: list[str] = []
    if layout == "vector":
        lines.append(f"input vector({draw(st.integers(3, 12))})")
        for _ in range(draw(st.integers(1, max_units))):
            w = draw(st.sampled_from(WIDTHS))
            bias = draw(st.booleans())
            lines.append("linear(" + f"{w}, bias = {'true' if bias else 'false'})")
            if draw(st.booleans()):
                lines.append(draw(st.sampled_from(["relu", "gelu", "tanh", "bn"])))
        lines.append("linear fc(classes)")
    else:
        size = draw(st.integers(4, 9))
        dims = (
            "("
            + str(draw(st.integers(1, 3)))
            + (f", {size}, {size})" if layout == "image" else f", {size})")
        )
        lines.append(f"input {layout}{dims}")
        blocks.append(
            "block unit(width, kernel = 3) {\n"
            "    residual {\n"
            "        conv c1(width, kernel = kernel)\n"
            "        bn; relu\n"
            "        conv c2(width, kernel = kernel)\n"
            "    }\n"
            "    shortcut if in_channels != width {\n"
            "        conv proj(width, kernel = 1)\n"
            "    }\n"
            "}\n"
        )
        for u in range(draw(st.integers(1, max_units))):
            w = draw(st.sampled_from(WIDTHS))
            kind = draw(st.sampled_from(["conv", "unit", "repeat"]))
            k = draw(st.sampled_from([1, 3]))
            if kind == "conv":
                bias = draw(st.booleans())
                lines.append(f"conv({w}, kernel = {k}, bias = {'true' if bias else 'false'})")
                lines.append(draw(st.sampled_from(["relu", "bn", "silu"])))
            elif kind == "unit":
                lines.append(f"unit({w}, kernel = {k})")
            else:
                lines.append(
                    f"stage st{u} = repeat {draw(st.integers(1, 3))} unit({w}, kernel = {k})"
                )
        lines.append(draw(st.sampled_from(["global_avgpool", "global_maxpool", "flatten"])))
        if draw(st.booleans()):
            lines.append(f"linear({draw(st.sampled_from(WIDTHS))})")
            lines.append("relu")
        lines.append("linear fc(classes)")
    body = "\n".join("    " + ln for ln in lines)
    return "".join(blocks) + f"backbone gen(classes = {classes}) {{\n{body}\n}}\n"


@st.composite
def ensembles(
    draw,
    budget: bool = True,
    members_max: int = 8,
    tpl_max: int = 8,
    factors: tuple[float, float] = (0.05, 4.0),
) -> str:
    """An ensemble section for ``gen`` with random members, budget, grouping and policy."""
    members = draw(st.integers(1, members_max))
    groups = draw(st.sampled_from(["by_shape", "by_shape", "single"]))
    tpl = draw(st.integers(1, tpl_max))
    policy = draw(st.sampled_from(["shared", "greedy_disjoint"]))
    singletons = draw(st.booleans())
    lines = [
        "backbone gen",
        f"members {members}",
        f"groups {groups}",
        f"templates_per_layer {tpl}",
        f"assign {policy}",
        f"bank_singletons {'true' if singletons else 'false'}",
    ]
    if budget:
        factor = draw(st.floats(*factors, allow_nan=False).map(lambda f: round(f, 3)))
        lines.append(f"budget {factor}x")
    return "ensemble {\n" + "\n".join("    " + ln for ln in lines) + "\n}\n"


@st.composite
def specs(draw) -> str:
    return draw(backbones()) + draw(ensembles())


# Settings a user would try on a zoo spec with --set (the allocation's neighbourhood).
def zoo_variants() -> st.SearchStrategy[list[str]]:
    """``--set`` overrides: members 1-8, templates_per_layer 1-8, both policies, by_shape/single,
    bank_singletons, budgets 0.05x-1.5x of one plain backbone."""
    return st.builds(
        lambda m, t, a, g, b, f: [
            f"members={m}",
            f"templates_per_layer={t}",
            f"assign={a}",
            f"groups={g}",
            f"bank_singletons={'true' if b else 'false'}",
            f"budget={f}x",
        ],
        st.integers(1, 8),
        st.integers(1, 8),
        st.sampled_from(["shared", "greedy_disjoint"]),
        st.sampled_from(["by_shape", "single"]),
        st.booleans(),
        st.floats(0.05, 1.5, allow_nan=False).map(lambda f: round(f, 4)),
    )


@st.composite
def vit_backbones(draw) -> str:
    """A random ViT (``backbone gen``) written with zoo/blocks/vit.mix's block, pooled by its
    class token or by the mean of its tokens."""
    heads = draw(st.integers(1, 3))
    dim = heads * draw(st.sampled_from((2, 4)))
    patch = draw(st.sampled_from((1, 2)))
    size = patch * draw(st.integers(1, 3))
    depth = draw(st.integers(1, 3))
    mlp = draw(st.integers(1, 3))
    cls = draw(st.booleans())
    pool = "cls" if cls else "mean"
    return (
        'import "blocks/vit.mix"\n'
        "backbone gen(classes = 3) {\n"
        f"    input image(2, {size}, {size})\n"
        f"    conv patch_embed({dim}, kernel = {patch}, stride = {patch}, padding = 0,"
        " bias = true)\n"
        "    tokens\n" + ("    cls_token cls\n" if cls else "") + "    pos_embed pos\n"
        f"    stage blocks = repeat {depth} vit_block({dim}, {heads}, mlp = {mlp})\n"
        "    layernorm norm\n"
        f'    token_pool("{pool}")\n'
        "    linear head(classes)\n"
        "}\n"
    )
