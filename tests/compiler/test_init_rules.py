"""Initialisation rules live in the plan and both backends apply the same ones."""

from __future__ import annotations

import numpy as np
import pytest

import mixc
from mixc.compiler.plan import InitRule, Plan

NORMAL = ["init.alphas=normal(std = 0.5)", "init.classifier=normal(std = 0.01)"]


def test_the_spec_chooses_and_the_plan_records():
    default = mixc.compile("digits")
    assert default.init.alphas == InitRule(
        law="orthonormal"
    ) and default.init.classifier == InitRule(law="uniform")
    plan = mixc.compile("digits", NORMAL)
    assert plan.init.alphas == InitRule(law="normal", std=0.5)
    assert plan.init.classifier == InitRule(law="normal", std=0.01)
    assert Plan.from_json(plan.to_json()) == plan
    # the rules define the model: checkpoints must not mix them
    assert plan.spec_hash != default.spec_hash
    text = (
        "backbone b(classes = 3) {\n input vector(4)\n linear(8)\n relu\n linear(8)\n relu\n"
        " linear(8)\n linear fc(classes)\n}\nensemble {\n backbone b\n members 2\n budget 2.0x\n"
        " init { alphas normal(std = 0.25); classifier uniform }\n}\n"
    )
    written = mixc.compile_text(text)
    assert written.init.alphas == InitRule(law="normal", std=0.25)
    # --set replaces one line of the body
    overridden = mixc.compile_text(text, ["init.alphas=orthonormal"])
    assert overridden.init.alphas == InitRule(law="orthonormal")


def _arrays(named: dict) -> dict[str, np.ndarray]:
    out = {}
    for k, v in named.items():
        v = v[...] if not hasattr(v, "detach") else v.detach()
        out[k] = np.asarray(v, dtype=np.float64)
    return out


def _torch_tensors(plan) -> dict[str, np.ndarray]:
    torch = pytest.importorskip("torch")
    from mixc.backends.torch import build, named_plan_tensors

    torch.manual_seed(0)
    return _arrays(named_plan_tensors(build(plan)))


def _flax_tensors(plan) -> dict[str, np.ndarray]:
    pytest.importorskip("jax")
    from mixc.backends.flax import build, named_plan_tensors

    return _arrays(named_plan_tensors(build(plan, seed=0)))


@pytest.mark.parametrize("tensors", [_torch_tensors, _flax_tensors], ids=["torch", "flax"])
def test_both_backends_apply_the_plans_rules(tensors):
    default = mixc.compile("digits")
    t = tensors(default)
    alphas = [v for k, v in t.items() if k.startswith("alpha.")]
    for a in alphas:  # orthonormal: unit rows
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    fan = default.op(default.output).weight_shape[1]
    bias = t[f"plain.{default.output}.bias"]
    assert np.all(np.abs(bias) <= 1 / np.sqrt(fan)) and np.any(bias != 0)  # PyTorch's uniform

    plan = mixc.compile("digits", NORMAL)
    t = tensors(plan)
    flat = np.concatenate([v.ravel() for k, v in t.items() if k.startswith("alpha.")])
    assert 0.4 < flat.std() < 0.6 and abs(flat.mean()) < 0.15  # N(0, 0.5^2) over ~100 draws
    norms = np.concatenate(
        [np.linalg.norm(v, axis=1) for k, v in t.items() if k.startswith("alpha.")]
    )
    assert np.ptp(norms) > 0.1  # no longer unit rows
    w = t[f"plain.{plan.output}.weight"]
    assert 0.008 < w.std() < 0.012
    assert np.all(t[f"plain.{plan.output}.bias"] == 0)


def test_a_classifier_rule_that_cannot_apply_is_a_warning():
    # thin: the output layer is banked
    plan = mixc.compile("wrn28_5", ["init.classifier=normal(std=0.01)"])
    assert len(plan.warnings) == 1 and "classifier rule does not apply" in plan.warnings[0].message
    assert not mixc.compile("digits", ["init.classifier=normal(std=0.01)"]).warnings
