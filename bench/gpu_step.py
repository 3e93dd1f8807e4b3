"""Benchmark one SGD training step of every ensemble method on the device users train on.

On the GPU (an H100/H200; bf16 autocast and channels_last by default):

    python bench/gpu_step.py --spec wrn28_10 --compile [--json out.json]

On a CPU (the defaults shrink to WRN-16-1 at batch 8 so that CI can run it):

    python bench/gpu_step.py --threads 2

For one zoo spec and member count it builds, side by side in one process: one plain network
(single), the naive deep ensemble, the spec's own method (the mixture), BatchEnsemble (grouped
and loop layouts each), MIMO and Packed-Ensembles (alpha 2, gamma 1), plus the real
``TorchTrainer`` step of the mixture at its best layout. Each step is forward, the sum of the
members' cross-entropies on logits [B, M, classes], backward and SGD (lr 0.1, momentum 0.9,
Nesterov) on synthetic data made on the device; the steps are timed round-robin, so load hits
every row alike. Per row it reports the median step (min-max), nominal TFLOP/s (6 x MACs x
images / time, MACs from the plan; MIMO counts the rows it actually runs, batch x repetitions),
memory and an eval-mode forward; then the ratios between rows and, on CUDA, the share of a dense
matmul's rate measured in the same run.

Memory: on CUDA the step's peak (torch.cuda.max_memory_allocated over what was allocated when it
began, plus the row's own parameters, buffers, optimiser state and inputs); on the CPU the bytes
autograd saves for backward (distinct storages, parameters excluded) plus parameters and
gradients; under flax XLA's memory analysis of the compiled step (arguments + outputs +
temporaries). The output names the measure used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mixc  # noqa: E402
from mixc.compiler.methods import method_of  # noqa: E402
from mixc.compiler.plan import Plan  # noqa: E402
from mixc.core.flops import ensemble_macs  # noqa: E402

GIB = 2**30

#: the variants: key -> (title prefix, the overrides that select it; None: the plain network)
VARIANTS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "single": ("one plain network", None),
    "naive": ("naive ensemble", ("method=naive",)),
    "mixture": ("spec's method", ()),
    "batch_ensemble": ("BatchEnsemble", ("method=batch_ensemble",)),
    "mimo": ("MIMO", ("method=mimo",)),
    "packed": ("Packed-Ensembles a2 g1", ("method=packed(alpha = 2, gamma = 1)",)),
}
#: the rows: key -> (variant, layout); single-path methods run one network ("auto" layout)
ROWS: dict[str, tuple[str, str]] = {
    "single": ("single", "loop"),
    "naive_loop": ("naive", "loop"),
    "naive_grouped": ("naive", "grouped"),
    "mixture_loop": ("mixture", "loop"),
    "mixture_grouped": ("mixture", "grouped"),
    "batch_ensemble_loop": ("batch_ensemble", "loop"),
    "batch_ensemble_grouped": ("batch_ensemble", "grouped"),
    "mimo": ("mimo", "auto"),
    "packed": ("packed", "auto"),
}
TRAINER = "trainer"


@dataclass
class Row:
    """One timed configuration: its plan, its step and what the report says of it."""

    key: str
    title: str
    layout: str
    plan: Plan
    overrides: list[str]
    images: int  # input rows a step runs (MIMO: batch x repetitions)
    step: Callable[[], Any] = lambda: None
    eval_step: Callable[[], Any] | None = None
    memory: Callable[[], float] | None = None  # bytes, measured once after warm-up
    compile_s: float | None = None
    times: list[float] = field(default_factory=list)
    memory_bytes: float | None = None
    eval_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one input row through every member (the plan's count)."""
        return ensemble_macs(self.plan)


# ---------------------------------------------------------------------------
# Options


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default=None, help="zoo name or .mix path (CUDA: wrn28_10)")
    ap.add_argument("--set", action="append", default=[], help="extra spec override key=value")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--batch", type=int, default=None, help="per member (CUDA 128, CPU 8)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default=None)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd steps")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed rounds (CUDA 30, CPU 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (CUDA 5, CPU 1)")
    ap.add_argument("--eval-batch", type=int, default=None, help="CUDA 512, CPU 16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--backend", choices=("torch", "flax"), default="torch")
    ap.add_argument("--only", default="", help=f"comma list of rows or variants: {_row_names()}")
    ap.add_argument("--json", default=None, help="write the figures here")
    return ap.parse_args(argv)


def _row_names() -> str:
    return ", ".join([*ROWS, TRAINER])


@dataclass
class Setup:
    """The options resolved for the device."""

    device: str
    spec: str
    base: list[str]  # overrides every row takes
    members: int
    batch: int
    precision: str
    channels_last: bool
    compile: bool
    steps: int
    warmup: int
    eval_batch: int
    backend: str
    only: set[str]


def resolve(args: argparse.Namespace, cuda_available: bool) -> Setup:
    """Full size on CUDA, tiny on the CPU (WRN-16-1, batch 8) unless told otherwise."""
    device = ("cuda" if cuda_available else "cpu") if args.device == "auto" else args.device
    gpu = device == "cuda"
    spec = args.spec or ("wrn28_10" if gpu else "wrn16_4")
    base = [f"members={args.members}", f"backbone.classes={args.classes}"]
    if args.spec is None and not gpu:
        base.append("backbone.k=1")
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    return Setup(
        device=device,
        spec=spec,
        base=base + list(args.set),
        members=args.members,
        batch=args.batch or (128 if gpu else 8),
        precision=args.precision or ("bf16" if gpu else "fp32"),
        channels_last=gpu if args.channels_last is None else args.channels_last,
        compile=args.compile,
        steps=args.steps or (30 if gpu else 3),
        warmup=args.warmup or (5 if gpu else 1),
        eval_batch=args.eval_batch or (512 if gpu else 16),
        backend=args.backend,
        only=only or {*ROWS, TRAINER},
    )


def selected(setup: Setup) -> list[str]:
    """The row keys asked for (by row key or by variant), in table order."""
    return [k for k, (variant, _) in ROWS.items() if k in setup.only or variant in setup.only]


def row_overrides(setup: Setup, variant: str, default: Plan) -> list[str]:
    """The spec overrides of one variant: the plain network is the spec's method's own recipe for
    it (``plain_backbone_override``) at one member."""
    extra = VARIANTS[variant][1]
    if extra is None:
        return [*setup.base, *method_of(default).plain_backbone_override, "members=1"]
    return [*setup.base, *extra]


def row_plans(setup: Setup) -> dict[str, tuple[Plan, list[str]]]:
    """Each selected row's plan and the overrides that made it."""
    default = mixc.compile(setup.spec, setup.base)
    out: dict[str, tuple[Plan, list[str]]] = {}
    for key in selected(setup):
        overrides = row_overrides(setup, ROWS[key][0], default)
        out[key] = (mixc.compile(setup.spec, overrides), overrides)
    return out


def row_title(key: str, plan: Plan) -> str:
    variant = ROWS[key][0]
    title = VARIANTS[variant][0]
    return method_of(plan).title if VARIANTS[variant][1] == () else title


def rows_per_step(plan: Plan, batch: int) -> int:
    """Input rows one training step runs: MIMO repeats the batch (``batch_repetitions``)."""
    return batch * (plan.method.batch_repetitions if method_of(plan).stacks_inputs else 1)


# ---------------------------------------------------------------------------
# Timing (shared by both backends)


def time_rounds(rows: list[Row], steps: int, clock: Clock) -> None:
    """Every row's step once per round, round-robin, so other load hits every row alike."""
    for r in range(steps):
        print(f"  round {r + 1}/{steps}", flush=True)
        marks = [(row, clock.around(row.step)) for row in rows]
        clock.settle()
        for row, mark in marks:
            row.times.append(mark())


class Clock:
    """Wall time around a call, in seconds: perf_counter (blocking steps)."""

    def around(self, fn: Callable[[], Any]) -> Callable[[], float]:
        t = time.perf_counter()
        out = fn()
        self.block(out)
        dt = time.perf_counter() - t
        return lambda: dt

    def block(self, out: Any) -> None:
        """Wait for ``out`` (jax: block_until_ready)."""

    def settle(self) -> None:
        """Make the marks of this round readable (CUDA: synchronize)."""

    def median_ms(self, fn: Callable[[], Any], reps: int) -> float:
        fn()
        marks = [self.around(fn) for _ in range(reps)]
        self.settle()
        return statistics.median(m() for m in marks) * 1000


class CudaClock(Clock):
    """CUDA events around each call: the GPU's time, no host sync inside a round."""

    def around(self, fn: Callable[[], Any]) -> Callable[[], float]:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        return lambda: start.elapsed_time(end) / 1000

    def settle(self) -> None:
        import torch

        torch.cuda.synchronize()


class JaxClock(Clock):
    def block(self, out: Any) -> None:
        import jax

        jax.block_until_ready(out)


def warm_up(rows: list[Row], warmup: int, clock: Clock) -> list[Row]:
    """Warm each row up (the first step of a compiled one is its compile time) and measure its
    memory; a row that fails is reported and left out, the others still run."""
    kept = []
    for row in rows:
        try:
            t = time.perf_counter()
            clock.block(row.step())
            clock.settle()
            if row.compile_s is not None:
                row.compile_s += time.perf_counter() - t
            for _ in range(warmup - 1):
                clock.block(row.step())
            clock.settle()
            row.memory_bytes = row.memory() if row.memory else None
            kept.append(row)
        except Exception as e:  # report, don't hide the other rows' figures
            print(f"  {row.key} failed: {type(e).__name__}: {e}", flush=True)
    return kept


def time_evals(rows: list[Row], reps: int, clock: Clock) -> None:
    for row in rows:
        if row.eval_step is not None:
            row.eval_ms = clock.median_ms(row.eval_step, reps)


# ---------------------------------------------------------------------------
# Torch


def torch_amp(precision: str):
    import torch

    return torch.bfloat16 if precision == "bf16" else None


def torch_data(plan: Plan, batch: int, dev, channels_last: bool):
    """Synthetic inputs and per-member labels on the device: [rows, *input] and [rows, M], or
    MIMO's [rows, M, *input] (each member its own images and labels)."""
    import torch

    n, M = rows_per_step(plan, batch), plan.members
    stacked = method_of(plan).stacks_inputs
    shape = (n, M, *plan.input_shape) if stacked else (n, *plan.input_shape)
    x = torch.randn(shape, device=dev)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, plan.classes, (n, M) if stacked else (n,), device=dev)
    return x, (y if stacked else y[:, None].expand(n, M))


def torch_loss(logits, y):
    """The sum over members of each member's mean cross-entropy (``TorchTrainer._step``'s)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum") / len(y)


def torch_step(net, opt, x, y, dev, amp) -> Callable[[], Any]:
    import torch

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = net(x)
        loss = torch_loss(logits, y)
        loss.backward()
        opt.step()
        return loss

    return step


def torch_eval(model, x, dev, amp) -> Callable[[], Any]:
    import torch

    def run():
        model.eval()
        with (
            torch.inference_mode(),
            torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None),
        ):
            out = model(x)
        model.train()
        return out

    return run


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages among ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def cpu_memory(step: Callable[[], Any], params: list) -> Callable[[], float]:
    """Bytes autograd saves for backward during one step (distinct storages, the parameters'
    own excluded) plus the parameters and their gradients."""
    import torch

    def measure() -> float:
        own = {p.untyped_storage().data_ptr() for p in params}
        saved: dict[int, int] = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in own:
                saved[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
        return sum(saved.values()) + tensor_bytes(params) + tensor_bytes(p.grad for p in params)

    return measure


def cuda_memory(step: Callable[[], Any], opt, resident: Callable[[], int]) -> Callable[[], float]:
    """The step's peak over what was allocated when it began (other rows' models included there,
    this row's gradients already freed), plus the row's own resident bytes (parameters, buffers,
    optimiser state, inputs)."""
    import torch

    def measure() -> float:
        opt.zero_grad(set_to_none=True)  # the step allocates its gradients anew: count them once
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base + resident()

    return measure


def resident_bytes(model, opt, *inputs) -> Callable[[], int]:
    """Parameters, buffers, optimiser state and inputs of one row (gradients are freed at the
    step's start: ``zero_grad(set_to_none=True)``, so they count in the peak)."""

    def count() -> int:
        state = [v for s in opt.state.values() for v in s.values() if hasattr(v, "untyped_storage")]
        return tensor_bytes([*model.parameters(), *model.buffers(), *state, *inputs])

    return count


def memory_probe(dev, step, model, opt, x, y) -> Callable[[], float]:
    if dev.type == "cuda":
        return cuda_memory(step, opt, resident_bytes(model, opt, x, y))
    return cpu_memory(step, [p for p in model.parameters() if p.requires_grad])


def torch_rows(setup: Setup, plans: dict[str, tuple[Plan, list[str]]], dev) -> list[Row]:
    """Every selected row as a torch step (and its torch.compile'd twin with ``--compile``)."""
    import torch

    from mixc.backends.torch import build

    amp = torch_amp(setup.precision)
    rows = []
    for key, (plan, overrides) in plans.items():
        torch.manual_seed(0)
        layout = ROWS[key][1]
        model = build(plan, layout=layout, device=dev, channels_last=setup.channels_last).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        x, y = torch_data(plan, setup.batch, dev, setup.channels_last)
        xe = torch.randn(setup.eval_batch, *plan.input_shape, device=dev)
        step = torch_step(model, opt, x, y, dev, amp)
        row = Row(key, row_title(key, plan), layout, plan, overrides, len(x), step)
        row.eval_step = torch_eval(model, xe, dev, amp)
        row.memory = memory_probe(dev, step, model, opt, x, y)
        rows.append(row)
        if setup.compile:
            rows.append(compiled_row(row, model, opt, x, y, dev, amp))
    return rows


def compiled_row(row: Row, model, opt, x, y, dev, amp) -> Row:
    """The same model and optimiser through torch.compile; its first step is the compile time."""
    import torch

    step = torch_step(torch.compile(model), opt, x, y, dev, amp)
    twin = Row(f"{row.key}+compile", f"{row.title} (compiled)", row.layout, row.plan, row.overrides,
               row.images, step, compile_s=0.0)  # fmt: skip
    # saved-tensor hooks do not see inside a compiled graph: CPU memory is left out
    twin.memory = (
        cuda_memory(step, opt, resident_bytes(model, opt, x, y)) if dev.type == "cuda" else None
    )
    return twin


def trainer_row(setup: Setup, best: Row, dev) -> tuple[Row, Row]:
    """``TorchTrainer``'s real step for the mixture at the best layout, and a fresh bare step of
    the same plan and layout to time it against (interleaved)."""
    import numpy as np

    from mixc.backends.torch.train import TorchTrainer
    from mixc.core.layout_choice import LayoutChoice
    from mixc.spec.recipe import Recipe

    plan = best.plan
    recipe = Recipe.model_validate(
        {**(plan.train or {}), "precision": setup.precision, "batch": setup.batch}
    )
    trainer = TorchTrainer(plan, recipe, device=str(dev), layout=best.layout, augment="none")
    # the bare rows' layout and memory format, not timed again: the ratio is the trainer's overhead
    trainer.layout_choice = LayoutChoice(
        layout=best.layout, channels_last=setup.channels_last, how="forced"
    )
    rng = np.random.default_rng(0)
    n = 4 * setup.batch
    x = rng.standard_normal((n, *plan.input_shape)).astype(np.float32)
    trainer.begin(x, rng.integers(0, plan.classes, n).astype(np.int64), setup.batch)
    trainer.begin_epoch(1, 2)
    counter = iter(range(10**9))

    def step():
        i = next(counter)
        idx = (np.arange(setup.batch) + i * setup.batch) % n
        return trainer.step(idx, 0.1, i)

    row = Row(TRAINER, f"TorchTrainer ({best.title})", best.layout, plan, best.overrides,
              setup.batch, step)  # fmt: skip
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    row.memory = (
        cuda_memory(step, trainer.opt, resident_bytes(model, trainer.opt, trainer.x_train))
        if dev.type == "cuda"
        else cpu_memory(step, params)
    )
    bare = torch_rows(
        Setup(**{**setup.__dict__, "compile": False}), {best.key: (plan, best.overrides)}, dev
    )[0]
    bare.key = f"{best.key} (bare, beside the trainer)"
    return row, bare


def torch_matmul_tflops(dev, precision: str, clock: Clock) -> tuple[float, str]:
    """A big dense matmul in the run's precision: the device's practical peak."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 8192 if dev.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    ms = clock.median_ms(lambda: a @ b, 10 if dev.type == "cuda" else 5)
    return 2 * n**3 / (ms / 1000) / 1e12, f"{str(dtype).split('.')[-1]} {n}x{n}"


def run_torch(setup: Setup, threads: int) -> dict[str, Any]:
    import torch

    dev = torch.device(setup.device)
    clock = CudaClock() if dev.type == "cuda" else Clock()
    rows = warm_up(torch_rows(setup, row_plans(setup), dev), setup.warmup, clock)
    print(f"warmed up {len(rows)} rows; timing {setup.steps} rounds", flush=True)
    time_rounds(rows, setup.steps, clock)
    time_evals(rows, 10 if dev.type == "cuda" else 3, clock)
    best = best_of(rows, "mixture")
    trainer = None
    if best is not None and TRAINER in setup.only:
        pair = warm_up(list(trainer_row(setup, best, dev)), setup.warmup, clock)
        time_rounds(pair, setup.steps, clock)
        trainer = pair
    peak, what = torch_matmul_tflops(dev, setup.precision, clock)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    return report_data(
        setup,
        rows,
        trainer,
        meta={
            "device": name,
            "framework": f"torch {torch.__version__}",
            "threads": threads,
            "memory_measure": MEMORY_MEASURES[dev.type],
            "matmul": what,
            "matmul_tflops": peak,
        },
    )


MEMORY_MEASURES = {
    "cuda": "CUDA step peak (max_memory_allocated over the step's start) + the row's resident"
    " params/buffers/optimiser state/inputs",
    "cpu": "bytes saved for backward (saved_tensors_hooks, distinct storages) + params + grads",
    "xla": "XLA memory_analysis of the compiled step: arguments + outputs + temporaries",
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


# ---------------------------------------------------------------------------
# Flax


def flax_step(plan: Plan, layout: str, precision: str, platform: str):
    """(jit-able step, its donated state): forward at ``precision`` (fp32 masters), the members'
    summed cross-entropy, gradients, optax SGD with Nesterov momentum."""
    import jax
    import jax.numpy as jnp
    import optax

    from mixc.backends.flax import build, split
    from mixc.backends.flax.model import apply, compute_graphdef

    graphdef, params, stats = split(build(plan, layout=layout, platform=platform))
    compute = jnp.bfloat16 if precision == "bf16" else None
    fdef = graphdef if compute is None else compute_graphdef(plan, layout, compute, platform)
    tx = optax.sgd(0.1, momentum=0.9, nesterov=True)

    def loss_fn(p, s, x, y):
        if compute is not None:
            p, x = jax.tree.map(lambda a: a.astype(compute), p), x.astype(compute)
        logits, new = apply(fdef, p, s, x, True)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)  # [B, M, classes]
        return -jnp.take_along_axis(logp, y[..., None], -1).mean(0).sum(), new

    def step(p, s, o, x, y):
        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, s, x, y)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), new, o, loss

    def predict(p, s, x):
        if compute is not None:
            p, x = jax.tree.map(lambda a: a.astype(compute), p), x.astype(compute)
        return apply(fdef, p, s, x, False)[0]

    return step, predict, (params, stats, tx.init(params))


def flax_row(key: str, plan: Plan, overrides: list[str], setup: Setup, platform: str) -> Row:
    import jax
    import jax.numpy as jnp
    import numpy as np

    layout = ROWS[key][1]
    step, predict, state = flax_step(plan, layout, setup.precision, platform)
    rng = np.random.default_rng(0)
    n, M = rows_per_step(plan, setup.batch), plan.members
    stacked = method_of(plan).stacks_inputs
    x = jnp.asarray(rng.standard_normal((n, *([M] if stacked else []), *plan.input_shape)), "f4")
    y = jnp.asarray(rng.integers(0, plan.classes, (n, M)), jnp.int32)
    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*state, x, y).compile()
    compile_s = time.perf_counter() - t
    held = list(state)

    def run():
        out = compiled(*held, x, y)
        held[:] = out[:3]
        return out[3]

    xe = jnp.asarray(rng.standard_normal((setup.eval_batch, *plan.input_shape)), "f4")
    pred = jax.jit(predict)
    row = Row(key, row_title(key, plan), layout, plan, overrides, n, run)
    row.eval_step = lambda: pred(held[0], held[1], xe)
    row.memory = lambda: float(xla_bytes(compiled))
    row.extra["jit_s"] = compile_s
    return row


def xla_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def run_flax(setup: Setup, threads: int) -> dict[str, Any]:
    import jax

    dev = jax.devices()[0]
    platform = dev.platform
    rows = []
    for key, (plan, overrides) in row_plans(setup).items():
        print(f"  jit {key}", flush=True)
        rows.append(flax_row(key, plan, overrides, setup, platform))
    clock = JaxClock()
    rows = warm_up(rows, setup.warmup, clock)
    time_rounds(rows, setup.steps, clock)
    time_evals(rows, 3 if platform == "cpu" else 10, clock)
    peak, what = jax_matmul_tflops(setup.precision, platform, clock)
    return report_data(
        setup,
        rows,
        None,
        meta={
            "device": f"{platform} ({dev.device_kind})",
            "framework": f"jax {jax.__version__}",
            "threads": f"XLA {xla_threads()}, torch {threads}",
            "memory_measure": MEMORY_MEASURES["xla"],
            "matmul": what,
            "matmul_tflops": peak,
        },
    )


def xla_threads() -> int:
    """XLA's CPU pool: one thread per core of the process's affinity."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def jax_matmul_tflops(precision: str, platform: str, clock: Clock) -> tuple[float, str]:
    import jax
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    n = 1024 if platform == "cpu" else 8192
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda a: a @ a)
    ms = clock.median_ms(lambda: mm(a), 5 if platform == "cpu" else 10)
    return 2 * n**3 / (ms / 1000) / 1e12, f"{jnp.dtype(dtype).name} {n}x{n}"


# ---------------------------------------------------------------------------
# Figures, ratios and the table


def best_of(rows: list[Row], variant: str) -> Row | None:
    """The fastest eager row of ``variant`` (by median step)."""
    mine = [r for r in rows if r.key in ROWS and ROWS[r.key][0] == variant]
    return min(mine, key=lambda r: statistics.median(r.times), default=None)


def sequence_length(plan: Plan) -> int | None:
    """Tokens per image of a transformer (the longest sequence: with the class token), else
    None."""
    lengths = [op.out_shape[1] for op in plan.ops if op.kind in ("tokens", "cls_token")]
    return max(lengths, default=None)


def row_figures(row: Row) -> dict[str, Any]:
    ms = statistics.median(row.times) * 1000
    tokens = sequence_length(row.plan)
    return {
        "title": row.title,
        "layout": row.layout,
        "method": row.plan.method.name,
        "members": row.plan.members,
        "overrides": row.overrides,
        "macs_per_image": row.macs,
        "images": row.images,
        "step_ms": ms,
        "step_ms_min": min(row.times) * 1000,
        "step_ms_max": max(row.times) * 1000,
        "tflops": 6 * row.macs * row.images / (ms / 1000) / 1e12,
        "images_per_s": row.images / (ms / 1000),
        "tokens_per_s": None if tokens is None else row.images * tokens / (ms / 1000),
        "memory_gib": None if row.memory_bytes is None else row.memory_bytes / GIB,
        "eval_ms": row.eval_ms,
        "compile_s": row.compile_s if row.compile_s is not None else row.extra.get("jit_s"),
    }


def quotient(a: float | None, b: float | None, scale: float = 1) -> float | None:
    return None if a is None or b is None else a / (b * scale)


def ratios(figs: dict[str, dict[str, Any]], members: int, meta: dict[str, Any]) -> dict:
    """Every ratio the report prints, from the rows of this run (None where a row is missing)."""

    def ms(key):
        return figs.get(key, {}).get("step_ms") if key else None

    def mem(key):
        return figs.get(key, {}).get("memory_gib") if key else None

    def best(variant):
        keys = [k for k, (v, _) in ROWS.items() if v == variant and k in figs]
        return min(keys, key=ms, default=None)

    mix, be = best("mixture"), best("batch_ensemble")
    out: dict[str, Any] = {
        "best_mixture": mix,
        "mixture_best_over_members_x_single": quotient(ms(mix), ms("single"), members),
        "mixture_best_over_naive_loop": quotient(ms(mix), ms("naive_loop")),
        "batch_ensemble_over_naive_loop": quotient(ms(be), ms("naive_loop")),
        "batch_ensemble_over_naive_loop_memory": quotient(mem(be), mem("naive_loop")),
        "packed_over_single": quotient(ms("packed"), ms("single")),
    }
    for variant in ("naive", "mixture", "batch_ensemble"):
        out[f"{variant}_grouped_over_loop"] = quotient(
            ms(f"{variant}_grouped"), ms(f"{variant}_loop")
        )
    for key in figs:
        if key.endswith("+compile"):
            out[f"{key}_over_eager"] = quotient(ms(key), ms(key[: -len("+compile")]))
    if mix is not None:
        out["mixture_best_share_of_matmul"] = figs[mix]["tflops"] / meta["matmul_tflops"]
    return {k: v for k, v in out.items() if v is not None}


def report_data(
    setup: Setup, rows: list[Row], trainer: list[Row] | None, meta: dict[str, Any]
) -> dict[str, Any]:
    figs = {r.key: row_figures(r) for r in rows}
    meta = {
        **meta,
        "backend": setup.backend,
        "spec": setup.spec,
        "overrides": setup.base,
        "members": setup.members,
        "batch_per_member": setup.batch,
        "precision": setup.precision,
        "channels_last": setup.channels_last,
        "steps": setup.steps,
        "warmup": setup.warmup,
        "eval_batch": setup.eval_batch,
    }
    out = {"meta": meta, "rows": figs, "ratios": ratios(figs, setup.members, meta)}
    if trainer and len(trainer) == 2:
        t, bare = (row_figures(r) for r in trainer)
        t["bare_step_ms"] = bare["step_ms"]
        figs[TRAINER] = t
        out["ratios"]["trainer_over_bare"] = t["step_ms"] / bare["step_ms"]
    return out


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, spec)


def print_report(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    m = res["meta"]
    console = Console(width=140)
    console.print(
        f"{m['device']}; {m['framework']}; threads {m['threads']}; {m['precision']}; "
        f"channels_last {m['channels_last']}; {m['spec']} {' '.join(m['overrides'])}; "
        f"batch {m['batch_per_member']} per member; {m['warmup']} warm-up + {m['steps']} rounds"
    )
    mem = "memory GiB" if m["backend"] == "flax" or "CUDA" in m["memory_measure"] else "mem* GiB"
    table = Table("row", "method", "layout", "step ms (min-max)", "img/s", "tokens/s", "TFLOP/s",
                  mem, f"eval ms @{m['eval_batch']}", "compile s")  # fmt: skip
    for key, f in res["rows"].items():
        table.add_row(
            key,
            f["title"],
            f["layout"],
            f"{f['step_ms']:.1f} ({f['step_ms_min']:.1f}-{f['step_ms_max']:.1f})",
            fmt(f["images_per_s"], ",.0f"),
            fmt(f["tokens_per_s"], ",.0f"),
            fmt(f["tflops"], ".3f"),
            fmt(f["memory_gib"], ".3f"),
            fmt(f["eval_ms"], ".1f"),
            fmt(f["compile_s"], ".1f"),
        )
    console.print(table)
    console.print(f"memory: {m['memory_measure']}")
    console.print(f"matmul ({m['matmul']}): {m['matmul_tflops']:.3f} TFLOP/s")
    for k, v in res["ratios"].items():
        console.print(f"  {k:<44} {v if isinstance(v, str) else format(v, '.3f')}")
    if TRAINER in res["rows"]:
        console.print(
            "  (the trainer runs the bare rows' layout and memory format, and adds its batch"
            " gather, weight decay and gradient scales)"
        )


# ---------------------------------------------------------------------------


def use_cores(n: int) -> None:
    """XLA sizes its CPU pool from the affinity when jax starts (bench/flax_step.py)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[-n:])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        if args.backend == "flax":
            use_cores(args.threads)
    cuda = torch.cuda.is_available()
    if args.backend == "flax":
        import jax

        cuda = jax.devices()[0].platform == "gpu"
    setup = resolve(args, cuda)
    threads = torch.get_num_threads()
    print(f"{setup.backend} on {setup.device}, {threads} torch threads", flush=True)
    res = (run_flax if setup.backend == "flax" else run_torch)(setup, threads)
    print_report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
