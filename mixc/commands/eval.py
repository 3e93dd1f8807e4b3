"""`mixc eval RUN_DIR|CHECKPOINT`: score a trained ensemble; optionally under corruption, with
plots.

Reports the ensemble's accuracy, NLL of the averaged prediction, ECE (15
equal-width bins), adaptive (equal-mass) and classwise ECE and Brier score;
selective prediction (AURC, AUGRC, risk at 80% coverage, coverage at 5% risk;
``mixc.selective``); before/after the run's temperature when `mixc calibrate`
fitted one for this checkpoint; with ``--ood DATA`` out-of-distribution
detection against each set (``mixc.ood``); every member's accuracy, NLL and ECE; the
mean member accuracy and the best member; disagreement and diversity (Fort et
al. 2019: pairwise disagreement over the mean member error, as in the paper's
Table 6). ``--corruptions`` adds the CIFAR-C style robustness columns
(``mixc.corruptions``), ``--data cifar10c|cifar100c`` reads the published files.

A run folder keeps its last result in ``RUN/eval.json`` (``mixc report`` reads
it). Exit codes: 0 done; 1 a run, checkpoint, backend or plot problem; 2 a data
problem.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mixc.commands import add_backend_argument, add_threads_argument
from mixc.core.data import DataError
from mixc.core.run_models import NAIVE, SINGLE


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `mixc eval`."""
    p.add_argument(
        "target",
        metavar="RUN_DIR|CHECKPOINT",
        help="a run folder (mixc train --out) or a checkpoint file",
    )
    p.add_argument("--plan", help="the plan of a checkpoint without plan.json beside it")
    p.add_argument(
        "--data",
        help=(
            "digits, cifar10, cifar100, a .npz, or cifar10c/cifar100c (the published "
            "corrupted sets, read from --data-dir); default: what the run trained on"
        ),
    )
    p.add_argument(
        "--data-dir", help="folder holding the cifar archives / CIFAR-10-C / CIFAR-100-C"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument(
        "--save-predictions",
        metavar="P.npz",
        help="write member_probs [N, M, classes] (float32) and labels [N] of the clean test set",
    )
    add_backend_argument(p, "evaluate with (checkpoints are shared: any backend reads any run)")
    p.add_argument("--device", default="cpu", help="device (cpu, cuda, cuda:1)")
    p.add_argument("--batch-size", type=int, default=500, help="evaluation batch (default 500)")
    add_threads_argument(p)
    p.add_argument(
        "--corruptions",
        nargs="?",
        const="all",
        metavar="LIST",
        help=(
            "also score corrupted copies of the test set at 5 severities: all (the default) or a "
            "comma-separated list of gaussian_noise, shot_noise, impulse_noise, speckle_noise, "
            "defocus_blur, gaussian_blur, contrast, brightness, pixelate, jpeg"
        ),
    )
    p.add_argument(
        "--severities", default="1,2,3,4,5", help="comma-separated severities (default 1,2,3,4,5)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the corruptions' noise (default 0)")
    p.add_argument(
        "--plot",
        nargs="?",
        const="",
        metavar="DIR",
        help=(
            "write reliability.png (and corruptions.png with --corruptions) into DIR "
            "(default: the run folder)"
        ),
    )
    p.add_argument("--no-save", action="store_true", help="do not write RUN/eval.json")
    p.add_argument(
        "--ood",
        action="append",
        metavar="DATA",
        help=(
            "also score out-of-distribution detection against DATA (repeatable): a .npz holding x"
            " (or x_test) as model inputs, an image file or folder, noise / inverted / flipped"
            " (made from the test set, offline), or a dataset mixc loads (digits, cifar10, ...)"
        ),
    )


def _severities(text: str) -> tuple[int, ...]:
    try:
        sev = tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
    except ValueError:
        sev = ()
    if not sev or any(s not in (1, 2, 3, 4, 5) for s in sev):
        raise DataError(f"--severities takes a comma-separated subset of 1,2,3,4,5, not {text!r}")
    return sev


class _Inputs(NamedTuple):
    """What `mixc eval` reads before the model loads (so bad data fails before a slow load)."""

    cifar_c: str | None  # the published CIFAR-C set --data names, if any
    names: list[str] | None  # corruptions to apply (None: every file in the CIFAR-C folder)
    severities: Any
    dataset: Any  # the clean test set (None for CIFAR-C, which brings its own)
    ood_sets: list[Any]


def run(args: argparse.Namespace) -> int:
    """Run `mixc eval` with parsed ``args``; returns the exit code (errors are ``MixcError``s for
    cli.main)."""
    from rich.console import Console

    from mixc.evaluation import open_run, resolve_data

    if args.batch_size < 1:
        raise DataError("--batch-size must be at least 1")
    run_ = open_run(args.target, args.plan)
    data, data_dir = resolve_data(run_, args.data, args.data_dir)
    inputs = _inputs(args, run_, data, data_dir)
    predict = _load_model(args, run_)
    err = Console(stderr=True, highlight=False)
    step = (
        (lambda name: err.print(f"  corrupting: {name}", markup=False)) if not args.json else None
    )
    result, probs, labels = _evaluate(args, run_, data, data_dir, inputs, predict, err, step)
    written = _write_outputs(args, run_, result, probs, labels, data, err)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _print(result, written)
    return 0


def _inputs(args: argparse.Namespace, run_: Any, data: str, data_dir: str | None) -> _Inputs:
    """The corruptions, severities, test set and --ood sets, checked before the model loads."""
    from mixc.corruptions import CIFAR_C, parse_corruptions
    from mixc.evaluation import load_test_set

    cifar_c = data.lower() if data.lower() in CIFAR_C else None
    severities = _severities(args.severities)
    names = parse_corruptions(args.corruptions) if (args.corruptions or cifar_c) else []
    if cifar_c and args.corruptions in (None, "all"):
        names = None  # every file in the folder
    # Check the data before the (possibly slow) model load.
    dataset = None if cifar_c else load_test_set(data, data_dir, run_.plan)
    if args.ood and cifar_c:
        raise DataError(
            f"--ood compares against a clean test set, and --data {data} is a corrupted one; hint: "
            "evaluate --ood and the corrupted sets in two runs of mixc eval"
        )
    ood_sets = _ood_sets(run_, args, dataset, data_dir) if args.ood else []
    return _Inputs(cifar_c, names, severities, dataset, ood_sets)


def _load_model(args: argparse.Namespace, run_: Any) -> Any:
    """The run's predictor on the chosen backend, with its thread count set."""
    from mixc.backends import get_backend
    from mixc.core.threads import resolve_threads
    from mixc.evaluation import load_predictor

    get_backend(args.backend, "eval").set_threads(resolve_threads(args.threads))
    return load_predictor(
        args.backend, run_.plan, run_.checkpoint, device=args.device, batch_size=args.batch_size
    )


def _evaluate(
    args: argparse.Namespace,
    run_: Any,
    data: str,
    data_dir: str | None,
    inputs: _Inputs,
    predict: Any,
    err: Any,
    step: Any,
) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray | None]:
    """The result dict, with the clean test set's member probabilities and labels (None when no
    clean set was loaded)."""
    from mixc.evaluation import evaluate_cifar_c, evaluate_corruptions, summarise

    cifar_c, names, dataset = inputs.cifar_c, inputs.names, inputs.dataset
    result = _head(run_, args, data)
    probs = labels = None
    if cifar_c:
        corr, dataset = evaluate_cifar_c(predict, cifar_c, data_dir, run_.plan, names, on_step=step)
        result["corruptions"] = corr
    if dataset is not None:
        probs = predict(dataset.x_test)
        labels = dataset.y_test
        result["clean"] = summarise(probs, labels)
        result["samples"] = int(len(labels))
        result["data"] = dataset.name if cifar_c else data
        if names and not cifar_c:
            result["corruptions"] = evaluate_corruptions(
                predict, dataset, names, inputs.severities, args.seed, on_step=step
            )
        if cifar_c:
            result["corruptions_of"] = data
        result.update(_uncertainty(args, run_, dataset, probs, inputs.ood_sets, data, err, predict))
    return result, probs, labels


def _write_outputs(
    args: argparse.Namespace,
    run_: Any,
    result: dict[str, Any],
    probs: np.ndarray | None,
    labels: np.ndarray | None,
    data: str,
    err: Any,
) -> list[Path]:
    """--save-predictions, --plot and RUN/eval.json; returns the paths written."""
    from mixc.evaluation import save_eval

    written: list[Path] = []
    if args.save_predictions and probs is not None:
        written.append(_save_predictions(Path(args.save_predictions), probs, labels))
    elif args.save_predictions:
        err.print(
            f"mixc eval: no clean {data} test set loaded, so no predictions saved", markup=False
        )
    if args.plot is not None:
        written += _plots(args, run_, result, probs, labels)
    if not args.no_save and run_.checkpoint.name == "checkpoint.safetensors":
        written.append(save_eval(run_.folder, result))
    return written


def _head(run_: Any, args: argparse.Namespace, data: str) -> dict[str, Any]:
    """What was evaluated: the run, its checkpoint, spec, size, backend and data."""
    return {
        "run": run_.label,
        "checkpoint": str(run_.checkpoint),
        "spec": run_.plan.name,
        "spec_hash": run_.plan.spec_hash,
        "epoch": run_.epoch,
        "members": run_.plan.members,
        "params": run_.plan.accounting.total_params,
        "baseline": run_.baseline,
        "backend": args.backend,
        "data": data,
    }


def _uncertainty(
    args: argparse.Namespace,
    run_: Any,
    dataset: Any,
    probs: np.ndarray,
    ood_sets: list[Any],
    data: str,
    err: Any,
    predict: Any,
) -> dict[str, Any]:
    """Selective prediction on the test set, the temperature's before/after, OOD detection
    (``--ood``)."""
    from mixc.selective import selective_metrics

    labels = dataset.y_test
    ens = probs.astype(np.float64).mean(axis=1)
    out: dict[str, Any] = {
        "selective": selective_metrics(ens.max(axis=1), ens.argmax(axis=1) != labels)
    }
    out.update(_calibration(run_, probs, labels, err))
    if ood_sets:
        out["ood"] = _ood(args, run_, dataset, probs, ood_sets, data, predict)
    return out


def _ood_sets(run_: Any, args: argparse.Namespace, dataset: Any, data_dir: str | None) -> list[Any]:
    """Every --ood set as model inputs (before the model loads, so a bad one fails fast)."""
    from mixc.ood_sets import load_ood_set

    sets, seen = [], set()
    for value in args.ood:
        s = load_ood_set(run_, value, dataset, args.data, data_dir, args.seed)
        name, k = s.name, 2
        while name in seen:  # two sets of one name stay apart in the result
            name, k = f"{s.name} ({k})", k + 1
        seen.add(name)
        sets.append((name, s))
    return sets


def _ood(
    args: argparse.Namespace,
    run_: Any,
    dataset: Any,
    probs: np.ndarray,
    sets: list[Any],
    data: str,
    predict: Any,
) -> dict[str, Any]:
    """OOD detection of every set against the test set, every score (``mixc.ood``), with the
    legend."""
    from mixc.backends import get_backend
    from mixc.ood import METRIC_LEGEND, SCORE_LEGEND, evaluate_ood, ood_scores

    backend = get_backend(args.backend, "eval")
    logits = backend.load_logit_predictor(
        run_.plan, run_.checkpoint, device=args.device, batch_size=args.batch_size
    )
    id_scores = ood_scores(probs, None if logits is None else logits(dataset.x_test))
    out: dict[str, Any] = {
        "in_distribution": f"{data} test set",
        "samples": int(len(probs)),
        "positive": "in-distribution",
        "scores": SCORE_LEGEND,
        "metrics": METRIC_LEGEND,
        "sets": {},
    }
    if logits is None:
        out["note"] = (
            f"the {backend.name} backend gives probabilities only: max_logit and energy are"
            " left out"
        )
    for name, s in sets:
        scores = ood_scores(predict(s.x), None if logits is None else logits(s.x))
        out["sets"][name] = {
            "source": s.how,
            "samples": int(len(s.x)),
            "scores": evaluate_ood(id_scores, scores),
        }
    return out


def _calibration(run_: Any, probs: np.ndarray, labels: np.ndarray, err: Any) -> dict[str, Any]:
    """Before and after the run's temperature, when `mixc calibrate` fitted one for this
    checkpoint."""
    from mixc.calibration import lookup, tempered
    from mixc.evaluation import calibration_summary

    cal, why = lookup(run_)
    if why is not None:
        err.print(f"mixc eval: note: {why}; the temperature is ignored", markup=False)
    if cal is None:
        return {}
    return {
        "calibration": {
            "temperature": cal.temperature,
            "member_temperatures": cal.member_temperatures,
            "fitted_on": cal.fitted_on,
            "warning": cal.warning,
            "before": calibration_summary(probs, labels),
            "after": calibration_summary(tempered(probs, cal), labels),
        }
    }


def _plots(
    args: argparse.Namespace, run_: Any, result: dict[str, Any], probs, labels
) -> list[Path]:
    from mixc.metrics import reliability
    from mixc.plots import corruption_plot, reliability_diagram, risk_coverage_plot
    from mixc.selective import risk_coverage

    folder = Path(args.plot) if args.plot else run_.folder
    out = []
    name = f"{run_.plan.name} ({_kind(result)}), {result['data']}"
    if probs is not None:
        ens = probs.mean(axis=1)
        out.append(
            reliability_diagram(
                reliability(ens, labels),
                result["clean"]["ece"],
                folder / "reliability.png",
                f"reliability: {name}",
            )
        )
        cov, risk = risk_coverage(ens.max(axis=1), ens.argmax(axis=1) != labels)
        out.append(
            risk_coverage_plot(
                cov,
                risk,
                result["selective"],
                folder / "risk_coverage.png",
                f"selective prediction: {name}",
            )
        )
    if "corruptions" in result:
        out.append(
            corruption_plot(
                result["corruptions"],
                result.get("clean"),
                folder / "corruptions.png",
                f"corruptions: {name}",
            )
        )
    return out


def _kind(result: dict[str, Any]) -> str:
    b = result.get("baseline")
    if b == SINGLE:
        return "single network"
    if b == NAIVE:
        return f"naive ensemble x{result['members']}"
    return f"MixtureEnsemble x{result['members']}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f}%"


def _print(result: dict[str, Any], written: list[Path]) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    head = (
        f"{result['spec']} ({_kind(result)}, {result['params']:,} parameters), checkpoint epoch"
        f" {result['epoch']}, {result['backend']}"
    )
    if result.get("clean") is not None:
        _print_clean(console, result, head)
        _print_extras(console, result)
    else:
        console.print(head)
    if result.get("corruptions"):
        _print_corruptions(console, result["corruptions"])
    if written:
        console.print("wrote " + ", ".join(str(p) for p in written))


def _print_clean(console: Any, result: dict[str, Any], head: str) -> None:
    """The clean test set: the ensemble's and every member's scores, diversity, calibration."""
    from rich.table import Table

    c = result["clean"]
    t = Table(
        title=f"{head}\n{result['data']} test set, {result['samples']} samples",
        title_justify="left",
    )
    for col in ("", "accuracy", "NLL", "ECE", "Brier"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row(
        "ensemble",
        _pct(c["accuracy"]),
        f"{c['nll']:.4f}",
        _pct(c["ece"]),
        f"{c['brier']:.4f}",
        style="bold",
    )
    for i, (a, n, e) in enumerate(zip(c["member_accuracy"], c["member_nll"], c["member_ece"])):
        t.add_row(
            f"member {i}"
            + (" (best)" if i == c["best_member"] and len(c["member_accuracy"]) > 1 else ""),
            _pct(a),
            f"{n:.4f}",
            _pct(e),
            "",
        )
    console.print(t)
    line = (
        f"mean member accuracy {_pct(c['mean_member_accuracy'])}; best member"
        f" {c['best_member']} ({_pct(c['best_member_accuracy'])})"
    )
    if c.get("diversity") is not None:
        line += (
            f"; disagreement {c['disagreement']:.3f}; diversity {c['diversity']:.3f} "
            "(disagreement / mean member error, Fort et al. 2019)"
        )
    console.print(line)
    console.print(
        f"calibration: ECE {_pct(c['ece'])} (15 equal-width bins), adaptive ECE"
        f" {_pct(c['adaptive_ece'])} (15 equal-mass bins), classwise ECE"
        f" {_pct(c['classwise_ece'])}"
    )


def _print_corruptions(console: Any, corr: dict[str, Any]) -> None:
    """Every corruption's means over severities, then its accuracy at each severity."""
    from rich import box
    from rich.table import Table

    sev = sorted(corr["by_severity"], key=int)
    t = Table(
        title=(
            f"under corruption ({corr['source']}): means over severities {', '.join(sev)}; "
            "then accuracy (%) by severity"
        ),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for col in ["corruption", "acc", "NLL", "ECE"] + [f"s{s}" for s in sev]:
        t.add_column(col, justify="left" if col == "corruption" else "right", no_wrap=True)
    f1 = lambda v: f"{v * 100:.1f}"  # noqa: E731
    for name, r in corr["corruptions"].items():
        t.add_row(
            name,
            _pct(r["accuracy"]),
            f"{r['nll']:.3f}",
            _pct(r["ece"]),
            *[f1(r["severities"][s]["accuracy"]) if s in r["severities"] else "-" for s in sev],
        )
    o = corr["overall"]
    t.add_row(
        "mean",
        _pct(o["accuracy"]),
        f"{o['nll']:.3f}",
        _pct(o["ece"]),
        *[f1(corr["by_severity"][s]["accuracy"]) for s in sev],
        style="bold",
    )
    console.print(t)
    console.print(f"pixel scale: {corr['pixel_scale']}")


def _print_extras(console: Any, result: dict[str, Any]) -> None:
    """Selective prediction, the temperature's before/after, and OOD detection, each with what it
    means."""
    from mixc.selective import LEGEND

    s = result.get("selective")
    if s:
        console.print(
            f"selective prediction (reject the least confident first): AURC {s['aurc']:.4f}, AUGRC "
            f"{s['augrc']:.4f}, risk at 80% coverage {_pct(s['risk_at_80'])}, coverage at 5% risk "
            f"{_pct(s['coverage_at_5'])}"
        )
        console.print("  " + "; ".join(f"{k}: {v}" for k, v in LEGEND.items()), style="dim")
    if result.get("calibration"):
        _print_calibration(console, result["calibration"])
    if result.get("ood"):
        _print_ood(console, result["ood"])


def _print_calibration(console: Any, cal: dict[str, Any]) -> None:
    """Every score before and after the run's temperature."""
    from rich import box
    from rich.table import Table

    t = Table(
        title=(
            f"temperature {cal['temperature']:.4f} (every member's logits / T before the"
            f" softmax-mean; fitted on {cal['fitted_on']})"
        ),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for col in ("", "accuracy", "NLL", "ECE", "adaptive ECE", "classwise ECE", "Brier"):
        t.add_column(col, justify="right" if col else "left")
    for row in ("before", "after"):
        r = cal[row]
        t.add_row(
            row,
            _pct(r["accuracy"]),
            f"{r['nll']:.4f}",
            _pct(r["ece"]),
            _pct(r["adaptive_ece"]),
            _pct(r["classwise_ece"]),
            f"{r['brier']:.4f}",
        )
    console.print(t)
    if cal.get("warning"):
        console.print(f"warning: {cal['warning']}")


def _print_ood(console: Any, ood: dict[str, Any]) -> None:
    """OOD detection: a table per set, every score's metrics, then the legends."""
    from rich import box
    from rich.table import Table

    console.print(
        f"OOD detection: in-distribution (the positives) = {ood['in_distribution']},"
        f" {ood['samples']} inputs"
    )
    for name, entry in ood["sets"].items():
        t = Table(
            title=f"against {name}: {entry['samples']} inputs, {entry['source']}",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        for col in ("score", "ID when", "AUROC", "AUPR-in", "AUPR-out", "FPR95"):
            t.add_column(
                col, justify="left" if col in ("score", "ID when") else "right", no_wrap=True
            )
        for score, m in entry["scores"].items():
            t.add_row(
                score,
                "higher" if m["direction"] == "higher = in-distribution" else "lower",
                f"{m['auroc']:.4f}",
                f"{m['aupr_in']:.4f}",
                f"{m['aupr_out']:.4f}",
                _pct(m["fpr95"]),
            )
        console.print(t)
    if ood.get("note"):
        console.print(f"note: {ood['note']}")
    console.print(
        'scores ("ID when": the direction that means in-distribution): '
        + "; ".join(f"{k} = {v}" for k, v in ood["scores"].items()),
        style="dim",
    )
    shown = {"auroc": "AUROC", "aupr_in": "AUPR-in", "aupr_out": "AUPR-out", "fpr95": "FPR95"}
    console.print(
        "metrics: " + "; ".join(f"{shown.get(k, k)} = {v}" for k, v in ood["metrics"].items()),
        style="dim",
    )


def _save_predictions(path: Path, probs: np.ndarray, labels: np.ndarray) -> Path:
    """``member_probs`` and ``labels`` into ``path`` (a .npz), through the one write rule (no links,
    atomic)."""
    from mixc.core.safe_write import write_with

    def fill(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy adds no suffix
            np.savez_compressed(
                f, member_probs=probs.astype(np.float32), labels=labels.astype(np.int64)
            )

    return write_with(path, fill)
