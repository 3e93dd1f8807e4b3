"""mixc eval --ood / selective prediction, mixc calibrate, and the temperature through export and
predict, on one small digits run (4 members of width 8, 8 epochs: about 99% accurate, about 6 s
on one thread)."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")

from mixc.temperature import apply_temperature  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _cli(capsys, *argv):
    from mixc.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from mixc.cli import main

    run = tmp_path_factory.mktemp("uncertainty") / "run"
    rc = main(
        [
            "train",
            "digits",
            "--epochs",
            "8",
            "--out",
            str(run),
            "--no-progress",
            "--threads",
            "1",
            "--val-fraction",
            "0.1",
            "--set",
            "backbone.width=8",
            "--set",
            "members=4",
            "--set",
            "train.batch=32",
            "--set",
            "train.schedule=constant",
        ]
    )
    assert rc == 0
    return run


def test_eval_ood_against_noise_and_selective_prediction(digits_run, capsys, tmp_path):
    rc, out, err = _cli(
        capsys,
        "eval",
        digits_run,
        "--json",
        "--no-save",
        "--threads",
        "1",
        "--ood",
        "noise",
        "--ood",
        "inverted",
    )
    assert rc == 0, err
    r = json.loads(out)
    ood = r["ood"]
    assert set(ood["sets"]) == {"noise", "inverted"} and ood["positive"] == "in-distribution"
    noise = ood["sets"]["noise"]["scores"]
    assert set(noise) == {
        "msp",
        "max_logit",
        "energy",
        "entropy",
        "mutual_information",
        "disagreement",
    }
    assert noise["msp"]["auroc"] > 0.9  # uniform noise is obviously unlike digits
    assert noise["energy"]["direction"] == "lower = in-distribution"
    for m in noise.values():
        assert 0 <= m["fpr95"] <= 1 and 0 <= m["aupr_in"] <= 1 and 0 <= m["aupr_out"] <= 1
    s = r["selective"]
    assert 0 <= s["augrc"] <= s["aurc"] <= 1 and 0 <= s["coverage_at_5"] <= 1
    assert s["risk_full"] == pytest.approx(1 - r["clean"]["accuracy"])
    assert {"adaptive_ece", "classwise_ece"} <= set(r["clean"])

    rc, out, err = _cli(
        capsys,
        "eval",
        digits_run,
        "--no-save",
        "--threads",
        "1",
        "--ood",
        "noise",
        "--plot",
        tmp_path,
    )
    assert rc == 0, err
    assert "against noise" in out and "AUROC" in out and "FPR95" in out and "AURC" in out
    assert "in-distribution" in out and "adaptive ECE" in out  # the legend and the calibration line
    assert (tmp_path / "risk_coverage.png").read_bytes()[:8] == PNG


def test_eval_ood_errors_are_one_paragraph(digits_run, capsys, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((3, 2, 8, 8), np.float32))
    rc, _, err = _cli(capsys, "eval", digits_run, "--no-save", "--ood", bad)
    assert rc == 2 and "bad.npz" in err and "Traceback" not in err
    rc, _, err = _cli(capsys, "eval", digits_run, "--no-save", "--ood", "no-such-set")
    assert rc == 2 and "no-such-set" in err and "hint" in err


def test_eval_ood_reads_an_image_folder(digits_run, capsys, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    folder = tmp_path / "letters"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8), mode="L").save(
            folder / f"{i}.png"
        )
    rc, out, err = _cli(
        capsys, "eval", digits_run, "--json", "--no-save", "--threads", "1", "--ood", folder
    )
    assert rc == 0, err
    s = json.loads(out)["ood"]["sets"]["letters"]
    assert (
        s["samples"] == 3 and "normalised" in s["source"] and set(s["scores"]) >= {"msp", "energy"}
    )


def _overconfident_copy(run, dest, factor=8.0, epoch=None):
    """The run with its classifier's weight and bias multiplied by ``factor``: logits x factor,
    over-confident."""
    from mixc.compiler.plan import read_plan
    from mixc.core.checkpoint_format import read_plan_arrays, save_arrays

    if not dest.exists():
        shutil.copytree(run, dest)
    plan = read_plan(dest / "plan.json")
    arrays, extra, _ = read_plan_arrays(dest / "checkpoint.safetensors", plan)
    for k in ("plain.fc.weight", "plain.fc.bias"):
        arrays[k] = arrays[k] * factor
    save_arrays(dest / "checkpoint.safetensors", arrays, plan, 8 if epoch is None else epoch)
    return dest


def test_calibrate_lowers_nll_and_round_trips_through_export_and_predict(
    digits_run, capsys, tmp_path
):
    rc, out, err = _cli(
        capsys,
        "calibrate",
        _overconfident_copy(digits_run, tmp_path / "base", factor=1.0),
        "--json",
        "--threads",
        "1",
    )
    assert rc == 0, err
    # the run as trained (a short run is often under-confident: t0 < 1)
    t0 = json.loads(out)["temperature"]
    # its logits times factor: over-confident, a temperature of 4 or more
    factor = max(8.0, 4.0 / t0)
    run = _overconfident_copy(digits_run, tmp_path / "over", factor=factor)
    rc, out, err = _cli(capsys, "calibrate", run, "--json", "--threads", "1")
    assert rc == 0, err
    cal = json.loads(out)
    # softmax(f z / f T) = softmax(z / T)
    assert cal["temperature"] == pytest.approx(factor * t0, rel=0.02)
    assert cal["temperature"] > 1.5 and "the run's validation split" in cal["fitted_on"]
    assert cal["nll_after"] < cal["nll_before"] and len(cal["member_temperatures"]) == 4

    preds = tmp_path / "p.npz"
    rc, out, err = _cli(
        capsys, "eval", run, "--json", "--threads", "1", "--save-predictions", preds
    )
    assert rc == 0, err
    c = json.loads(out)["calibration"]
    assert c["temperature"] == cal["temperature"]
    # fitted on the validation split, better on the test set too
    assert c["after"]["nll"] < c["before"]["nll"]
    with np.load(preds) as z:
        member_probs = z["member_probs"]
    want = apply_temperature(member_probs, cal["temperature"])

    x = tmp_path / "x.npz"
    from mixc.core.data import load_dataset

    np.savez(x, x=load_dataset("digits").x_test[:50])
    rc, out, err = _cli(capsys, "predict", run, x, "-o", tmp_path / "out.npz")
    assert rc == 0, err
    assert "temperature" in out and "applied" in out
    with np.load(tmp_path / "out.npz") as z:
        np.testing.assert_allclose(z["ensemble_probs"], want[:50].mean(axis=1), atol=1e-5)
        assert float(z["temperature"]) == pytest.approx(cal["temperature"])

    rc, out, err = _cli(capsys, "export", run, "--format", "members", "-o", tmp_path / "members")
    assert rc == 0, err
    manifest = json.loads((tmp_path / "members" / "export.json").read_text())
    assert manifest["temperature"] == cal["temperature"]
    from mixc.compiler.plan import read_plan
    from mixc.evaluation import load_predictor

    plain = read_plan(tmp_path / "members" / "plain_plan.json")
    member0 = load_predictor("torch", plain, tmp_path / "members" / "member_0.safetensors")(
        load_dataset("digits").x_test
    )
    np.testing.assert_allclose(member0[:, 0], want[:, 0], atol=1e-4)  # member 0's logits / T


def test_a_temperature_of_another_checkpoint_is_refused(digits_run, capsys, tmp_path):
    run = _overconfident_copy(digits_run, tmp_path / "over")
    assert _cli(capsys, "calibrate", run, "--threads", "1")[0] == 0
    # the checkpoint changes (as a resume would)
    _overconfident_copy(digits_run, run, factor=1.0, epoch=7)
    x = tmp_path / "x.npz"
    np.savez(x, x=np.zeros((2, 1, 8, 8), np.float32))
    rc, _, err = _cli(capsys, "predict", run, x, "--json")
    assert (
        rc == 1
        and "calibration.json" in err
        and "--no-temperature" in err
        and "Traceback" not in err
    )
    rc, out, err = _cli(capsys, "predict", run, x, "--json", "--no-temperature")
    assert rc == 0, err
    assert json.loads(out)["temperature"] is None
    rc, out, err = _cli(capsys, "eval", run, "--json", "--no-save", "--threads", "1")
    assert rc == 0 and "calibration" not in json.loads(out) and "ignored" in err
    rc, _, err = _cli(capsys, "export", run, "--format", "members", "-o", tmp_path / "m")
    assert rc == 1 and "calibration.json" in err


def test_calibrate_option_and_data_errors(digits_run, capsys, tmp_path):
    rc, _, err = _cli(capsys, "calibrate", digits_run, "--val-fraction", "1.5")
    assert rc == 2 and "--val-fraction" in err
    bad = tmp_path / "val.npz"
    np.savez(bad, x_val=np.zeros((4, 1, 8, 8), np.float32), y_val=np.array([0, 1, 2, 10]))
    rc, _, err = _cli(capsys, "calibrate", digits_run, "--data", bad)
    assert rc == 2 and "val.npz" in err and "label 10" in err
    no_val = tmp_path / "no_val"
    shutil.copytree(digits_run, no_val)
    config = json.loads((no_val / "config.json").read_text())
    config["recipe"]["val_fraction"] = 0.0  # as if trained on the whole training set
    (no_val / "config.json").write_text(json.dumps(config))
    rc, _, err = _cli(capsys, "calibrate", no_val)
    assert (
        rc == 1 and "no held-out data" in err and "--val-fraction" in err and "Traceback" not in err
    )
    (tmp_path / "run2").mkdir()
    shutil.copytree(digits_run, tmp_path / "run2" / "r")
    cal = tmp_path / "run2" / "r" / "calibration.json"
    cal.write_text(json.dumps({"temperature": "hot"}))
    rc, _, err = _cli(capsys, "predict", tmp_path / "run2" / "r", bad, "--json")
    assert rc == 1 and "calibration.json" in err and "temperature" in err


def test_report_and_sweep_carry_the_uncertainty_columns(digits_run, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    rc, out, err = _cli(capsys, "eval", run, "--json", "--threads", "1", "--ood", "noise")
    assert rc == 0, err
    ev = json.loads(out)
    rc, out, err = _cli(capsys, "report", run, "--json")
    assert rc == 0, err
    row = json.loads(out)[0]
    assert (
        row["ood_auroc"] == ev["ood"]["sets"]["noise"]["scores"]["msp"]["auroc"]
        and row["ood_sets"] == "noise"
    )
    assert (
        row["aurc"] == ev["selective"]["aurc"]
        and row["adaptive_ece"] == ev["clean"]["adaptive_ece"]
    )
    assert row["temperature"] is None  # never calibrated
    rc, out, _ = _cli(capsys, "report", run)
    assert "OOD AUROC" in out and "AURC" in out and "(noise)" in out and "NLL (T)" not in out

    from mixc.compiler.plan import read_plan
    from mixc.core.run_read import last_metrics
    from mixc.sweep import Point, _row, markdown

    point = Point("p", "ensemble", "1x", 4, [], plan=read_plan(run / "plan.json"))
    r = _row(point, last_metrics(run), "done before", run)
    assert r["ood_auroc"] == row["ood_auroc"] and r["aurc"] == row["aurc"]
    assert "OOD AUROC" in markdown([r], "t")
    # a damaged eval.json: the columns are left empty, no error
    (run / "eval.json").write_text("{not json")
    assert _row(point, last_metrics(run), "done before", run)["ood_auroc"] is None


def test_logits_from_the_backend_or_a_note_without_them(digits_run, capsys, monkeypatch):
    import mixc.backends
    from mixc.backends import get_backend
    from mixc.backends.base import Backend
    from mixc.evaluation import load_predictor, open_run

    r = open_run(digits_run)
    x = np.random.default_rng(0).normal(size=(5, 1, 8, 8)).astype(np.float32)
    z = get_backend("torch").load_logit_predictor(r.plan, r.checkpoint)(x)
    e = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(
        e / e.sum(-1, keepdims=True), load_predictor("torch", r.plan, r.checkpoint)(x), atol=1e-6
    )

    class NoRunner(Backend):  # a third-party backend that only overrides load_predictor
        name = "no-runner"

    assert NoRunner().load_logit_predictor(r.plan, r.checkpoint) is None
    torch_backend = get_backend("torch")

    class ProbsOnly:
        def __getattr__(self, name):
            return getattr(torch_backend, name)

        def load_logit_predictor(self, *a, **k):
            return None

    real = mixc.backends.get_backend
    monkeypatch.setattr(
        mixc.backends,
        "get_backend",
        lambda name, command=None: ProbsOnly() if name == "torch" else real(name, command),
    )
    rc, out, err = _cli(
        capsys, "eval", digits_run, "--json", "--no-save", "--threads", "1", "--ood", "noise"
    )
    assert rc == 0, err
    ood = json.loads(out)["ood"]
    assert "probabilities only" in ood["note"] and set(ood["sets"]["noise"]["scores"]) == {
        "msp",
        "entropy",
        "mutual_information",
        "disagreement",
    }
