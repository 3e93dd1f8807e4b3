"""Training on digits: the loss falls, resume is exact, bad input gives clean errors."""

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from interrupt import interrupt_after_first_epoch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import mixc  # noqa: E402
from mixc.backends.torch import build, named_plan_tensors  # noqa: E402
from mixc.backends.torch import train as torch_train  # noqa: E402
from mixc.backends.torch.train import crop_flip  # noqa: E402
from mixc.commands import train as cmd  # noqa: E402
from mixc.core.data import load_dataset  # noqa: E402
from mixc.core.errors import TrainError  # noqa: E402
from mixc.spec.recipe import Recipe  # noqa: E402
from mixc.training import (
    learning_rate,  # noqa: E402
    train,  # noqa: E402
)

SMALL = ["backbone.width=8", "members=2", "train.batch=128", "train.optimizer.lr=0.2"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def few(digits):
    """A quarter of the train set: enough for the resume/refusal checks, four times faster."""
    return dataclasses.replace(digits, x_train=digits.x_train[:384], y_train=digits.y_train[:384])


def _plan(*extra):
    return mixc.compile("digits", SMALL + list(extra))


def _recipe(plan, **kw):
    return Recipe.model_validate({**plan.train, **kw})


def test_learning_rate_warmup_step_cosine():
    r = Recipe(
        epochs=10,
        optimizer={"lr": 1.0},
        warmup=2,
        schedule={"name": "step", "milestones": [4, 8], "gamma": 0.1},
    )
    assert learning_rate(r, 0, 10, 10) == pytest.approx(1 / 20)  # warm-up: (step + 1) / (2 * 10)
    assert learning_rate(r, 19, 10, 10) == pytest.approx(1.0)
    assert learning_rate(r, 39, 10, 10) == pytest.approx(1.0)
    assert learning_rate(r, 40, 10, 10) == pytest.approx(0.1)  # milestone epoch 4 starts at step 40
    assert learning_rate(r, 99, 10, 10) == pytest.approx(0.01)
    c = Recipe(epochs=10, optimizer={"lr": 1.0}, schedule={"name": "cosine", "min_lr": 0.1})
    assert learning_rate(c, 0, 10, 10) == pytest.approx(1.0)
    assert learning_rate(c, 50, 10, 10) == pytest.approx(0.55)
    assert learning_rate(c, 100, 10, 10) == pytest.approx(0.1)
    k = Recipe(epochs=3, optimizer={"lr": 0.3}, schedule={"name": "constant"})
    assert learning_rate(k, 29, 10, 3) == pytest.approx(0.3)


def test_crop_flip_is_a_shifted_window():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    y = crop_flip(x, g)
    assert y.shape == x.shape
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        windows = [xp[i, :, a : a + 32, b : b + 32] for a in range(9) for b in range(9)]
        assert any(torch.equal(y[i], w) or torch.equal(y[i], w.flip(-1)) for w in windows)
    assert torch.equal(crop_flip(x, torch.Generator().manual_seed(0)), y)  # the generator decides


def test_training_decreases_loss_and_writes_files(tmp_path, digits):
    plan = _plan()
    out = tmp_path / "run"
    m = train("torch", plan, _recipe(plan, epochs=3), out_dir=out, data=digits, progress=False)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert m["accuracy"] > 0.5 and len(m["member_accuracy"]) == 2
    assert {"accuracy", "nll", "ece", "member_accuracy", "diversity"} <= set(lines[0])
    assert json.loads((out / "config.json").read_text())["recipe"]["epochs"] == 3
    assert (
        mixc.compiler.plan.Plan.from_json((out / "plan.json").read_text()).spec_hash
        == plan.spec_hash
    )
    ck = load_file(str(out / "checkpoint.safetensors"))
    assert any(k.startswith("optim.") and k.endswith("momentum_buffer") for k in ck)


def test_resume_equals_uninterrupted(tmp_path, few, monkeypatch):
    plan = _plan()
    # cosine: the LR depends on the total, so this is a true interruption
    recipe = _recipe(plan, epochs=2)
    train("torch", plan, recipe, out_dir=tmp_path / "a", data=few, progress=False)

    interrupt_after_first_epoch(
        monkeypatch,
        lambda: train("torch", plan, recipe, out_dir=tmp_path / "b", data=few, progress=False),
    )
    m = train("torch", plan, recipe, out_dir=tmp_path / "b", data=few, progress=False)
    assert m["epoch"] == 2

    a = load_file(str(tmp_path / "a" / "checkpoint.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lb) == 2
    assert [json.loads(l)["accuracy"] for l in la] == [json.loads(l)["accuracy"] for l in lb]


def test_run_folder_of_another_spec_is_refused(tmp_path, few):
    plan = _plan()
    train("torch", plan, _recipe(plan, epochs=1), out_dir=tmp_path, data=few, progress=False)
    other = mixc.compile("digits", ["backbone.width=4", "members=2"])
    with pytest.raises(
        TrainError, match=rf"belongs to digits .*{plan.spec_hash}.*{other.spec_hash}"
    ):
        train("torch", other, _recipe(other, epochs=1), out_dir=tmp_path, data=few, progress=False)


def test_weight_decay_skips_alphas_and_bn():
    plan = _plan()
    model = build(plan)
    tensors = named_plan_tensors(model)
    names = torch_train._param_names(model, tensors)
    opt = torch_train._optimizer(
        model, plan, _recipe(plan, weight_decay_exclude=["alphas", "bn"]), names
    )
    roles = {t.name: t.role for t in plan.tensors}
    decayed = {
        roles[names[id(p)]] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]
    }
    skipped = {
        roles[names[id(p)]] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]
    }
    assert skipped == {"alpha", "bn_weight", "bn_bias"}
    assert "alpha" not in decayed and "bank" in decayed and "plain_weight" in decayed


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizer_state_round_trips(optimizer):
    plan = _plan()
    recipe = _recipe(plan, optimizer={"name": optimizer, "lr": 0.01})
    torch.manual_seed(0)
    model = build(plan)
    names = torch_train._param_names(model, named_plan_tensors(model))
    opt = torch_train._optimizer(model, plan, recipe, names)
    for _ in range(2):
        model(torch.randn(8, 1, 8, 8)).square().mean().backward()
        opt.step()
    saved = torch_train._optimizer_state(opt, names)
    assert saved and all(k.startswith("optim.") for k in saved)
    fresh = torch_train._optimizer(model, plan, recipe, names)
    torch_train._load_optimizer_state(fresh, names, saved)
    for p, state in opt.state.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(fresh.state[p][key]), torch.as_tensor(value)), key


def test_missing_cuda_is_a_clear_error(tmp_path, few):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    plan = _plan()
    with pytest.raises(TrainError, match="no CUDA GPU"):
        train(
            "torch",
            plan,
            _recipe(plan, epochs=1),
            out_dir=tmp_path,
            data=few,
            device="cuda",
            progress=False,
        )


def _cli(argv, capsys):
    code = cmd.main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_bad_data_path(tmp_path, capsys):
    code, _, err = _cli(
        ["digits", "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "r")], capsys
    )
    assert code == 2
    assert "missing.npz" in err and "x_train" in err and "Traceback" not in err


def test_cli_wrong_shapes(tmp_path, capsys):
    path = tmp_path / "flat.npz"
    np.savez(
        path,
        x_train=np.zeros((8, 64), np.float32),
        y_train=np.zeros(8, np.int64),
        x_test=np.zeros((4, 64), np.float32),
        y_test=np.zeros(4, np.int64),
    )
    code, _, err = _cli(["digits", "--data", str(path), "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    assert "[64]" in err and "[1, 8, 8]" in err and "Traceback" not in err


def test_cli_bad_option_is_one_paragraph(tmp_path, capsys):
    code, _, err = _cli(["digits", "--epochs", "0", "--out", str(tmp_path / "r")], capsys)
    assert code == 1 and "invalid training option: epochs" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_cli_bad_override_renders_spec_error(tmp_path, capsys):
    code, _, err = _cli(["digits", "--set", "nonsense=3", "--out", str(tmp_path / "r")], capsys)
    assert code == 1 and "nonsense" in err and "Traceback" not in err


def test_cli_baseline_single_trains_one_member(tmp_path, capsys):
    code, out, _ = _cli(
        [
            "digits",
            "--baseline",
            "single",
            "--set",
            "backbone.width=4",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "s"),
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0
    assert "ensemble" in out and "member 0" in out and "member 1" not in out
    plan = json.loads((tmp_path / "s" / "plan.json").read_text())
    assert plan["members"] == 1 and plan["grouping"] == "none"
    assert (
        json.loads((tmp_path / "s" / "config.json").read_text())["options"]["baseline"] == "single"
    )


def test_allocator_tuning_respects_the_environment(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libtcmalloc.so.4")
    assert cmd.tune_allocator().startswith("preloaded")
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1")
    assert "user" in cmd.tune_allocator()


def test_every_train_option_reaches_the_loop():
    """train() hands its keyword options on as one _Options: a new keyword must be a field too."""
    import dataclasses
    import inspect

    from mixc.training import _Options, train

    keywords = [
        p.name
        for p in inspect.signature(train).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    assert keywords == [f.name for f in dataclasses.fields(_Options)]
