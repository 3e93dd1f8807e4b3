"""mixc eval / interpolate / report on a tiny trained run; metrics worked out by hand; FLOPs."""

import json
import math

import numpy as np
import pytest
from spec_texts import tiny_cnn
from synthetic import generated_npz

from mixc.metrics import ece, member_summary, reliability

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--set", "backbone.width=8", "--set", "members=2"]


# ---------------------------------------------------------------------------
# Metrics by hand (mixc.metrics' own tests cover ece/nll/diversity; these cover the additions)


def test_reliability_bins_by_hand_and_agree_with_ece():
    edge = np.linspace(0, 1, 16)[10]  # 10/15: closes bin 9
    p = np.array([[0.7, 0.3], [0.7, 0.3], [0.05, 0.95], [edge, 1 - edge], [0.5, 0.5]])
    y = np.array([0, 1, 1, 0, 1])
    r = reliability(p, y)
    assert len(r["edges"]) == 16 and len(r["count"]) == 15
    assert (
        r["count"][10] == 2
        and r["accuracy"][10] == 0.5
        and r["confidence"][10] == pytest.approx(0.7)
    )
    assert r["count"][9] == 1 and r["accuracy"][9] == 1.0  # the edge sample falls in (9/15, 10/15]
    assert r["count"][14] == 1 and r["confidence"][14] == pytest.approx(0.95)
    assert r["count"][7] == 1 and r["accuracy"][7] == 0.0  # 0.5 in (7/15, 8/15]; argmax 0 is wrong
    assert sum(r["count"]) == 5
    empty = [b for b in range(15) if b not in (7, 9, 10, 14)]
    assert all(
        r["count"][b] == 0 and r["accuracy"][b] is None and r["confidence"][b] is None
        for b in empty
    )
    from_bins = sum(
        c / 5 * abs(a - f) for c, a, f in zip(r["count"], r["accuracy"], r["confidence"]) if c
    )
    assert from_bins == pytest.approx(ece(p, y), abs=1e-12)


def test_member_summary_and_diversity_normalisation_by_hand():
    from mixc.evaluation import summarise

    # 3 members, 4 samples, 2 classes; labels all 0. Predicted classes:
    #   m0: 0 0 0 1 (1 error), m1: 0 1 1 1 (3 errors), m2: 0 0 0 0 (0 errors)
    preds = np.array([[0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 0, 0]]).T  # [N, M]
    probs = np.where(preds[..., None] == np.arange(2), 0.8, 0.2)  # [N, M, 2]
    y = np.zeros(4, int)
    s = summarise(probs, y)
    # pair disagreements: (0,1) 2/4, (0,2) 1/4, (1,2) 3/4 -> mean 0.5; mean member error 4/12 ->
    # diversity 1.5
    assert s["disagreement"] == pytest.approx(0.5)
    assert s["diversity"] == pytest.approx(0.5 / (4 / 12))
    assert s["mean_member_accuracy"] == pytest.approx(8 / 12)
    assert s["best_member"] == 2 and s["best_member_accuracy"] == 1.0
    assert s["best_member_nll"] == pytest.approx(-math.log(0.8))
    # the ensemble's NLL is of the averaged probabilities: sample 1 averages 0.8, 0.2, 0.8 -> 0.6
    p_true = np.array([0.8, 0.6, 0.6, 0.4])
    assert s["nll"] == pytest.approx(-np.mean(np.log(p_true)))
    assert member_summary(probs[:, :1], y)["best_member"] == 0


def test_flops_relative_to_one_backbone():
    import mixc
    from mixc.core.flops import backbone_macs, ensemble_macs, relative_flops

    ens = mixc.compile("digits")
    naive = mixc.compile("digits", ["groups=none"])
    single = mixc.compile("digits", ["members=1", "groups=none"])
    assert relative_flops(single) == 1.0
    assert relative_flops(naive) == 4.0
    stem = next(op for op in ens.ops if op.name == "stem")
    assert stem.source == "plain"  # the plain stem reads the shared input: it runs once
    assert ensemble_macs(ens) == 4 * backbone_macs(ens) - 3 * (64 * 32 * 9)
    # the paper's thin WRN-28-5 x4 costs about one WRN-28-10 (its Table 2 "1x")
    thin = mixc.compile("wrn28_5")
    assert relative_flops(
        thin, mixc.compile("wrn28_10", ["members=1", "groups=none"])
    ) == pytest.approx(1.0, abs=0.01)
    assert backbone_macs(mixc.compile("wrn28_10", ["members=1", "groups=none"])) == pytest.approx(
        5.25e9, rel=0.01
    )


# ---------------------------------------------------------------------------
# A tiny trained run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pytest.importorskip("torch")
    from mixc.cli import main

    root = tmp_path_factory.mktemp("eval")
    npz = generated_npz(root / "gen.npz")
    run = root / "run"
    rc = main(
        [
            "train",
            "digits",
            "--data",
            str(npz),
            "--epochs",
            "1",
            "--out",
            str(run),
            "--no-progress",
            "--set",
            "train.batch=32",
            *TINY,
        ]
    )
    assert rc == 0
    return run, npz


def _cli(capsys, *argv):
    from mixc.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_json_matches_training_metrics_and_saves_predictions(trained, capsys, tmp_path):
    run, npz = trained
    pred = tmp_path / "p.npz"
    rc, out, err = _cli(
        capsys, "eval", run, "--json", "--save-predictions", pred, "--plot", tmp_path
    )
    assert rc == 0, err
    r = json.loads(out)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    c = r["clean"]
    assert c["accuracy"] == pytest.approx(last["accuracy"]) and c["nll"] == pytest.approx(
        last["nll"], rel=1e-5
    )
    assert c["diversity"] == pytest.approx(last["diversity"])
    assert {"brier", "member_accuracy", "member_nll", "mean_member_accuracy", "best_member"} <= set(
        c
    )
    assert r["members"] == 2 and r["epoch"] == 1 and r["samples"] == 64
    with np.load(pred) as z:
        assert z["member_probs"].shape == (64, 2, 10) and z["labels"].shape == (64,)
        np.testing.assert_allclose(z["member_probs"].sum(-1), 1.0, atol=1e-5)
    assert (tmp_path / "reliability.png").read_bytes()[:8] == PNG
    assert json.loads((run / "eval.json").read_text())["clean"]["accuracy"] == c["accuracy"]
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"


def test_eval_tables_with_corruptions_and_plot(trained, capsys, tmp_path):
    run, _ = trained
    rc, out, err = _cli(
        capsys,
        "eval",
        run,
        "--corruptions",
        "contrast,jpeg",
        "--severities",
        "1,5",
        "--plot",
        tmp_path,
    )
    assert rc == 0, err
    assert "ensemble" in out and "member 1" in out and "diversity" in out
    assert "contrast" in out and "jpeg" in out and "mean" in out
    assert (tmp_path / "corruptions.png").read_bytes()[:8] == PNG
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["corruptions"]["corruptions"]) == {"contrast", "jpeg"}
    assert set(ev["corruptions"]["corruptions"]["jpeg"]["severities"]) == {"1", "5"}
    assert ev["corruptions"]["pixel_scale"] == "stored as pixels in [0, 1]"
    # a second clean-only eval keeps the corruption results of the same checkpoint for `mixc report`
    assert _cli(capsys, "eval", run)[0] == 0
    assert "corruptions" in json.loads((run / "eval.json").read_text())


def test_eval_of_a_checkpoint_file_and_clear_errors(trained, capsys, tmp_path):
    run, npz = trained
    rc, out, err = _cli(capsys, "eval", run / "checkpoint.safetensors", "--json", "--no-save")
    assert rc == 0 and json.loads(out)["clean"]["samples"] == 64
    # a checkpoint moved away from its plan
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((run / "checkpoint.safetensors").read_bytes())
    rc, out, err = _cli(capsys, "eval", lone)
    assert rc == 1 and "no plan" in err and "--plan" in err and "Traceback" not in err
    rc, out, err = _cli(capsys, "eval", lone, "--plan", run / "plan.json", "--json", "--no-save")
    assert rc == 0
    rc, out, err = _cli(capsys, "eval", tmp_path / "nope")
    assert rc == 1 and "no run folder or checkpoint" in err
    rc, out, err = _cli(capsys, "eval", tmp_path)
    assert rc == 1 and "holds no checkpoint.safetensors" in err
    not_ckpt = tmp_path / "x.safetensors"
    not_ckpt.write_bytes(b"garbage!")
    assert "not a safetensors file" in _cli(capsys, "eval", not_ckpt)[2]
    # data that do not fit the model: exit 2, the shapes named
    bad = tmp_path / "bad.npz"
    np.savez(
        bad,
        x_train=np.zeros((4, 3, 8, 8)),
        y_train=np.zeros(4, int),
        x_test=np.zeros((4, 3, 8, 8)),
        y_test=np.zeros(4, int),
    )
    rc, out, err = _cli(capsys, "eval", run, "--data", bad)
    assert rc == 2 and "[3, 8, 8]" in err
    rc, out, err = _cli(capsys, "eval", run, "--corruptions", "fog")
    assert rc == 2 and "unknown corruption" in err
    rc, out, err = _cli(capsys, "eval", run, "--data", "cifar100c", "--data-dir", tmp_path)
    assert rc == 2 and "CIFAR-100-C" in err


def test_eval_backend_without_its_framework_is_clear(trained, capsys, monkeypatch):
    """A registered backend whose framework does not import: exit 1, the pip extra named, no
    traceback."""
    from mixc.backends.flax.backend import FlaxBackend

    monkeypatch.setattr(FlaxBackend, "modules", ("jax", "mixc_no_such_framework"))
    run, _ = trained
    rc, out, err = _cli(capsys, "eval", run, "--backend", "flax")
    assert rc == 1 and "mixc_no_such_framework" in err and "pip install 'mixc[flax]'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_interpolation_ends_are_the_members(trained, backend):
    """At t = 0 and 1 (BatchNorm in eval mode) the one-member network is member i, member j, in
    either backend."""
    if backend == "flax":
        pytest.importorskip("jax")
    from mixc.core.data import load_dataset
    from mixc.evaluation import load_predictor, open_run
    from mixc.interpolation import Interpolator

    run, npz = trained
    r = open_run(run)
    ds = load_dataset(str(npz))
    probs = load_predictor("torch", r.plan, r.checkpoint)(ds.x_test)
    it = Interpolator(r, backend=backend)
    assert it.plan.members == 1 and it.plan.grouping == "none"
    for i, j, t, m in ((0, 1, 0.0, 0), (0, 1, 1.0, 1)):
        it.set_point(i, j, t)
        np.testing.assert_allclose(it.probs(ds.x_test, "eval"), probs[:, m], atol=1e-5)


def test_interpolate_flax_agrees_with_torch(trained, capsys):
    """`mixc interpolate RUN --backend flax` on a torch-trained run: torch's numbers to 1e-3."""
    pytest.importorskip("jax")
    run, _ = trained
    got = {}
    for backend in ("torch", "flax"):
        rc, out, err = _cli(
            capsys,
            "interpolate",
            run,
            "--points",
            "3",
            "--backend",
            backend,
            "--json",
            "--out",
            run / f"interp-{backend}",
        )
        assert rc == 0, err
        got[backend] = json.loads(out)[0]
    for a, b in zip(got["torch"]["points"], got["flax"]["points"]):
        for k in ("accuracy", "nll", "ece"):
            assert b[k] == pytest.approx(a[k], abs=1e-3), (a["t"], k)
    for m in ("0", "1"):
        for k in ("accuracy", "nll"):
            assert got["flax"]["members_eval_mode"][m][k] == pytest.approx(
                got["torch"]["members_eval_mode"][m][k], abs=1e-3
            )


def test_interpolate_command_writes_csv_and_png(trained, capsys, tmp_path):
    run, _ = trained
    rc, out, err = _cli(
        capsys,
        "interpolate",
        run,
        run,
        "--members",
        "1",
        "0",
        "--points",
        "3",
        "--labels",
        "a,b",
        "--out",
        tmp_path,
    )
    assert rc == 0, err
    rows = (tmp_path / "interpolation.csv").read_text().splitlines()
    assert rows[0].startswith("run,label,params,member_i,member_j,bn,t,accuracy")
    assert len(rows) == 1 + 2 * 3 and ",0.5000," in rows[2]
    assert (tmp_path / "interpolation.png").read_bytes()[:8] == PNG
    assert "members (eval BN)" in out
    rc, out, err = _cli(capsys, "interpolate", run, "--members", "0", "5")
    assert rc == 1 and "member 5 does not exist" in err
    rc, out, err = _cli(capsys, "interpolate", run, "--points", "1")
    assert rc == 1 and "--points" in err


def test_report_table(trained, capsys, tmp_path):
    run, _ = trained
    rc, out, err = _cli(
        capsys,
        "report",
        run,
        "--labels",
        "mine",
        "--csv",
        tmp_path / "r.csv",
        "--out",
        tmp_path / "r.md",
    )
    assert rc == 0, err
    assert out.startswith("| Method | Params | Accuracy | NLL | ECE |")
    assert "| mine |" in out and "FLOPs" in out and "x |" in out
    assert (tmp_path / "r.md").read_text() == out
    assert (tmp_path / "r.csv").read_text().startswith("run,method,params")
    rc, out, err = _cli(capsys, "report", run, "--labels", "a,b")
    assert rc == 1 and "--labels" in err
    rc, out, err = _cli(capsys, "report", tmp_path)
    assert rc == 1 and "holds no checkpoint" in err


TINY_32 = tiny_cnn(
    "image(3, 32, 32)",
    10,
    stem="conv stem(4, kernel = 3, stride = 4)",
    ensemble_extra="    templates_per_layer 2\n    assign shared\n",
    train=(
        "    data digits\n    epochs 1\n    batch 16\n    optimizer sgd(lr = 0.05)\n    schedule"
        " constant\n"
    ),
)


def test_eval_on_published_cifar_c_files(tmp_path, capsys):
    """--data cifar10c reads <corruption>.npy + labels.npy; without the clean archive, published
    statistics."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    spec = tmp_path / "tiny.mix"
    spec.write_text(TINY_32)
    npz = tmp_path / "c.npz"
    np.savez(
        npz,
        x_train=rng.random((32, 3, 32, 32), dtype=np.float32),
        y_train=rng.integers(0, 10, 32),
        x_test=rng.random((8, 3, 32, 32), dtype=np.float32),
        y_test=rng.integers(0, 10, 8),
    )
    run = tmp_path / "run"
    rc, _, err = _cli(capsys, "train", spec, "--data", npz, "--out", run, "--no-progress")
    assert rc == 0, err
    folder = tmp_path / "data" / "CIFAR-10-C"
    folder.mkdir(parents=True)
    np.save(folder / "labels.npy", np.tile(np.arange(6), 5))
    for name in ("fog", "jpeg_compression"):
        np.save(folder / f"{name}.npy", rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8))
    rc, out, err = _cli(
        capsys, "eval", run, "--data", "cifar10c", "--data-dir", tmp_path / "data", "--json"
    )
    assert rc == 0, err
    r = json.loads(out)
    corr = r["corruptions"]
    assert set(corr["corruptions"]) == {"fog", "jpeg_compression"}
    assert set(corr["corruptions"]["fog"]["severities"]) == {"1", "2", "3", "4", "5"}
    assert "published cifar10 train statistics" in corr["pixel_scale"]
    assert "clean" not in r  # no clean CIFAR-10 archive in the folder
    rc, out, err = _cli(
        capsys,
        "eval",
        run,
        "--data",
        "cifar10c",
        "--data-dir",
        tmp_path / "data",
        "--corruptions",
        "jpeg",
        "--json",
        "--no-save",
    )
    assert rc == 0 and list(json.loads(out)["corruptions"]["corruptions"]) == ["jpeg_compression"]


def test_eval_asks_the_registered_backend(trained, monkeypatch):
    """load_predictor goes through the registry's Backend object, whatever its name."""
    import mixc.backends
    from mixc.evaluation import load_predictor, open_run

    run, npz = trained
    r = open_run(run)
    torch_probs = load_predictor("torch", r.plan, r.checkpoint)
    calls = []

    class Fake:
        def load_predictor(self, plan, checkpoint, device="cpu", batch_size=500):
            calls.append((plan.name, checkpoint.name, device, batch_size))
            return torch_probs

    real = mixc.backends.get_backend
    monkeypatch.setattr(
        mixc.backends,
        "get_backend",
        lambda name, command=None: Fake() if name == "fake" else real(name, command),
    )
    x = np.zeros((3, 1, 8, 8), np.float32)
    out = load_predictor("fake", r.plan, r.checkpoint, batch_size=7)(x)
    assert out.shape == (3, 2, 10) and calls == [("digits", "checkpoint.safetensors", "cpu", 7)]


def test_flax_evaluates_a_torch_run_to_the_same_numbers(trained, capsys):

    pytest.importorskip("jax")
    run, _ = trained
    got = {}
    for backend in ("torch", "flax"):
        rc, out, err = _cli(capsys, "eval", run, "--backend", backend, "--json", "--no-save")
        assert rc == 0, err
        got[backend] = json.loads(out)["clean"]
    assert got["flax"]["accuracy"] == got["torch"]["accuracy"]
    assert got["flax"]["nll"] == pytest.approx(got["torch"]["nll"], rel=1e-4)
    np.testing.assert_allclose(got["flax"]["member_nll"], got["torch"]["member_nll"], rtol=1e-4)
