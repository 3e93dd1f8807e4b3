"""--precision, --grad-clip, --compile: bf16 and fp16 on CPU under both backends (flax through its
dtype policy), exact fp16 resume with the loss scaler's state; flax refuses --compile clearly."""

import json

import pytest

SMALL = [
    "--set",
    "backbone.width=4",
    "--set",
    "members=2",
    "--set",
    "train.batch=256",
    "--epochs",
    "1",
    "--threads",
    "1",
    "--no-progress",
]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_torch_low_precision_on_cpu(tmp_path, precision, capsys):
    pytest.importorskip("torch")
    from mixc.cli import main
    from mixc.core.run_read import read_metrics

    out = tmp_path / precision
    assert (
        main(
            [
                "train",
                "digits",
                *SMALL,
                "--precision",
                precision,
                "--grad-clip",
                "1.0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    recipe = json.loads((out / "config.json").read_text())["recipe"]
    assert recipe["precision"] == precision and recipe["grad_clip"] == 1.0
    assert read_metrics(out)[0].accuracy is not None
    assert precision in capsys.readouterr().out


def test_grad_clip_bounds_the_update():
    """With a tiny clip the weights barely move; without, they move more (the clip is really
    applied)."""
    pytest.importorskip("torch")
    import numpy as np

    import mixc
    from mixc.backends import get_backend
    from mixc.core.data import load_dataset
    from mixc.spec.recipe import Recipe

    plan = mixc.compile("digits", ["backbone.width=4", "members=2"])
    d = load_dataset("digits")
    moved = {}
    for clip in (None, 1e-4):
        r = Recipe.model_validate(
            {
                **plan.train,
                "grad_clip": clip,
                "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0},
                "weight_decay": 0,
            }
        )
        t = get_backend("torch").trainer(plan, r, device="cpu", layout="auto", augment="none")
        t.begin(d.x_train, d.y_train, 64)
        # the arrays may share the tensors
        before = {k: v.copy() for k, v in t.state_arrays().items()}
        t.begin_epoch(1, 2)
        t.step(np.arange(64), 0.1, 0)
        after = t.state_arrays()
        moved[clip] = sum(
            float(np.abs(after[k] - before[k]).sum()) for k in before if "running" not in k
        )
        t.close()
    assert moved[1e-4] < moved[None] / 10


def test_flax_refuses_compile(tmp_path, capsys):
    pytest.importorskip("jax")
    from mixc.cli import main

    assert (
        main(
            [
                "train",
                "digits",
                *SMALL,
                "--backend",
                "flax",
                "--compile",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 1
    )
    assert "always jit-compiled" in capsys.readouterr().err


def test_flax_bf16_trains_digits(tmp_path, monkeypatch, capsys):
    """--precision bf16 under flax: the forward runs in bfloat16 (the inputs the model sees), the
    parameters and BatchNorm statistics stay float32, and digits learns as in fp32 (chance: 10%,
    loss log 10 = 2.30).
    """
    pytest.importorskip("jax")
    import jax.numpy as jnp
    import numpy as np

    from mixc.backends.flax import model as flax_model
    from mixc.backends.flax import train as flax_train
    from mixc.cli import main
    from mixc.compiler.plan import Plan
    from mixc.core.checkpoint_format import read_plan_arrays
    from mixc.core.run_read import read_metrics

    seen = []
    real_apply = flax_model.apply
    monkeypatch.setattr(
        flax_model,
        "apply",
        lambda g, p, s, x, *a: (
            seen.append((x.dtype, {v.dtype for v in p.values()})) or real_apply(g, p, s, x, *a)
        ),
    )
    monkeypatch.setattr(flax_train, "_COMPILED", {})  # trace afresh, through the patched apply
    out = tmp_path / "bf16"
    assert (
        main(
            [
                "train",
                "digits",
                "--backend",
                "flax",
                "--set",
                "backbone.width=4",
                "--set",
                "members=2",
                "--set",
                "train.batch=64",
                "--set",
                "train.optimizer.lr=0.1",
                "--set",
                "train.schedule=constant",
                "--epochs",
                "4",
                "--threads",
                "1",
                "--no-progress",
                "--no-curves",
                "--precision",
                "bf16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "bf16" in capsys.readouterr().out
    assert (jnp.bfloat16, {jnp.dtype(jnp.bfloat16)}) in seen  # the train step's forward
    assert (jnp.float32, {jnp.dtype(jnp.float32)}) in seen  # evaluation stays float32
    lines = read_metrics(out)
    losses = [m.train_loss for m in lines]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 1.5, losses
    assert lines[-1].accuracy > 0.4
    arrays, _, _ = read_plan_arrays(
        out / "checkpoint.safetensors", Plan.model_validate_json((out / "plan.json").read_text())
    )
    assert all(a.dtype == np.float32 for a in arrays.values())


def test_flax_loss_scale_follows_torchs_grad_scaler():
    """The flax fp16 loss scale moves exactly as torch's GradScaler does over any run of good and
    bad steps."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("jax")
    import jax.numpy as jnp
    import numpy as np

    from mixc.backends.flax import train as flax_train

    rng = np.random.default_rng(0)
    scale_t, tracker_t = torch.tensor([2.0**16]), torch.tensor([0], dtype=torch.int32)
    scale_j, tracker_j = jnp.float32(2.0**16), jnp.int32(0)
    for bad in rng.random(60) < 0.3:
        torch._amp_update_scale_(scale_t, tracker_t, torch.tensor([float(bad)]), 2.0, 0.5, 3)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(flax_train, "SCALE_INTERVAL", 3)
            scale_j, tracker_j = flax_train.loss_scale_update(
                scale_j, tracker_j, jnp.bool_(not bad)
            )
        assert float(scale_j) == float(scale_t[0]) and int(tracker_j) == int(tracker_t[0])


def test_flax_fp16_resume_is_exact_with_the_loss_scale(tmp_path, monkeypatch):
    """fp16 under flax: dynamic loss scaling trains, skips overflowing steps, and resumes bit for
    bit (the scale and its growth tracker in the checkpoint). Scaling starts near the overflow
    and grows after every good step, so the state at the interruption decides which later steps
    are skipped."""
    pytest.importorskip("jax")
    import numpy as np
    from interrupt import interrupt_after_first_epoch

    import mixc
    from mixc.backends.flax import train as flax_train
    from mixc.core.checkpoint_format import read_plan_arrays
    from mixc.spec.recipe import Recipe
    from mixc.training import train

    monkeypatch.setattr(flax_train, "SCALE_INIT", 2.0**17)
    monkeypatch.setattr(flax_train, "SCALE_INTERVAL", 1)
    monkeypatch.setattr(flax_train, "_COMPILED", {})
    few = _few_digits()
    plan = mixc.compile("digits", ["backbone.width=4", "members=2", "train.batch=128"])
    recipe = Recipe.model_validate({**plan.train, "epochs": 2, "precision": "fp16"})
    run = lambda out: train("flax", plan, recipe, out_dir=out, data=few, progress=False)  # noqa: E731
    run(tmp_path / "a")
    interrupt_after_first_epoch(monkeypatch, lambda: run(tmp_path / "b"))
    _, extra, _ = read_plan_arrays(tmp_path / "b" / "checkpoint.safetensors", plan)
    assert (
        extra["optim.grad_scaler.scale"][0] != 2.0**17
        and "optim.grad_scaler.growth_tracker" in extra
    )
    assert run(tmp_path / "b")["epoch"] == 2
    a, ea, _ = read_plan_arrays(tmp_path / "a" / "checkpoint.safetensors", plan)
    b, eb, _ = read_plan_arrays(tmp_path / "b" / "checkpoint.safetensors", plan)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert ea.keys() == eb.keys() and all(np.array_equal(ea[k], eb[k]) for k in ea)


def _few_digits():
    """A quarter of digits' train set (3 steps of 128 per epoch): enough for a resume check,
    fast."""
    import dataclasses

    from mixc.core.data import load_dataset

    d = load_dataset("digits")
    return dataclasses.replace(d, x_train=d.x_train[:384], y_train=d.y_train[:384])


def test_torch_fp16_resume_is_exact_with_the_scaler_state(tmp_path, monkeypatch):
    """Interrupted after epoch 1 of 2 and resumed == 2 epochs straight, bit for bit, under fp16: the
    gradient scaler's scale and growth tracker travel in the checkpoint. A scaler that grows
    after every good step reaches the overflow (at about 2**21 here) in epoch 2 and skips steps
    there; a resume that restarted it at 2**17 would not."""
    torch = pytest.importorskip("torch")
    import functools

    import numpy as np
    from interrupt import interrupt_after_first_epoch

    import mixc
    from mixc.core.checkpoint_format import read_plan_arrays
    from mixc.spec.recipe import Recipe
    from mixc.training import train

    monkeypatch.setattr(
        torch.amp,
        "GradScaler",
        functools.partial(torch.amp.GradScaler, init_scale=2.0**17, growth_interval=1),
    )
    few = _few_digits()
    plan = mixc.compile("digits", ["backbone.width=8", "members=2", "train.batch=128"])
    recipe = Recipe.model_validate({**plan.train, "epochs": 2, "precision": "fp16"})
    run = lambda out: train("torch", plan, recipe, out_dir=out, data=few, progress=False)  # noqa: E731
    run(tmp_path / "a")
    interrupt_after_first_epoch(monkeypatch, lambda: run(tmp_path / "b"))
    _, extra, _ = read_plan_arrays(tmp_path / "b" / "checkpoint.safetensors", plan)
    assert (
        extra["optim.grad_scaler.scale"].dtype == np.float32
        and extra["optim.grad_scaler.scale"][0] != 2.0**17
    )
    assert run(tmp_path / "b")["epoch"] == 2
    a, _, _ = read_plan_arrays(tmp_path / "a" / "checkpoint.safetensors", plan)
    b, _, _ = read_plan_arrays(tmp_path / "b" / "checkpoint.safetensors", plan)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_grad_scaler_state_is_checked_on_load():
    """The scaler's tensors are read like every checkpoint field: whole, and within what a scaler
    can hold."""
    import numpy as np

    from mixc.core.checkpoint_format import CheckpointError, grad_scaler_arrays, read_grad_scaler

    assert read_grad_scaler({}) is None  # fp32/bf16 runs have none
    good = grad_scaler_arrays(1024.0, 7)
    assert read_grad_scaler(good) == (1024.0, 7)
    with pytest.raises(CheckpointError, match="growth_tracker"):
        read_grad_scaler({"optim.grad_scaler.scale": good["optim.grad_scaler.scale"]})
    with pytest.raises(
        CheckpointError, match=r"scale must be one positive finite number, not float32 \[-1.0\]"
    ):
        read_grad_scaler({**good, "optim.grad_scaler.scale": np.asarray([-1.0], np.float32)})
    with pytest.raises(CheckpointError, match="integer of 0 or more"):
        read_grad_scaler(
            {**good, "optim.grad_scaler.growth_tracker": np.asarray([0.5], np.float32)}
        )
