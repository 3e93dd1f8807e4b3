"""Benchmark one training step (forward + backward) of WRN-16-4 ensembles, side by side.

    python bench/train_step.py [--quick] [--members 4] [--batch 64] [--threads N]

Compares, in one process and on the same input (32x32, batch 64, M members):
  (a) the MixtureEnsemble at 1.0x budget, grouped and loop layouts, each also channels_last;
  (b) M plain WRN-16-4 networks (ordinary nn.Conv2d/BatchNorm2d modules) run in a loop;
  (c) one plain WRN-16-4;
  (d) torch.func.stack_module_state + vmap over the M plain networks;
  (e) the ensemble with unfactorised per-member weights (groups=none), both layouts.
It prints median step times, the ratios a/b, a/(M*c), a/d, a/e, and the achieved
GFLOP/s (conv/linear FLOPs counted from the plan, fwd+bwd = 3 x fwd) next to a
float32 matmul measured in the same run. The loss is the sum of the members'
cross-entropies, as in training.

The allocator matters on CPU (docs/execution.md): glibc returns every block over
32 MB to the OS and faults it back next step. ``--tune-malloc`` applies the fix
at run time (mallopt: no mmap'd blocks, no trimming) so the two allocators'
effect can be compared without restarting under LD_PRELOAD.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from math import prod
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mixc  # noqa: E402
from mixc.backends.torch import build  # noqa: E402
from mixc.compiler.plan import Plan  # noqa: E402

# ---------------------------------------------------------------------------
# Allocator


def allocator() -> tuple[str, list[str]]:
    """Which malloc serves this process, and warnings about it."""
    preload = os.environ.get("LD_PRELOAD", "")
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    for lib in ("tcmalloc", "jemalloc", "mimalloc"):
        if lib in preload or f"lib{lib}" in maps:
            return lib, []
    tuned = {
        k: os.environ[k] for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"
    }
    if tuned:
        return f"glibc ({', '.join(f'{k}={v}' for k, v in sorted(tuned.items()))})", []
    return "glibc (defaults)", [
        "glibc's defaults return every block over 32 MB to the OS when it is freed and fault it"
        " back in on the next step; the grouped layout's activations cross that size. Use tcmalloc"
        " (LD_PRELOAD=libtcmalloc.so), set MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large> before"
        " starting, or pass --tune-malloc."
    ]


def tune_glibc_malloc() -> bool:
    """mallopt(M_MMAP_MAX, 0) and a huge M_TRIM_THRESHOLD: freed big blocks stay in the heap."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


# ---------------------------------------------------------------------------
# A plain network, written the way a user would (standard modules), from a members=1 plan


ACTS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


class PlainNet(nn.Module):
    """One plain backbone with ordinary nn modules, interpreting the plan's op graph."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.ops = [op for op in plan.ops]
        self.output = plan.output
        self.layers = nn.ModuleDict()
        for op in self.ops:
            key = op.name.replace(".", "_")
            if op.kind == "conv":
                conv = nn.Conv2d if op.dim == 2 else nn.Conv1d
                self.layers[key] = conv(
                    op.in_channels,
                    op.out_channels,
                    op.kernel,
                    op.stride,
                    op.padding,
                    op.dilation,
                    op.groups,
                    op.bias,
                )
                nn.init.kaiming_normal_(self.layers[key].weight, nonlinearity="relu")
            elif op.kind == "linear":
                self.layers[key] = nn.Linear(op.in_features, op.out_features, op.bias)
            elif op.kind == "bn":
                bn = nn.BatchNorm2d if len(op.in_shape) == 3 else nn.BatchNorm1d
                self.layers[key] = bn(op.channels, op.eps, op.momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals = {}
        for op in self.ops:
            key = op.name.replace(".", "_")
            a = vals[op.inputs[0]] if op.inputs else x
            if op.kind in ("conv", "linear", "bn"):
                y = self.layers[key](a)
            elif op.kind == "input":
                y = x
            elif op.kind == "act":
                y = F.leaky_relu(a, op.slope) if op.fn == "leaky_relu" else ACTS[op.fn](a)
            elif op.kind == "pool":
                y = getattr(F, f"{op.op}_pool{op.dim}d")(a, op.kernel, op.stride, op.padding)
            elif op.kind == "global_pool":
                dims = tuple(range(2, a.dim()))
                y = a.mean(dims) if op.op == "avg" else a.amax(dims)
            elif op.kind == "flatten":
                y = a.flatten(1)
            elif op.kind == "dropout":
                y = F.dropout(a, op.p, self.training) if op.p else a
            elif op.kind == "add":
                y = vals[op.inputs[0]] + vals[op.inputs[1]]
            else:  # the transformer ops among others: this baseline is a convnet's
                raise ValueError(f"the plain baseline has no op kind {op.kind!r}")
            vals[op.name] = y
        return vals[self.output]


# ---------------------------------------------------------------------------
# FLOPs


def forward_macs(plan: Plan) -> int:
    """Multiply-accumulates of one member's forward pass on one example (conv + linear)."""
    macs = 0
    for op in plan.ops:
        if op.kind == "conv":
            macs += prod(op.out_shape) * (op.in_channels // op.groups) * prod(op.kernel)
        elif op.kind == "linear":
            macs += op.in_features * op.out_features
    return macs


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


# ---------------------------------------------------------------------------
# Timing


def ensemble_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    members = model.members

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(x)  # [B, M, classes]
        loss = F.cross_entropy(
            logits.flatten(0, 1), y.repeat_interleave(members), reduction="sum"
        ) / len(y)
        loss.backward()

    return step


def loop_step(nets: list[nn.Module], x: torch.Tensor, y: torch.Tensor):
    def step():
        for net in nets:
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()

    return step


def vmap_step(nets: list[nn.Module], x: torch.Tensor, y: torch.Tensor):
    from torch.func import functional_call, stack_module_state, vmap

    params, buffers = stack_module_state(nets)
    base = nets[0]

    def run(p, b, x):
        return functional_call(base, (p, b), (x,))

    def step():
        for p in params.values():
            p.grad = None
        logits = vmap(run, in_dims=(0, 0, None))(params, buffers, x)  # [M, B, classes]
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(nets)), reduction="sum") / len(y)
        loss.backward()

    return step


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed steps per config")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: torch's choice)"
    )
    ap.add_argument(
        "--tune-malloc", action="store_true", help="mallopt: keep freed big blocks (glibc)"
    )
    ap.add_argument("--only", default="", help="comma list of configs to run (a,b,c,d,e)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tune_malloc:
        print(f"mallopt tuning applied: {tune_glibc_malloc()}")
    warmup, steps = (1, 3) if args.quick else (3, 7)
    M, B = args.members, args.batch
    name, warnings = allocator()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, allocator: {name}"
        + (" + runtime mallopt" if args.tune_malloc else "")
    )
    for w in warnings if not args.tune_malloc else []:
        print(f"WARNING: {w}")
    only = set(args.only.split(",")) if args.only else set("abcde")

    me_plan = mixc.compile("wrn16_4", overrides=[f"members={M}", "budget=1.0x"])
    naive_plan = mixc.compile("wrn16_4", overrides=[f"members={M}", "groups=none"])
    plain_plan = mixc.compile("wrn16_4", overrides=["members=1", "groups=none"])
    gflop_step = 3 * 2 * forward_macs(plain_plan) * B * M / 1e9  # M backbones, fwd + bwd
    peak = matmul_gflops()
    print(
        f"WRN-16-4, {M} members, batch {B}, 32x32: {gflop_step:.0f} GFLOP per ensemble step; "
        f"float32 matmul {peak:.0f} GFLOP/s; {warmup} warm-up + {steps} timed steps\n"
    )

    torch.manual_seed(0)
    x = torch.randn(B, 3, 32, 32)
    y = torch.randint(0, 10, (B,))
    configs = _configs(only, (me_plan, naive_plan, plain_plan), M, x, y, gflop_step)
    configs, times, cpu = _time_configs(configs, warmup, steps)
    results = {label: statistics.median(ts) for label, ts in times.items()}
    cpu_results = {label: statistics.median(ts) for label, ts in cpu.items()}
    _print_table(configs, times, results, cpu_results, M)
    _print_ratios(results, cpu_results, M)
    a = _best(results, "a ")
    if a:
        print(
            f"\nbest MixtureEnsemble: {a[0]}, {gflop_step / a[1]:.0f} GFLOP/s "
            f"({gflop_step / a[1] / peak:.0%} of the float32 matmul measured in this run)"
        )
    return 0


def _configs(
    only: set[str],
    plans: tuple[Plan, Plan, Plan],
    M: int,
    x: torch.Tensor,
    y: torch.Tensor,
    gflop_step: float,
) -> list[tuple[str, object, float]]:
    """The selected configs as (label, step, GFLOP per step), the label's first letter its kind."""
    me_plan, naive_plan, plain_plan = plans
    xcl = x.contiguous(memory_format=torch.channels_last)
    configs: list[tuple[str, object, float]] = []
    for key, plan in (("a", me_plan), ("e", naive_plan)):
        if key not in only:
            continue
        for layout in ("grouped", "loop"):
            for cl in (False, True):
                model = build(plan, layout=layout, channels_last=cl).train()
                configs.append(
                    (
                        f"{key} {layout}{' channels_last' if cl else ''}",
                        ensemble_step(model, x, y),
                        gflop_step,
                    )
                )
    nets = [PlainNet(plain_plan).train() for _ in range(M)]
    nets_cl = [PlainNet(plain_plan).train().to(memory_format=torch.channels_last) for _ in range(M)]
    if "b" in only:
        configs.append(("b loop", loop_step(nets, x, y), gflop_step))
        configs.append(("b loop channels_last", loop_step(nets_cl, xcl, y), gflop_step))
    if "c" in only:
        configs.append(("c one", loop_step(nets[:1], x, y), gflop_step / M))
        configs.append(("c one channels_last", loop_step(nets_cl[:1], xcl, y), gflop_step / M))
    if "d" in only:
        configs.append(("d vmap", vmap_step(nets, x, y), gflop_step))
    return configs


def _time_configs(
    configs: list[tuple[str, object, float]], warmup: int, steps: int
) -> tuple[list[tuple[str, object, float]], dict[str, list[float]], dict[str, list[float]]]:
    """Warm up each config, then time them round-robin, so that load from other processes on a
    shared machine hits every config alike. A config that fails is reported and left out."""
    times: dict[str, list[float]] = {label: [] for label, _, _ in configs}
    # process CPU time: steadier under load
    cpu: dict[str, list[float]] = {label: [] for label, _, _ in configs}
    for label, step, _ in list(configs):
        try:
            for _ in range(warmup):
                step()
        except Exception as e:  # report, don't hide the other figures
            print(f"  {label} failed: {type(e).__name__}: {e}")
            configs = [c for c in configs if c[0] != label]
            del times[label], cpu[label]
    print(f"warmed up {len(configs)} configs; timing {steps} rounds", flush=True)
    for r in range(steps):
        print(f"  round {r + 1}/{steps}", flush=True)
        for label, step, _ in configs:
            t, c = time.perf_counter(), time.process_time()
            step()
            times[label].append(time.perf_counter() - t)
            cpu[label].append(time.process_time() - c)
    return configs, times, cpu


def _print_table(
    configs: list[tuple[str, object, float]],
    times: dict[str, list[float]],
    results: dict[str, float],
    cpu_results: dict[str, float],
    M: int,
) -> None:
    titles = {
        "a": "(a) MixtureEnsemble, 1.0x budget",
        "e": "(e) ensemble of unfactorised per-member weights (groups=none)",
        "b": f"(b) {M} plain WRN-16-4 (nn modules) in a loop",
        "c": "(c) one plain WRN-16-4",
        "d": f"(d) torch.func stack_module_state + vmap over {M} plain networks",
    }
    for key, title in titles.items():
        rows = [(label, work) for label, _, work in configs if label.startswith(key + " ")]
        if rows:
            print(title)
        for label, work in rows:
            t = results[label]
            spread = f"{min(times[label]) * 1000:.0f}-{max(times[label]) * 1000:.0f}"
            print(
                f"  {label:<28} {t * 1000:8.1f} ms  ({spread})  {work / t:6.1f} GFLOP/s   "
                f"cpu {cpu_results[label]:6.2f} s"
            )


def _best(res: dict[str, float], prefix: str) -> tuple[str, float] | None:
    items = [(k, v) for k, v in res.items() if k.startswith(prefix)]
    return min(items, key=lambda kv: kv[1]) if items else None


def _print_ratios(results: dict[str, float], cpu_results: dict[str, float], M: int) -> None:
    for title, res in (
        ("wall time", results),
        ("process CPU time (less sensitive to other load)", cpu_results),
    ):
        a = _best(res, "a ")
        print(f"\nRatios by {title}, best of each (a is the MixtureEnsemble):")
        for label, other, scale in (
            ("a/b", "b ", 1),
            (f"a/({M}*c)", "c ", M),
            ("a/d", "d ", 1),
            ("a/e", "e ", 1),
        ):
            o = _best(res, other)
            if a and o:
                print(f"  {label:<10} {a[1] / (o[1] * scale):5.3f}   ({a[0]} vs {o[0]})")
        for k in ("grouped", "loop"):
            for fmt in ("", " channels_last"):
                if f"a {k}{fmt}" in res and f"e {k}{fmt}" in res:
                    print(
                        f"  composition cost, {k}{fmt}: a/e ="
                        f" {res[f'a {k}{fmt}'] / res[f'e {k}{fmt}']:.3f}"
                    )


if __name__ == "__main__":
    raise SystemExit(main())
