"""mixc export / predict on a tiny trained run: every export reproduces the run's own
predictions."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from synthetic import generated_npz  # noqa: E402

import mixc  # noqa: E402
from mixc.backends.torch import build, load_checkpoint, named_plan_tensors  # noqa: E402
from mixc.backends.torch.export import DeployedEnsemble  # noqa: E402
from mixc.export import compose_all  # noqa: E402

TINY = ["--set", "backbone.width=8", "--set", "members=2"]
TOL = 1e-4


def _cli(capsys, *argv):
    from mixc.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from mixc.cli import main

    root = tmp_path_factory.mktemp("export")
    npz = generated_npz(root / "gen.npz", n_train=128, n_test=48)
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
    with np.load(npz) as z:
        x = z["x_test"].astype(np.float32)
    return run, npz, x


def _run_model(run):
    """The run's own torch model (the generated module) with the checkpoint loaded, in eval mode."""
    from mixc.compiler.plan import read_plan

    plan = read_plan(run / "plan.json")
    model = build(plan)
    load_checkpoint(run / "checkpoint.safetensors", model, plan)
    return plan, model.eval()


def _reference(run, x):
    plan, model = _run_model(run)
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    return logits.numpy(), torch.softmax(logits, -1).numpy()


# --------------------------------------------------------------------------- The deployed module
# against the generated one, on random weights (bank, blob windows that wrap, naive)


@pytest.mark.parametrize(
    "overrides",
    [["members=3"], ["members=3", "groups=single", "budget=0.7x"], ["members=2", "groups=none"]],
    ids=["bank", "blob-wrap", "naive"],
)
def test_deployed_module_equals_generated_model(overrides):
    plan = mixc.compile("digits", ["backbone.width=8", *overrides])
    # the case this parameter is for: some member's window runs past the end
    if plan.blob is not None:
        assert any(o + s.k * s.size > plan.blob.size for s in plan.slots for o in s.offsets)
    torch.manual_seed(0)
    model = build(plan).eval()
    with torch.no_grad():
        for name, t in named_plan_tensors(model).items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif name.endswith(("running_mean", ".bias")) or name.startswith("bn."):
                t.normal_(0, 0.5)
    arrays = {n: t.detach().numpy() for n, t in named_plan_tensors(model).items()}
    dep = DeployedEnsemble(plan, compose_all(plan, arrays)).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        want = torch.softmax(model(x), -1)
        probs, ens = dep(x)
    assert not list(dep.parameters())  # composed weights are constants
    np.testing.assert_allclose(probs.numpy(), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(ens.numpy(), want.mean(1).numpy(), atol=1e-5)


# ---------------------------------------------------------------------------
# Exports of a trained run


def test_onnx_export_equals_the_run(trained, capsys, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    run, _, x = trained
    out = tmp_path / "m.onnx"
    rc, stdout, err = _cli(capsys, "export", run, "--format", "onnx", "-o", out)
    assert rc == 0, err
    assert "max |difference|" in stdout and "opset 18" in stdout
    manifest = json.loads((tmp_path / "m.onnx.json").read_text())
    assert (
        manifest["max_abs_diff"] <= TOL
        and manifest["opset"] == 18
        and manifest["checked_samples"] == 48
    )
    # this npz stores pixels in [0, 1]
    assert manifest["pixel_mean"] == [0.0] and manifest["pixel_std"] == [1.0]
    _, want = _reference(run, x)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["member_probs", "ensemble_probs"]
    for xb in (x, x[:1]):  # the batch axis is dynamic
        probs, ens = sess.run(None, {"x": xb})
        assert probs.shape == (len(xb), 2, 10)
        np.testing.assert_allclose(probs, want[: len(xb)], atol=TOL)
        np.testing.assert_allclose(ens, want[: len(xb)].mean(1), atol=TOL)
    # no temporaries left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]


def test_torch_export_equals_the_run(trained, capsys, tmp_path):
    run, _, x = trained
    out = tmp_path / "m.pt2"
    rc, stdout, err = _cli(capsys, "export", run, "--format", "torch-export", "-o", out)
    assert rc == 0, err
    prog = torch.export.load(str(out)).module()
    _, want = _reference(run, x)
    with torch.no_grad():
        probs, ens = prog(torch.from_numpy(x))
    np.testing.assert_allclose(probs.numpy(), want, atol=TOL)
    np.testing.assert_allclose(ens.numpy(), want.mean(1), atol=TOL)


def test_members_export_loads_into_the_plain_backbone(trained, capsys, tmp_path):
    run, _, x = trained
    out = tmp_path / "members"
    rc, stdout, err = _cli(capsys, "export", run, "--format", "members", "-o", out)
    assert rc == 0, err
    plain = mixc.compile("digits", [TINY[1], TINY[3], "members=1", "groups=none"])
    assert sorted(p.name for p in out.iterdir()) == [
        "export.json",
        "member_0.safetensors",
        "member_1.safetensors",
        "plain_plan.json",
    ]
    logits, _ = _reference(run, x)
    for m in range(2):
        # an ordinary single network, built from the plain spec, not from the export
        net = build(plain)
        load_checkpoint(out / f"member_{m}.safetensors", net, plain)
        with torch.no_grad():
            got = net.eval()(torch.from_numpy(x))[:, 0]
        np.testing.assert_allclose(got.numpy(), logits[:, m], atol=TOL)
    assert json.loads((out / "export.json").read_text())["max_abs_diff"] <= TOL


def test_an_export_that_disagrees_is_not_written(trained, capsys, tmp_path, monkeypatch):
    import mixc.export as ex

    def wrong(plan, arrays):  # a composition bug: the classifier's bias for class 0 off by 0.01
        members = compose_all(plan, arrays)
        for mw in members:
            w = mw.layers["fc"]
            bias = w.bias.copy()
            bias[0] += 0.01
            mw.layers["fc"] = ex.LayerWeights(w.weight, bias)
        return members

    run, _, _ = trained
    monkeypatch.setattr(ex, "compose_all", wrong)
    rc, stdout, err = _cli(
        capsys, "export", run, "--format", "torch-export", "-o", tmp_path / "m.pt2"
    )
    assert rc == 1 and "disagrees with the run's own model" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither the export nor its temporary


def test_damaged_and_foreign_runs_and_missing_onnx_are_clear_errors(
    trained, capsys, tmp_path, monkeypatch
):
    import shutil
    import sys

    run, _, _ = trained
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    data = bytearray((bad / "checkpoint.safetensors").read_bytes())
    data[-3] ^= 0xFF  # a flipped byte in the tensor data
    (bad / "checkpoint.safetensors").write_bytes(bytes(data))
    rc, _, err = _cli(capsys, "export", bad, "--format", "members", "-o", tmp_path / "o")
    assert (
        rc == 1 and "checksum" in err and "Traceback" not in err and not (tmp_path / "o").exists()
    )
    # another spec's plan beside the checkpoint
    (bad / "checkpoint.safetensors").write_bytes((run / "checkpoint.safetensors").read_bytes())
    (bad / "plan.json").write_text(mixc.compile("digits", ["members=3"]).to_json())
    rc, _, err = _cli(capsys, "export", bad, "--format", "torch-export", "-o", tmp_path / "o.pt2")
    assert rc == 1 and "hash" in err and "Traceback" not in err
    rc, _, err = _cli(capsys, "predict", bad, tmp_path / "nothing.npz", "--json")
    assert rc in (1, 2) and "Traceback" not in err
    # the onnx extra missing
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    rc, _, err = _cli(capsys, "export", run, "--format", "onnx", "-o", tmp_path / "m.onnx")
    assert rc == 1 and "mixc[export]" in err and not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------------------
# mixc predict


def test_predict_matches_eval_and_reads_images(trained, capsys, tmp_path):
    run, npz, x = trained
    saved = tmp_path / "eval.npz"
    assert _cli(capsys, "eval", run, "--save-predictions", saved, "--no-save")[0] == 0
    out = tmp_path / "pred.npz"
    rc, stdout, err = _cli(capsys, "predict", run, npz, "-o", out)
    assert rc == 0, err
    with np.load(saved) as e, np.load(out) as p:
        np.testing.assert_allclose(p["member_probs"], e["member_probs"], atol=1e-6)
        np.testing.assert_allclose(p["ensemble_probs"], e["member_probs"].mean(1), atol=1e-6)
        assert (p["predicted"] == e["member_probs"].mean(1).argmax(-1)).all()
        np.testing.assert_allclose(p["confidence"], e["member_probs"].mean(1).max(-1), atol=1e-6)
        top = e["member_probs"].argmax(-1)
        np.testing.assert_array_equal(
            p["disagreement"], (top[:, 0] != top[:, 1]).astype(np.float32)
        )

    # images: pixels in [0, 1] (this npz's scale), resized; the grey image equals its array's
    # prediction
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    px = np.round(x[:2, 0] * 255).astype(np.uint8)
    for i in range(2):
        Image.fromarray(px[i], "L").save(folder / f"{i}.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "colour.png")
    rc, stdout, err = _cli(capsys, "predict", run, folder, "--json", "--show", "1")
    assert rc == 0, err
    r = json.loads(stdout)
    assert (
        r["inputs"] == 2 and len(r["predictions"]) == 1 and r["predictions"][0]["input"] == "0.png"
    )
    _, want = _reference(run, (px[:1, None] / 255.0).astype(np.float32))
    np.testing.assert_allclose(r["predictions"][0]["ensemble_probs"], want.mean(1)[0], atol=1e-5)
    rc, _, err = _cli(capsys, "predict", run, tmp_path / "colour.png", "--json")
    assert rc == 2 and "colour image" in err and "grey" in err and "Traceback" not in err


def test_a_flax_run_exports_through_the_shared_checkpoint(trained, capsys, tmp_path):
    pytest.importorskip("flax")
    from mixc.cli import main
    from mixc.evaluation import load_predictor, open_run

    _, npz, x = trained
    run = tmp_path / "flax-run"
    assert (
        main(
            [
                "train",
                "digits",
                "--backend",
                "flax",
                "--data",
                str(npz),
                "--epochs",
                "1",
                "--out",
                str(run),
                "--no-progress",
                "--set",
                "train.batch=64",
                *TINY,
            ]
        )
        == 0
    )
    capsys.readouterr()
    out = tmp_path / "m.pt2"
    rc, stdout, err = _cli(capsys, "export", run, "--format", "torch-export", "-o", out)
    assert rc == 0, err
    r = open_run(run)
    want = load_predictor("flax", r.plan, r.checkpoint)(x)  # the flax model's own predictions
    with torch.no_grad():
        probs, _ = torch.export.load(str(out)).module()(torch.from_numpy(x))
    np.testing.assert_allclose(probs.numpy(), want, atol=TOL)


def test_a_plain_backbone_of_another_shape_is_refused():
    from mixc.export import ExportError, check_plain_plan

    plan = mixc.compile("digits", ["backbone.width=8", "members=2"])
    check_plain_plan(plan, mixc.compile("digits", ["backbone.width=8", "members=1", "groups=none"]))
    with pytest.raises(ExportError, match="spec file changed"):
        check_plain_plan(
            plan, mixc.compile("digits", ["backbone.width=16", "members=1", "groups=none"])
        )
