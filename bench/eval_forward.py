"""Benchmark eval-mode forward passes: re-composing weights every call vs composing them once.

    python bench/eval_forward.py [--quick] [--threads N] [--batches 1,256] [--reps R]

In one process, on the same random input, each in eval mode under ``torch.inference_mode``:
  (a) the MixtureEnsemble as built (``mixc.build``): composes every member's weights from the
      bank on every forward;
  (b) the per-member-weights ensemble (the spec with ``groups=none``): no composition;
  (c) M plain networks (the spec with ``members=1 groups=none``) run one after another;
  (d) one plain network;
  (e) the deployed module (``mixc export``'s DeployedEnsemble: weights of (a) composed once in
      numpy, all members in one grouped pass), eager;
  (f) the same exported with ``torch.export`` (``.module()`` of the loaded ``.pt2``);
  (g) the same exported to ONNX (dynamo exporter), run by an onnxruntime CPU session.
Weights are the fresh initialisation (timing does not depend on their values); (e)-(g) are
checked against (a) before timing. WRN-16-4 (``zoo/wrn16_4.mix``, 32x32, 4 members) by default,
``--quick`` the digits spec (8x8). Prints median wall time and median process CPU time per
forward, and the ratios to (a) and to (c). Threads: ``torch.set_num_threads(N)`` and the same
``intra_op_num_threads`` for onnxruntime (inter-op 1).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mixc  # noqa: E402
from mixc.backends.torch import build, named_plan_tensors  # noqa: E402
from mixc.compiler.plan import Plan  # noqa: E402


def timed(fn: Callable[[], object], reps: int, warmup: int) -> tuple[float, float]:
    """Median (wall, process CPU) seconds per call, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def eval_model(plan: Plan) -> torch.nn.Module:
    return build(plan).eval()


def candidates(
    spec: str, overrides: list[str], threads: int, workdir: Path
) -> tuple[Plan, dict[str, Callable]]:
    """name -> function of a numpy batch, for every variant; the exported ones checked against
    (a)."""
    from mixc.backends.torch.export import (
        DeployedEnsemble,
        export_onnx,
        export_pt2,
        onnx_runner,
        pt2_runner,
    )
    from mixc.export import compose_all

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    plan = mixc.compile(spec, overrides)
    m = plan.members
    torch.manual_seed(0)
    mix = eval_model(plan)
    naive = eval_model(mixc.compile(spec, [*overrides, "groups=none"]))
    plain_plan = mixc.compile(spec, [*overrides, "members=1", "groups=none"])
    plains = [eval_model(plain_plan) for _ in range(m)]
    arrays = {n: t.detach().numpy() for n, t in named_plan_tensors(mix).items()}
    dep = DeployedEnsemble(plan, compose_all(plan, arrays)).eval()
    t0 = time.perf_counter()
    export_pt2(dep, workdir / "m.pt2")
    t1 = time.perf_counter()
    export_onnx(dep, workdir / "m.onnx")
    t2 = time.perf_counter()
    print(f"export times: torch.export {t1 - t0:.1f}s, onnx {t2 - t1:.1f}s", flush=True)
    pt2 = pt2_runner(workdir / "m.pt2")
    ort = onnx_runner(workdir / "m.onnx", threads=threads)

    def torch_fn(model: torch.nn.Module) -> Callable[[np.ndarray], object]:
        return lambda x: model(torch.from_numpy(x))

    variants: dict[str, Callable[[np.ndarray], object]] = {
        "(a) MixtureEnsemble as built": torch_fn(mix),
        "(b) per-member weights (groups=none)": torch_fn(naive),
        f"(c) {m} plain networks in a loop": lambda x: [p(torch.from_numpy(x)) for p in plains],
        "(d) one plain network": torch_fn(plains[0]),
        "(e) deployed module, eager": torch_fn(dep),
        "(f) torch.export module": lambda x: pt2(x),
        "(g) onnxruntime session": lambda x: ort(x),
    }
    x = np.random.default_rng(0).standard_normal((4, *plan.input_shape)).astype(np.float32)
    with torch.inference_mode():
        want = torch.softmax(mix(torch.from_numpy(x)), -1).numpy()
        for name in (
            "(e) deployed module, eager",
            "(f) torch.export module",
            "(g) onnxruntime session",
        ):
            got = variants[name](x)[0]
            got = got.numpy() if isinstance(got, torch.Tensor) else got
            diff = float(np.abs(got - want).max())
            print(
                f"check {name}: max |difference| in member probabilities vs (a) = {diff:.2e}",
                flush=True,
            )
            assert diff <= 1e-4, name
    return plan, variants


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="the digits spec (8x8, width 32, 4 members)"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch and onnxruntime intra-op threads (default 1)"
    )
    ap.add_argument(
        "--batches", default="1,256", help="comma-separated batch sizes (default 1,256)"
    )
    ap.add_argument(
        "--reps", type=int, default=5, help="timed calls per measurement (median; default 5)"
    )
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    ap.add_argument("--members", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    spec = "digits" if args.quick else "wrn16_4"
    overrides = [f"members={args.members}"]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        plan, variants = candidates(spec, overrides, args.threads, Path(tmp))
        print(
            f"\n{plan.name}: {plan.members} members, input {plan.input_shape},"
            f" {plan.accounting.total_params:,} parameters; torch {torch.__version__},"
            f" {torch.get_num_threads()} thread(s); median of {args.reps} after {args.warmup}"
            " warm-up\n",
            flush=True,
        )
        rng = np.random.default_rng(1)
        for b in batches:
            x = rng.standard_normal((b, *plan.input_shape)).astype(np.float32)
            rows = []
            with torch.inference_mode():
                for name, fn in variants.items():
                    wall, cpu = timed(lambda: fn(x), args.reps, args.warmup)  # noqa: B023 (called here)
                    rows.append((name, wall, cpu))
                    print(f"  measured batch {b}: {name}", file=sys.stderr, flush=True)
            a = rows[0][1]
            c = next(r[1] for r in rows if r[0].startswith("(c)"))
            print(f"batch {b}")
            print(
                f"  {'variant':<40} {'wall ms':>10} {'cpu ms':>10} {'wall/(a)':>9} {'wall/(c)':>9}"
            )
            for name, wall, cpu in rows:
                print(
                    f"  {name:<40} {wall * 1e3:>10.2f} {cpu * 1e3:>10.2f} {wall / a:>9.3f}"
                    f" {wall / c:>9.3f}"
                )
            print(flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
