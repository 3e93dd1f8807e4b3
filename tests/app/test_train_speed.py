"""What keeps the device busy while training: no per-step wait for the device, the layout chosen
by timing and recorded, the speed reported."""

import dataclasses
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mixc  # noqa: E402
import mixc.training  # noqa: E402
from mixc.core import layout_choice  # noqa: E402
from mixc.core.data import load_dataset  # noqa: E402
from mixc.core.errors import TrainError  # noqa: E402
from mixc.loss_watch import CHECK_EVERY  # noqa: E402
from mixc.spec.recipe import Recipe  # noqa: E402
from mixc.training import train  # noqa: E402

#: the ways a tensor's value reaches Python, each a wait for the device on a GPU
HOST_READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__")


@pytest.fixture(scope="module")
def data():
    d = load_dataset("digits")
    return dataclasses.replace(d, x_train=d.x_train[:640], y_train=d.y_train[:640])


def _plan(*extra):
    return mixc.compile("digits", ["backbone.width=8", "members=2", "train.batch=16", *extra])


def _recipe(plan, **kw):
    return Recipe.model_validate({**plan.train, "epochs": 1, **kw})


def _count_host_reads(monkeypatch, where):
    """Count host reads of tensors made while ``where`` (a function of mixc.training) runs."""
    reads, inside = [], [False]
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            if inside[0]:
                reads.append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    real_where = getattr(mixc.training, where)

    def wrapped(*a, **kw):
        inside[0] = True
        try:
            return real_where(*a, **kw)
        finally:
            inside[0] = False

    monkeypatch.setattr(mixc.training, where, wrapped)
    return reads


def test_an_epoch_reads_its_losses_once_per_ten_steps(tmp_path, data, monkeypatch):
    plan = _plan()
    reads = _count_host_reads(monkeypatch, "_one_epoch")
    train("torch", plan, _recipe(plan), out_dir=tmp_path, data=data, progress=False)
    steps = 640 // 16
    # one read per batch of CHECK_EVERY losses (4 here); reading each step's would be 40
    assert reads == ["tolist"] * math.ceil(steps / CHECK_EVERY)


@pytest.mark.parametrize("method", ["default", "mimo"])
def test_a_torch_step_neither_reads_the_device_nor_waits_to_copy(data, monkeypatch, method):
    from mixc.backends.torch.train import TorchTrainer

    plan = _plan() if method == "default" else _plan("method=mimo")
    trainer = TorchTrainer(plan, _recipe(plan), augment="crop_flip")
    trainer.begin(data.x_train, data.y_train, 16)
    trainer.begin_epoch(1, 2)
    reads, copies = [], []
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name, **k: reads.append(_n))
    real_to = torch.Tensor.to

    def to(self, *a, **kw):
        if any(isinstance(v, (torch.device, str)) for v in (*a, kw.get("device"))):
            copies.append(kw.get("non_blocking", False))
        return real_to(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "to", to)
    losses = [trainer.step(np.arange(i * 16, (i + 1) * 16), 0.1, i) for i in range(3)]
    monkeypatch.undo()
    assert reads == []
    assert copies and all(copies)  # every copy to the device queued, none waited for
    assert trainer.fetch_losses(losses)() == pytest.approx([float(v) for v in losses])


def test_a_flax_step_moves_nothing_to_the_host(data):
    jax = pytest.importorskip("jax")
    from mixc.backends import get_backend

    plan = _plan()
    trainer = get_backend("flax", "train").trainer(
        plan, _recipe(plan), device="cpu", layout="auto", augment="crop_flip"
    )
    trainer.begin(data.x_train, data.y_train, 16)
    trainer.begin_epoch(1, 2)
    with jax.transfer_guard_device_to_host("disallow"):
        losses = [trainer.step(np.arange(i * 16, (i + 1) * 16), 0.1, i) for i in range(3)]
    values = trainer.fetch_losses(losses)()
    assert len(values) == 3 and all(math.isfinite(v) for v in values)


def test_speed_is_in_the_metrics_and_the_epoch_line(tmp_path, data, capsys):
    plan = _plan()
    train("torch", plan, _recipe(plan), out_dir=tmp_path, data=data, progress=True)
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert 0 < line["train_time"] <= line["epoch_time"]
    assert line["images_per_s"] == pytest.approx(640 / line["train_time"])
    assert f"{line['images_per_s']:,.0f} img/s" in capsys.readouterr().out


def _config(out):
    return json.loads((out / "config.json").read_text())["options"]


def test_auto_layout_is_timed_recorded_and_kept_on_resume(tmp_path, data, monkeypatch, capsys):
    monkeypatch.setattr(layout_choice, "MEASURED_DEVICES", {"cpu"})  # time here as on a GPU
    timed = []
    real = layout_choice.choose_layout

    def spy(requested, kind, image, time_steps):
        return real(requested, kind, image, lambda c: timed.append(c) or time_steps(c))

    monkeypatch.setattr("mixc.backends.torch.train.choose_layout", spy)
    plan = _plan()
    train("torch", plan, _recipe(plan), out_dir=tmp_path, data=data, progress=False)
    options = _config(tmp_path)
    choice = options["layout_choice"]
    assert choice["how"] == "measured" and len(timed) == 4  # 2 layouts x 2 memory formats
    assert set(choice["step_ms"]) == {
        "loop",
        "loop+channels_last",
        "grouped",
        "grouped+channels_last",
    }
    assert all(v > 0 for v in choice["step_ms"].values())
    fastest = min(choice["step_ms"], key=choice["step_ms"].get)
    assert layout_choice.label((choice["layout"], choice["channels_last"])) == fastest
    assert options["layout"] == choice["layout"]
    assert "measured a step" in capsys.readouterr().out

    # resumed with more epochs: the recorded choice, not timed again
    timed.clear()
    train(
        "torch",
        plan,
        _recipe(plan, epochs=2),
        out_dir=tmp_path,
        data=data,
        progress=False,
        allow_recipe_change=True,  # cosine: more epochs is a recipe change
    )
    again = _config(tmp_path)["layout_choice"]
    assert timed == [] and again == {**choice, "how": "resumed"}


def test_a_forced_layout_is_kept_and_only_its_memory_formats_timed(tmp_path, data, monkeypatch):
    plan = _plan()
    recipe = _recipe(plan)
    run = dict(data=data, progress=False, layout="grouped")
    train("torch", plan, recipe, out_dir=tmp_path / "cpu", **run)
    choice = _config(tmp_path / "cpu")["layout_choice"]
    assert choice == {"layout": "grouped", "channels_last": False, "how": "forced", "step_ms": {}}
    monkeypatch.setattr(layout_choice, "MEASURED_DEVICES", {"cpu"})  # as on a GPU
    train("torch", plan, recipe, out_dir=tmp_path / "gpu", **run)
    choice = _config(tmp_path / "gpu")["layout_choice"]
    assert choice["layout"] == "grouped" and choice["how"] == "measured"
    assert set(choice["step_ms"]) == {"grouped", "grouped+channels_last"}


def test_a_tampered_layout_choice_is_a_clear_error(tmp_path, data):
    plan = _plan()
    train("torch", plan, _recipe(plan), out_dir=tmp_path, data=data, progress=False)
    config = json.loads((tmp_path / "config.json").read_text())
    config["options"]["layout_choice"]["layout"] = "__import__('os')"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TrainError, match=r"config\.json.*layout_choice") as e:
        train("torch", plan, _recipe(plan), out_dir=tmp_path, data=data, progress=False)
    assert "Traceback" not in str(e.value) and "hint" in str(e.value)


def test_flax_auto_layout_is_timed_on_an_accelerator(data, monkeypatch):
    pytest.importorskip("jax")
    from mixc.backends import get_backend

    monkeypatch.setattr(layout_choice, "MEASURED_DEVICES", {"cpu"})
    plan = _plan()
    trainer = get_backend("flax", "train").trainer(
        plan, _recipe(plan), device="cpu", layout="auto", augment="none"
    )
    trainer.begin(data.x_train, data.y_train, 16)
    choice = trainer.layout_choice
    assert choice.how == "measured" and set(choice.step_ms) == {"loop", "grouped"}
    assert choice.layout == min(choice.step_ms, key=choice.step_ms.get)
    trainer.begin_epoch(1, 2)
    assert math.isfinite(float(trainer.step(np.arange(16), 0.1, 0)))


def test_flax_gathers_on_the_devices_what_it_gathered_on_the_host(tmp_path, data, monkeypatch):
    pytest.importorskip("jax")
    from safetensors.numpy import load_file

    import mixc.backends.flax.train as flax_train

    plan = _plan()
    recipe = _recipe(plan)
    train("flax", plan, recipe, out_dir=tmp_path / "host", data=data, progress=False)
    held = []
    monkeypatch.setattr(flax_train, "_fits_on_devices", lambda n, d: held.append(n) or True)
    train("flax", plan, recipe, out_dir=tmp_path / "device", data=data, progress=False)
    assert held == [data.x_train.nbytes]
    a, b = (load_file(tmp_path / k / "checkpoint.safetensors") for k in ("host", "device"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
