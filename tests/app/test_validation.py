"""--val-fraction: a seeded split, per-epoch validation metrics, best.safetensors, --keep, test at
the end."""

import json

import numpy as np
import pytest

from mixc.core.data import DataError, load_dataset, split_validation

SMALL = [
    "--set",
    "backbone.width=4",
    "--set",
    "members=2",
    "--set",
    "train.batch=256",
    "--threads",
    "1",
    "--no-progress",
]


def test_split_is_seeded_and_disjoint():
    d = load_dataset("digits")
    a, b, c = (
        split_validation(d, 0.25, 0),
        split_validation(d, 0.25, 0),
        split_validation(d, 0.25, 1),
    )
    assert np.array_equal(a.y_val, b.y_val) and np.array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.x_val, c.x_val)
    assert len(a.y_val) + len(a.y_train) == len(d.y_train) and len(a.y_val) == round(
        0.25 * len(d.y_train)
    )
    rows = {r.tobytes() for r in a.x_train.reshape(len(a.x_train), -1)}
    assert not any(r.tobytes() in rows for r in a.x_val.reshape(len(a.x_val), -1)[:50])
    with pytest.raises(DataError, match="val-fraction"):
        split_validation(d, 0.99999, 0)


@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_val_fraction_writes_val_metrics_and_best(tmp_path, backend):
    pytest.importorskip("torch" if backend == "torch" else "jax")
    from mixc.cli import main
    from mixc.core.checkpoint_format import read_plan_arrays
    from mixc.core.run_read import read_metrics

    out = tmp_path / "run"
    code = main(
        [
            "train",
            "digits",
            *SMALL,
            "--epochs",
            "2",
            "--val-fraction",
            "0.2",
            "--keep",
            "2",
            "--backend",
            backend,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    lines = read_metrics(out)
    assert [m.epoch for m in lines] == [1, 2]
    assert all(m.val_nll is not None and m.val_accuracy is not None for m in lines)
    # the test set only at the end
    assert lines[0].accuracy is None and lines[1].accuracy is not None
    assert (out / "best.safetensors").is_file() and (out / "epoch-0001.safetensors").is_file()
    best_epoch = min(lines, key=lambda m: m.val_nll).epoch
    plan = __import__("mixc.compiler.plan", fromlist=["Plan"]).Plan.model_validate_json(
        (out / "plan.json").read_text()
    )
    _, _, header = read_plan_arrays(out / "best.safetensors", plan)
    assert int(header["epoch"] if isinstance(header, dict) else header.epoch) == best_epoch
    assert json.loads((out / "config.json").read_text())["recipe"]["val_fraction"] == 0.2
