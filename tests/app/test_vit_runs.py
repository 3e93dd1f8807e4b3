"""A ViT through every command: train (the digits-sized ViT, and an epoch of the CIFAR-sized one
on synthetic data), eval with corruptions, predict, export (verified against eval), interpolate,
and sweep's rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from mixc.cli import main  # noqa: E402

#: a smaller vit_digits (2 blocks of width 32), trained 2 epochs: what the commands need
SMALL = ["--set", "backbone.dim=32", "--set", "backbone.depth=2", "--set", "members=2"]


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    from synthetic import generated_npz

    root = tmp_path_factory.mktemp("vit")
    npz = generated_npz(root / "d.npz", n_train=192, n_test=48)
    run = root / "run"
    rc = main(
        [
            "train",
            "vit_digits",
            "--data",
            str(npz),
            "--epochs",
            "2",
            "--out",
            str(run),
            "--no-progress",
            "--threads",
            "1",
            *SMALL,
        ]
    )
    assert rc == 0
    return run, npz


def test_trained_vit_run_records_its_epochs(vit_run):
    run, _ = vit_run
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert all(np.isfinite(x["train_loss"]) for x in lines)
    plan = json.loads((run / "plan.json").read_text())
    assert any(op["kind"] == "attention" for op in plan["ops"])


def test_vit_eval_predict_and_export_agree(vit_run, capsys, tmp_path):
    run, npz = vit_run
    rc, out, err = _cli(capsys, "eval", run, "--corruptions", "contrast", "--severities", "1")
    assert rc == 0, err
    assert "contrast" in out
    saved = tmp_path / "eval.npz"
    assert _cli(capsys, "eval", run, "--save-predictions", saved, "--no-save")[0] == 0
    rc, _, err = _cli(capsys, "predict", run, npz, "-o", tmp_path / "pred.npz")
    assert rc == 0, err
    with np.load(saved) as e, np.load(tmp_path / "pred.npz") as p:
        np.testing.assert_allclose(p["member_probs"], e["member_probs"], atol=1e-6)
    rc, out, err = _cli(capsys, "export", run, "--format", "torch-export", "-o", tmp_path / "m.pt2")
    assert rc == 0, err
    assert "max |difference|" in out


def test_vit_onnx_export_is_verified(vit_run, capsys, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    run, _ = vit_run
    rc, out, err = _cli(capsys, "export", run, "--format", "onnx", "-o", tmp_path / "m.onnx")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "m.onnx.json").read_text())
    assert manifest["max_abs_diff"] <= 1e-4


def test_vit_interpolation_between_members(vit_run, capsys, tmp_path):
    run, _ = vit_run
    rc, out, err = _cli(
        capsys, "interpolate", run, "--points", "3", "--json", "--out", tmp_path / "i"
    )
    assert rc == 0, err
    points = json.loads(out)[0]["points"]
    assert [p["t"] for p in points] == [0.0, 0.5, 1.0]


def test_cifar_sized_vit_runs_an_epoch_on_synthetic_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.random((64, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    np.savez(tmp_path / "c.npz", x_train=x[:48], y_train=y[:48], x_test=x[48:], y_test=y[48:])
    rc, out, err = _cli(
        capsys,
        "train",
        "vit_cifar",
        "--data",
        tmp_path / "c.npz",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--out",
        tmp_path / "run",
        "--no-progress",
        "--threads",
        "1",
    )
    assert rc == 0, err
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["epoch"] == 1 and np.isfinite(line["train_loss"])


def test_vit_sweep_trains_each_method(vit_run, capsys, tmp_path):
    _, npz = vit_run
    rc, out, err = _cli(
        capsys,
        "sweep",
        "vit_digits",
        "--methods",
        "mixture,packed",
        "--baselines",
        "single",
        "--epochs",
        "1",
        "--data",
        npz,
        "--out",
        tmp_path / "s",
        "--no-plot",
        "--no-progress",
        "--threads",
        "1",
        *SMALL,
    )
    assert rc == 0, err
    assert "mixture" in out and "packed" in out and "single" in out


def test_flax_trains_the_vit_and_torch_reads_its_run(vit_run, capsys, tmp_path):
    pytest.importorskip("jax")
    _, npz = vit_run
    run = tmp_path / "flax"
    rc, _, err = _cli(
        capsys,
        "train",
        "vit_digits",
        "--backend",
        "flax",
        "--data",
        npz,
        "--epochs",
        "1",
        "--out",
        run,
        "--no-progress",
        "--threads",
        "1",
        *SMALL,
    )
    assert rc == 0, err
    got = {}
    for backend in ("flax", "torch"):
        rc, out, err = _cli(capsys, "eval", run, "--backend", backend, "--json", "--no-save")
        assert rc == 0, err
        got[backend] = json.loads(out)["clean"]
    assert got["flax"]["accuracy"] == got["torch"]["accuracy"]
    assert got["flax"]["nll"] == pytest.approx(got["torch"]["nll"], rel=1e-4)
