"""mixc sweep: points, the low-budget fallback, a tiny end-to-end sweep that resumes, the plots."""

import csv
import json

import numpy as np
import pytest

from mixc.sweep import SweepError, parse_budgets, parse_members, plan_points

PNG = b"\x89PNG\r\n\x1a\n"


def test_parse_options():
    assert parse_budgets("0.25x, 0.5x,0.5x,20M") == ["0.25x", "0.5x", "20M"]
    assert parse_budgets(None) == []
    assert parse_members("1,2,4,8") == [1, 2, 4, 8]
    for bad in ("0,2", "two", ","):
        with pytest.raises(SweepError):
            parse_members(bad)


def test_budgets_may_be_absolute_counts():
    assert parse_budgets("250K,5M,1200000,1x,1.5e5") == ["250K", "5M", "1200000", "1x", "1.5e5"]
    for bad in ("abc", "5MB", "1x,two"):
        with pytest.raises(SweepError, match="not a budget"):
            parse_budgets(bad)
    pts = plan_points("digits", [], ["150K", "200000", "1x"], [4], [])
    backbone = pts[0].plan.accounting.backbone_params
    assert [p.plan.accounting.budget for p in pts] == [150_000, 200_000, backbone]
    assert all(p.plan.accounting.total_params <= p.plan.accounting.budget for p in pts)


def test_points_fallback_and_infeasible():
    pts = plan_points("digits", [], ["0.2x", "0.4x", "1x"], [], ["single", "naive"])
    by = {p.key: p for p in pts}
    assert list(by) == ["m4-b0.2x", "m4-b0.4x", "m4-b1x", "single", "naive-m4"]
    assert (
        by["m4-b0.2x"].error and "minimum" in by["m4-b0.2x"].error and by["m4-b0.2x"].plan is None
    )
    fb = by["m4-b0.4x"]  # below the by_shape minimum 70,854 but fits one blob (61,686)
    assert fb.error is None and fb.plan.grouping == "single" and "groups single" in fb.note
    assert fb.overrides[-1] == "groups=single"
    assert by["m4-b1x"].plan.grouping == "by_shape"
    assert by["single"].plan.members == 1 and by["single"].plan.grouping == "none"
    assert by["naive-m4"].plan.members == 4 and by["naive-m4"].plan.grouping == "none"
    strict = plan_points("digits", [], ["0.4x"], [], [], fallback="none")
    assert strict[0].error and strict[0].plan is None
    grid = plan_points("digits", [], ["1x", "2x"], [2, 4], ["naive"])
    # naive: the spec's M
    assert [p.key for p in grid] == ["m2-b1x", "m2-b2x", "m4-b1x", "m4-b2x", "naive-m4"]


def test_tiny_sweep_end_to_end_and_resumes(tmp_path, capsys):
    pytest.importorskip("torch")
    from synthetic import generated_npz

    from mixc.cli import main

    npz = generated_npz(tmp_path / "gen.npz", n_train=192, n_test=48)
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "digits",
        "--budgets",
        "1x,2x",
        "--baselines",
        "single",
        "--data",
        str(npz),
        "--epochs",
        "1",
        "--set",
        "backbone.width=8",
        "--set",
        "members=2",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "| point |" in first
    for f in ("sweep.md", "sweep.csv", "sweep.json", "sweep.png"):
        assert (out / f).is_file()
    assert (out / "sweep.png").read_bytes()[:8] == PNG
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["point"] for r in rows] == ["m2-b1x", "m2-b2x", "single"]
    assert all(r["status"] == "trained" and 0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    assert int(rows[1]["params"]) > int(rows[0]["params"])  # 2x holds more templates than 1x
    assert rows[0]["diversity"] and not rows[2]["diversity"]  # a single network has no pairs
    cfg = json.loads((out / "m2-b2x" / "config.json").read_text())["options"]
    assert cfg["overrides"][-1] == "budget=2x" and cfg["file"] == "digits"
    stamp = (out / "m2-b1x" / "checkpoint.safetensors").stat().st_mtime_ns
    # Again: nothing is trained, the same table comes back.
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("not trained again") == 3
    assert (out / "m2-b1x" / "checkpoint.safetensors").stat().st_mtime_ns == stamp
    rows2 = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["accuracy"] for r in rows2] == [r["accuracy"] for r in rows]
    # the points are ordinary runs: report reads them
    assert main(["report", str(out / "m2-b1x"), str(out / "single")]) == 0
    assert "Single network (baseline)" in capsys.readouterr().out


def test_sweep_errors_are_clear(tmp_path, capsys):
    pytest.importorskip("torch")  # the sweep asks its backend first
    from mixc.cli import main

    assert main(["sweep", "digits", "--budgets", "0.1x", "--out", str(tmp_path / "s")]) == 1
    assert "no point of the sweep can be compiled" in capsys.readouterr().err
    assert main(["sweep", "digits", "--baselines", "ensemble"]) == 1
    assert "--baselines" in capsys.readouterr().err
    assert main(["sweep", "digits", "--members", "0"]) == 1
    assert main(["sweep", "digits", "--set", "groups=none"]) == 1
    assert "naive ensemble" in capsys.readouterr().err


def test_members_and_params_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from mixc.plots import sweep_members_plot, sweep_params_plot

    rows = []
    for b, p in (("0.5x", 80_000), ("1x", 160_000)):
        for m, a in ((1, 0.90), (2, 0.93), (4, 0.95)):
            rows.append(
                {
                    "kind": "ensemble",
                    "budget": b,
                    "members": m,
                    "params": p + m,
                    "accuracy": a - 0.01 * (b == "0.5x"),
                    "nll": 1 - a,
                }
            )
    rows += [
        {
            "kind": "single",
            "budget": "-",
            "members": 1,
            "params": 170_000,
            "accuracy": 0.9,
            "nll": 0.3,
        },
        {
            "kind": "naive",
            "budget": "-",
            "members": 4,
            "params": 680_000,
            "accuracy": 0.96,
            "nll": 0.1,
        },
        {
            "kind": "ensemble",
            "budget": "0.1x",
            "members": 4,
            "params": None,
            "accuracy": None,
            "nll": None,
        },
    ]
    a = sweep_params_plot(rows, tmp_path / "p.png", "t")
    b = sweep_members_plot(rows, tmp_path / "m.png", "t")
    assert a.read_bytes()[:8] == PNG and b.read_bytes()[:8] == PNG
    assert np.isfinite([r["accuracy"] for r in rows if r["accuracy"] is not None]).all()


def test_two_seed_sweep_prints_mean_and_sd(tmp_path, capsys):
    pytest.importorskip("torch")
    from mixc.cli import main

    out = tmp_path / "seeds"
    argv = [
        "sweep",
        "digits",
        "--budgets",
        "1x",
        "--seeds",
        "0,1",
        "--epochs",
        "1",
        "--set",
        "backbone.width=4",
        "--set",
        "members=2",
        "--set",
        "train.batch=512",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "±" in text and "2 seeds" in text
    assert (out / "b1x" / "seed-0" / "checkpoint.safetensors").is_file() or any(
        out.glob("*/seed-1/checkpoint.safetensors")
    )
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert rows[0]["seeds"] == "2" and float(rows[0]["accuracy_sd"]) >= 0
    per = json.loads((out / "sweep.json").read_text())[0]["per_seed"]
    accs = [r["accuracy"] for r in per]
    assert float(rows[0]["accuracy"]) == pytest.approx(sum(accs) / 2)
    assert accs[0] != accs[1]  # the seeds really differ
    assert (out / "sweep.pdf").is_file()
    assert main(["sweep", "digits", "--seeds", "0,0"]) == 1
    capsys.readouterr()
    seed_runs = sorted(str(p.parent) for p in out.glob("*/seed-*/checkpoint.safetensors"))
    assert len(seed_runs) == 2
    assert main(["report", *seed_runs]) == 0  # runs that differ only in seed: one row, mean ± sd
    table = capsys.readouterr().out
    assert "(2 seeds)" in table and "±" in table and table.count("MixtureEnsemble") == 1
    assert main(["report", "--per-seed", *seed_runs]) == 0
    assert capsys.readouterr().out.count("MixtureEnsemble") == 2


def test_parse_methods_keeps_options_and_refuses_unknown_names():
    from mixc.sweep import parse_methods

    assert parse_methods("mixture, batch_ensemble,packed(alpha = 2, gamma = 1),naive") == [
        "mixture",
        "batch_ensemble",
        "packed(alpha = 2, gamma = 1)",
        "naive",
    ]
    assert parse_methods(None) == []
    for bad in ("mixture,batchensemble", "", "deep", "packed(alpha = 2"):
        with pytest.raises(SweepError, match="--methods"):
            parse_methods(bad)


def test_methods_sweep_trains_each_method_as_an_ordinary_run(tmp_path, capsys):
    """One series per method, each point an ordinary run with the method in its plan; the table
    names the method, its parameters and inference FLOPs; report shows the method beside the
    metrics."""
    pytest.importorskip("torch")
    from synthetic import generated_npz

    from mixc.cli import main

    npz = generated_npz(tmp_path / "gen.npz", n_train=128, n_test=48)
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        "digits",
        "--methods",
        "mixture,batch_ensemble,mimo,packed,naive",
        "--data",
        str(npz),
        "--epochs",
        "1",
        "--set",
        "backbone.width=8",
        "--set",
        "members=2",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| method |" in table
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["method"] for r in rows] == ["mixture", "batch_ensemble", "mimo", "packed", "naive"]
    assert [r["point"] for r in rows] == [
        "m2",
        "batch_ensemble-m2",
        "mimo-m2",
        "packed-m2",
        "naive-m2",
    ]
    assert all(r["status"] == "trained" and 0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    flops = {r["method"]: float(r["flops"]) for r in rows}
    assert flops["naive"] == pytest.approx(2.0) and flops["batch_ensemble"] == pytest.approx(2.0)
    # one network; only the first conv reads M inputs
    assert flops["mimo"] == pytest.approx(1.0, rel=0.05)
    params = {r["method"]: int(r["params"]) for r in rows}
    assert params["naive"] > 1.8 * params["mixture"]
    for (
        r
    ) in rows:  # a plan file leaves out the method where grouping implies it (mixture; none: naive)
        plan = json.loads((out / r["point"] / "plan.json").read_text())
        implied = "naive" if plan["grouping"] == "none" else "mixture"
        assert plan.get("method", {}).get("name", implied) == r["method"]
    assert (out / "sweep.png").read_bytes()[:8] == PNG
    assert main(["report", *(str(out / r["point"]) for r in rows)]) == 0
    report = capsys.readouterr().out
    assert "BatchEnsemble" in report and "MIMO" in report and "Packed-Ensembles" in report
