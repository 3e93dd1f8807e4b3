"""`mixc import` of Vision Transformers written as timm writes them (plain PyTorch): attention
modules become `attention`, the token ops `tokens`/`cls_token`/`pos_embed`/`token_pool`, the
Block class a `vit_block`; counts and logits equal the original's; variants the language lacks are
one clear error."""

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "support"))

import import_models as M  # noqa: E402
from torch import nn  # noqa: E402

import mixc  # noqa: E402
from mixc.core.module_graph import ModuleImportError  # noqa: E402
from mixc.importing import check, import_graph  # noqa: E402

SMALL = [1, 8, 8]
CASES = {
    "cls": ({}, ["cls_token cls_token", 'token_pool("cls")', "attention attn(4)"]),
    "mean": ({"pool": "avg"}, ['token_pool("mean")']),
    "mha": ({"mha": True}, ["attention attn(4)", "cls_token cls_token"]),
}


def _round_trip(module, shape):
    imported, plan = import_graph(module, shape, "vit")
    names, result = check(module, imported, plan, shape)
    n = sum(p.numel() for p in module.parameters())
    assert result.original_params == result.compiled_params == n
    assert result.max_abs_diff <= 1e-5, result
    return imported, names


@pytest.mark.parametrize("case", CASES)
def test_small_vits_round_trip(case):
    kw, wanted = CASES[case]
    imported, _ = _round_trip(M.randomised_vit(M.vit_small(**kw)), SMALL)
    text = imported.text
    for piece in wanted + ["block vit_block() {", "stage blocks = repeat 2 vit_block()", "tokens"]:
        assert piece in text, text
    assert "layernorm norm1(eps = 1e-06)\n        attention attn(4)\n    }" in text
    assert "pos_embed pos_embed" in text and "linear mlp_fc1(128)" in text
    assert ("cls_token" in text) == (case != "mean")
    assert "optimizer adamw" in text
    assert "weight_decay_exclude [alphas, norm, embedding, bias]" in text
    # the default ensemble (4 members) compiles
    assert mixc.compile_text(text).members == 4


def test_vit_ti16_count_and_logits():
    """timm's ViT-Ti/16 at 224px: 5,717,416 parameters, the logits within 1e-5 (a few seconds)."""
    module = M.randomised_vit(M.vit_ti16())
    imported, names = _round_trip(module, [3, 224, 224])
    assert sum(p.numel() for p in module.parameters()) == 5_717_416
    assert "stage blocks = repeat 12 vit_block()" in imported.text
    assert names["blocks.3.attn.qkv.weight[1/3]"] == "member.blocks.b3.attn.k.weight"
    assert names["blocks.3.attn.qkv.bias[2/3]"] == "member.blocks.b3.attn.v.bias"
    assert names["cls_token"] == "embed.cls_token.token"
    assert names["pos_embed"] == "embed.pos_embed.pos"
    assert names["blocks.11.norm2.weight"] == "ln.blocks.b11.norm2.weight"


def test_a_swapped_q_and_k_is_caught():
    module = M.randomised_vit(M.vit_small())
    imported, plan = import_graph(module, SMALL, "vit")
    attn = imported.tensors["blocks.b0.attn"]
    attn["q.weight"], attn["k.weight"] = attn["k.weight"], attn["q.weight"]
    _, result = check(module, imported, plan, SMALL)
    assert result.max_abs_diff > 1e-3


@pytest.mark.parametrize("case", ["cls", "mha"])
def test_naive_init_from_reproduces_the_vit_in_every_member(case):
    from mixc.backends import get_backend
    from mixc.backends.torch import build, named_plan_tensors
    from mixc.init_from import initialise

    module = M.randomised_vit(M.vit_small(**CASES[case][0])).eval()
    imported, plain = import_graph(module, SMALL, "vit")
    names, _ = check(module, imported, plain, SMALL)
    pre = get_backend("torch").imported_arrays(module, names, plain)
    assert pre["embed.cls_token.token"].shape == (1, 32)
    assert pre["embed.pos_embed.pos"].shape == (1, 17, 32)
    assert pre["ln.norm.weight"].shape == (1, 32)
    plan = mixc.compile_text(imported.text, ["method=naive"])
    model = build(plan).eval()
    tensors = named_plan_tensors(model)
    state = {k: v.detach().numpy().copy() for k, v in tensors.items()}
    new, lines = initialise(state, plan, pre, [])
    assert "left as initialised" not in "\n".join(lines)
    assert new["ln.norm.weight"].shape[0] == new["embed.pos_embed.pos"].shape[0] == 4
    with torch.no_grad():
        for k, v in new.items():
            tensors[k].copy_(torch.as_tensor(v))
        x = torch.randn(16, *SMALL)
        want, got = module(x), model(x)
    assert got.shape[1] == 4
    assert (got - want[:, None]).abs().max() < 1e-4, lines


def test_cli_writes_a_vit_and_its_weights(tmp_path, capsys):
    from safetensors.numpy import load_file

    from mixc.cli import main

    out, weights = tmp_path / "vit.mix", tmp_path / "vit.safetensors"
    argv = ["import", f"{M.__file__}:vit_small", "--input", "1,8,8", "-o", str(out)]
    rc = main([*argv, "--args", '{"pool": "avg"}', "--weights", str(weights)])
    assert rc == 0, capsys.readouterr().err
    arrays = load_file(str(weights))
    assert arrays["member.blocks.b1.attn.proj.weight"].shape == (1, 32, 32)
    assert 'token_pool("mean")' in out.read_text()


# ---------------------------------------------------------------------------
# Variants the language lacks: one paragraph naming the node and the line


class QkNormAttention(M.Attention):
    def __init__(self, dim, num_heads):
        super().__init__(dim, num_heads)
        self.q_norm = nn.LayerNorm(self.head_dim)


class RelPosAttention(M.Attention):
    def __init__(self, dim, num_heads):
        super().__init__(dim, num_heads)
        self.rel_bias = nn.Parameter(torch.zeros(num_heads, 16, 16))


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x):
        return x * self.gamma


class ScaledBlock(M.Block):
    def __init__(self, dim, num_heads):
        super().__init__(dim, num_heads)
        self.ls1 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class RegisterViT(M.VisionTransformer):
    def __init__(self):
        super().__init__(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=1, num_heads=4)
        self.reg_token = nn.Parameter(torch.zeros(1, 2, 32))
        self.pos_embed = nn.Parameter(torch.zeros(1, 16, 32))

    def forward(self, x):
        x = self.patch_embed(x) + self.pos_embed
        B = x.shape[0]
        x = torch.cat((self.cls_token.expand(B, -1, -1), self.reg_token.expand(B, -1, -1), x), 1)
        return self.head(self.norm(self.blocks(x))[:, 0])


class SliceViT(M.VisionTransformer):
    def __init__(self):
        super().__init__(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=1, num_heads=4)

    def forward(self, x):
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), self.patch_embed(x)), dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.head(x[:, 1:].mean(1))


def _with_attention(cls):
    vit = M.vit_small(depth=1)
    vit.blocks[0].attn = cls(32, 4)
    return vit


def _with_block(cls):
    vit = M.vit_small(depth=1)
    vit.blocks[0] = cls(32, 4)
    return vit


VARIANTS = {
    "qk_norm": (lambda: _with_attention(QkNormAttention), "holds q_norm (LayerNorm)"),
    "rel_pos": (lambda: _with_attention(RelPosAttention), "holds its own tensors (rel_bias)"),
    "layer_scale": (lambda: _with_block(ScaledBlock), "reads the parameter 'blocks.0.ls1.gamma'"),
    "registers": (RegisterViT, "reads the parameter 'cls_token'"),
    "slice": (SliceViT, "indexes a token sequence"),
}


@pytest.mark.parametrize("case", VARIANTS)
def test_unsupported_variants_are_one_clear_error(case):
    make, what = VARIANTS[case]
    with pytest.raises(ModuleImportError) as e:
        mixc.import_module(make(), SMALL)
    msg = str(e.value)
    assert what in msg and "\n" not in msg, msg
    assert ".py:" in msg and "hint:" in msg, msg
