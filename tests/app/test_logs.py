"""--logger csv|tensorboard and curves.png/.pdf at the end of training."""

import csv

import pytest

SMALL = [
    "--set",
    "backbone.width=4",
    "--set",
    "members=2",
    "--set",
    "train.batch=256",
    "--epochs",
    "2",
    "--threads",
    "1",
    "--no-progress",
]


def test_tensorboard_events_and_curves(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    from mixc.cli import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "digits",
                *SMALL,
                "--val-fraction",
                "0.2",
                "--logger",
                "tensorboard",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    # tensorboard's own writer stores scalars as v2 summaries (tensors), which TensorBoard shows as
    # scalars
    assert {"train/train_loss", "val/nll", "test/accuracy"} <= set(acc.Tags()["tensors"])
    assert [e.step for e in acc.Tensors("val/nll")] == [1, 2]
    assert (out / "curves.png").stat().st_size > 1000 and (out / "curves.pdf").stat().st_size > 1000


def test_csv_logger(tmp_path):
    pytest.importorskip("torch")
    from mixc.cli import main

    out = tmp_path / "run"
    assert (
        main(["train", "digits", *SMALL, "--logger", "csv", "--no-curves", "--out", str(out)]) == 0
    )
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1.0", "2.0"] or [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["accuracy"]) > 0 and not (out / "curves.png").exists()
