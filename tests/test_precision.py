"""--precision, --grad-clip, --compile: bf16 and fp16 run on CPU under torch; flax refuses clearly."""

import json

import pytest

SMALL = ["--set", "backbone.width=4", "--set", "members=2", "--set", "train.batch=256", "--epochs", "1",
         "--threads", "1", "--no-progress"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_torch_low_precision_on_cpu(tmp_path, precision, capsys):
    pytest.importorskip("torch")
    from mixc.cli import main
    from mixc.run_folder import read_metrics

    out = tmp_path / precision
    assert main(["train", "digits", *SMALL, "--precision", precision, "--grad-clip", "1.0", "--out", str(out)]) == 0
    recipe = json.loads((out / "config.json").read_text())["recipe"]
    assert recipe["precision"] == precision and recipe["grad_clip"] == 1.0
    assert read_metrics(out)[0].accuracy is not None
    assert precision in capsys.readouterr().out


def test_grad_clip_bounds_the_update():
    """With a tiny clip the weights barely move; without, they move more (the clip is really applied)."""
    torch = pytest.importorskip("torch")
    import numpy as np

    import mixc
    from mixc.data import load_dataset
    from mixc.backends import get_backend
    from mixc.spec.recipe import Recipe

    plan = mixc.compile("digits", ["backbone.width=4", "members=2"])
    d = load_dataset("digits")
    moved = {}
    for clip in (None, 1e-4):
        r = Recipe.model_validate({**plan.train, "grad_clip": clip, "optimizer": {"name": "sgd", "lr": 0.1,
                                                                                   "momentum": 0.0}, "weight_decay": 0})
        t = get_backend("torch").trainer(plan, r, device="cpu", layout="auto", augment="none")
        t.begin(d.x_train, d.y_train, 64)
        before = {k: v.copy() for k, v in t.state_arrays().items()}  # the arrays may share the tensors
        t.begin_epoch(1, 2)
        t.step(np.arange(64), 0.1, 0)
        after = t.state_arrays()
        moved[clip] = sum(float(np.abs(after[k] - before[k]).sum()) for k in before if "running" not in k)
        t.close()
    assert moved[1e-4] < moved[None] / 10


def test_flax_refuses_low_precision_and_compile(tmp_path, capsys):
    pytest.importorskip("jax")
    from mixc.cli import main

    assert main(["train", "digits", *SMALL, "--backend", "flax", "--precision", "bf16", "--out", str(tmp_path / "a")]) == 1
    assert "fp32 only" in capsys.readouterr().err
    assert main(["train", "digits", *SMALL, "--backend", "flax", "--compile", "--out", str(tmp_path / "b")]) == 1
    assert "always jit-compiled" in capsys.readouterr().err
