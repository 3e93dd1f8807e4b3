"""Transformer backbones in the compiler: exact counts against timm's formula, shapes, errors,
and the allocation invariants over random ViTs."""

import pytest
from hypothesis import given, settings
from strategies import ensembles, vit_backbones

import mixc
from mixc.cli import main
from mixc.compiler.invariants import check_plan
from mixc.core.flops import backbone_macs
from mixc.spec import SpecError

PLAIN = ["members=1", "groups=none"]


def timm_vit_params(
    dim: int,
    heads: int,
    depth: int = 12,
    patch: int = 16,
    size: int = 224,
    classes: int = 1000,
    mlp: int = 4,
    channels: int = 3,
) -> int:
    """timm's VisionTransformer, counted from its modules: patch_embed.proj (conv with bias),
    cls_token, pos_embed (tokens + 1), per block norm1, attn.qkv (D -> 3D, bias), attn.proj,
    norm2, mlp.fc1, mlp.fc2; the final norm and the head."""
    tokens = (size // patch) ** 2 + 1
    block = 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + 2 * dim
    block += (dim * mlp * dim + mlp * dim) + (mlp * dim * dim + dim)
    return (
        channels * patch * patch * dim
        + dim
        + dim
        + tokens * dim
        + depth * block
        + 2 * dim
        + dim * classes
        + classes
    )


@pytest.mark.parametrize(
    "name, dim, heads, count",
    [
        ("vit_ti16", 192, 3, 5_717_416),
        ("vit_s16", 384, 6, 22_050_664),
        ("vit_b16", 768, 12, 86_567_656),
    ],
)
def test_zoo_vits_count_as_timm(name, dim, heads, count, capsys):
    assert timm_vit_params(dim, heads) == count
    plan = mixc.compile(name, PLAIN)
    assert plan.accounting.backbone_params == plan.accounting.total_params == count
    assert main(["inspect", name, "--set", "members=1", "--set", "groups=none"]) == 0
    assert f"{count:,}" in capsys.readouterr().out


def test_vit_ops_shapes_and_tensors():
    plan = mixc.compile("vit_ti16", PLAIN)
    ops = {o.name: o for o in plan.ops}
    assert next(o for o in plan.ops if o.kind == "tokens").out_shape == [192, 196]
    assert ops["cls"].out_shape == [192, 197] and ops["pos"].out_shape == [192, 197]
    attn = ops["blocks.b0.attn.attend"]
    assert attn.inputs == [f"blocks.b0.attn.{p}" for p in "qkv"] and attn.head_dim == 64
    assert ops["blocks.b0.attn.q"].out_shape == [192, 197]
    assert ops["head"].in_shape == [192]
    shapes = {t.name: t.shape for t in plan.tensors}
    assert shapes["embed.cls.token"] == [1, 192] and shapes["embed.pos.pos"] == [1, 197, 192]
    assert shapes["ln.blocks.b0.norm1.weight"] == [1, 192]
    # MACs: the weight layers once per token plus attention's 2 N^2 D per block
    tokens, d = 197, 192
    weights = 3 * 16 * 16 * d * 196 + 12 * tokens * (4 * d * d + 8 * d * d) + d * 1000
    assert backbone_macs(plan) == weights + 12 * 2 * tokens**2 * d


def test_vit_mixture_shares_attention_weights_across_depth():
    plan = mixc.compile("vit_ti16")
    square = next(g for g in plan.groups if g.weight_shape == [192, 192])
    assert len(square.layers) == 4 * 12  # q, k, v, proj of every block
    a = plan.accounting
    assert a.norm_params == 4 * (25 * 2 * 192) and a.embedding_params == 4 * (192 + 197 * 192)
    assert a.total_params <= a.budget == 5_717_416
    assert check_plan(plan) == []


@pytest.mark.parametrize(
    "method", ["naive", "batch_ensemble", "mimo", "packed(alpha = 2, gamma = 1)"]
)
def test_vit_other_methods_compile_soundly(method):
    plan = mixc.compile("vit_digits", [f"method={method}"])
    assert check_plan(plan) == []


def test_packed_vit_splits_heads_and_norms_per_member():
    plan = mixc.compile("vit_digits", ["method=packed(alpha = 2, gamma = 1)"])
    ops = {o.name: o for o in plan.ops}
    assert ops["blocks.b0.attn.attend"].heads == 4 * 4
    assert ops["blocks.b0.attn.attend"].channels == 128
    assert ops["blocks.b0.norm1"].groups == 4


BAD = [
    ("attention attn(heads = 5)", "5 heads must divide the 64 channels"),
    ('token_pool("first")', "token_pool mode is"),
    ("cls_token", "needs a token sequence [D, N]"),
]


@pytest.mark.parametrize("line, message", BAD)
def test_vit_shape_errors_are_positioned(line, message):
    text = (
        "backbone b(classes = 3) {\n    input image(1, 8, 8)\n"
        "    conv pe(64, kernel = 2, stride = 2, padding = 0)\n"
        + ("    tokens\n" if "cls_token" not in line else "")
        + f"    {line}\n    token_pool\n    linear head(classes)\n}}\n"
        "ensemble {\n    backbone b\n    members 2\n}\n"
    )
    with pytest.raises(SpecError) as err:
        mixc.compile_text(text)
    rendered = err.value.render()
    assert message in rendered and ":5:" in rendered


def test_packed_heads_that_do_not_split_name_the_attention():
    # 68 channels in 4 heads per member: 2 members' 8 heads do not divide them
    overrides = ["method=packed(alpha = 1, gamma = 1)", "members=2", "backbone.dim=68"]
    with pytest.raises(SpecError) as err:
        mixc.compile("vit_digits", overrides)
    text = err.value.render()
    assert "'blocks.b0.attn.attend'" in text and "2 members x 4 heads" in text


@settings(max_examples=25, deadline=None)
@given(vit_backbones(), ensembles())
def test_random_vits_keep_every_invariant(backbone, ensemble):
    try:
        plan = mixc.compile_text(backbone + ensemble)
    except SpecError as err:
        text = err.render()
        assert "budget" in text or "no layer is factorised" in text or "templates" in text, text
        return
    assert check_plan(plan) == []
    assert type(plan).from_json(plan.to_json()) == plan
