"""`mixc calibrate RUN [--val-fraction F | --data VAL]`: fit a temperature on held-out data.

One temperature for the ensemble (every member's logits divided by it before
the softmax-mean; ``mixc.temperature``) and one per member, each minimising
the NLL on held-out data, written to ``RUN/calibration.json`` with the sha256
of the checkpoint it fits. `mixc eval` then reports before and after;
`mixc export` and `mixc predict` apply it.

Held-out data, in this order: ``--data VAL`` (a ``.npz`` holding ``x_val,
y_val`` or ``x, y``; or a dataset mixc loads, whose validation split is used);
``--val-fraction F`` (a seeded share of the training set, the run's own seed:
with the fraction the run trained with, exactly the samples it held out); the
dataset's own validation split; the run's validation split (``train
--val-fraction``). Never the test set, whose numbers `mixc eval` reports.

Exit codes: 0 done; 1 a run or option problem; 2 a data problem.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mixc.commands import add_backend_argument, add_threads_argument
from mixc.core.data import MAX_INPUT, DataError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `mixc calibrate`."""
    p.add_argument(
        "target",
        metavar="RUN_DIR|CHECKPOINT",
        help="a run folder (mixc train --out) or a checkpoint file",
    )
    p.add_argument("--plan", help="the plan of a checkpoint without plan.json beside it")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help=(
            "hold out this share of the training set (seeded by the run's seed; the run's own "
            "fraction gives exactly the samples it held out)"
        ),
    )
    g.add_argument(
        "--data",
        metavar="VAL",
        help=(
            "held-out data: a .npz holding x_val, y_val (or x, y), or a "
            "dataset with a validation split"
        ),
    )
    p.add_argument("--data-dir", help="folder holding the cifar archives")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_backend_argument(
        p, "run the model with (checkpoints are shared: any backend reads any run)"
    )
    p.add_argument("--device", default="cpu", help="device (cpu, cuda, cuda:1)")
    p.add_argument("--batch-size", type=int, default=500, help="batch (default 500)")
    add_threads_argument(p)


def _npz_pair(path: Path, plan: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """``(x_val, y_val)`` or ``(x, y)`` of a .npz, checked against the plan; None when it holds
    neither pair."""
    try:
        with np.load(path, allow_pickle=False) as z:
            key = next(
                (
                    k
                    for k in ("val", "")
                    if f"x{'_' + k if k else ''}" in z.files
                    and f"y{'_' + k if k else ''}" in z.files
                ),
                None,
            )
            if key is None:
                return None
            xk, yk = ("x_val", "y_val") if key else ("x", "y")
            x, y = z[xk], z[yk]
    except Exception as e:  # not a zip, pickled objects, truncated...
        raise DataError(
            f"cannot read {path} as a .npz of plain arrays ({e}); hint: write it with numpy.savez"
        ) from e
    shape = list(plan.input_shape)
    if x.ndim < 2 or list(x.shape[1:]) != shape or not np.issubdtype(x.dtype, np.number):
        raise DataError(
            f"{path}: {xk} has shape {list(x.shape)} ({x.dtype}), but the model takes numbers of"
            f" shape [N, {', '.join(map(str, shape))}]; hint: store inputs normalised as in"
            " training"
        )
    if y.shape != (len(x),) or len(y) == 0 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{path}: {yk} must hold one integer label per row of {xk} ({len(x)}), not"
            f" {list(y.shape)} {y.dtype}; hint: labels 0..{plan.classes - 1}"
        )
    if y.min() < 0 or y.max() >= plan.classes:
        raise DataError(
            f"{path}: {yk} holds label {int(y.min() if y.min() < 0 else y.max())}, outside the"
            f" model's {plan.classes} classes; hint: labels 0..{plan.classes - 1}"
        )
    xf = np.ascontiguousarray(x, dtype=np.float32)
    if not (np.isfinite(xf) & (np.abs(xf) <= MAX_INPUT)).all():
        raise DataError(
            f"{path}: {xk} holds non-finite or huge values; hint: store normalised inputs"
        )
    return xf, y.astype(np.int64)


def held_out(
    run: Any, data: str | None, fraction: float | None, data_dir: str | None
) -> tuple[np.ndarray, np.ndarray, str]:
    """The held-out inputs, labels and a description (module doc for the order)."""
    from mixc.core.data import split_validation
    from mixc.evaluation import EvalError, load_test_set, resolve_data

    recipe = run.config.get("recipe") or run.plan.train or {}
    seed = int(recipe.get("seed") or 0)
    run_fraction = float(recipe.get("val_fraction") or 0.0)
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise DataError(f"--val-fraction takes a share in (0, 1), not {fraction}")
    if data is not None and Path(data).suffix.lower() == ".npz" and Path(data).is_file():
        pair = _npz_pair(Path(data), run.plan)
        if pair is not None:
            return pair[0], pair[1], f"{data} ({len(pair[1])} samples)"
    name, ddir = resolve_data(run, data, data_dir)
    ds = load_test_set(name, ddir, run.plan)
    if fraction is not None:
        if ds.x_val is not None:
            raise DataError(
                f"{ds.name} has its own validation split; hint: drop --val-fraction to use it"
            )
        ds = split_validation(ds, fraction, seed)
        same = data is None and abs(fraction - run_fraction) < 1e-12
        where = (
            "the samples the run held out from training"
            if same
            else "NOTE: the run trained on these samples"
            + (f" (it held out {run_fraction:g})" if run_fraction else "")
            + ", so the temperature may be too low"
        )
        return (
            ds.x_val,
            ds.y_val,
            (
                f"{fraction:g} of the {ds.name} training set, seed {seed} ({len(ds.y_val)} samples;"
                f" {where})"
            ),
        )
    if ds.x_val is not None:
        return ds.x_val, ds.y_val, f"the validation split of {ds.name} ({len(ds.y_val)} samples)"
    if run_fraction > 0 and data is None:
        ds = split_validation(ds, run_fraction, seed)
        return (
            ds.x_val,
            ds.y_val,
            (
                f"the run's validation split ({run_fraction:g} of the {ds.name} training set, "
                f"seed {seed}, {len(ds.y_val)} samples)"
            ),
        )
    why = (
        f"--data {data} holds no x_val, y_val (nor x, y) and no validation split"
        if data is not None
        else f"{name} has no validation split and the run trained on its whole training set"
    )
    raise EvalError(
        f"{run.label}: no held-out data to fit a temperature on ({why}); hint: pass --val-fraction"
        " F (a share of the training set; if the run trained on it, the temperature comes out too"
        " low) or --data VAL.npz holding x_val, y_val; the test set is never used, since mixc eval"
        " reports on it"
    )


def run(args: argparse.Namespace) -> int:
    """Run `mixc calibrate`; returns the exit code (errors are ``MixcError``s for cli.main)."""
    from mixc.backends import get_backend
    from mixc.calibration import fit, save
    from mixc.core.threads import resolve_threads
    from mixc.evaluation import load_predictor, open_run

    if args.batch_size < 1:
        raise DataError("--batch-size must be at least 1")
    run_ = open_run(args.target, args.plan)
    x, y, described = held_out(run_, args.data, args.val_fraction, args.data_dir)
    get_backend(args.backend, "eval").set_threads(resolve_threads(args.threads))
    predict = load_predictor(
        args.backend, run_.plan, run_.checkpoint, device=args.device, batch_size=args.batch_size
    )
    cal = fit(run_, predict(x), y, described)
    path = save(run_, cal)
    if args.json:
        print(json.dumps({**cal.model_dump(mode="json"), "written": str(path)}, indent=1))
    else:
        members = ", ".join(f"{t:.3f}" for t in cal.member_temperatures)
        print(
            f"temperature {cal.temperature:.4f} (every member's logits / T before the"
            f" softmax-mean), fitted on {described}: NLL {cal.nll_before:.4f} ->"
            f" {cal.nll_after:.4f}; member temperatures {members}"
        )
        print(
            f"wrote {path} (mixc eval reports before and after; mixc export and predict apply it)"
        )
    if cal.warning:
        print(f"mixc calibrate: warning: {cal.warning}", file=sys.stderr)
    return 0
