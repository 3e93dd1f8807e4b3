"""Divergence inside the epoch: a NaN stops the run at its step, a loss far above its start is
reported."""

import dataclasses
import json
import math

import numpy as np
import pytest

from mixc.core.errors import TrainError
from mixc.loss_watch import CHECK_EVERY, HIGH_FACTOR, HIGH_STEPS, LossWatch


def _watch(lines, members=2, steps_per_epoch=30):
    return LossWatch(members, steps_per_epoch, lines.append, hint="; HINT")


def test_a_nan_names_its_step_and_epoch():
    lines = []
    w = _watch(lines)
    losses = [4.0] * 37 + [math.nan] + [4.0] * 25  # summed over 2 members: 2.0 each
    with pytest.raises(TrainError, match=r"became nan at step 38 \(epoch 2, step 8 of 30\).*HINT"):
        for s, v in enumerate(losses):
            w.add(s, v)
    # steps 30-39 are sent to the host at step 39 and read one batch later, at step 49: never
    # waiting for the steps queued since, and not at the epoch's end (step 60)
    assert s == 49
    assert lines == []


def test_losses_are_fetched_a_batch_at_a_time_and_read_a_batch_later():
    fetched, read = [], []

    def fetch(losses):
        fetched.append(list(losses))
        return lambda: read.append(len(fetched)) or [float(v) for v in losses]

    w = LossWatch(1, 100, print, fetch=fetch)
    for s in range(35):
        w.add(s, float(s))
        if s == 19:  # two batches sent, the first read
            assert len(fetched) == 2 and read == [2]
    assert [len(f) for f in fetched] == [10, 10, 10] and read == [2, 3]
    assert [s for s, _ in w.take()] == list(range(20))
    w.check()  # the epoch's end: the rest, in one last fetch
    assert [len(f) for f in fetched] == [10, 10, 10, 5] and read == [2, 3, 4, 4]
    assert w.take() == [(s, float(s)) for s in range(20, 35)]


def test_an_infinite_loss_found_by_the_final_check_of_an_epoch():
    w = _watch([])
    for s in range(3):
        w.add(s, 2.0)
    w.add(3, math.inf)
    with pytest.raises(TrainError, match="became inf at step 4"):
        w.check()


def test_a_loss_that_stays_high_is_warned_about_once():
    lines = []
    w = _watch(lines)
    start = 2.3
    high = HIGH_FACTOR * start * 1.2
    values = [start] * CHECK_EVERY + [high] * (HIGH_STEPS - 1) + [start] + [high] * (2 * HIGH_STEPS)
    for s, v in enumerate(values):
        w.add(s, 2 * v)
    w.check()
    # 49 high steps, a dip, then 100: one warning, naming where the last run began
    assert len(lines) == 1
    first_high = CHECK_EVERY + HIGH_STEPS + 1  # 1-based
    assert f"since step {first_high} " in lines[0] and "HINT" in lines[0], lines


def test_a_noisy_healthy_loss_is_not_warned_about():
    lines = []
    w = _watch(lines)
    r = np.random.default_rng(0)
    for s in range(500):
        w.add(s, 2 * (2.3 * np.exp(-s / 100) + 0.3 * r.random()))
    w.check()
    assert lines == []


def test_training_stops_at_the_nan_step_and_keeps_the_last_epoch(tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    import mixc
    from mixc.backends.torch.train import TorchTrainer
    from mixc.core.data import load_dataset
    from mixc.spec.recipe import Recipe
    from mixc.training import train

    data = load_dataset("digits")
    data = dataclasses.replace(data, x_train=data.x_train[:512], y_train=data.y_train[:512])
    plan = mixc.compile("digits", ["backbone.width=8", "members=2", "train.batch=16"])
    recipe = Recipe.model_validate({**plan.train, "epochs": 3})
    real_step, calls = TorchTrainer.step, []

    def step(self, idx, lr, s):
        calls.append(s)
        loss = real_step(self, idx, lr, s)
        # epoch 2 (32 steps each), its 3rd step
        return loss * torch.nan if len(calls) == 32 + 3 else loss

    monkeypatch.setattr(TorchTrainer, "step", step)
    with pytest.raises(TrainError, match=r"at step 35 \(epoch 2, step 3 of 32\)"):
        train("torch", plan, recipe, out_dir=tmp_path, data=data, progress=False)
    # epoch 2's first ten losses are read when the next ten are sent: not at its end (64)
    assert len(calls) == 32 + 2 * CHECK_EVERY
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
    from mixc.core.checkpoint_format import read_plan_arrays

    _, _, header = read_plan_arrays(tmp_path / "checkpoint.safetensors", plan)
    assert int(header["epoch"]) == 1
