"""The flax backend's model: accounting, layouts, codegen, init. Numerics against torch:
test_cross_backend.py."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
import handmade_plans as hp
import jax.numpy as jnp  # noqa: E402
from framework_fixtures import fast_xla_compiles  # noqa: F401 (autouse)
from paths import ZOO as ZOO_DIR
from source_checks import import_roots, import_written

import mixc
from mixc.backends.emit import class_name
from mixc.backends.flax import (
    apply,
    build,
    count_params,
    emit_source,
    ensemble_probs,
    named_plan_tensors,
    plan_arrays,
    split,
    write,
)

PLANS = {
    "tiny": lambda: hp.tiny_convnet(),
    "rich": lambda: hp.rich_convnet(dropout=0.0),
    "signal_small_blob": lambda: hp.signal_blob_net(members=3, blob_size=50),
    "mlp": lambda: hp.mlp_net(dropout=0.0),
}
ZOO = sorted(p.stem for p in ZOO_DIR.glob("*.mix"))


def _randomise(model) -> None:
    """Non-trivial BN affine and running stats, so eval mode exercises them."""
    rng = np.random.default_rng(1)
    for name, v in named_plan_tensors(model).items():
        if name.endswith("running_var"):
            v[...] = jnp.asarray(rng.random(v[...].shape) + 0.5, jnp.float32)
        elif name.startswith("bn."):
            base = 1.0 if name.endswith("weight") else 0.0
            v[...] = jnp.asarray(rng.standard_normal(v[...].shape) * 0.3 + base, jnp.float32)


def _input(plan, batch=5):
    return jnp.asarray(
        np.random.default_rng(2).standard_normal((batch, *plan.input_shape)), jnp.float32
    )


@pytest.mark.parametrize("name", sorted(PLANS))
def test_parameters_match_plan(name):
    plan = PLANS[name]()
    model = build(plan)
    named = named_plan_tensors(model)
    assert list(named) == [t.name for t in plan.tensors]
    for t in plan.tensors:
        assert list(named[t.name][...].shape) == t.shape, t.name
        assert isinstance(named[t.name], nnx.Param) == t.trainable, t.name
        assert isinstance(named[t.name], nnx.BatchStat) == (not t.trainable), t.name
    params = nnx.state(model, nnx.Param)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert total == plan.accounting.total_params == count_params(plan)
    assert len(jax.tree.leaves(nnx.state(model))) == len(plan.tensors)  # nothing outside the plan


@pytest.mark.parametrize("name", ["rich", "signal_small_blob", "mlp"])
def test_grouped_equals_loop_with_gradients(name):
    """Both layouts: same logits (train and eval), new running statistics and gradients (float32).

    One jit-compiled function computes everything for both layouts: compiling dominates.
    """
    plan = PLANS[name]()
    model = build(plan, layout="loop")
    _randomise(model)
    gd_loop, params, stats = split(model)
    model.layout = "grouped"
    gd_grouped, _, _ = split(model)
    x = _input(plan, batch=4)
    target = jnp.asarray(
        np.random.default_rng(3).standard_normal((4, plan.members, plan.classes)), jnp.float32
    )

    def both(p):
        out = []
        for gd in (gd_loop, gd_grouped):

            def loss(p, gd=gd):
                logits, new = apply(gd, p, stats, x, True)
                return (logits * target).sum(), (logits, new)

            (_, (logits, new)), grads = jax.value_and_grad(loss, has_aux=True)(p)
            out.append((logits, new, grads, apply(gd, p, stats, x, False)[0]))
        return out

    (la, sa, ga, ea), (lb, sb, gb, eb) = jax.jit(both)(params)
    assert la.shape == (4, plan.members, plan.classes)
    assert float(jnp.abs(la - lb).max()) < 1e-5
    assert float(jnp.abs(ea - eb).max()) < 1e-5
    if any(op.kind == "bn" for op in plan.ops):  # eval mode really uses the running statistics
        assert float(jnp.abs(ea - la).max()) > 1e-3
    for k in sa:
        assert float(jnp.abs(sa[k] - sb[k]).max()) < 1e-5, k
    for k in ga:
        scale = 1.0 + float(jnp.abs(ga[k]).max())
        assert float(jnp.abs(ga[k] - gb[k]).max()) < 1e-4 * scale, k


def test_train_call_updates_running_statistics_in_place():
    plan = hp.tiny_convnet()
    model = build(plan)
    before = plan_arrays(model)
    model(_input(plan), train=True)
    after = plan_arrays(model)
    assert not np.array_equal(before["bn.bn0.running_mean"], after["bn.bn0.running_mean"])
    assert np.array_equal(before["bank.g0"], after["bank.g0"])
    model(_input(plan))  # eval mode leaves them
    assert np.array_equal(after["bn.bn0.running_mean"], plan_arrays(model)["bn.bn0.running_mean"])


def test_dropout_active_only_in_training():
    plan = hp.mlp_net(dropout=0.5)
    model = build(plan, layout="grouped")
    x = _input(plan)
    assert jnp.array_equal(model(x), model(x))
    a = model(x, train=True, dropout_key=jax.random.key(0))
    b = model(x, train=True, dropout_key=jax.random.key(1))
    assert not jnp.array_equal(a, b)
    with pytest.raises(ValueError, match="dropout_key"):
        model(x, train=True)


def test_init_variance_and_alphas():
    """A composed conv starts with kaiming-normal variance; alphas are orthonormal rows."""
    plan = hp.three_conv_bank()
    model = build(plan, seed=0)
    w = model.compose()
    target = math.sqrt(2 / (32 * 9))
    for layer in ("c1", "c2", "c3"):
        std = np.asarray(w[f"{layer}.weight"]).std(axis=(1, 2, 3, 4))
        np.testing.assert_allclose(std, target, rtol=0.05)
        alpha = np.asarray(named_plan_tensors(model)[f"alpha.{layer}"][...])
        np.testing.assert_allclose(alpha @ alpha.T, np.eye(3), atol=1e-5)
    fc = np.asarray(named_plan_tensors(model)["plain.fc.weight"][...])
    assert np.abs(fc).max() <= 1 / math.sqrt(32) and fc.std() > 0.5 / math.sqrt(3 * 32)
    assert not np.array_equal(
        plan_arrays(build(plan, seed=1))["bank.g"], plan_arrays(model)["bank.g"]
    )


def test_ensemble_probs():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((6, 3, 5)), jnp.float32)
    p = ensemble_probs(logits)
    assert p.shape == (6, 5)
    np.testing.assert_allclose(np.asarray(p.sum(-1)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(p), np.asarray(jax.nn.softmax(logits, -1).mean(1)), rtol=1e-6
    )
    assert ensemble_probs(logits.astype(jnp.bfloat16)).dtype == jnp.float32
    with pytest.raises(ValueError, match="member logits"):
        ensemble_probs(logits[0])


def test_codegen_is_deterministic_and_imports_jax_flax_and_the_runtime():
    for make in [
        *PLANS.values(),
        lambda: mixc.compile("digits"),
        lambda: mixc.compile("wrn28_10_7m"),
    ]:
        src = emit_source(make())
        assert src == emit_source(make())
        assert import_roots(src) == {"jax", "flax", "mixc"}
        assert "from mixc.backends.flax.runtime import " in src


def test_standalone_source_needs_jax_and_flax_alone_and_computes_the_same(tmp_path):
    """``--standalone`` writes the runtime into the file: no mixc import, the same parameters and
    logits."""
    from mixc.cli import main

    plan = hp.tiny_convnet()
    src = emit_source(plan, standalone=True)
    assert import_roots(src) <= {"jax", "flax", "math", "dataclasses", "typing"}, import_roots(src)
    mod = types.ModuleType("standalone_flax_model")
    exec(compile(src, "standalone_flax_model.py", "exec", dont_inherit=True), mod.__dict__)  # noqa: S102
    alone = getattr(mod, class_name(plan))(rngs=nnx.Rngs(3), layout="loop")
    ours = build(plan, layout="loop", seed=3)
    ours_arrays = plan_arrays(ours)
    for name, a in plan_arrays(alone).items():
        np.testing.assert_allclose(a, ours_arrays[name], rtol=1e-6, atol=1e-7, err_msg=name)
    x = _input(plan)
    np.testing.assert_allclose(np.asarray(alone(x)), np.asarray(ours(x)), rtol=1e-5, atol=1e-6)
    assert (
        main(
            ["compile", "digits", "--backend", "flax", "--standalone", "-o", str(tmp_path / "out")]
        )
        == 0
    )
    assert "from mixc" not in (tmp_path / "out" / "digits.py").read_text()


def test_written_file_is_what_runs(tmp_path):
    plan = hp.mlp_net(dropout=0.0)
    mod = import_written(write, plan, tmp_path, "mlp", "mlp_generated_flax")
    ours = build(plan, layout="grouped", seed=3)  # jit-compiled initialisation
    theirs = mod.Mlp(rngs=nnx.Rngs(3), layout="grouped")  # op by op: the same numbers
    theirs_arrays = plan_arrays(theirs)
    for name, a in plan_arrays(ours).items():
        np.testing.assert_allclose(a, theirs_arrays[name], rtol=1e-6, atol=1e-7, err_msg=name)
    x = _input(plan)
    np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(theirs(x)), rtol=1e-5, atol=1e-6)


def test_build_rejects_unknown_layout():
    with pytest.raises(ValueError, match="layout"):
        build(hp.tiny_convnet(), layout="vmap")


def test_mixc_build_and_compile_cli(tmp_path):
    model = mixc.build("digits", backend="flax", layout="loop", seed=1)
    assert type(model).__name__ == "Digits" and model.layout == "loop"
    assert set(named_plan_tensors(model)) == {t.name for t in mixc.compile("digits").tensors}
    from mixc.cli import main

    assert main(["compile", "digits", "--backend", "flax", "-o", str(tmp_path / "out")]) == 0
    assert "from flax import nnx" in (tmp_path / "out" / "digits.py").read_text()


@pytest.mark.parametrize("name", ZOO)
def test_zoo_parameter_counts(name):
    plan = mixc.compile(name)
    assert count_params(plan) == plan.accounting.total_params


def test_load_predictor_pads_batches_and_matches_the_model(tmp_path):
    from mixc.backends.flax import load_predictor, predict_member_probs, save_checkpoint

    plan = hp.tiny_convnet()
    model = build(plan, seed=5)
    _randomise(model)
    path = save_checkpoint(tmp_path / "ck.safetensors", model, plan, epoch=1)
    x = np.asarray(_input(plan, batch=7))
    predict = load_predictor(plan, path, batch_size=3)  # batches of 3, 3 and a padded 1
    got = predict(x)
    assert got.shape == (7, plan.members, plan.classes)
    want = np.asarray(jax.nn.softmax(model(jnp.asarray(x)), -1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(predict_member_probs(model, x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["rich", "signal_small_blob"])
def test_cpu_kernel_gradient_equals_xlas(name):
    """platform="cpu" takes conv kernel gradients from per-tap matmuls; XLA's own autodiff agrees
    (strided, dilated, grouped, 1-D and 2-D convs)."""
    plan = PLANS[name]()
    model = build(plan, layout="loop", platform="cpu")
    _randomise(model)
    gd_cpu, params, stats = split(model)
    model.platform = "gpu"  # any other platform: XLA's gradients
    gd_xla, _, _ = split(model)
    x = _input(plan, batch=4)

    def both(p):
        def loss(p, gd):
            return jnp.sin(apply(gd, p, stats, x, True)[0]).sum()

        return jax.grad(loss)(p, gd_cpu), jax.grad(loss)(p, gd_xla)

    ga, gb = jax.jit(both)(params)
    for k in ga:
        scale = 1.0 + float(jnp.abs(gb[k]).max())
        assert float(jnp.abs(ga[k] - gb[k]).max()) < 1e-5 * scale, k


def test_normal_draws_are_finite_at_the_size_of_a_wide_network():
    """The init's normals are erfinv of uniforms on [-1, 1): one draw in 2^23 is exactly -1, so a
    WRN-28-10 (36M weights) started with -inf weights and trained to NaN (on a GPU at once). Key
    0 draws -1 in 2^24.
    """
    from mixc.backends.flax.runtime import _Draws

    z = np.asarray(_Draws(jax.random.key(0), (0, 1 << 24), jnp.float32).normal((1 << 24,)))
    assert np.isfinite(z).all()
    assert 5 < np.abs(z).max() < 6 and abs(z.std() - 1) < 1e-3


def test_the_model_runs_through_the_one_loader():
    """generated.load serves both backends: the class lives under its stable compiled-module name,
    made from the very text emit_source writes."""
    import sys

    from mixc.backends import generated

    plan = hp.tiny_convnet()
    cls = type(build(plan, layout="loop"))
    assert (
        cls.__module__
        == f"{generated.PACKAGE}.flax_{generated.module_name(plan)}_{plan.content_hash()}"
    )
    assert sys.modules[cls.__module__].__mixc_source__ == emit_source(plan)
    assert generated.load(plan, "flax") is sys.modules[cls.__module__]
