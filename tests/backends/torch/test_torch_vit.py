"""Vision Transformers in the torch backend (issue 22): LayerNorm, attention, tokens, the class
token, the position embedding, token pooling and token-wise linear layers, for every ensemble
method, against the independent per-member reference (tests/support/torch_reference.py) in both
layouts, plus checkpoints, a training step and the generated source."""

from __future__ import annotations

import types

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from paths import ZOO  # noqa: E402
from source_checks import import_roots  # noqa: E402
from torch_reference import assert_grouped_equals_loop, reference_forward  # noqa: E402

import mixc  # noqa: E402
from mixc.backends.emit import class_name  # noqa: E402
from mixc.backends.torch import (  # noqa: E402
    build,
    emit_source,
    load_checkpoint,
    named_plan_tensors,
    save_checkpoint,
)
from mixc.backends.torch.runtime import Members, _BatchEnsemble  # noqa: E402

SPEC = """
import "{zoo}/blocks/vit.mix"
ensemble {{
    backbone vit(size = 8, patch = 2, dim = 24, depth = 2, heads = 2, classes = 10, channels = 1)
    members 4
    {ensemble}
}}
"""

METHODS = {
    "mixture shared": "budget 1.0x\n    assign shared",
    "mixture greedy_disjoint": "budget 1.0x\n    assign greedy_disjoint",
    "naive": "method naive",
    "batch_ensemble": "method batch_ensemble",
    "mimo": "method mimo",
    "packed": "method packed(alpha = 2, gamma = 1)",
}


def _plan(method: str = "mixture shared"):
    return mixc.compile_text(SPEC.format(zoo=ZOO, ensemble=METHODS[method]), [], name="vit.mix")


def _input(plan, batch: int = 3, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(batch, *plan.input_shape, generator=g, dtype=dtype)


def _randomise_norms_and_embeddings(named: dict[str, torch.Tensor]) -> None:
    """LayerNorm affine and embeddings away from their init (ones, zeros, a token near 0), so the
    comparison reads every one of them."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in named.items():
            if name.startswith(("ln.", "embed.")):
                shift = 1.0 if name.endswith("weight") else 0.0
                t.copy_(torch.randn(t.shape, generator=g) * 0.3 + shift)


@pytest.mark.parametrize("layout", ["grouped", "loop"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_matches_the_reference(method, layout):
    """Logits equal the per-member reference's within 1e-9 (float64), training mode."""
    plan = _plan(method)
    torch.manual_seed(0)
    model = build(plan, layout=layout, dtype=torch.float64)
    _randomise_norms_and_embeddings(named_plan_tensors(model))
    ref = {k: v.detach().clone() for k, v in named_plan_tensors(model).items()}
    x = _input(plan)
    got = model(x)
    assert got.shape == (3, plan.members, plan.classes)
    assert (got - reference_forward(plan, ref, x, training=True)).abs().max().item() < 1e-9


@pytest.mark.parametrize("formulation", ["compose", "scale"])
@pytest.mark.parametrize("layout", ["grouped", "loop"])
def test_batch_ensemble_formulations_match_the_reference(layout, formulation, monkeypatch):
    """Token-wise layers through BatchEnsemble's composed and scaled formulations alike."""
    monkeypatch.setattr(_BatchEnsemble, "formulation", formulation)
    plan = _plan("batch_ensemble")
    torch.manual_seed(0)
    model = build(plan, layout=layout, dtype=torch.float64)
    ref = {k: v.detach().clone() for k, v in named_plan_tensors(model).items()}
    x = _input(plan)
    assert (model(x) - reference_forward(plan, ref, x, training=True)).abs().max() < 1e-9


@pytest.mark.parametrize("method", sorted(METHODS))
def test_grouped_equals_loop_with_gradients(method):
    assert_grouped_equals_loop(_plan(method), build, named_plan_tensors)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_parameters_match_plan(method):
    plan = _plan(method)
    model = build(plan)
    named = named_plan_tensors(model)
    assert list(named) == [t.name for t in plan.tensors]
    for t in plan.tensors:
        assert list(named[t.name].shape) == t.shape, t.name
    assert sum(p.numel() for p in model.parameters()) == plan.accounting.total_params
    assert len(model.state_dict()) == len(plan.tensors)


def test_initialisation_follows_timm():
    """LayerNorm ones and zeros, the class token N(0, 1e-6^2), the position embedding std 0.02."""
    plan = _plan("naive")
    torch.manual_seed(0)
    named = named_plan_tensors(build(plan))
    assert torch.equal(named["ln.norm.weight"], torch.ones(4, 24))
    assert torch.equal(named["ln.norm.bias"], torch.zeros(4, 24))
    assert 0 < named["embed.cls.token"].abs().max() < 1e-5
    assert 0.015 < named["embed.pos.pos"].std() < 0.025


def test_layer_norm_is_torchs_per_member():
    """One member's LayerNorm is nn.LayerNorm over the channels at each token."""
    plan = _plan("naive")
    model = build(plan, layout="loop", dtype=torch.float64)
    _randomise_norms_and_embeddings(named_plan_tensors(model))
    norm, x = model.norm, torch.randn(2, 24, 5, dtype=torch.float64)
    y = norm(Members([x] * 4), model.mix(x.device))
    for m in range(4):
        want = F.layer_norm(x.transpose(1, 2), (24,), norm.weight[m], norm.bias[m], 1e-6)
        assert (y[m] - want.transpose(1, 2)).abs().max() < 1e-12


def test_checkpoint_round_trip(tmp_path):
    plan = _plan()
    torch.manual_seed(0)
    a = build(plan)
    _randomise_norms_and_embeddings(named_plan_tensors(a))
    path = save_checkpoint(tmp_path / "vit.safetensors", a, plan, epoch=1)
    torch.manual_seed(1)
    b = build(plan)
    load_checkpoint(path, b, plan)
    for name, t in named_plan_tensors(a).items():
        assert torch.equal(named_plan_tensors(b)[name], t), name
    x = _input(plan, dtype=torch.float32)
    assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("layout", ["grouped", "loop"])
def test_a_training_step(layout):
    """Loss finite; templates, alphas, LayerNorms and embeddings all get gradients; a step moves
    them."""
    plan = _plan()
    torch.manual_seed(0)
    model = build(plan, layout=layout).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _input(plan, batch=8, dtype=torch.float32), torch.randint(0, 10, (8,))
    logits = model(x)
    loss = sum(F.cross_entropy(logits[:, m], y) for m in range(plan.members))
    assert torch.isfinite(loss)
    loss.backward()
    named = named_plan_tensors(model)
    for prefix in ("bank.", "alpha.", "ln.", "embed.", "plain."):
        got = [n for n in named if n.startswith(prefix)]
        assert got, prefix
        for n in got:
            assert named[n].grad is not None and named[n].grad.abs().sum() > 0, n
    before = named["embed.pos.pos"].detach().clone()
    opt.step()
    assert not torch.equal(before, named["embed.pos.pos"])


def test_generated_source_reads_like_the_spec():
    src = emit_source(_plan())
    assert "class Attention(nn.Module):" in src and "class VitBlock(nn.Module):" in src
    for line in ("self.q = Linear(", "self.k = Linear(", "self.v = Linear(", "self.proj = Linear("):
        assert line in src, line
    assert "attend(h, h1, x, head_dim=12)" in src
    assert "x = x.flatten(2)" in src and "x = x.select(2, 0)" in src


def test_standalone_source_computes_the_same():
    plan = _plan()
    src = emit_source(plan, standalone=True)
    assert import_roots(src) <= {"torch", "math", "dataclasses", "typing", "__future__"}
    mod = types.ModuleType("standalone_vit")
    exec(compile(src, "standalone_vit.py", "exec", dont_inherit=True), mod.__dict__)  # noqa: S102
    torch.manual_seed(0)
    alone = getattr(mod, class_name(plan))(layout="grouped").eval()
    torch.manual_seed(0)
    built = build(plan, layout="grouped").eval()
    x = _input(plan, dtype=torch.float32)
    assert torch.equal(alone(x), built(x))


MEAN_POOLED = """
import "{zoo}/blocks/vit.mix"
backbone tiny_vit(classes = 10) {{
    input image(1, 8, 8)
    conv patch_embed(24, kernel = 2, stride = 2, padding = 0, bias = true)
    tokens
    pos_embed pos
    stage blocks = repeat 1 vit_block(24, 2)
    layernorm norm(eps = 1e-6)
    token_pool("mean")
    linear head(classes)
}}
ensemble {{
    backbone tiny_vit(classes = 10)
    members 3
    {ensemble}
}}
"""


@pytest.mark.parametrize("layout", ["grouped", "loop"])
@pytest.mark.parametrize("ensemble", ["budget 1.0x", "method packed(alpha = 2, gamma = 1)"])
def test_mean_pooled_vit_without_class_token(ensemble, layout):
    """token_pool("mean") and a position embedding read straight after the patch tokens."""
    text = MEAN_POOLED.format(zoo=ZOO, ensemble=ensemble)
    plan = mixc.compile_text(text, [], name="tiny_vit.mix")
    torch.manual_seed(0)
    model = build(plan, layout=layout, dtype=torch.float64)
    _randomise_norms_and_embeddings(named_plan_tensors(model))
    ref = {k: v.detach().clone() for k, v in named_plan_tensors(model).items()}
    x = _input(plan)
    assert "x.mean(2)" in emit_source(plan)
    assert (model(x) - reference_forward(plan, ref, x, training=True)).abs().max() < 1e-9


@pytest.mark.parametrize("method", ["mixture shared", "naive", "batch_ensemble"])
def test_deployed_vit_equals_the_generated_model(method, tmp_path):
    """The deployable module (composed weights as constants) gives the generated model's
    probabilities; exported by torch.export and ONNX (run by onnxruntime) it still does."""
    import numpy as np

    from mixc.backends.torch.export import DeployedEnsemble, export_onnx, export_pt2
    from mixc.export import compose_all

    plan = _plan(method)
    torch.manual_seed(0)
    model = build(plan).eval()
    _randomise_norms_and_embeddings(named_plan_tensors(model))
    arrays = {
        k: v.detach().numpy().astype(np.float64) for k, v in named_plan_tensors(model).items()
    }
    dep = DeployedEnsemble(plan, compose_all(plan, arrays)).eval()
    x = _input(plan, batch=5, dtype=torch.float32)
    with torch.no_grad():
        want = torch.softmax(model(x), -1)
        probs, ens = dep(x)
    torch.testing.assert_close(probs, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(ens, want.mean(1), atol=1e-5, rtol=0)
    if method != "mixture shared":
        return
    export_pt2(dep, tmp_path / "m.pt2")
    with torch.no_grad():
        got, _ = torch.export.load(str(tmp_path / "m.pt2")).module()(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    export_onnx(dep, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got, _ = sess.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


@pytest.mark.parametrize("overrides", [["members=1", "groups=none"], ["members=1"]])
def test_one_member_vit_runs_in_both_layouts(overrides):
    """One network (a single baseline): the grouped layout's LayerNorm has one block of [1, C]
    parameters; it must give the loop layout's logits (grouped is auto's choice on CUDA)."""
    plan = mixc.compile("vit_digits", ["backbone.dim=32", "backbone.depth=1", *overrides])
    torch.manual_seed(0)
    grouped = build(plan, layout="grouped", dtype=torch.float64)
    _randomise_norms_and_embeddings(named_plan_tensors(grouped))
    loop = build(plan, layout="loop", dtype=torch.float64)
    loop.load_state_dict(grouped.state_dict())
    x = _input(plan)
    assert (grouped(x) - loop(x)).abs().max().item() < 1e-12
