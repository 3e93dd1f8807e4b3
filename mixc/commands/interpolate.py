"""`mixc interpolate RUN [RUN...] --members I J --points N`: the paper's Figure 4.

Scores the network at evenly spaced points on the straight line between two
members' composed weights (BatchNorm in train mode, as the paper does; see
``mixc.interpolation`` for why composed weights and not alphas). Several runs
(e.g. a sweep's budgets) give one curve each in one figure; `--backend` picks the framework
(any backend reads any run). Writes
``interpolation.csv`` and ``interpolation.png``.

Exit codes: 0 done; 1 a run, spec or plot problem; 2 a data problem.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from mixc.commands import add_backend_argument
from mixc.core.data import DataError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `mixc interpolate`."""
    p.add_argument(
        "runs", nargs="+", metavar="RUN", help="run folders (mixc train --out); one curve each"
    )
    p.add_argument(
        "--members",
        nargs=2,
        type=int,
        default=[0, 1],
        metavar=("I", "J"),
        help="the two members to interpolate between (default 0 1)",
    )
    p.add_argument(
        "--points",
        type=int,
        default=11,
        help="points from member I (t=0) to member J (t=1), default 11",
    )
    p.add_argument("--data", help="dataset (default: what the run trained on)")
    p.add_argument("--data-dir", help="folder holding the cifar archives")
    p.add_argument(
        "--split",
        choices=["test", "train"],
        default="test",
        help="which split to score (default test)",
    )
    p.add_argument(
        "--bn",
        choices=["train", "eval"],
        default="train",
        help=(
            "BatchNorm mode: train (batch statistics, the paper's choice) or eval (interpolated "
            "running statistics)"
        ),
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=500,
        help=(
            "evaluation batch; with --bn train also the "
            "batch whose statistics BatchNorm uses (default 500)"
        ),
    )
    p.add_argument("--device", default="cpu", help="device (cpu, cuda, cuda:1)")
    add_backend_argument(
        p, "run the networks with (checkpoints are shared: any backend reads any run)"
    )
    p.add_argument(
        "--labels", help="comma-separated curve labels, one per run (default: the folder names)"
    )
    p.add_argument(
        "--out",
        help=(
            "folder for interpolation.csv/.png (default: the run folder for one run, "
            "else the current folder)"
        ),
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args: argparse.Namespace) -> int:
    """Run `mixc interpolate`; returns the exit code (errors are ``MixcError``s for cli.main)."""
    from mixc.backends import get_backend
    from mixc.core.safe_write import refuse_link
    from mixc.evaluation import EvalError, open_run

    get_backend(args.backend, "interpolate")  # the install hint before any work
    if args.batch_size < 1:
        raise DataError("--batch-size must be at least 1")
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    if labels is not None and len(labels) != len(args.runs):
        raise EvalError(f"--labels names {len(labels)} curves for {len(args.runs)} runs")
    runs = [open_run(r) for r in args.runs]
    out = Path(args.out) if args.out else (runs[0].folder if len(runs) == 1 else Path("."))
    # refused before the work
    for name in ("interpolation.csv", "interpolation.png", "interpolation.pdf"):
        refuse_link(out / name)
    results = _interpolate_runs(args, runs, labels)
    csv_path = out / "interpolation.csv"
    _write_csv(csv_path, results, *args.members)
    png = _plot(args, results, out)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    _print(args, results, csv_path, png)
    return 0


def _interpolate_runs(
    args: argparse.Namespace, runs: list[Any], labels: list[str] | None
) -> list[dict[str, Any]]:
    """Every run's curve between the two members, on its own test (or train) set."""
    from mixc.evaluation import load_test_set, resolve_data
    from mixc.interpolation import interpolate

    i, j = args.members
    results = []
    for k, r in enumerate(runs):
        name, data_dir = resolve_data(r, args.data, args.data_dir)
        ds = load_test_set(name, data_dir, r.plan)
        x, y = (ds.x_test, ds.y_test) if args.split == "test" else (ds.x_train, ds.y_train)
        res = interpolate(
            r,
            i,
            j,
            args.points,
            x,
            y,
            bn=args.bn,
            batch=args.batch_size,
            device=args.device,
            backend=args.backend,
        )
        res["label"] = labels[k] if labels else (r.folder.name or str(r.folder))
        res["params"] = r.plan.accounting.total_params
        res["data"] = f"{name} {args.split}"
        results.append(res)
    return results


def _write_csv(csv_path: Path, results: list[dict[str, Any]], i: int, j: int) -> None:
    """One row per run and point, through the one write rule (no links, atomic)."""
    from mixc.core.safe_write import write_with

    def fill(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                [
                    "run",
                    "label",
                    "params",
                    "member_i",
                    "member_j",
                    "bn",
                    "t",
                    "accuracy",
                    "nll",
                    "ece",
                ]
            )
            for res in results:
                for p in res["points"]:
                    w.writerow(
                        [
                            res["run"],
                            res["label"],
                            res["params"],
                            i,
                            j,
                            res["bn"],
                            f"{p['t']:.4f}",
                            f"{p['accuracy']:.6f}",
                            f"{p['nll']:.6f}",
                            f"{p['ece']:.6f}",
                        ]
                    )

    write_with(csv_path, fill)


def _plot(args: argparse.Namespace, results: list[dict[str, Any]], out: Path) -> Path:
    """Accuracy and NLL along t, a curve per run; returns the PNG's path."""
    from mixc.plots import interpolation_plot

    i, j = args.members
    curves = [
        {
            "label": f"{res['label']} ({res['params']:,} params)",
            "t": [p["t"] for p in res["points"]],
            "accuracy": [p["accuracy"] for p in res["points"]],
            "nll": [p["nll"] for p in res["points"]],
        }
        for res in results
    ]
    return interpolation_plot(
        curves,
        out / "interpolation.png",
        f"members {i} -> {j}, BatchNorm in {args.bn} mode, {results[0]['data']}",
    )


def _print(
    args: argparse.Namespace, results: list[dict[str, Any]], csv_path: Path, png: Path
) -> None:
    """Accuracy at every t, a column per run, each run's dip below its weaker end, the files."""
    from rich.console import Console
    from rich.table import Table

    i, j = args.members
    console = Console(highlight=False)
    t = Table(
        title=(
            f"accuracy (%) from member {i} (t=0) to member {j} (t=1), BatchNorm in {args.bn} mode"
        ),
        title_justify="left",
    )
    t.add_column("t", justify="right")
    for res in results:
        t.add_column(res["label"], justify="right")
    for n in range(args.points):
        t.add_row(
            f"{results[0]['points'][n]['t']:.2f}",
            *[f"{res['points'][n]['accuracy'] * 100:.2f}" for res in results],
        )
    t.add_row(
        "members (eval BN)",
        *[
            f"{res['members_eval_mode'][str(i)]['accuracy'] * 100:.2f} /"
            f" {res['members_eval_mode'][str(j)]['accuracy'] * 100:.2f}"
            for res in results
        ],
    )
    console.print(t)
    for res in results:
        accs = [p["accuracy"] for p in res["points"]]
        dip = min(accs[0], accs[-1]) - min(accs)
        console.print(
            f"{res['label']}: lowest accuracy {min(accs) * 100:.2f}% (a dip of {dip * 100:.2f}"
            " points below the weaker end)"
        )
    console.print(f"wrote {csv_path}, {png}")
