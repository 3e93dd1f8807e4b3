"""The flax backend's Vision Transformer (zoo/blocks/vit.mix): every method builds plan-shaped,
both layouts agree, a training step runs, checkpoints round-trip, and one naive member equals a
channels-first numpy reference written from the plan's tensors (the flax model runs channels-last,
so this checks token order, head split and LayerNorm axes independently of the torch backend)."""

from __future__ import annotations

import functools
import math
import types

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
import jax.numpy as jnp  # noqa: E402
from framework_fixtures import fast_xla_compiles  # noqa: F401 (autouse)
from paths import ZOO
from scipy.special import erf

import mixc
from mixc.backends.emit import class_name
from mixc.backends.flax import (
    apply,
    build,
    emit_source,
    load_checkpoint,
    named_plan_tensors,
    plan_arrays,
    save_checkpoint,
    split,
)

DIM, HEADS, CLASSES, M = 24, 2, 10, 4

#: each method's lines of the ensemble section
METHODS = {
    "mixture": "budget 1.0x",
    "mixture_disjoint": "budget 1.0x\n    assign greedy_disjoint",
    "naive": "method naive",
    "batch_ensemble": "method batch_ensemble",
    "mimo": "method mimo",
    "packed": "method packed(alpha = 2, gamma = 1)",
}


@functools.cache
def _plan(method: str):
    return mixc.compile_text(
        f"""import "{ZOO / "blocks" / "vit.mix"}"
ensemble {{
    backbone vit(size = 8, patch = 2, dim = {DIM}, depth = 2, heads = {HEADS}, classes = {CLASSES},
                 channels = 1)
    members {M}
    {METHODS[method]}
}}
""",
        name="vit_tiny.mix",
    )


def _input(batch: int = 3, seed: int = 2):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, 1, 8, 8)), jnp.float32)


def _logits(model, x) -> np.ndarray:
    """The model's eval-mode logits through one jit (op by op, every op compiles on its own)."""
    graphdef, params, stats = split(model)
    return np.asarray(jax.jit(lambda p: apply(graphdef, p, stats, x, False)[0])(params))


def _randomise(model, seed: int = 1) -> None:
    """LayerNorm affines away from 1/0 and a visible class token, so they are exercised."""
    rng = np.random.default_rng(seed)
    for name, v in named_plan_tensors(model).items():
        if name.startswith(("ln.", "embed.")):
            base = 1.0 if name.endswith("weight") else 0.0
            v[...] = jnp.asarray(rng.standard_normal(v[...].shape) * 0.3 + base, jnp.float32)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_tensors_are_the_plans(method):
    plan = _plan(method)
    named = named_plan_tensors(build(plan, layout="loop"))
    assert list(named) == [t.name for t in plan.tensors]
    for t in plan.tensors:
        assert list(named[t.name][...].shape) == t.shape, t.name
    kinds = {t.name.split(".")[0] for t in plan.tensors}
    assert {"ln", "embed"} <= kinds


@pytest.mark.parametrize("method", sorted(METHODS))
def test_grouped_equals_loop(method):
    plan = _plan(method)
    model = build(plan, layout="loop")
    _randomise(model)
    x = _input()
    loop = _logits(model, x)
    model.layout = "grouped"
    assert loop.shape == (3, M, CLASSES)
    np.testing.assert_allclose(_logits(model, x), loop, rtol=1e-5, atol=1e-5)
    assert np.abs(loop[:, 0] - loop[:, 1]).max() > 1e-4  # the members differ


@pytest.mark.parametrize("method", ["mixture", "packed"])
def test_grouped_equals_loop_with_gradients(method):
    """The same logits and parameter gradients in both layouts (one jit for both): composed
    token-wise layers (mixture) and Packed's grouped LayerNorm and linear layers."""
    plan = _plan(method)
    model = build(plan, layout="loop")
    _randomise(model)
    gd_loop, params, stats = split(model)
    model.layout = "grouped"
    gd_grouped = split(model)[0]
    x = _input()
    target = jnp.asarray(np.random.default_rng(3).standard_normal((3, M, CLASSES)), jnp.float32)

    def both(p):
        out = []
        for gd in (gd_loop, gd_grouped):

            def loss(p, gd=gd):
                logits = apply(gd, p, stats, x, False)[0]
                return (logits * target).sum(), logits

            (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(p)
            out.append((logits, grads))
        return out

    (la, ga), (lb, gb) = jax.jit(both)(params)
    assert la.shape == (3, M, CLASSES)
    assert float(jnp.abs(la - lb).max()) < 1e-5
    for k in ga:
        scale = 1.0 + float(jnp.abs(ga[k]).max())
        assert float(jnp.abs(ga[k] - gb[k]).max()) < 1e-4 * scale, k


@pytest.mark.parametrize("formulation", ["compose", "scale"])
def test_batch_ensemble_formulations_agree_on_tokens(formulation, monkeypatch):
    """Token-wise layers run BatchEnsemble's scaled formulation too (the size rule counts tokens
    as positions): both give the automatic rule's logits."""
    from mixc.backends.flax.runtime import _BatchEnsemble

    plan = _plan("batch_ensemble")
    x = _input()
    model = build(plan, layout="loop")
    for layout in ("loop", "grouped"):
        model.layout = layout
        auto = _logits(model, x)
        monkeypatch.setattr(_BatchEnsemble, "formulation", formulation)
        np.testing.assert_allclose(_logits(model, x), auto, rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(_BatchEnsemble, "formulation", "auto")


def test_packed_members_are_independent():
    """Packed-Ensembles' one network: member 0's logits read only member 0's block of every
    LayerNorm, class token and position embedding (grouped LayerNorm, heads within a member)."""
    plan = _plan("packed")
    model = build(plan, layout="grouped")
    _randomise(model)
    gd, params, stats = split(model)
    x = _input()
    grads = jax.jit(jax.grad(lambda p: apply(gd, p, stats, x, False)[0][:, 0].sum()))(params)
    names = model.plan_tensors
    for t in plan.tensors:
        if t.name.split(".")[0] in ("ln", "embed"):
            g = np.asarray(grads[names[t.name]])
            width = g.shape[-1] // M
            assert np.abs(g[..., width:]).max() == 0, t.name
            assert np.abs(g[..., :width]).max() > 0, t.name


@pytest.mark.parametrize("method", ["mixture", "batch_ensemble", "mimo", "packed"])
def test_a_training_step_runs(method):
    """The trainer's own jit-compiled step (optimiser masks by plan role, MIMO's rows)."""
    from mixc.backends.flax.train import Trainer, devices_for
    from mixc.spec.recipe import Recipe

    plan = _plan(method)
    recipe = Recipe.model_validate(
        {"optimizer": {"name": "adamw", "lr": 1e-3}, "weight_decay": 0.05, "batch": 8}
    )
    trainer = Trainer(plan, recipe, devices_for("cpu"), layout="grouped")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, CLASSES, 8)
    trainer.begin(x, y, 8)
    trainer.begin_epoch(0, 0)
    before = trainer.state_arrays()
    losses = [float(trainer.step(np.arange(8), 1e-3, i)) for i in range(2)]
    assert all(math.isfinite(v) for v in losses), losses
    after = trainer.state_arrays()
    for name in ("embed.pos.pos", "ln.norm.weight"):
        assert np.abs(after[name] - before[name]).max() > 0, name


@pytest.mark.parametrize("method", ["mixture", "naive", "packed"])
def test_checkpoint_round_trip(method, tmp_path):
    plan = _plan(method)
    model = build(plan, layout="loop", seed=1)
    _randomise(model)
    path = save_checkpoint(tmp_path / "vit.safetensors", model, plan, epoch=3)
    other = build(plan, layout="grouped", seed=2)
    assert load_checkpoint(path, other, plan)[0] == 3
    theirs = plan_arrays(other)
    for name, a in plan_arrays(model).items():
        np.testing.assert_array_equal(a, theirs[name], err_msg=name)
    x = _input()
    np.testing.assert_allclose(_logits(other, x), _logits(model, x), rtol=1e-5, atol=1e-5)


def test_source_reads_like_the_spec_and_stands_alone():
    """One class per block, the attention scope a class holding q, k, v and proj; exact GELU; the
    standalone file computes what the imported runtime does."""
    plan = _plan("mixture")
    src = emit_source(plan)
    assert "class Attention(nnx.Module):" in src and "class VitBlock(nnx.Module):" in src
    for line in ("self.q = Linear(", "self.proj = Linear(", "self.cls = ClassToken("):
        assert line in src, line
    assert "attend(h, h1, x, head_dim=12)" in src
    assert 'each(token_pool, x, "cls")' in src and "each(tokens, x)" in src
    assert "each(jax.nn.gelu, h, approximate=False)" in src
    alone = emit_source(plan, standalone=True)
    mod = types.ModuleType("standalone_vit")
    exec(compile(alone, "standalone_vit.py", "exec", dont_inherit=True), mod.__dict__)  # noqa: S102
    theirs = getattr(mod, class_name(plan))(rngs=nnx.Rngs(3), layout="grouped")
    ours = build(plan, layout="grouped", seed=3)
    x = _input()
    np.testing.assert_allclose(_logits(theirs, x), _logits(ours, x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# An independent reference: one naive member, channels-first, float64 numpy


def _layer_norm(x, weight, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def _attention(x, t: dict, name: str, m: int):
    def lin(part):
        return x @ t[f"member.{name}.{part}.weight"][m].T + t[f"member.{name}.{part}.bias"][m]

    b, n, d = x.shape
    q, k, v = (lin(p).reshape(b, n, HEADS, d // HEADS).transpose(0, 2, 1, 3) for p in "qkv")
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // HEADS)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    y = (p / p.sum(-1, keepdims=True)) @ v  # [B, heads, N, head_dim]
    y = y.transpose(0, 2, 1, 3).reshape(b, n, d)
    return y @ t[f"member.{name}.proj.weight"][m].T + t[f"member.{name}.proj.bias"][m]


def _reference_member(x, t: dict, m: int):
    """Member m's logits: patches as in PyTorch's conv, tokens as flatten(2).transpose(1, 2)."""
    b = x.shape[0]
    w, bias = t["member.patch_embed.weight"][m], t["member.patch_embed.bias"][m]  # [D, 1, 2, 2]
    patches = x.reshape(b, 1, 4, 2, 4, 2)  # [B, C, h, ky, w, kx]
    h = np.einsum("bchiwj,dcij->bdhw", patches, w) + bias[:, None, None]
    h = h.reshape(b, DIM, -1).transpose(0, 2, 1)  # [B, N, D]
    token = np.broadcast_to(t["embed.cls.token"][m], (b, 1, DIM))
    h = np.concatenate([token, h], 1) + t["embed.pos.pos"][m]

    def ln(x, name):
        return _layer_norm(x, t[f"ln.{name}.weight"][m], t[f"ln.{name}.bias"][m])

    def lin(x, name):
        return x @ t[f"member.{name}.weight"][m].T + t[f"member.{name}.bias"][m]

    for blk in ("blocks.b0", "blocks.b1"):
        h = h + _attention(ln(h, f"{blk}.norm1"), t, f"{blk}.attn", m)
        a = lin(ln(h, f"{blk}.norm2"), f"{blk}.fc1")
        h = h + lin(0.5 * a * (1 + erf(a / math.sqrt(2))), f"{blk}.fc2")
    return lin(ln(h, "norm")[:, 0], "head")


def test_naive_members_equal_a_numpy_reference():
    plan = _plan("naive")
    model = build(plan, layout="loop", seed=4)
    _randomise(model, seed=5)
    t = {k: v.astype(np.float64) for k, v in plan_arrays(model).items()}
    x = _input(batch=2, seed=6)
    logits = _logits(model, x)
    for m in range(M):
        ref = _reference_member(np.asarray(x, np.float64), t, m)
        np.testing.assert_allclose(logits[:, m], ref, rtol=1e-4, atol=2e-5, err_msg=f"member {m}")


def test_attend_reads_a_shared_input_in_both_layouts():
    """A q, k or v shared by all members ([B, N, D], a plain layer's) meets per-member ones."""
    from mixc.backends.flax.runtime import Members, attend

    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 2, 8)), jnp.float32) for _ in range(3))
    shared_k = k[:, :, 0]
    per_member = [attend(q[:, :, m], shared_k, v[:, :, m], head_dim=4) for m in range(2)]
    loop = attend(Members([q[:, :, 0], q[:, :, 1]]), shared_k, Members([v[:, :, 0], v[:, :, 1]]), 4)
    grouped = attend(q.reshape(2, 5, 16), shared_k, v.reshape(2, 5, 16), head_dim=4)
    for m in range(2):
        np.testing.assert_allclose(loop[m], per_member[m], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(grouped[..., 8 * m : 8 * m + 8], per_member[m], atol=1e-6)


def test_a_bf16_forward_stays_in_bf16_and_near_float32():
    """The mixed-precision policy's forward (parameters cast, LayerNorm statistics in float32)."""
    from mixc.backends.flax.model import compute_graphdef

    plan = _plan("packed")
    graphdef, params, stats = split(build(plan, layout="grouped"))
    x = _input()
    ref = np.asarray(apply(graphdef, params, stats, x)[0])
    low = compute_graphdef(plan, "grouped", jnp.bfloat16)
    cast = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    out = jax.jit(lambda p: apply(low, p, stats, x.astype(jnp.bfloat16))[0])(cast)
    assert out.dtype == jnp.bfloat16
    assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.05 * np.abs(ref).max()
