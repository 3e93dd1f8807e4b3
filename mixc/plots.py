"""PNG figures for eval, interpolate and sweep: the paper's Figures 3 and 4 and a reliability
diagram.

matplotlib is an optional extra (``pip install 'mixc[plot]'``); it is imported
inside each function with the Agg backend, so figures are written without a
display and importing this module costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mixc.core.errors import MixcError
from mixc.spec.sections import DEFAULT_METHOD

__all__ = [
    "PlotError",
    "reliability_diagram",
    "risk_coverage_plot",
    "corruption_plot",
    "interpolation_plot",
    "sweep_params_plot",
    "sweep_members_plot",
    "training_curves",
]


class PlotError(MixcError, RuntimeError):
    """matplotlib is missing (a user-facing error with the install hint)."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotError(
            f"plots need matplotlib, which is not importable here ({e}); hint: pip install"
            " 'mixc[plot]'"
        ) from e
    return plt


def _save(fig: Any, path: str | Path) -> Path:
    from mixc.core.safe_write import write_with

    path = Path(path)
    try:
        write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=200, bbox_inches="tight"))
        # every figure also as PDF, for papers
        write_with(
            path.with_suffix(".pdf"),
            lambda tmp: fig.savefig(tmp, format="pdf", bbox_inches="tight"),
        )
    finally:
        _pyplot().close(fig)
    return path


def reliability_diagram(rel: dict[str, list], ece: float, path: str | Path, title: str) -> Path:
    """Accuracy against confidence per bin (``mixc.metrics.reliability``), the gap shaded, counts
    below."""
    plt = _pyplot()
    edges = np.asarray(rel["edges"])
    width = edges[1] - edges[0]
    centers = edges[:-1] + width / 2
    acc = np.array([np.nan if a is None else a for a in rel["accuracy"]])
    conf = np.array([np.nan if c is None else c for c in rel["confidence"]])
    count = np.asarray(rel["count"])
    fig, (ax, axc) = plt.subplots(
        2,
        1,
        figsize=(5, 6),
        sharex=True,
        layout="constrained",
        gridspec_kw={"height_ratios": [3, 1]},
    )
    ax.bar(
        centers,
        np.nan_to_num(acc),
        width=width * 0.95,
        color="tab:blue",
        alpha=0.8,
        edgecolor="black",
        label="accuracy in bin",
    )
    gap_lo = np.minimum(np.nan_to_num(acc), np.nan_to_num(conf))
    ax.bar(
        centers,
        np.abs(np.nan_to_num(conf) - np.nan_to_num(acc)),
        bottom=gap_lo,
        width=width * 0.95,
        facecolor="none",
        edgecolor="tab:red",
        hatch="//",
        label="gap to mean confidence",
    )
    ax.plot(conf, acc, "o", color="tab:red", ms=3, label="(mean confidence, accuracy)")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}\nECE {ece * 100:.2f}% ({len(centers)} bins)")
    ax.legend(loc="upper left", fontsize=8)
    axc.bar(centers, count, width=width * 0.95, color="grey")
    axc.set_xlabel("confidence (largest mean probability)")
    axc.set_ylabel("samples")
    axc.set_xlim(0, 1)
    return _save(fig, path)


def risk_coverage_plot(
    coverage: np.ndarray, risk: np.ndarray, metrics: dict[str, Any], path: str | Path, title: str
) -> Path:
    """Selective risk against coverage (``mixc.selective.risk_coverage``), AURC and the two
    operating points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4), layout="constrained")
    ax.plot(
        coverage,
        risk,
        color="tab:blue",
        lw=1.5,
        label=f"risk-coverage (AURC {metrics['aurc']:.4f})",
    )
    ax.fill_between(coverage, risk, color="tab:blue", alpha=0.15)
    ax.axvline(0.8, color="grey", ls=":", lw=1)
    ax.plot(
        [0.8],
        [metrics["risk_at_80"]],
        "o",
        color="tab:red",
        label=f"risk at 80% coverage: {metrics['risk_at_80'] * 100:.2f}%",
    )
    ax.axhline(0.05, color="grey", ls="--", lw=1)
    ax.plot(
        [metrics["coverage_at_5"]],
        [0.05],
        "s",
        color="tab:green",
        label=f"coverage at 5% risk: {metrics['coverage_at_5'] * 100:.1f}%",
    )
    ax.set_xlabel("coverage (share of inputs answered, most confident first)")
    ax.set_ylabel("selective risk (error rate of the answered)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(0.1, float(np.max(risk)) * 1.05) if len(risk) else 1)
    ax.set_title(f"{title}\nAUGRC {metrics['augrc']:.4f}")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def corruption_plot(
    result: dict[str, Any], clean: dict[str, float] | None, path: str | Path, title: str
) -> Path:
    """Accuracy and NLL against severity: one thin line per corruption, the mean bold, clean at
    severity 0."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for ax, key, label in ((axes[0], "accuracy", "accuracy (%)"), (axes[1], "nll", "NLL")):
        scale = 100.0 if key == "accuracy" else 1.0
        for name, r in result["corruptions"].items():
            sev = sorted(r["severities"], key=int)
            xs = [int(s) for s in sev]
            ys = [r["severities"][s][key] * scale for s in sev]
            if clean is not None:
                xs, ys = [0] + xs, [clean[key] * scale] + ys
            ax.plot(xs, ys, marker=".", lw=1, alpha=0.7, label=name)
        sev = sorted(result["by_severity"], key=int)
        xs = [int(s) for s in sev]
        ys = [result["by_severity"][s][key] * scale for s in sev]
        if clean is not None:
            xs, ys = [0] + xs, [clean[key] * scale] + ys
        ax.plot(xs, ys, "k-o", lw=2.5, label="mean")
        ax.set_xlabel("severity (0 = clean)" if clean is not None else "severity")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", ncol=2)
    fig.suptitle(title)
    return _save(fig, path)


def interpolation_plot(curves: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """The paper's Figure 4: accuracy (and NLL) of the network at each point between two members.

    ``curves``: ``{"label", "t": [...], "accuracy": [...], "nll": [...]}`` per run.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for c in curves:
        axes[0].plot(c["t"], np.asarray(c["accuracy"]) * 100, marker="o", label=c["label"])
        axes[1].plot(c["t"], c["nll"], marker="o", label=c["label"])
    for ax, lab in zip(axes, ("accuracy (%)", "NLL")):
        ax.set_xlabel("interpolation point t  (0 = member i, 1 = member j)")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def _fmt_params(n: float) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}K" if n >= 1e3 else str(int(n))


def _sd(rows: Sequence[dict[str, Any]], key: str, scale: float) -> list[float] | None:
    """Error bars: the seeds' standard deviation (``<key>_sd``) of each row, None when no row has
    one."""
    sds = [r.get(f"{key}_sd") for r in rows]
    return None if all(s is None for s in sds) else [(s or 0.0) * scale for s in sds]


#: how the figures name the ensemble methods
METHOD_NAMES = {
    "mixture": "MixtureEnsemble",
    "batch_ensemble": "BatchEnsemble",
    "mimo": "MIMO",
    "packed": "Packed-Ensembles",
    "naive": "deep ensemble",
}


def sweep_params_plot(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """The paper's Figure 3 (left): accuracy and NLL against parameter count, baselines as reference
    points.

    ``rows``: sweep rows with ``kind`` (ensemble/single/naive), ``members``,
    ``params``, ``accuracy``, ``nll`` and a ``budget`` label.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    done = [r for r in rows if r.get("accuracy") is not None]
    ens = [r for r in done if r["kind"] == "ensemble"]
    for ax, key, label in ((axes[0], "accuracy", "accuracy (%)"), (axes[1], "nll", "NLL")):
        scale = 100.0 if key == "accuracy" else 1.0
        series = dict.fromkeys((r.get("method") or DEFAULT_METHOD, r["members"]) for r in ens)
        for method, m in series:
            pts = sorted(
                (
                    r
                    for r in ens
                    if (r.get("method") or DEFAULT_METHOD, r["members"]) == (method, m)
                ),
                key=lambda r: r["params"],
            )
            ax.errorbar(
                [r["params"] for r in pts],
                [r[key] * scale for r in pts],
                yerr=_sd(pts, key, scale),
                fmt="-o" if len(pts) > 1 else "D",
                capsize=3,
                label=f"{METHOD_NAMES.get(method, method)} x{m}",
            )
            for r in pts:
                if r["budget"] != "-":
                    ax.annotate(
                        r["budget"],
                        (r["params"], r[key] * scale),
                        textcoords="offset points",
                        xytext=(4, 4),
                        fontsize=7,
                    )
        for kind, marker, name in (
            ("single", "*", "single network"),
            ("naive", "s", "naive ensemble"),
        ):
            for r in (r for r in done if r["kind"] == kind):
                lab = name if kind == "single" else f"{name} x{r['members']}"
                ax.errorbar(
                    [r["params"]],
                    [r[key] * scale],
                    yerr=_sd([r], key, scale),
                    fmt=marker,
                    ms=12,
                    capsize=3,
                    label=lab,
                )
        ax.set_xscale("log")
        ax.margins(x=0.06, y=0.12)  # keep the big baseline markers inside the axes
        ax.set_xlabel("parameters")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ticks = sorted({r["params"] for r in ens}) or sorted({r["params"] for r in done})
        # labels must not collide
        ticks = [t for k, t in enumerate(ticks) if k == 0 or t / ticks[k - 1] > 1.15]
        if ticks:
            ax.set_xticks(ticks)
            ax.set_xticklabels([_fmt_params(t) for t in ticks], rotation=45, fontsize=7)
            ax.minorticks_off()
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def sweep_members_plot(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """The paper's Figure 3 (right): accuracy and NLL against the number of members, one line per
    budget."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    ens = [r for r in rows if r["kind"] == "ensemble" and r.get("accuracy") is not None]
    for ax, key, label in ((axes[0], "accuracy", "accuracy (%)"), (axes[1], "nll", "NLL")):
        scale = 100.0 if key == "accuracy" else 1.0
        for b in dict.fromkeys(r["budget"] for r in ens):
            pts = sorted((r for r in ens if r["budget"] == b), key=lambda r: r["members"])
            ax.errorbar(
                [r["members"] for r in pts],
                [r[key] * scale for r in pts],
                yerr=_sd(pts, key, scale),
                fmt="-o",
                capsize=3,
                label=f"budget {b}",
            )
        ms = sorted({r["members"] for r in ens})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms)
        ax.set_xticklabels([str(m) for m in ms])
        ax.minorticks_off()
        ax.set_xlabel("ensemble members")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def training_curves(lines: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Loss (train loss; validation and test NLL) and accuracy (validation, test) per epoch, from
    metrics.jsonl lines; a series is drawn where it was measured (the test set may be scored at
    the last epoch only).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    series = (
        (axes[0], "train_loss", "train loss (mean member CE)", 1.0),
        (axes[0], "val_nll", "validation NLL", 1.0),
        (axes[0], "nll", "test NLL", 1.0),
        (axes[1], "val_accuracy", "validation accuracy", 100.0),
        (axes[1], "accuracy", "test accuracy", 100.0),
    )
    for ax, key, label, scale in series:
        pts = [(m["epoch"], m[key] * scale) for m in lines if m.get(key) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "-o" if len(pts) > 1 else "o", ms=3, label=label)
    for ax, label in zip(axes, ("loss", "accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)
