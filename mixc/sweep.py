"""Budget and member sweeps: train one spec at many operating points, tabulate, plot (the paper's
Figure 3).

A sweep is a list of points, each a set of ``--set`` overrides on one spec: ``budget=B members=M``
for every budget and member count asked for, plus the baselines (``single``: one plain backbone;
``naive``: M plain backbones). With ``methods`` each ensemble method is a series of its own
(``method=X``): budgets apply to mixture and packed (which solves its width for the budget), the
other methods have one point per member count. Every point trains with the spec's own recipe through
the shared driver (``mixc.training``) on the chosen backend into ``OUT/<point>/``, an ordinary run
folder (``mixc eval``, ``interpolate`` and ``report`` work on it). A point whose checkpoint already
reached the target epoch is not trained again; a partly trained one resumes.

Low budgets: when a budget is below the ``by_shape`` minimum (the fixed cost
plus one template per group), the paper switched to one shared blob (its 7M
point); with ``fallback="single"`` (the default) a sweep does the same and says
so in the table. A point that no grouping can fit is reported and skipped.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixc.backends import DEFAULT
from mixc.compiler.methods import get_method, method_of
from mixc.compiler.plan import METHODS, Plan
from mixc.core.checkpoint_format import spec_hash
from mixc.core.errors import MixcError
from mixc.core.run_models import BASELINES, NAIVE, SINGLE
from mixc.spec.sections import DEFAULT_METHOD

__all__ = [
    "SweepError",
    "Point",
    "parse_budgets",
    "parse_members",
    "plan_points",
    "run_point",
    "run_sweep",
    "write_outputs",
    "COLUMNS",
]


class SweepError(MixcError, RuntimeError):
    """A user-facing problem with the sweep's options."""


@dataclass
class Point:
    """One operating point of a sweep."""

    key: str  # folder name under the sweep's folder
    kind: str  # ensemble | single | naive
    budget: str  # the budget as given ("0.5x"), "-" for the baselines
    members: int
    overrides: list[str]  # on top of the user's --set
    plan: Plan | None = None
    note: str = ""
    error: str | None = None
    row: dict[str, Any] = field(default_factory=dict)
    method: str = DEFAULT_METHOD  # the ensemble method (Plan.method.name) of an ensemble point


_BUDGET = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?[KMGx]?")


def parse_budgets(text: str | None) -> list[str]:
    """``0.25x,0.5x,1x`` (multiples of one plain backbone), ``5M,250K,1200000`` (absolute parameter
    counts) or a mix -> the budget strings, each checked for its form here (a typo fails before any
    training) and for its size by the compiler."""
    if not text:
        return []
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise SweepError(
            f"--budgets takes a comma-separated list such as 0.25x,0.5x,1x,2x,4x, not {text!r}"
        )
    bad = [t for t in items if not _BUDGET.fullmatch(t)]
    if bad:
        raise SweepError(
            f"--budgets: {', '.join(map(repr, bad))} is not a budget; write multiples of one plain "
            "backbone (0.5x, 1x) or parameter counts (250K, 5M, 1200000)"
        )
    return list(dict.fromkeys(items))


def parse_members(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        ms = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        ms = []
    if not ms or any(m < 1 for m in ms):
        raise SweepError(
            "--members takes a comma-separated list of positive counts such as 1,2,4,8, not"
            f" {text!r}"
        )
    return list(dict.fromkeys(ms))


def _one_line(e: Exception, hint: bool = True) -> str:
    render = getattr(e, "render", None)
    text = render() if callable(render) else str(e)
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    first = next((l for l in lines if "error:" in l), lines[0] if lines else str(e))
    hint = next((l for l in lines if l.startswith("hint:")), "") if hint else ""
    return (first.split("error:", 1)[-1].strip() + (f" ({hint})" if hint else "")).strip()


#: the methods a budget applies to (``--methods`` takes every one of the plan's METHODS)
BUDGETED = tuple(m for m in METHODS if get_method(m).uses_budget)


def parse_methods(text: str | None) -> list[str]:
    """``mixture,batch_ensemble,packed(alpha = 2, gamma = 1)`` -> the method values (commas inside
    parentheses belong to the method), each name checked here so a typo fails before any training.
    """
    if text is None:
        return []
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    items = [i for i in items + [cur.strip()] if i]
    bad = [i for i in items if i.split("(")[0].strip() not in METHODS]
    if not items or bad or depth != 0:
        raise SweepError(
            f"--methods takes a comma-separated list of {', '.join(METHODS)} (options in"
            f" parentheses, e.g. packed(alpha = 2)), not {text!r}"
        )
    return items


def _method_name(method: str) -> str:
    return method.split("(")[0].strip()


def plan_points(
    spec: str,
    overrides: list[str],
    budgets: list[str],
    members: list[int],
    baselines: list[str],
    fallback: str = "single",
    methods: list[str] | None = None,
) -> list[Point]:
    """Compile every point (fast, no training), applying the low-budget fallback; errors stay on the
    point. ``methods``: one series per ensemble method (default: the spec's, as the mixture
    points always were).
    """
    import mixc
    from mixc.spec import SpecError

    base = mixc.compile(spec, overrides)  # a broken spec is the user's error: let SpecError through
    if base.grouping == "none" and not methods:
        raise SweepError(
            f"{spec} is a naive ensemble (groups none): there is no budget to sweep; "
            "hint: --methods mixture,naive compares it with a MixtureEnsemble"
        )
    ms = members or [base.members]
    points: list[Point] = []
    for method in methods or [None]:
        name = _method_name(method) if method else DEFAULT_METHOD
        tag = "" if method is None or name == method == DEFAULT_METHOD else f"{name}-"
        for m in ms:
            for b in (budgets or [None]) if name in BUDGETED else [None]:
                label = (
                    "-"
                    if name not in BUDGETED
                    else (
                        b
                        if b is not None
                        else f"{base.accounting.budget or base.accounting.total_params:,}"
                    )
                )
                extra = (
                    [f"members={m}"]
                    + ([f"method={method}"] if method else [])
                    + ([f"budget={b}"] if b is not None else [])
                )
                key = f"{tag}m{m}-b{b}" if b is not None else f"{tag}m{m}"
                points.append(Point(key, "ensemble", label, m, extra, method=name))
    naive_m = ms[0] if len(ms) == 1 else base.members
    plain = list(method_of(base).plain_backbone_override)
    if SINGLE in baselines:
        points.append(Point(SINGLE, SINGLE, "-", 1, ["members=1", *plain]))
    if NAIVE in baselines:
        points.append(
            Point(f"{NAIVE}-m{naive_m}", NAIVE, "-", naive_m, [f"members={naive_m}", *plain])
        )
    for p in points:
        try:
            p.plan = mixc.compile(spec, overrides + p.overrides)
        except SpecError as e:
            below = "below the minimum" in e.render()
            if (
                below
                and fallback == "single"
                and p.kind == "ensemble"
                and get_method(p.method).has_templates
                and base.grouping == "by_shape"
            ):
                try:
                    p.plan = mixc.compile(spec, overrides + p.overrides + ["groups=single"])
                    p.overrides = p.overrides + ["groups=single"]
                    p.note = (
                        "one shared blob (groups single), as the paper at its 7M point:"
                        f" {_one_line(e, False)}"
                    )
                    continue
                except SpecError as e2:
                    e = e2
            p.error = _one_line(e)
    return points


COLUMNS = [
    "point",
    "kind",
    "method",
    "members",
    "budget",
    "grouping",
    "params",
    "params_x",
    "accuracy",
    "nll",
    "ece",
    "brier",
    "diversity",
    "mean_member_accuracy",
    "flops",
    "epoch",
    "status",
    "note",
    "run",
    "seeds",
    "accuracy_sd",
    "nll_sd",
    "ece_sd",
    "brier_sd",
    "diversity_sd",
    "mean_member_accuracy_sd",
    # from the point's eval.json when `mixc eval` (--ood, after `mixc calibrate`) scored its
    # checkpoint
    "aurc",
    "augrc",
    "ood_auroc",
    "ood_fpr95",
    "ood_sets",
    "temperature",
    "calibrated_nll",
    "aurc_sd",
    "augrc_sd",
    "ood_auroc_sd",
    "ood_fpr95_sd",
    "temperature_sd",
    "calibrated_nll_sd",
]
#: the uncertainty columns a sweep carries (shown when some point has them)
UNCERTAINTY = ["aurc", "augrc", "ood_auroc", "ood_fpr95", "temperature", "calibrated_nll"]
#: the measured columns that several seeds average (mean, and the sample standard deviation in
#: ``<name>_sd``)
MEASURED = ["accuracy", "nll", "ece", "brier", "diversity", "mean_member_accuracy", *UNCERTAINTY]


def parse_seeds(text: str | None) -> list[int] | None:
    """``0,1,2`` -> [0, 1, 2] (distinct whole numbers), None when not given."""
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SweepError(
            f"--seeds takes comma-separated whole numbers (e.g. 0,1,2), not {text!r}"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds needs at least one seed and no repeats, not {text!r}")
    from mixc.spec.recipe import MAX_SEED

    bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise SweepError(
            f"--seeds {text}: a seed is a whole number from 0 to {MAX_SEED:,} (2**32 - 1), not"
            f" {bad[0]:,}; hint: --seeds 0,1,2"
        )
    return seeds


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One point's rows over seeds -> one row: the measured columns' mean and sample sd
    (``<name>_sd``; None with one seed), ``seeds`` = how many finished; status and note from the
    first row that has them."""
    import statistics

    done = [r for r in rows if r.get("accuracy") is not None]
    out = {
        **(done[0] if done else rows[0]),
        "seeds": len(done),
        "run": rows[0]["run"] if len(rows) == 1 else str(Path(rows[0]["run"]).parent),
    }
    for c in MEASURED:
        vals = [r[c] for r in done if r.get(c) is not None]
        out[c] = statistics.fmean(vals) if vals else None
        out[f"{c}_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
    if len(done) < len(rows):
        out["status"] = "failed" if not done else f"{len(done)} of {len(rows)} seeds"
    return out


def _finished(folder: Path, plan: Plan, epochs: int) -> dict[str, Any] | None:
    """The final metrics of a point already trained to ``epochs`` (same spec), else None."""
    from mixc.evaluation import EvalError, checkpoint_header, last_metrics

    ckpt = folder / "checkpoint.safetensors"
    if not ckpt.is_file():
        return None
    try:  # a damaged folder is not finished: training it gives the clear error (or repairs it)
        head = checkpoint_header(ckpt)
        m = last_metrics(folder)
    except EvalError:
        return None
    if head.get("spec_hash") != spec_hash(plan) or int(head["epoch"]) < epochs:
        return None
    return m if m is not None and m.get("epoch") == int(head["epoch"]) else None


def run_point(
    point: Point,
    spec: str,
    overrides: list[str],
    folder: Path,
    *,
    data: Any = None,
    data_dir: str | None = None,
    epochs: int | None = None,
    device: str = "cpu",
    seed: int | None = None,
    layout: str = "auto",
    progress: bool = True,
    backend: str = DEFAULT,
    threads: int | None = None,
) -> tuple[dict[str, Any], str]:
    """Train (or resume, or reuse) one point on ``backend``; returns its final metrics and what was
    done."""
    from mixc.backends import get_backend
    from mixc.spec.recipe import Recipe
    from mixc.training import train

    plan = point.plan
    recipe = Recipe.model_validate(plan.train or {})
    target = epochs if epochs is not None else recipe.epochs
    done = _finished(folder, plan, target)
    if done is not None:
        return done, "done before"
    status = "resumed" if (folder / "checkpoint.safetensors").is_file() else "trained"
    baseline = point.kind if point.kind in BASELINES else None
    metrics = train(
        get_backend(backend, "sweep"),
        plan,
        recipe,
        out_dir=folder,
        data=data,
        data_dir=data_dir,
        epochs=epochs,
        device=device,
        seed=seed,
        layout=layout,
        baseline=baseline,
        progress=progress,
        threads=threads,
        config={
            "file": spec,
            "overrides": overrides + point.overrides,
            "backend": backend,
            "sweep_point": point.key,
        },
    )
    return metrics, status


def _row(point: Point, metrics: dict[str, Any] | None, status: str, folder: Path) -> dict[str, Any]:
    from mixc.core.flops import relative_flops

    row: dict[str, Any] = {c: None for c in COLUMNS}
    row.update(
        point=point.key,
        kind=point.kind,
        method=point.method if point.kind == "ensemble" else None,
        members=point.members,
        budget=point.budget,
        status=status,
        note=point.error or point.note,
        run=str(folder),
    )
    if point.plan is not None:
        acc = point.plan.accounting
        row.update(
            grouping=point.plan.grouping,
            params=acc.total_params,
            params_x=acc.total_params / acc.backbone_params,
            flops=relative_flops(point.plan),
        )
    if metrics:
        accs = metrics.get("member_accuracy") or []
        row.update(
            accuracy=metrics["accuracy"],
            nll=metrics["nll"],
            ece=metrics["ece"],
            brier=metrics.get("brier"),
            diversity=metrics.get("diversity"),
            epoch=metrics.get("epoch"),
            mean_member_accuracy=sum(accs) / len(accs) if accs else None,
        )
        if point.plan is not None and metrics.get("epoch") is not None:
            from mixc.evaluation import uncertainty_columns

            extra = uncertainty_columns(folder, int(metrics["epoch"]), spec_hash(point.plan))
            row.update({k: extra[k] for k in UNCERTAINTY + ["ood_sets"]})
    return row


def run_sweep(
    spec: str,
    overrides: list[str],
    points: list[Point],
    out: Path,
    log: Callable[[str], None] = print,
    seeds: list[int] | None = None,
    **train_kw: Any,
) -> list[dict[str, Any]]:
    """Train every point for each of ``seeds`` (``out/<key>/seed-<s>``; without seeds, the recipe's
    or ``seed`` in ``out/<key>``); returns one row per point, its measured columns averaged over
    the seeds with their sd (:func:`aggregate`). Per-seed rows are in each row's ``per_seed``."""
    if not seeds:
        return [aggregate([r]) for r in _run_points(spec, overrides, points, out, log, **train_kw)]
    train_kw.pop("seed", None)
    per_seed = []
    for s in seeds:
        log(f"seed {s}:")
        per_seed.append(
            _run_points(
                spec, overrides, points, out, log, subfolder=f"seed-{s}", seed=s, **train_kw
            )
        )
    return [{**aggregate(list(rs)), "per_seed": list(rs)} for rs in zip(*per_seed)]


def _run_points(
    spec: str,
    overrides: list[str],
    points: list[Point],
    out: Path,
    log: Callable[[str], None] = print,
    subfolder: str = "",
    **train_kw: Any,
) -> list[dict[str, Any]]:
    """Train every feasible point in turn into ``out/<key>[/subfolder]``; one row per point
    (failures included).

    ``train_kw`` go to :func:`run_point` (data, data_dir, epochs, device, seed, layout, progress,
    backend, threads). A data or backend problem stops the sweep (it would fail every point); a
    problem with one point's folder is recorded and the sweep goes on.
    """
    from mixc.core.data import DataError
    from mixc.core.errors import BackendError

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    n = len(points)
    for k, p in enumerate(points, 1):
        folder = out / p.key / subfolder if subfolder else out / p.key
        if p.error:
            log(f"[{k}/{n}] {p.key}: skipped: {p.error}")
            rows.append(_row(p, None, "infeasible", folder))
            continue
        log(
            f"[{k}/{n}] {p.key}: {p.kind}, {p.members} member(s),"
            f" {p.plan.accounting.total_params:,} parameters" + (f"; {p.note}" if p.note else "")
        )
        try:
            metrics, status = run_point(p, spec, overrides, folder, **train_kw)
        except (DataError, BackendError):
            raise
        except MixcError as e:
            p.error = str(e)
            log(f"[{k}/{n}] {p.key}: failed: {e}")
            rows.append(_row(p, None, "failed", folder))
            continue
        if status == "done before":
            log(
                f"[{k}/{n}] {p.key}: already trained to epoch {metrics.get('epoch')}, not trained"
                " again"
            )
        rows.append(_row(p, metrics, status, folder))
    return rows


def _fmt(v: Any, kind: str, sd: float | None = None) -> str:
    if v is None:
        return "-"
    if sd is not None:
        return f"{_fmt(v, kind)} ± {_fmt(sd, kind)}"
    if kind == "pct":
        return f"{v * 100:.2f}"
    if kind == "int":
        return f"{v:,}"
    if kind == "x":
        return f"{v:.2f}x"
    if kind == "f3":
        return f"{v:.3f}"
    if kind == "f4":
        return f"{v:.4f}"
    return str(v)


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    """The sweep table: one line per point, baselines last."""
    cols = [
        ("point", "point", "s"),
        ("method", "method", "s"),
        ("members", "M", "s"),
        ("budget", "budget", "s"),
        ("grouping", "grouping", "s"),
        ("params", "params", "int"),
        ("params_x", "x backbone", "x"),
        ("accuracy", "accuracy (%)", "pct"),
        ("nll", "NLL", "f3"),
        ("ece", "ECE (%)", "pct"),
        ("brier", "Brier", "f3"),
        ("diversity", "diversity", "f3"),
        ("mean_member_accuracy", "mean member acc (%)", "pct"),
        ("flops", "FLOPs", "x"),
        ("status", "status", "s"),
    ]
    extra = [
        ("aurc", "AURC", "f4"),
        ("augrc", "AUGRC", "f4"),
        ("ood_auroc", "OOD AUROC", "f4"),
        ("ood_fpr95", "OOD FPR95 (%)", "pct"),
        ("temperature", "T", "f3"),
        ("calibrated_nll", "NLL (T)", "f3"),
    ]
    shown = [c for c in extra if any(r.get(c[0]) is not None for r in rows)]
    cols = cols[:-2] + shown + cols[-2:]
    lines = [
        f"## {title}",
        "",
        "| " + " | ".join(h for _, h, _ in cols) + " |",
        "|" + "|".join("---" if f == "s" else "---:" for _, _, f in cols) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c], f, r.get(f"{c}_sd")) for c, _, f in cols) + " |")
    notes = [f"- {r['point']}: {r['note']}" for r in rows if r.get("note")]
    lines += [
        "",
        (
            "Accuracy, NLL and Brier score (of the averaged prediction), ECE (15 bins) and"
            " diversity (pairwise disagreement / mean member error) on the test set after the last"
            " epoch; FLOPs: inference cost relative to one plain backbone (multiply-accumulates of"
            " the convolutions, linear layers and attention)."
        ),
    ]
    if shown:
        lines += [
            "",
            (
                "From each point's `mixc eval` (eval.json of its last checkpoint): AURC and AUGRC"
                " (selective prediction, lower is better), OOD AUROC and FPR95 of the ensemble's"
                " top probability (means over the `--ood` sets), T and NLL (T): the `mixc"
                " calibrate` temperature and the test NLL after it."
            ),
        ]
    n_seeds = max((r.get("seeds") or 0 for r in rows), default=0)
    if n_seeds > 1:
        lines += [
            "",
            (
                f"Each point trained with {n_seeds} seeds: mean ± sample standard deviation over"
                " the seeds."
            ),
        ]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def write_outputs(
    rows: list[dict[str, Any]], out: Path, title: str, plots: bool = True
) -> list[Path]:
    """``sweep.md``, ``sweep.csv``, ``sweep.json`` and the PNGs (``sweep.png``;
    ``sweep_members.png`` when several member counts were trained)."""
    from mixc.core.safe_write import write_text, write_with

    written = [write_text(out / "sweep.md", markdown(rows, title))]

    def fill(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    written.append(write_with(out / "sweep.csv", fill))
    written.append(write_text(out / "sweep.json", json.dumps(rows, indent=1) + "\n"))
    if plots and any(r["accuracy"] is not None for r in rows):
        from mixc.plots import sweep_members_plot, sweep_params_plot

        written.append(sweep_params_plot(rows, out / "sweep.png", title))
        ens_members = {
            r["members"] for r in rows if r["kind"] == "ensemble" and r["accuracy"] is not None
        }
        if len(ens_members) > 1:
            written.append(sweep_members_plot(rows, out / "sweep_members.png", title))
    return written
