"""The torch backend's model: accounting, numerics against an independent reference, codegen."""

from __future__ import annotations

import copy
import math
import os
import types

import pytest
from hypothesis import assume, given, settings

torch = pytest.importorskip("torch")

import handmade_plans as hp  # noqa: E402
from paths import GOLDEN
from paths import ZOO as ZOO_DIR
from source_checks import import_roots, import_written
from strategies import specs
from torch_reference import assert_grouped_equals_loop, randomise_batch_norm, reference_forward

import mixc
from mixc.backends.emit import class_name
from mixc.backends.torch import build, emit_source, ensemble_probs, named_plan_tensors, write
from mixc.spec import SpecError

PLANS = {
    "tiny": lambda: hp.tiny_convnet(),
    "tiny_greedy": lambda: hp.tiny_convnet(members=2, assign="greedy_disjoint"),
    "rich": lambda: hp.rich_convnet(dropout=0.0),
    "rich_shared": lambda: hp.rich_convnet(members=2, assign="shared", dropout=0.0),
    "signal": lambda: hp.signal_blob_net(),
    # windows wrap many times
    "signal_small_blob": lambda: hp.signal_blob_net(members=3, blob_size=50),
    "signal_shared": lambda: hp.signal_blob_net(assign="shared"),
    "mlp": lambda: hp.mlp_net(dropout=0.0),
}


def _input(plan, batch=5, dtype=torch.float64):
    return torch.randn(
        batch, *plan.input_shape, generator=torch.Generator().manual_seed(2), dtype=dtype
    )


@pytest.mark.parametrize("name", sorted(PLANS))
def test_parameters_match_plan(name):
    plan = PLANS[name]()
    model = build(plan)
    named = named_plan_tensors(model)
    assert list(named) == [t.name for t in plan.tensors]
    params = {id(p) for p in model.parameters()}
    for t in plan.tensors:
        assert list(named[t.name].shape) == t.shape, t.name
        assert (id(named[t.name]) in params) == t.trainable, t.name
    assert sum(p.numel() for p in model.parameters()) == plan.accounting.total_params
    # nothing trainable outside the plan
    assert len(params) == sum(t.trainable for t in plan.tensors)
    persistent = set(model.state_dict())
    assert len(persistent) == len(plan.tensors)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", ["grouped", "loop"])
@pytest.mark.parametrize("name", sorted(PLANS))
def test_matches_separate_members(name, layout, training):
    """Fused model == each member as its own plain network (float64, max abs diff < 1e-5)."""
    plan = PLANS[name]()
    torch.manual_seed(0)
    model = build(plan, layout=layout, dtype=torch.float64)
    randomise_batch_norm(named_plan_tensors(model))
    model.train(training)
    ref_t = {k: v.detach().clone() for k, v in named_plan_tensors(model).items()}
    x = _input(plan)
    got = model(x)
    want = reference_forward(plan, ref_t, x, training)
    assert got.shape == (5, plan.members, plan.classes)
    assert (got - want).abs().max().item() < 1e-5
    for k, v in named_plan_tensors(model).items():  # running statistics moved the same way
        assert (v.detach() - ref_t[k]).abs().max().item() < 1e-10, k


@pytest.mark.parametrize("name", sorted(PLANS))
def test_grouped_equals_loop_with_gradients(name):
    assert_grouped_equals_loop(PLANS[name](), build, named_plan_tensors)


def test_auto_layout_and_channels_last_agree():
    plan = hp.rich_convnet(dropout=0.0)
    torch.manual_seed(0)
    ref = build(plan, layout="loop").eval()
    x = _input(plan, dtype=torch.float32)
    want = ref(x)
    for layout in ("auto", "grouped", "loop"):
        m = build(plan, layout=layout, channels_last=True).eval()
        m.load_state_dict(ref.state_dict())
        assert torch.allclose(m(x), want, atol=1e-5), layout


def test_dropout_active_only_in_training():
    plan = hp.mlp_net(dropout=0.5)
    model = build(plan, layout="grouped")
    x = _input(plan, dtype=torch.float32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_init_variance_and_alphas():
    """A composed conv starts with kaiming-normal variance; alphas are orthonormal rows."""
    plan = hp.three_conv_bank()
    torch.manual_seed(0)
    model = build(plan)
    w = model.compose()
    target = math.sqrt(2 / (32 * 9))
    for layer in ("c1", "c2", "c3"):
        std = w[f"{layer}.weight"].std(dim=(1, 2, 3, 4))
        assert torch.allclose(std, torch.full_like(std, target), rtol=0.05), (layer, std, target)
        alpha = named_plan_tensors(model)[f"alpha.{layer}"].detach()
        assert torch.allclose(alpha @ alpha.T, torch.eye(3), atol=1e-5)


def test_ensemble_probs():
    logits = torch.randn(6, 3, 5)
    p = ensemble_probs(logits)
    assert p.shape == (6, 5)
    assert torch.allclose(p.sum(-1), torch.ones(6))
    assert torch.allclose(p, torch.softmax(logits, -1).mean(1))
    assert ensemble_probs(logits.bfloat16()).dtype == torch.float32


def test_codegen_is_deterministic_and_imports_torch_and_the_runtime():
    for make in PLANS.values():
        src = emit_source(make())
        assert src == emit_source(make())
        assert import_roots(src) == {"torch", "mixc"}
        assert "from mixc.backends.torch.runtime import " in src


def test_standalone_source_needs_torch_alone_and_computes_the_same():
    """``--standalone`` writes the runtime into the file: no mixc import, and the same model."""
    for make in PLANS.values():
        plan = make()
        src = emit_source(plan, standalone=True)
        assert src == emit_source(plan, standalone=True)
        assert import_roots(src) <= {"torch", "math", "dataclasses", "typing", "__future__"}, (
            import_roots(src)
        )
        mod = types.ModuleType("standalone_model")
        exec(compile(src, "standalone_model.py", "exec", dont_inherit=True), mod.__dict__)  # noqa: S102
        torch.manual_seed(0)
        alone = getattr(mod, class_name(plan))(layout="loop").eval()
        torch.manual_seed(0)
        built = build(plan, layout="loop").eval()
        assert alone.state_dict().keys() == built.state_dict().keys()
        x = torch.randn(3, *plan.input_shape)
        assert torch.equal(alone(x), built(x))


def test_golden_source():
    """The emitted source of the tiny plan, byte for byte (MIXC_UPDATE_GOLDEN=1 rewrites it)."""
    path = GOLDEN / "tiny.py"
    src = emit_source(hp.tiny_convnet())
    if os.environ.get("MIXC_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(src)
    assert path.exists(), "golden file missing; run with MIXC_UPDATE_GOLDEN=1"
    assert src == path.read_text(), (
        "codegen output changed; review and regenerate with MIXC_UPDATE_GOLDEN=1"
    )


def test_written_file_is_what_runs(tmp_path):
    plan = hp.rich_convnet(dropout=0.0)
    mod = import_written(write, plan, tmp_path, "rich", "rich_generated")
    torch.manual_seed(0)
    ours = build(plan, layout="grouped").eval()
    theirs = mod.Rich(layout="grouped").eval()
    theirs.load_state_dict(ours.state_dict())
    x = _input(plan, dtype=torch.float32)
    assert torch.equal(ours(x), theirs(x))


# ---------------------------------------------------------------------------
# Compiled specs: the zoo and generated backbones


ZOO = sorted(p.stem for p in ZOO_DIR.glob("*.mix"))


@pytest.mark.parametrize("name", ZOO)
def test_zoo_parameter_counts(name):
    plan = mixc.compile(name)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build(plan)
    assert sum(p.numel() for p in model.parameters()) == plan.accounting.total_params
    assert set(named_plan_tensors(model)) == {t.name for t in plan.tensors}


def test_wrn16_4_runs_in_both_layouts():
    plan = mixc.compile("wrn16_4")
    torch.manual_seed(0)
    a = build(plan, layout="grouped", dtype=torch.float64)
    b = build(plan, layout="loop", dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ya = a(x)
    assert ya.shape == (2, 4, 10)
    assert (ya - b(x)).abs().max().item() < 1e-10
    ref = reference_forward(
        plan, {k: v.detach().clone() for k, v in named_plan_tensors(b).items()}, x, True
    )
    assert (ya - ref).abs().max().item() < 1e-5


@settings(max_examples=30)
@given(specs())
def test_generated_specs_build_and_match_reference(text):
    """Parameter count == accounting and fused == per-member reference, over generated specs."""
    try:
        plan = mixc.compile_text(text)
    except SpecError:
        assume(False)
    torch.manual_seed(0)
    model = build(plan, layout="grouped", dtype=torch.float64)
    assert sum(p.numel() for p in model.parameters()) == plan.accounting.total_params
    assert list(named_plan_tensors(model)) == [t.name for t in plan.tensors]
    x = torch.randn(3, *plan.input_shape, dtype=torch.float64)
    T = {k: v.detach().clone() for k, v in named_plan_tensors(model).items()}
    want = reference_forward(plan, T, x, True)
    got = model(x)
    loop = build(plan, layout="loop", dtype=torch.float64)
    loop.load_state_dict(model.state_dict())
    assert (got - want).abs().max().item() < 1e-5
    assert (loop(x) - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["tiny", "signal_small_blob"])
def test_eval_mode_keeps_composed_weights_until_a_parameter_changes(name):
    """Inference composes once; an optimiser step, a loaded state or train mode make it compose
    again, and every answer equals a fresh composition."""
    plan = PLANS[name]()
    model = build(plan).double().eval()
    x = _input(plan)
    calls = []
    real = model._mix
    model._mix = lambda device: calls.append(1) or real(device)
    with torch.no_grad():
        first = model(x)
        # the second forward reused the weights
        assert torch.equal(model(x), first) and len(calls) == 1
    with torch.inference_mode():
        model(x)
    assert len(calls) == 1
    bank = next(t for n, t in named_plan_tensors(model).items() if n.startswith(("bank.", "blob")))
    with torch.no_grad():
        bank.mul_(1.5)  # an in-place update, as an optimiser step makes
        changed = model(x)
    assert len(calls) == 2 and not torch.allclose(changed, first)
    alpha = next(t for n, t in named_plan_tensors(model).items() if n.startswith("alpha."))
    with torch.no_grad():
        alpha.add_(0.25)
        after_alpha = model(x)
    assert len(calls) == 3 and not torch.allclose(after_alpha, changed)
    fresh = build(plan).double().eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh(x), after_alpha, rtol=0, atol=1e-12)
    model(x)  # autograd on: composed afresh, not from the cache
    assert len(calls) == 4
    assert copy.deepcopy(model)._mixed is None
