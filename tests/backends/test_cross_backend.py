"""One checkpoint format for both frameworks: a file written by either backend loads in the other
and gives the same member logits (max abs difference < 1e-4, float32), and both count the plan's
parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
import handmade_plans as hp
import jax.numpy as jnp  # noqa: E402
from framework_fixtures import fast_xla_compiles, one_torch_thread  # noqa: F401 (autouse)
from strategies import specs
from torch_reference import randomise_batch_norm

import mixc
from mixc.backends import flax as fb
from mixc.backends import torch as tb
from mixc.spec import SpecError

TOL = 1e-4
#: a smaller vit_digits: 2 blocks of width 32, 3 members
VIT = ["backbone.dim=32", "backbone.depth=2", "members=3"]

PLANS = {
    "tiny": lambda: hp.tiny_convnet(),
    "rich": lambda: hp.rich_convnet(dropout=0.0),
    "signal": lambda: hp.signal_blob_net(),
    "signal_small_blob": lambda: hp.signal_blob_net(members=3, blob_size=50),
    "mlp": lambda: hp.mlp_net(dropout=0.0),
    "digits": lambda: mixc.compile("digits"),
    "wrn16_4_k1": lambda: mixc.compile("wrn16_4", ["backbone.k=1", "members=2"]),
    "digits_batch_ensemble": lambda: mixc.compile("digits", ["method=batch_ensemble", "members=3"]),
    "digits_mimo": lambda: mixc.compile("digits", ["method=mimo", "members=3"]),
    "digits_packed": lambda: mixc.compile(
        "digits", ["method=packed(alpha = 2, gamma = 2)", "members=2"]
    ),
    "vit_mixture": lambda: mixc.compile("vit_digits", VIT),
    "vit_mixture_greedy": lambda: mixc.compile("vit_digits", [*VIT, "assign=greedy_disjoint"]),
    "vit_batch_ensemble": lambda: mixc.compile("vit_digits", [*VIT, "method=batch_ensemble"]),
    "vit_mimo": lambda: mixc.compile("vit_digits", [*VIT, "method=mimo"]),
    "vit_packed": lambda: mixc.compile(
        "vit_digits", [*VIT, "members=2", "method=packed(alpha = 2, gamma = 1)"]
    ),
    "vit_naive": lambda: mixc.compile("vit_digits", [*VIT, "groups=none"]),
}


def _randomise_transformer(arrays: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """LayerNorm affine and embeddings away from their init, so the comparison reads them."""
    rng = np.random.default_rng(seed)
    return {
        name: rng.standard_normal(a.shape) * 0.3 + (1.0 if name.endswith("weight") else 0.0)
        for name, a in arrays.items()
        if name.startswith(("ln.", "embed."))
    }


def _randomise_flax(model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, a in fb.plan_arrays(model).items():
        if name.endswith("running_var"):
            arrays[name] = rng.random(a.shape) + 0.5
        elif name.startswith("bn."):
            arrays[name] = rng.standard_normal(a.shape) * 0.3 + (
                1.0 if name.endswith("weight") else 0.0
            )
    arrays |= _randomise_transformer(fb.plan_arrays(model), seed)
    fb.assign_plan_arrays(model, arrays)


@jax.jit
def _flax_forward(params, stats, x, graphdef):
    """(eval logits, train-mode logits, new running statistics): one compile per plan."""
    eval_logits, _ = fb.apply(graphdef, params, stats, x, False)
    train_logits, new = fb.apply(graphdef, params, stats, x, True)
    return eval_logits, train_logits, new


_flax_forward = jax.jit(_flax_forward.__wrapped__, static_argnums=3)


def _flax_run(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    graphdef, params, stats = fb.split(model)
    eval_logits, train_logits, new = _flax_forward(params, stats, jnp.asarray(x), graphdef)
    names = {attr: name for name, attr in model.plan_tensors.items()}
    return (
        np.asarray(eval_logits),
        np.asarray(train_logits),
        {names[k]: np.asarray(v) for k, v in new.items()},
    )


def _torch_run(model: torch.nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    with torch.no_grad():
        eval_logits = model.eval()(torch.from_numpy(x)).numpy()
        train_logits = model.train()(torch.from_numpy(x)).numpy()
    stats = {k: v.numpy().copy() for k, v in tb.named_plan_tensors(model).items() if "running" in k}
    return eval_logits, train_logits, stats


def _assert_same(a: tuple, b: tuple) -> None:
    """Eval logits, train-mode logits and the running statistics after the train-mode call agree."""
    assert a[0].shape == b[0].shape
    assert np.abs(a[0] - b[0]).max() < TOL
    assert np.abs(a[1] - b[1]).max() < TOL
    assert set(a[2]) == set(b[2])
    for name in a[2]:  # PyTorch's momentum convention and unbiased running variance
        assert np.abs(a[2][name] - b[2][name]).max() < TOL, name


def _check_both_directions(plan, tmp_path, batch: int = 4) -> None:
    x = np.random.default_rng(5).standard_normal((batch, *plan.input_shape)).astype(np.float32)

    # torch -> flax
    torch.manual_seed(0)
    tm = tb.build(plan)
    randomise_batch_norm(tb.named_plan_tensors(tm), 1)
    named = tb.named_plan_tensors(tm)
    with torch.no_grad():
        for name, a in _randomise_transformer({k: v.numpy() for k, v in named.items()}, 1).items():
            named[name].copy_(torch.from_numpy(a))
    path = tb.save_checkpoint(
        tmp_path / "from_torch.safetensors", tm, plan, epoch=4, metadata={"by": "torch"}
    )
    fm = fb.build(plan, seed=7)
    epoch, extra, meta = fb.load_checkpoint(path, fm, plan)
    assert (epoch, extra, meta) == (4, {}, {"by": "torch"})
    want = _torch_run(tm, x)
    got = _flax_run(fm, x)
    assert got[0].shape == (batch, plan.members, plan.classes)
    _assert_same(got, want)

    # flax -> torch
    _randomise_flax(fm, 2)
    path = fb.save_checkpoint(
        tmp_path / "from_flax.safetensors", fm, plan, epoch=9, metadata={"by": "flax"}
    )
    tm = tb.build(plan)
    epoch, extra, meta = tb.load_checkpoint(path, tm, plan)
    assert (epoch, extra, meta) == (9, {}, {"by": "flax"})
    _assert_same(_torch_run(tm, x), _flax_run(fm, x))


@pytest.mark.parametrize("name", sorted(PLANS))
def test_checkpoints_cross_backends(name, tmp_path):
    _check_both_directions(PLANS[name](), tmp_path)


def test_files_are_byte_compatible(tmp_path):
    """Same tensor names, dtypes and header keys whichever backend writes."""
    from safetensors import safe_open

    from mixc.core.checkpoint_format import tensor_checksum

    plan = hp.rich_convnet(dropout=0.0)
    torch.manual_seed(0)
    a = tb.save_checkpoint(tmp_path / "t.safetensors", tb.build(plan), plan, epoch=1)
    b = fb.save_checkpoint(tmp_path / "f.safetensors", fb.build(plan), plan, epoch=1)
    with safe_open(str(a), framework="numpy") as fa, safe_open(str(b), framework="numpy") as fb_:
        assert sorted(fa.keys()) == sorted(fb_.keys()) == sorted(t.name for t in plan.tensors)
        ma, mb = fa.metadata(), fb_.metadata()
        # the checksum is of each file's own weights (the two builds draw different ones), computed
        # alike
        for f, m in ((fa, ma), (fb_, mb)):
            assert m.pop("checksum") == tensor_checksum({k: f.get_tensor(k) for k in f.keys()})
        assert ma == mb
        for k in fa.keys():
            assert fa.get_tensor(k).dtype == fb_.get_tensor(k).dtype == np.float32


def _compile(text: str):
    try:
        return mixc.compile_text(text)
    except SpecError:
        assume(False)


@settings(max_examples=5)
@given(specs())
def test_generated_specs_cross_backends(tmp_path_factory, text):
    _check_both_directions(_compile(text), tmp_path_factory.mktemp("ck"))


@settings(max_examples=15)
@given(specs())
def test_generated_specs_parameter_counts_in_both_backends(text):
    """docs/plan.md: the emitted model's parameter count equals the plan's accounting, in every
    backend."""
    plan = _compile(text)
    with torch.device("meta"):
        tm = tb.build(plan)
    assert sum(p.numel() for p in tm.parameters()) == plan.accounting.total_params
    assert fb.count_params(plan) == plan.accounting.total_params
