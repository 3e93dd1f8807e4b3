"""The first training steps of a spec's ensemble beside its baselines: loss curves and update ratios
per role.

    python bench/stability.py [SPEC] [--steps 20] [--device cpu|cuda] [--backend torch|flax]
                              [--kinds mixture,mixture-sum,naive,single] [--set KEY=VALUE ...]
                              [--threads N]

Every run uses the spec's own recipe (learning rate, momentum, batch, weight decay, warm-up) on
synthetic data of the spec's input shape (``signal * prototype[y] + N(0, 1)``, 10 classes;
``mixc.stability``), each example seen once. The kinds:

- ``mixture``: the spec's ensemble (its method: ``--set method=batch_ensemble`` for another) under
  its recipe's ``shared_gradient`` (default ``mean_output``; ``--set train.shared_gradient=mean``
  for the other);
- ``mixture-sum``: the same with ``shared_gradient sum`` (the summed member losses' gradient as it
  is:
  what mixc did before; on the paper's WRN-28-10 x4 at lr 0.1 it diverges in the first epoch);
- ``naive``: M plain backbones (``--baseline naive``); ``single``: one (``--baseline single``).

It prints the mean member loss every few steps side by side, each run's peak and last-10 mean
against the naive ensemble's, and, at step 1 (``--probe``), how far one step moved each kind of
tensor (``|dW| / |W|`` over the role's tensors) and each member's composed weights (the median over
layers and members; the classifier apart), with the ratio to the naive ensemble's for the same
layers.

Default SPEC: on CPU ``bench/specs/wrn16_10_8px.mix`` (WRN-28-10's widths, two blocks a stage, 8x8
images, the flagship's recipe: about 5 s a 4-member step on 2 cores), with ``--device cuda`` the
zoo's ``wrn28_10`` at 10 classes (the paper's model and recipe at full size).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

# run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mixc  # noqa: E402
from mixc.backends import get_backend  # noqa: E402
from mixc.commands.train import baseline_overrides  # noqa: E402
from mixc.spec.recipe import Recipe  # noqa: E402
from mixc.stability import Trace, first_steps, synthetic  # noqa: E402

CPU_SPEC = str(Path(__file__).resolve().parent / "specs" / "wrn16_10_8px.mix")
KINDS = ("mixture", "mixture-sum", "naive", "single")


def kind_overrides(kind: str, method: str) -> list[str]:
    """The ``--set`` items of one kind of run, for a spec whose method is ``method``."""
    return {"mixture": [], "mixture-sum": ["train.shared_gradient=sum"]}.get(
        kind
    ) or baseline_overrides(kind, method)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), *(line(r) for r in rows)])


def _f(v: float) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", nargs="?", help="a .mix spec or zoo name (default: see the module doc)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="torch", choices=["torch", "flax"])
    ap.add_argument("--kinds", default="mixture,mixture-sum,naive,single")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: torch's/XLA's own)"
    )
    ap.add_argument(
        "--probe",
        default="0",
        help="0-based steps whose update ratios are measured (comma-separated)",
    )
    ap.add_argument(
        "--signal", type=float, default=0.5, help="prototype strength of the synthetic data"
    )
    ap.add_argument("--layout", default="auto")
    args = ap.parse_args()
    args.kind_list = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in args.kind_list if k not in KINDS]
    if unknown:
        ap.error(f"--kinds: {', '.join(unknown)} not among {', '.join(KINDS)}")
    return args


def _trace_kinds(args, spec: str, base: list[str], kinds: list[str], probe, backend) -> dict:
    """The first steps of each kind of run, side by side on the same synthetic data rule."""
    method = mixc.compile(spec, base).method.name
    traces: dict[str, Trace] = {}
    for kind in kinds:
        plan = mixc.compile(spec, base + kind_overrides(kind, method))
        recipe = Recipe.model_validate(plan.train or {})
        x, y = synthetic(
            plan.input_shape,
            plan.classes,
            args.steps * recipe.batch,
            signal=args.signal,
            seed=recipe.seed,
        )
        t0 = time.perf_counter()
        traces[kind] = first_steps(
            backend,
            plan,
            recipe,
            x,
            y,
            args.steps,
            probe=probe,
            device=args.device,
            layout=args.layout,
        )
        print(
            f"  {kind}: {plan.members} member(s), {plan.accounting.total_params:,} parameters, lr"
            f" {recipe.optimizer.lr}, batch {recipe.batch}, shared_gradient"
            f" {recipe.shared_gradient}: {(time.perf_counter() - t0) / args.steps:.2f} s a step",
            flush=True,
        )
    return traces


def _print_losses(traces: dict, kinds: list[str], steps: int) -> None:
    every = max(1, steps // 20)
    rows = [[str(s + 1)] + [_f(traces[k].losses[s]) for k in kinds] for s in range(0, steps, every)]
    print("\nmean member cross-entropy by step\n" + _table(["step", *kinds], rows))
    ref = traces.get("naive")
    rows = []
    for k in kinds:
        t = traces[k]
        rows.append(
            [
                k,
                _f(t.losses[0]),
                _f(t.peak),
                _f(t.tail()),
                _f(t.peak / ref.peak) if ref else "-",
                _f(t.tail() / ref.tail()) if ref else "-",
            ]
        )
    print(
        "\n" + _table(["run", "first", "peak", "last 10", "peak / naive", "last 10 / naive"], rows)
    )


def _print_updates(traces: dict, kinds: list[str], step: int) -> None:
    """Update ratios at ``step``: per role of tensor, then per composed layer against naive."""
    ref = traces.get("naive")
    roles = sorted({r for t in traces.values() for r in t.roles.get(step, {})})
    rows = [[k, *(_f(traces[k].roles.get(step, {}).get(r)) for r in roles)] for k in kinds]
    print(
        f"\nstep {step + 1}: update / weight, per kind of tensor\n" + _table(["run", *roles], rows)
    )
    rows = []
    for k in kinds:
        comp = traces[k].composed.get(step, {})
        if not comp:
            continue
        last = list(comp)[-1]  # the output layer
        vs = [
            comp[n] / ref.composed[step][n] for n in comp if ref and n in ref.composed.get(step, {})
        ]
        rows.append(
            [
                k,
                _f(float(np.median(list(comp.values())))),
                _f(max(comp.values())),
                _f(comp[last]),
                _f(float(np.median(vs))) if vs else "-",
                _f(max(vs)) if vs else "-",
                _f(vs[-1]) if vs else "-",
                _f(traces[k].alpha_norm.get(step)),
            ]
        )
    header = ["run", "median", "max", "classifier", "median / naive", "max / naive"]
    header += ["classifier / naive", "alpha norm"]
    print(
        f"\nstep {step + 1}: composed weights, |dW| / |W| per layer and member (median over"
        " members)\n" + _table(header, rows)
    )


def main() -> int:
    args = _parse_args()
    on_gpu = args.device.startswith(("cuda", "gpu"))
    spec = args.spec or ("wrn28_10" if on_gpu else CPU_SPEC)
    base = list(args.overrides) + (
        ["backbone.classes=10"] if spec == "wrn28_10" and not args.spec else []
    )
    kinds = args.kind_list
    probe = tuple(int(s) for s in args.probe.split(","))
    backend = get_backend(args.backend, "train")
    threads = backend.set_threads(args.threads) if args.threads else {}
    print(
        f"bench/stability.py: {spec} {' '.join(base)}; backend {args.backend}, device"
        f" {args.device}, threads {threads.get('threads', 'default')}"
        f" (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); {args.steps} steps",
        flush=True,
    )
    traces = _trace_kinds(args, spec, base, kinds, probe, backend)
    _print_losses(traces, kinds, args.steps)
    for step in probe:
        _print_updates(traces, kinds, step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
