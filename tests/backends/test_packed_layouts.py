"""Packed-Ensembles' two layouts: "grouped" runs each grouped layer as one grouped op, "loop" as one
dense op per group (docs/execution.md, "BatchEnsemble and Packed-Ensembles formulations"). Both
give the logits and gradients of the grouped op, in both backends; "auto" keeps the grouped op."""

from __future__ import annotations

import numpy as np
import pytest

import mixc

CASES = {
    "digits": ("digits", ["method=packed(alpha = 2, gamma = 1)"]),
    "digits gamma 2": ("digits", ["method=packed(alpha = 2, gamma = 2)", "members=2"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_layouts_give_the_grouped_result(case):
    torch = pytest.importorskip("torch")
    from mixc.backends.torch import build

    plan = mixc.compile(*CASES[case])
    x = torch.randn(6, *plan.input_shape, generator=torch.Generator().manual_seed(1))
    results = {}
    for layout in ("grouped", "loop", "auto"):
        torch.manual_seed(0)
        model = build(plan, layout=layout).train()
        logits = model(x)
        logits.square().sum().backward()
        grads = [p.grad for p in model.parameters()]
        results[layout] = (logits.detach(), grads, model.mix(x.device).split_groups)
    assert [results[k][2] for k in ("grouped", "loop", "auto")] == [False, True, False]
    want, want_grads, _ = results["grouped"]
    for layout in ("loop", "auto"):
        got, grads, _ = results[layout]
        assert (got - want).abs().max().item() < 1e-5
        for g, h in zip(grads, want_grads):
            assert (g - h).abs().max().item() < 1e-4 * (1 + h.abs().max().item())


@pytest.mark.parametrize("case", sorted(CASES))
def test_flax_layouts_give_the_grouped_result(case):
    pytest.importorskip("jax")
    import jax.numpy as jnp
    from framework_fixtures import fast_xla_compiles  # noqa: F401

    from mixc.backends.flax import build

    plan = mixc.compile(*CASES[case])
    x = jnp.asarray(np.random.default_rng(1).standard_normal((6, *plan.input_shape)), jnp.float32)
    # platform "gpu": XLA's grouped convolution itself (on CPU _conv splits the groups anyway)
    grouped = build(plan, layout="grouped", seed=0, platform="gpu")(x)
    for layout, platform in (("loop", "gpu"), ("loop", "cpu"), ("auto", "cpu")):
        got = build(plan, layout=layout, seed=0, platform=platform)(x)
        assert float(jnp.abs(got - grouped).max()) < 1e-5, (layout, platform)
