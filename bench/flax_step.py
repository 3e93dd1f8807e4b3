"""Benchmark one training step (forward + backward) of the flax backend on WRN-16-4, side by side.

    python bench/flax_step.py [--quick] [--members 4] [--batch 64] [--grouped] [--no-torch]
    [--threads N]

Compares, in one process and on the same input (32x32, batch 64, M members),
every step one jit-compiled function returning the gradients and new BatchNorm
statistics of the loss (the sum of the members' cross-entropies):
  (a) the flax MixtureEnsemble at 1.0x budget (mixc.compile("wrn16_4")), the
      layout "auto" picks for the device (loop on CPU, grouped elsewhere), and
      with --grouped (or on an accelerator) the other one too;
  (b) flax's own loop of M plain WRN-16-4 networks (nnx.Conv/nnx.BatchNorm/
      nnx.Linear modules built from the members=1, groups=none plan), all M in one jit;
  (p) M plain networks built by this backend from that plan, all M in one jit: the same
      convolution (on CPU, its faster kernel gradient) and BatchNorm code as (a), so a/p
      is the cost of composition and layout alone;
  (c) one plain network;
  (e) the flax ensemble with unfactorised per-member weights (groups=none):
      a/e is the cost of composing weights from the templates;
  (t) torch's step for the same plan in the same process (its loop layout,
      plain and channels_last; the best is the reference), for the flax/torch ratio.
jit compile time is reported separately from the step time. Steps are timed
round-robin, so load from other processes hits every config alike.
The target: flax ensemble step <= 1.05x flax's loop of M plain nets, and a/e <= 1.05.

Threads: XLA's CPU client runs a pool sized by the CPU affinity (neither
OMP_NUM_THREADS nor, with jax 0.10, XLA's single-threaded-eigen flags change it)
and torch its own (OMP_NUM_THREADS, else its default), so ``OMP_NUM_THREADS=1``
alone gives flax every core and torch one; the report prints both counts.
``--threads N`` restricts the process to N of its cores before jax starts and
gives torch N threads, so both run N-wide.

``measure_flax(quick)`` returns the figures as a dict (bench/train_step.py
prints them beside torch's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from math import prod
from pathlib import Path
from typing import Any

# run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _threads_from_argv(argv: list[str]) -> int | None:
    """``--threads N``, read before jax starts (XLA sizes its pool once, when it starts)."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return None


def _use_cores(n: int) -> None:
    """Restrict this process to ``n`` of its cores (the last ones), so XLA's pool has ``n``
    threads."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[-n:])


if __name__ == "__main__" and _threads_from_argv(sys.argv[1:]) is not None:
    _use_cores(_threads_from_argv(sys.argv[1:]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import mixc  # noqa: E402
from mixc.backends.flax import build, split  # noqa: E402
from mixc.backends.flax.model import apply  # noqa: E402
from mixc.compiler.plan import Plan  # noqa: E402

# ---------------------------------------------------------------------------
# A plain network written the way a flax user would, from a members=1 plan


class PlainNet(nnx.Module):
    """One plain backbone with nnx modules (NHWC), interpreting the plan's op graph in
    ``plain_forward``."""

    def __init__(self, plan: Plan, rngs: nnx.Rngs) -> None:
        layers = {}
        for op in plan.ops:
            key = op.name.replace(".", "_")
            if op.kind == "conv":
                layers[key] = nnx.Conv(
                    op.in_channels,
                    op.out_channels,
                    tuple(op.kernel),
                    strides=tuple(op.stride),
                    padding=[(p, p) for p in op.padding],
                    kernel_dilation=tuple(op.dilation),
                    feature_group_count=op.groups,
                    use_bias=op.bias,
                    kernel_init=nnx.initializers.kaiming_normal(),
                    rngs=rngs,
                )
            elif op.kind == "linear":
                layers[key] = nnx.Linear(
                    op.in_features, op.out_features, use_bias=op.bias, rngs=rngs
                )
            elif op.kind == "bn":  # flax's momentum is 1 - PyTorch's
                layers[key] = nnx.BatchNorm(
                    op.channels, momentum=1 - op.momentum, epsilon=op.eps, rngs=rngs
                )
        self.layers = nnx.Dict(layers)


_ACTS = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}


def plain_forward(net: PlainNet, plan: Plan, x: jax.Array, train: bool) -> jax.Array:
    """Logits of one plain network; ``x`` channels-first like the data."""
    vals: dict[str, jax.Array] = {}
    for op in plan.ops:
        key = op.name.replace(".", "_")
        a = vals[op.inputs[0]] if op.inputs else None
        if op.kind == "input":
            y = jnp.moveaxis(x, 1, -1) if x.ndim > 2 else x
        elif op.kind in ("conv", "linear"):
            y = net.layers[key](a)
        elif op.kind == "bn":
            y = net.layers[key](a, use_running_average=not train)
        elif op.kind == "act":
            y = jax.nn.leaky_relu(a, op.slope) if op.fn == "leaky_relu" else _ACTS[op.fn](a)
        elif op.kind == "global_pool":
            axes = tuple(range(1, a.ndim - 1))
            y = a.mean(axes) if op.op == "avg" else a.max(axes)
        elif op.kind == "flatten":
            y = a.reshape(a.shape[0], -1)
        elif op.kind == "dropout":
            y = a  # p = 0 in the benchmark workload
        elif op.kind == "add":
            y = vals[op.inputs[0]] + vals[op.inputs[1]]
        elif op.kind == "pool":
            window, strides = (1, *op.kernel, 1), (1, *op.stride, 1)
            pads = ((0, 0), *((p, p) for p in op.padding), (0, 0))
            if op.op == "max":
                y = jax.lax.reduce_window(a, -jnp.inf, jax.lax.max, window, strides, pads)
            else:
                y = jax.lax.reduce_window(a, 0.0, jax.lax.add, window, strides, pads) / prod(
                    op.kernel
                )
        else:
            raise ValueError(op.kind)
        vals[op.name] = y
    return vals[plan.output]


# ---------------------------------------------------------------------------
# Steps: (compiled function, its arguments)


def _ce(logits: jax.Array, y: jax.Array) -> jax.Array:
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[:, None], -1).mean()


def ensemble_step(plan: Plan, layout: str, x: jax.Array, y: jax.Array) -> tuple[Callable, tuple]:
    """Forward + backward of the MixtureEnsemble (sum of member CEs), new BN statistics included."""
    graphdef, params, stats = split(build(plan, layout=layout))

    def step(params, stats, x, y):
        def loss(p):
            logits, new = apply(graphdef, p, stats, x, True)
            return sum(_ce(logits[:, m], y) for m in range(plan.members)), new

        (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, grads, new

    return step, (params, stats, x, y)


def backend_loop_step(
    plan: Plan, members: int, x: jax.Array, y: jax.Array
) -> tuple[Callable, tuple]:
    """Forward + backward of ``members`` plain networks built by mixc's flax backend (a members=1
    plan), one after another inside one jit: the same convolution and BatchNorm code as the
    ensemble."""
    models = [build(plan, layout="loop", seed=i) for i in range(members)]
    graphdef = split(models[0])[0]
    params = [split(m)[1] for m in models]
    stats = [split(m)[2] for m in models]

    def step(params, stats, x, y):
        def loss(ps):
            total, new = 0.0, []
            for p, s in zip(ps, stats):
                logits, n = apply(graphdef, p, s, x, True)
                total = total + _ce(logits[:, 0], y)
                new.append(n)
            return total, new

        (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, grads, new

    return step, (params, stats, x, y)


def loop_step(plan: Plan, members: int, x: jax.Array, y: jax.Array) -> tuple[Callable, tuple]:
    """Forward + backward of ``members`` plain nnx networks, one after another inside one jit."""
    nets = [PlainNet(plan, nnx.Rngs(i)) for i in range(members)]
    graphdef = nnx.split(nets[0], nnx.Param, nnx.BatchStat)[0]
    # pure pytrees: safe across traces
    params = [nnx.to_pure_dict(nnx.state(n, nnx.Param)) for n in nets]
    stats = [nnx.to_pure_dict(nnx.state(n, nnx.BatchStat)) for n in nets]

    def step(params, stats, x, y):
        def loss(ps, ss):
            total, new = 0.0, []
            for p, s in zip(ps, ss):
                net = nnx.merge(graphdef, nnx.State(p), nnx.State(s))
                total = total + _ce(plain_forward(net, plan, x, True), y)
                new.append(nnx.to_pure_dict(nnx.state(net, nnx.BatchStat)))
            return total, new

        (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params, stats)
        return value, grads, new

    return step, (params, stats, x, y)


def _compile(fn: Callable, args: tuple) -> tuple[Callable, float]:
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t


def _torch_steps(
    plan: Plan, x: np.ndarray, y: np.ndarray, platform: str, threads: int | None = None
) -> dict[str, Callable[[], None]]:
    """torch's fwd+bwd for the same plan (bench/train_step.py's definition): on CPU the loop layout,
    plain and channels_last; on a GPU both layouts. The best is the flax/torch reference."""
    try:
        import torch
        import torch.nn.functional as F

        from mixc.backends.torch import build as torch_build
    except ImportError:
        return {}
    if threads is not None:
        torch.set_num_threads(threads)
    cuda = platform == "gpu" and torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    xt, yt = torch.from_numpy(x).to(dev), torch.from_numpy(y).long().to(dev)
    variants = [("grouped", False), ("loop", False)] if cuda else [("loop", False), ("loop", True)]
    out = {}
    for layout, cl in variants:
        model = torch_build(plan, layout=layout, channels_last=cl, device=dev).train()

        def step(model=model):
            model.zero_grad(set_to_none=True)
            logits = model(xt)
            loss = F.cross_entropy(
                logits.flatten(0, 1), yt.repeat_interleave(plan.members), reduction="sum"
            ) / len(yt)
            loss.backward()
            if cuda:
                torch.cuda.synchronize()

        out[f"t torch {layout}{' channels_last' if cl else ''} ({dev.type})"] = step
    return out


def forward_macs(plan: Plan) -> int:
    """Multiply-accumulates of one member's forward pass on one example (conv + linear)."""
    macs = 0
    for op in plan.ops:
        if op.kind == "conv":
            macs += prod(op.out_shape) * (op.in_channels // op.groups) * prod(op.kernel)
        elif op.kind == "linear":
            macs += op.in_features * op.out_features
    return macs


# ---------------------------------------------------------------------------
# The measurement


def _xla_threads() -> int:
    """XLA's CPU pool: one thread per core of the process's affinity."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def measure_flax(
    quick: bool = False,
    members: int = 4,
    batch: int = 64,
    grouped: bool | None = None,
    torch_too: bool = True,
    log: Callable[[str], None] = lambda s: None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Median step times (ms), compile times (s) and the ratios; see the module docstring.

    ``grouped``: also time the grouped layout (default: only off CPU, where XLA's grouped
    convolutions are a slow path that takes minutes to time). ``threads``: torch's thread
    count (XLA's pool is sized by the affinity when jax starts: ``_use_cores``).
    """
    platform = jax.devices()[0].platform
    warmup, rounds = (
        ((1, 3) if quick else (2, 7)) if platform == "cpu" else ((3, 10) if quick else (5, 30))
    )
    auto = "loop" if platform == "cpu" else "grouped"
    layouts = [auto] + (
        ["grouped" if auto == "loop" else "loop"]
        if (grouped if grouped is not None else platform != "cpu")
        else []
    )
    me_plan = mixc.compile("wrn16_4", [f"members={members}", "budget=1.0x"])
    naive_plan = mixc.compile("wrn16_4", [f"members={members}", "groups=none"])
    plain_plan = mixc.compile("wrn16_4", ["members=1", "groups=none"])
    gflop = 3 * 2 * forward_macs(plain_plan) * batch * members / 1e9  # M backbones, fwd + bwd

    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    y_np = rng.integers(0, 10, batch).astype(np.int32)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)

    plans = (me_plan, naive_plan, plain_plan)
    steps, compile_s = _compile_steps(_builders(plans, layouts, auto, members, x, y), log)
    torch_threads = None
    if torch_too:
        steps.update(_torch_steps(me_plan, x_np, y_np, platform, threads))
        if any(k.startswith("t ") for k in steps):
            import torch

            torch_threads = torch.get_num_threads()

    times, cpu = _time_steps(steps, warmup, rounds, log)
    out: dict[str, Any] = {
        "device": f"{platform} ({jax.devices()[0].device_kind}), jax {jax.__version__}",
        "threads": (
            f"XLA {_xla_threads() if platform == 'cpu' else '-'}, torch {torch_threads or '-'}"
        ),
        "workload": f"WRN-16-4, {members} members at 1.0x, batch {batch}, 32x32, fwd+bwd",
        "gflop_per_step": gflop,
    }
    out.update(_ratios(times, cpu, compile_s, members, auto, gflop))
    return out


def _builders(
    plans: tuple[Plan, Plan, Plan], layouts: list[str], auto: str, members: int, x, y
) -> dict[str, Callable[[], tuple[Callable, tuple]]]:
    """The flax steps to time, by label (the label's first letter is its kind)."""
    me_plan, naive_plan, plain_plan = plans
    builders: dict[str, Callable[[], tuple[Callable, tuple]]] = {}
    for layout in layouts:
        builders[f"a ensemble {layout}"] = lambda layout=layout: ensemble_step(
            me_plan, layout, x, y
        )
    builders[f"b {members} plain nnx nets, loop"] = lambda: loop_step(plain_plan, members, x, y)
    builders[f"p {members} plain mixc-flax nets, loop"] = lambda: backend_loop_step(
        plain_plan, members, x, y
    )
    builders["c one plain nnx net"] = lambda: loop_step(plain_plan, 1, x, y)
    builders[f"e unfactorised {auto}"] = lambda: ensemble_step(naive_plan, auto, x, y)
    return builders


def _compile_steps(
    builders: dict[str, Callable[[], tuple[Callable, tuple]]], log: Callable[[str], None]
) -> tuple[dict[str, Callable[[], Any]], dict[str, float]]:
    """Each step compiled, as a call that blocks until its result is ready, and its compile time."""
    steps: dict[str, Callable[[], Any]] = {}
    compile_s: dict[str, float] = {}
    for label, make in builders.items():
        log(f"compiling {label}")
        fn, args = make()
        compiled, compile_s[label] = _compile(fn, args)
        steps[label] = lambda c=compiled, a=args: jax.block_until_ready(c(*a))
    return steps, compile_s


def _time_steps(
    steps: dict[str, Callable[[], Any]], warmup: int, rounds: int, log: Callable[[str], None]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process CPU seconds of each step, the steps interleaved round by round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    # process CPU time: steadier under others' load
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(rounds):
        log(f"round {r + 1}/{rounds}")
        for label, step in steps.items():
            t, c = time.perf_counter(), time.process_time()
            step()
            times[label].append(time.perf_counter() - t)
            cpu[label].append(time.process_time() - c)
    return times, cpu


def _ratios(
    times: dict[str, list[float]],
    cpu: dict[str, list[float]],
    compile_s: dict[str, float],
    members: int,
    auto: str,
    gflop: float,
) -> dict[str, Any]:
    """The medians and the ratios between the steps that the report shows."""
    ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
    cpu_ms = {k: statistics.median(v) * 1000 for k, v in cpu.items()}
    best_a = min((k for k in ms if k.startswith("a ")), key=ms.get)
    b = next(k for k in ms if k.startswith("b "))
    c = next(k for k in ms if k.startswith("c "))
    e = next(k for k in ms if k.startswith("e "))
    p = next(k for k in ms if k.startswith("p "))
    torch_best = min((k for k in ms if k.startswith("t ")), key=ms.get, default=None)
    out: dict[str, Any] = {
        "step_ms": ms,
        "spread_ms": {k: (min(v) * 1000, max(v) * 1000) for k, v in times.items()},
        "cpu_ms": cpu_ms,
        "ensemble_over_plain_loop_cpu": cpu_ms[best_a] / cpu_ms[b],
        "compile_s": compile_s,
        "best_ensemble": best_a,
        "ensemble_over_plain_loop": ms[best_a] / ms[b],
        "ensemble_over_m_single": ms[best_a] / (members * ms[c]),
        "ensemble_over_backend_plain_loop": ms[best_a] / ms[p],
        "ensemble_over_backend_plain_loop_cpu": cpu_ms[best_a] / cpu_ms[p],
        "composition_cost": ms[f"a ensemble {auto}"] / ms[e],
        "composition_cost_cpu": cpu_ms[f"a ensemble {auto}"] / cpu_ms[e],
        "gflops_ensemble": gflop / ms[best_a] * 1000,
        "target_met": ms[best_a] <= 1.05 * ms[b] and ms[f"a ensemble {auto}"] <= 1.05 * ms[e],
    }
    if torch_best:
        out["torch_best"] = torch_best
        out["flax_over_torch"] = ms[best_a] / ms[torch_best]
        out["flax_over_torch_cpu"] = cpu_ms[best_a] / cpu_ms[torch_best]
    return out


def report(res: dict[str, Any]) -> str:
    lines = [
        f"{res['workload']}; {res['device']}; threads: {res['threads']}; "
        f"{res['gflop_per_step']:.0f} GFLOP per ensemble step"
    ]
    for label, t in res["step_ms"].items():
        lo, hi = res["spread_ms"][label]
        comp = res["compile_s"].get(label)
        lines.append(
            f"  {label:<34} {t:9.1f} ms  ({lo:.0f}-{hi:.0f})  cpu"
            f" {res['cpu_ms'][label] / 1000:7.2f} s"
            + (f"   jit compile {comp:6.1f} s" if comp is not None else "")
        )
    lines.append(
        f"flax ensemble / flax loop of plain nets: {res['ensemble_over_plain_loop']:.3f} "
        f"({res['best_ensemble']}); by process CPU time {res['ensemble_over_plain_loop_cpu']:.3f}"
    )
    lines.append(
        "flax ensemble / M plain nets of this backend (same conv and BN code): "
        f"{res['ensemble_over_backend_plain_loop']:.3f}; by process CPU time "
        f"{res['ensemble_over_backend_plain_loop_cpu']:.3f}"
    )
    lines.append(f"flax ensemble / (M x one plain net):     {res['ensemble_over_m_single']:.3f}")
    lines.append(
        f"composition cost (a / e):                {res['composition_cost']:.3f}; "
        f"by process CPU time {res['composition_cost_cpu']:.3f}"
    )
    lines.append(f"target a/b <= 1.05 and a/e <= 1.05: {'met' if res['target_met'] else 'NOT met'}")
    if "flax_over_torch" in res:
        lines.append(
            f"flax / torch (best: {res['torch_best']}):   {res['flax_over_torch']:.3f}; "
            f"by process CPU time {res['flax_over_torch_cpu']:.3f}"
        )
    lines.append(f"flax ensemble throughput: {res['gflops_ensemble']:.0f} GFLOP/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed rounds")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument(
        "--grouped", action="store_true", help="also time the grouped layout on CPU (slow)"
    )
    ap.add_argument(
        "--no-torch", action="store_true", help="skip torch's step (no flax/torch ratio)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="run on N cores: XLA's pool and torch's threads both N",
    )
    args = ap.parse_args(argv)
    res = measure_flax(
        args.quick,
        args.members,
        args.batch,
        grouped=True if args.grouped else None,
        torch_too=not args.no_torch,
        log=lambda s: print(s, flush=True),
        threads=args.threads,
    )
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
