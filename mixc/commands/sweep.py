"""`mixc sweep FILE --budgets 0.25x,0.5x,1x,2x,4x [--members 4] [--baselines single,naive]`: Figure
3.

Trains the spec at every budget (and member count) with its own recipe, plus
the baselines, each into ``OUT/<point>/`` (resumable: a finished point is not
trained again, a partial one resumes). Then writes ``OUT/sweep.md``,
``OUT/sweep.csv`` (params, accuracy, NLL, ECE, diversity per point) and
``OUT/sweep.png``: accuracy and NLL against parameter count with the baselines
as reference points (Figure 3 left). ``--members 1,2,4,8`` adds
``OUT/sweep_members.png``: accuracy and NLL against members, one line per
budget (Figure 3 right).

Exit codes: 0 every point trained; 1 a spec, option or point problem (the
other points still train and are tabulated); 2 a data problem; 130 interrupted
(finished epochs are kept: the same command resumes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mixc.commands import add_backend_argument, add_threads_argument
from mixc.core.run_models import BASELINES
from mixc.spec.sections import DEFAULT_METHOD


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `mixc sweep`."""
    p.add_argument("file", metavar="FILE", help="a .mix spec, or the name of a zoo spec")
    p.add_argument(
        "--budgets",
        help=(
            "comma-separated budgets: multiples of one plain backbone (0.25x,0.5x,1x,2x,4x) "
            "or absolute parameter counts (250K,5M,1200000), mixed freely; default: the spec's"
        ),
    )
    p.add_argument("--members", help="comma-separated member counts (1,2,4,8); default: the spec's")
    p.add_argument(
        "--methods",
        help=(
            "comma-separated ensemble methods, one series each: mixture, batch_ensemble, mimo,"
            " packed, naive (options in parentheses: packed(alpha = 2)); budgets apply to mixture"
            " and packed; default: the spec's method"
        ),
    )
    p.add_argument(
        "--baselines",
        default="",
        help=(
            "comma-separated: single (one plain backbone), naive (M plain "
            "backbones; M = the one --members value, else the spec's)"
        ),
    )
    p.add_argument(
        "--fallback",
        choices=["single", "none"],
        default="single",
        help=(
            "below the by_shape minimum, use one shared blob (groups single, as the paper's 7M"
            " point) or skip the point (default single)"
        ),
    )
    p.add_argument("--out", help="sweep folder (default runs/sweep-<spec name>)")
    p.add_argument("--data", help="dataset (default: the spec's train section)")
    p.add_argument("--data-dir", help="folder holding the cifar archives")
    p.add_argument("--epochs", type=int, help="override the spec's epochs for every point")
    p.add_argument("--seed", type=int, help="override the spec's seed")
    p.add_argument(
        "--seeds",
        metavar="LIST",
        help=(
            "comma-separated seeds (0,1,2): train every point once per seed "
            "(OUT/<point>/seed-<s>) and report mean ± sd, with error bars in the plots"
        ),
    )
    p.add_argument("--device", default="cpu", help="device: cpu, cuda, cuda:1")
    add_backend_argument(p, "train every point with")
    p.add_argument(
        "--layout", choices=["auto", "grouped", "loop"], default="auto", help="how members run"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec setting for every point (repeatable), e.g. --set train.epochs=15",
    )
    add_threads_argument(p)
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs (no matplotlib needed)")
    p.add_argument(
        "--no-progress", action="store_true", help="plain lines instead of progress bars"
    )


def _title(name: str, rows: list, seeds: list[int] | None) -> str:
    """What the figures and the table show: the spec, the methods, the budgets and members (not
    folder names or override strings)."""
    ens = [r for r in rows if r["kind"] == "ensemble"]
    budgets = list(
        dict.fromkeys(r["budget"] for r in ens if r.get("method", DEFAULT_METHOD) == DEFAULT_METHOD)
    )
    members = sorted({r["members"] for r in ens})
    methods = list(dict.fromkeys(r.get("method") or DEFAULT_METHOD for r in ens))
    base = sorted({r["kind"] for r in rows if r["kind"] != "ensemble"})
    if methods != [DEFAULT_METHOD]:
        from mixc.plots import METHOD_NAMES

        parts = [
            f"{', '.join(METHOD_NAMES.get(m, m) for m in methods)}, members"
            f" {', '.join(map(str, members))}"
            + (f", budgets {', '.join(budgets)}" if budgets else "")
        ]
    else:
        parts = (
            [
                f"MixtureEnsemble, budgets {', '.join(budgets)}, members"
                f" {', '.join(map(str, members))}"
            ]
            if budgets
            else []
        )
    parts += [f"{b} baseline" for b in base]
    return (
        f"{name}: "
        + "; ".join(parts)
        + (f" ({len(seeds)} seeds, mean ± sd)" if seeds and len(seeds) > 1 else "")
    )


def _error(msg: str) -> None:
    print(f"mixc sweep: error: {msg}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Run `mixc sweep`; returns the exit code (errors are ``MixcError``s for cli.main)."""
    from mixc.backends import get_backend
    from mixc.commands.train import tune_allocator
    from mixc.plots import PlotError
    from mixc.sweep import (
        SweepError,
        parse_budgets,
        parse_members,
        parse_methods,
        parse_seeds,
        plan_points,
        run_sweep,
        write_outputs,
    )

    tune_allocator()
    get_backend(args.backend, "sweep")
    budgets = parse_budgets(args.budgets)
    members = parse_members(args.members)
    seeds = parse_seeds(args.seeds)
    if seeds and args.seed is not None:
        raise SweepError("give --seed or --seeds, not both")
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise SweepError(f"--baselines takes single and/or naive, not {', '.join(bad)}")
    if args.epochs is not None and args.epochs < 1:
        raise SweepError("--epochs must be at least 1")
    methods = parse_methods(args.methods)
    points = plan_points(
        args.file, list(args.overrides), budgets, members, baselines, args.fallback, methods
    )
    name = next((p.plan.name for p in points if p.plan is not None), Path(args.file).stem)
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{name}"
    if out.exists() and not out.is_dir():
        raise SweepError(f"--out {out} is a file, not a folder")
    bad_points = [p for p in points if p.error]
    if len(bad_points) == len(points):
        raise SweepError(
            "no point of the sweep can be compiled: "
            + "; ".join(f"{p.key}: {p.error}" for p in bad_points)
        )
    try:
        rows = run_sweep(
            args.file,
            list(args.overrides),
            points,
            out,
            data=args.data,
            data_dir=args.data_dir,
            epochs=args.epochs,
            device=args.device,
            seed=args.seed,
            layout=args.layout,
            progress=not args.no_progress,
            backend=args.backend,
            threads=args.threads,
            seeds=seeds,
        )
    except KeyboardInterrupt:
        _error(
            f"interrupted; finished epochs are saved under {out}: run the same command to resume"
        )
        return 130
    title = _title(name, rows, seeds)
    try:
        written = write_outputs(rows, out, title, plots=not args.no_plot)
    except PlotError as e:
        raise PlotError(f"{e} (the tables are written; --no-plot skips the PNGs)") from None
    print()
    print((out / "sweep.md").read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in written))
    failed = [r for r in rows if r["status"] in ("failed", "infeasible")]
    return 1 if failed else 0
