"""The paper's recipe at width: shared weights take the mean of their members' gradients (a
4-member WRN-28-10 diverged at lr 0.1 while one member and the naive ensemble trained).

The CPU-sized reproducer is a 1024-wide MLP ensemble at lr 0.1 (the WRN recipe's SGD): its
classifier and input layer are plain layers every member reads, and at that width the summed
gradient of four members throws the loss far above its start, as the WRN-28-10 did on the GPU.
``bench/stability.py`` measures the same on the zoo's WRN at full or reduced size.
"""

import numpy as np
import pytest
from framework_fixtures import fast_xla_compiles, one_torch_thread  # noqa: F401  (autouse)

import mixc
from mixc.core.method_batches import gradient_scales
from mixc.spec.recipe import Recipe
from mixc.stability import first_steps, synthetic

WIDE_MLP = """
backbone mlp(width = 512, classes = 10) {
    input vector(64)
    linear inp(width)
    stage body = repeat 4 block(width)
    bn; relu
    linear fc(classes)
}
block block(width) {
    bn; relu
    linear l(width)
}
ensemble {
    backbone mlp(width = 512)
    members 4
    budget 1x
    groups by_shape
    templates_per_layer 4
    assign shared
}
train {
    batch 128
    optimizer sgd(lr = 0.1, momentum = 0.9, nesterov = true)
    weight_decay 5e-4
    weight_decay_exclude [alphas]
}
"""

STEPS = 40


def _plan(*overrides: str):
    return mixc.compile_text(WIDE_MLP, list(overrides), name="wide_mlp.mix")


def _trace(backend_name: str, *overrides: str):
    from mixc.backends import get_backend

    plan = _plan(*overrides)
    recipe = Recipe.model_validate(plan.train)
    x, y = synthetic(plan.input_shape, plan.classes, STEPS * recipe.batch, signal=0.3)
    return first_steps(get_backend(backend_name, "train"), plan, recipe, x, y, STEPS)


def test_which_weights_take_the_mean():
    plan = _plan()
    assert gradient_scales(plan, "mean_output") == {"plain.fc.weight": 0.25, "plain.fc.bias": 0.25}
    assert gradient_scales(plan, "mean") == {
        "plain.inp.weight": 0.25,
        "plain.inp.bias": 0.25,
        "plain.fc.weight": 0.25,
        "plain.fc.bias": 0.25,
    }
    assert gradient_scales(plan, "sum") == {}
    for rule in ("mean", "mean_output"):
        assert gradient_scales(_plan("members=1"), rule) == {}
        # the naive ensemble shares nothing
        assert gradient_scales(_plan("groups=none"), rule) == {}
        # one network, trained as the references do
        for single_path in ("method=mimo", "method=packed"):
            assert gradient_scales(_plan(single_path), rule) == {}
    be = _plan("method=batch_ensemble")
    assert set(gradient_scales(be, "mean")) == {
        t.name for t in be.tensors if t.role == "plain_weight"
    }
    assert set(gradient_scales(be, "mean_output")) == {"plain.fc.weight"}


def test_the_recipe_defaults_to_the_output_mean_and_takes_the_others_by_set():
    assert Recipe().shared_gradient == "mean_output"
    # the default stays out of the Plan: its bytes do not move
    assert "shared_gradient" not in _plan().train
    for rule in ("sum", "mean"):
        assert (
            Recipe.model_validate(_plan(f"train.shared_gradient={rule}").train).shared_gradient
            == rule
        )
    with pytest.raises(mixc.spec.SpecError, match="shared_gradient"):
        _plan("train.shared_gradient=average")


def _one_step(backend: str, rule: str, init: dict | None = None) -> tuple[dict, dict]:
    """(state before, state after) one SGD step (momentum and decay off) of a 2-member 32-wide
    mixture."""
    from mixc.backends import get_backend

    plan = _plan(
        f"train.shared_gradient={rule}",
        "train.optimizer.momentum=0",
        "train.weight_decay=0",
        "members=2",
        "backbone.width=32",
    )
    recipe = Recipe.model_validate(plan.train)
    x, y = synthetic(plan.input_shape, plan.classes, recipe.batch)
    trainer = get_backend(backend, "train").trainer(
        plan, recipe, device="cpu", layout="loop", augment="none"
    )
    trainer.begin(x, y, recipe.batch)
    if init is not None:
        trainer.load_state(init)
    trainer.begin_epoch(1, 2)
    # copies: torch's are live views
    before = {k: np.array(v) for k, v in trainer.state_arrays().items()}
    trainer.step(np.arange(recipe.batch), 0.1, 0)
    after = {k: np.array(v) for k, v in trainer.state_arrays().items()}
    trainer.close()
    return before, after


def test_one_step_divides_exactly_the_shared_gradients_in_both_backends():
    """From one initial state, one step under ``mean`` (``mean_output``) moves every plain layer
    (the output layer) 1/M as far as under ``sum`` and every other tensor exactly as far, and
    torch and flax take the same step."""
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    init, _ = _one_step("torch", "sum")
    moved = {}
    for backend in ("torch", "flax"):
        for rule in ("sum", "mean", "mean_output"):
            before, after = _one_step(backend, rule, init)
            moved[backend, rule] = {
                k: after[k] - before[k]
                for k in after
                if not k.endswith(("running_mean", "running_var"))
            }
    halved = {"mean": ("plain.",), "mean_output": ("plain.fc.",)}
    for name, delta in moved["torch", "sum"].items():
        for rule, prefixes in halved.items():
            factor = 0.5 if name.startswith(prefixes) else 1.0
            for backend in ("torch", "flax"):
                np.testing.assert_allclose(
                    moved[backend, rule][name],
                    factor * delta,
                    rtol=1e-3,
                    atol=1e-6,
                    err_msg=f"{backend} {rule} {name}",
                )
    assert any(
        np.abs(d).max() > 1e-4
        for n, d in moved["torch", "sum"].items()
        if n.startswith("plain.inp")
    )
    assert any(
        np.abs(d).max() > 1e-4 for n, d in moved["torch", "sum"].items() if n.startswith("plain.fc")
    )


@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_the_wide_mixture_trains_like_the_naive_ensemble(backend):
    """The reproducer: under ``sum`` the mixture's loss shoots far above its start (the divergence);
    under the default (``mean_output``) and under ``mean`` its peak and its last steps stay
    within 1.3x of the naive ensemble's at the same recipe."""
    pytest.importorskip({"torch": "torch", "flax": "jax"}[backend])
    naive = _trace(backend, "groups=none")
    summed = _trace(backend, "train.shared_gradient=sum")
    start = naive.losses[0]
    assert summed.peak > 3 * naive.peak, (summed.losses, naive.losses)  # the fault reproduces
    for fixed in (_trace(backend), _trace(backend, "train.shared_gradient=mean")):
        assert fixed.peak <= 1.3 * max(naive.peak, start), (fixed.losses, naive.losses)
        assert fixed.tail() <= 1.3 * naive.tail(), (fixed.losses, naive.losses)
        assert fixed.tail() < 0.6 * start  # and it learns


def test_a_recipe_recorded_before_the_setting_reads_as_sum():
    """Runs recorded before ``shared_gradient`` existed trained with the sum: resuming one under
    today's default is a recipe change (refused unless --allow-recipe-change), not a silent one."""
    import json

    from mixc.core.run_models import RunConfig, TrainMetadata
    from mixc.recipe_diff import recipe_changes

    old = Recipe().model_dump(mode="json")
    del old["shared_gradient"]
    assert RunConfig.model_validate({"recipe": old}).recipe.shared_gradient == "sum"
    recorded = TrainMetadata.model_validate({"recipe": json.dumps(old)}).recipe
    assert recorded.shared_gradient == "sum"
    assert recipe_changes(recorded, Recipe()) == {"shared_gradient": ("sum", "mean_output")}
    new = Recipe(shared_gradient="mean").model_dump(mode="json")
    assert RunConfig.model_validate({"recipe": new}).recipe.shared_gradient == "mean"
