"""`mixc report RUN...`: trained runs side by side, as a markdown table shaped like the paper's
tables.

Columns: method, params, accuracy, NLL, ECE (Tables 1 and 3), the CIFAR-C
style corrupted accuracy/NLL/ECE when ``mixc eval --corruptions`` has been run
on any of the runs (Tables 2 and 4), diversity and mean member accuracy
(Table 6), and inference FLOPs relative to one plain backbone (``mixc.core.flops``;
the reference is ``--reference``, default the first single-network baseline
among the runs, else the first run's own backbone).

Numbers come from ``RUN/eval.json`` (the last ``mixc eval``) when it is of the
run's current checkpoint, else from the last line of ``RUN/metrics.jsonl``
(the test set after the last epoch). Nothing is recomputed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from typing import Any

from mixc.compiler.methods import method_of
from mixc.core.run_models import NAIVE, SINGLE


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `mixc report`."""
    p.add_argument(
        "runs", nargs="+", metavar="RUN", help="run folders (mixc train --out, or a sweep's points)"
    )
    p.add_argument(
        "--labels", help="comma-separated method names, one per run (default: from each run)"
    )
    p.add_argument(
        "--reference",
        metavar="RUN",
        help=(
            "the run whose plain backbone is 1x in the FLOPs column (default: the first single "
            "baseline given, else the first run)"
        ),
    )
    p.add_argument("--out", metavar="FILE.md", help="also write the markdown table to this file")
    p.add_argument("--csv", metavar="FILE.csv", help="also write the rows as CSV")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of markdown")
    p.add_argument(
        "--per-seed",
        action="store_true",
        help=(
            "one row per run (default: runs that differ only in their seed are one row, mean ± sd)"
        ),
    )


def method_name(run: Any) -> str:
    """How the paper names a row: the baseline, or the ensemble and its member count."""
    b = run.baseline
    if b == SINGLE:
        return "Single network (baseline)"
    if b == NAIVE:
        return f"Naive ensemble x{run.plan.members}"
    method = run.plan.method
    title = f"{method_of(run.plan).title} x{run.plan.members}"
    if method_of(run.plan).budget_solves:  # the solved option says which model the budget made
        return f"{title} (alpha {method.alpha:g}, gamma {method.gamma})"
    return title


def collect(run: Any) -> dict[str, Any]:
    """The numbers of one run: eval.json of this checkpoint if present, else the last metrics
    line."""
    from mixc.evaluation import EVAL_FILE, EvalError, last_metrics

    ev_path = run.folder / EVAL_FILE
    row: dict[str, Any] = {}
    if ev_path.is_file():
        try:
            ev = json.loads(ev_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            ev = {}
        if not isinstance(ev, dict) or not isinstance(ev.get("clean"), dict):
            ev = {}  # a damaged cache: the metrics lines below are the record
        if (
            ev.get("epoch") == run.epoch
            and ev.get("spec_hash") == run.plan.spec_hash
            and ev.get("clean")
        ):
            row = {**ev["clean"], "source": f"{EVAL_FILE} ({ev.get('data')})"}
            if ev.get("corruptions"):
                row["corrupt"] = ev["corruptions"]["overall"]
    if not row:
        m = last_metrics(run.folder)
        if m is None or m.get("epoch") != run.epoch:
            raise EvalError(
                f"{run.label}: no metrics of its checkpoint (epoch {run.epoch}) in metrics.jsonl or"
                f" eval.json; hint: run `mixc eval {run.label}` first"
            )
        row = {**m, "source": "metrics.jsonl"}
    if row.get("member_accuracy") and "mean_member_accuracy" not in row:
        row["mean_member_accuracy"] = sum(row["member_accuracy"]) / len(row["member_accuracy"])
    return row


def build_rows(runs: list[Any], labels: list[str] | None, reference: Any) -> list[dict[str, Any]]:
    from mixc.core.flops import backbone_macs, ensemble_macs
    from mixc.evaluation import uncertainty_columns

    ref_macs = backbone_macs(reference.plan)
    rows = []
    for k, r in enumerate(runs):
        m = collect(r)
        acc = r.plan.accounting
        rows.append(
            {
                "run": r.label,
                "method": labels[k] if labels else method_name(r),
                "params": acc.total_params,
                "params_x": acc.total_params / acc.backbone_params,
                "members": r.plan.members,
                "epoch": r.epoch,
                "accuracy": m["accuracy"],
                "nll": m["nll"],
                "ece": m["ece"],
                "corrupt_accuracy": (m.get("corrupt") or {}).get("accuracy"),
                "corrupt_nll": (m.get("corrupt") or {}).get("nll"),
                "corrupt_ece": (m.get("corrupt") or {}).get("ece"),
                "diversity": m.get("diversity"),
                "mean_member_accuracy": m.get("mean_member_accuracy"),
                "flops": ensemble_macs(r.plan) / ref_macs,
                "source": m["source"],
                **uncertainty_columns(r.folder, r.epoch, r.plan.spec_hash),
            }
        )
    return rows


MEASURED = [
    "accuracy",
    "nll",
    "ece",
    "corrupt_accuracy",
    "corrupt_nll",
    "corrupt_ece",
    "diversity",
    "mean_member_accuracy",
    "adaptive_ece",
    "classwise_ece",
    "aurc",
    "augrc",
    "risk_at_80",
    "coverage_at_5",
    "ood_auroc",
    "ood_fpr95",
    "temperature",
    "calibrated_nll",
    "calibrated_ece",
]

#: the optional uncertainty columns (from eval.json): (key, header, kind), shown when some run has
#: the first key
UNCERTAINTY = [
    [
        ("aurc", "AURC", "f4"),
        ("augrc", "AUGRC", "f4"),
        ("risk_at_80", "Risk@80%", "pct"),
        ("coverage_at_5", "Cov@5%", "pct"),
    ],
    [("ood_auroc", "OOD AUROC", "f4"), ("ood_fpr95", "OOD FPR95", "pct")],
    [
        ("temperature", "T", "f3"),
        ("calibrated_nll", "NLL (T)", "f3"),
        ("calibrated_ece", "ECE (T)", "pct"),
    ],
]


def seed_key(run: Any) -> str:
    """What must be equal for two runs to be the same experiment but for the seed: the spec (plan
    hash), the baseline, the epoch reached and the recipe without its seed."""
    recipe = dict((run.config or {}).get("recipe") or run.plan.train or {})
    recipe.pop("seed", None)
    return json.dumps(
        [run.plan.spec_hash, run.baseline, run.epoch, recipe], sort_keys=True, default=str
    )


def aggregate_seeds(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Rows with equal keys become one: the measured columns' mean and sample sd (``<col>_sd``),
    ``seeds`` the count, ``run`` every folder; order of first appearance. A group of one is left
    as it is."""
    import statistics

    groups: dict[str, list[dict[str, Any]]] = {}
    for key, row in zip(keys, rows):
        groups.setdefault(key, []).append(row)
    out = []
    for group in groups.values():
        row = dict(group[0])
        if len(group) > 1:
            row.update(seeds=len(group), run=", ".join(r["run"] for r in group))
            for c in MEASURED:
                vals = [r[c] for r in group if r.get(c) is not None]
                row[c] = statistics.fmean(vals) if vals else None
                row[f"{c}_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(row)
    return out


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.4g}K" if n >= 1e4 else f"{n:,}"


def _cell(row: dict[str, Any], col: str, fmt: Any, unit: str = "") -> str:
    """``mean`` or ``mean ± sd`` of a column, ``-`` when not measured."""
    v, sd = row.get(col), row.get(f"{col}_sd")
    if v is None:
        return "-"
    return fmt(v) + (f" ± {fmt(sd)}" if sd is not None else "") + unit


def markdown(rows: list[dict[str, Any]], reference_label: str) -> str:
    """The table: paper columns first, optional columns only when some run has them."""
    corrupt = any(r["corrupt_accuracy"] is not None for r in rows)
    div = any(r["diversity"] is not None for r in rows)
    cols = ["Method", "Params", "Accuracy", "NLL", "ECE"]
    if corrupt:
        cols += ["Corrupt acc", "Corrupt NLL", "Corrupt ECE"]
    if div:
        cols += ["Diversity", "Mean member acc"]
    groups = [g for g in UNCERTAINTY if any(r.get(g[0][0]) is not None for r in rows)]
    cols += [h for g in groups for _, h, _ in g]
    cols += ["FLOPs", "Run"]
    lines = [
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" if c in ("Method", "Run") else "---:" for c in cols) + "|",
    ]
    for r in rows:
        pct = lambda c, unit="": _cell(r, c, lambda v: f"{v * 100:.2f}", unit)  # noqa: E731, B023
        num = lambda c, d=3: _cell(r, c, lambda v: f"{v:.{d}f}")  # noqa: E731, B023
        cells = [
            r["method"] + (f" ({r['seeds']} seeds)" if r.get("seeds") else ""),
            f"{_fmt_params(r['params'])} ({r['params_x']:.2f}x)",
            pct("accuracy"),
            num("nll"),
            pct("ece", "%"),
        ]
        if corrupt:
            cells += [pct("corrupt_accuracy"), num("corrupt_nll"), pct("corrupt_ece", "%")]
        if div:
            cells += [num("diversity", 2), pct("mean_member_accuracy")]
        for g in groups:
            cells += [
                pct(k, "%") if kind == "pct" else num(k, 4 if kind == "f4" else 3)
                for k, _, kind in g
            ]
        cells += [f"{r['flops']:.2f}x", f"`{r['run']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = (
        "\nAccuracy and member accuracy in %, NLL of the averaged prediction, ECE over 15 bins;"
        " params as a multiple of one plain backbone; FLOPs: inference multiply-accumulates"
        f" relative to one plain backbone of `{reference_label}`."
    )
    if any(r.get("seeds") for r in rows):
        notes += (
            " Rows over several seeds (runs that differ only in their seed): mean ± sample standard"
            " deviation."
        )
    if corrupt:
        notes += " Corrupt: means over every corruption and severity (`mixc eval --corruptions`)."
    if UNCERTAINTY[0] in groups:
        notes += (
            " AURC, AUGRC: areas under the (generalised) risk-coverage curve, rejecting the least"
            " confident first (lower is better); Risk@80%: error on the 80% most confident; Cov@5%:"
            " largest share answerable at 5% error (`mixc eval`)."
        )
    if UNCERTAINTY[1] in groups:
        sets = sorted({r["ood_sets"] for r in rows if r.get("ood_sets")})
        notes += (
            " OOD: the ensemble's top probability (MSP) as the in-distribution score, AUROC (1"
            " perfect, 0.5 chance) and the share of OOD inputs accepted at 95% of the test set"
            " (FPR95, lower is better), means over the sets of `mixc eval --ood`"
            f" ({'; '.join(sets)})."
        )
    if UNCERTAINTY[2] in groups:
        notes += " T: the temperature of `mixc calibrate`; NLL (T), ECE (T): the test set after it."
    return "\n".join(lines) + "\n" + notes + "\n"


def run(args: argparse.Namespace) -> int:
    """Run `mixc report`; returns the exit code (errors are ``MixcError``s for cli.main)."""
    from mixc.core.safe_write import check_output, write_text, write_with
    from mixc.evaluation import EvalError, open_run

    runs = [open_run(r) for r in args.runs]
    seen: dict[str, str] = {}
    # one run given twice would count as two seeds of one experiment
    for given, r in zip(args.runs, runs):
        key = os.path.realpath(r.checkpoint)
        if key in seen:
            raise EvalError(
                f"the run {given} is given twice (also as {seen[key]}); each run counts once (runs "
                "that differ only in their seed are averaged); hint: name each run folder once"
            )
        seen[key] = given
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    if labels is not None and len(labels) != len(runs):
        raise EvalError(f"--labels names {len(labels)} methods for {len(runs)} runs")
    if args.reference:
        reference = open_run(args.reference)
    else:
        reference = next((r for r in runs if r.baseline == "single"), runs[0])
    rows = build_rows(runs, labels, reference)
    if not args.per_seed and labels is None:
        rows = aggregate_seeds(rows, [seed_key(r) for r in runs])
    inputs = [p for r in runs for p in sorted(r.folder.iterdir()) if p.is_file()]
    if args.csv:
        check_output(args.csv, inputs=inputs, force=True, option="--csv")

        def fill(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
                w.writeheader()
                w.writerows(rows)

        write_with(args.csv, fill)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        text = markdown(rows, reference.label)
        print(text, end="")
    if args.out:
        check_output(args.out, inputs=inputs, force=True, option="--out")
        write_text(args.out, markdown(rows, reference.label))
    return 0
