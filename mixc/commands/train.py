"""`mixc train FILE`: compile a spec, train its ensemble (or a baseline), print a summary.

Exit codes: 0 done; 1 a spec, recipe, backend or run-folder problem; 2 a data
problem (bad --data path, arrays that do not fit the spec); 130 interrupted
(the last finished epoch is checkpointed: the same command resumes it).

Memory allocator: glibc returns every freed block over 32 MB to the OS and
faults it back in on the next step, which costs the grouped layout 20-30%
(docs/execution.md). Unless tcmalloc/jemalloc is preloaded or the user set the glibc
malloc variables, the command raises glibc's mmap and trim thresholds to 1 GiB
in-process with ``mallopt`` before any tensor exists: the same effect as
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` without a re-exec (checked
here: a loop of 64 MB tensors went from 655k minor page faults to 0). If that
fails it prints a one-line hint. ``MIXC_MALLOC=off`` leaves malloc alone.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mixc.commands import add_backend_argument, add_threads_argument
from mixc.compiler.methods import get_method
from mixc.compiler.plan import first_problem
from mixc.core.errors import TrainError
from mixc.core.run_models import NAIVE, SINGLE
from mixc.spec.sections import DEFAULT_METHOD

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `mixc train`."""
    _add_data_arguments(parser)
    _add_recipe_arguments(parser)
    _add_run_arguments(parser)
    _add_backend_arguments(parser)
    _add_validation_arguments(parser)
    _add_numerics_arguments(parser)
    _add_logging_arguments(parser)
    _add_streaming_arguments(parser)
    _add_behaviour_arguments(parser)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The spec and the data it trains on."""
    parser.add_argument("file", help="a .mix spec, or the name of one in the zoo (e.g. digits)")
    parser.add_argument(
        "--data",
        help=(
            "digits, cifar10, cifar100, or a .npz with x_train/y_train/x_test/y_test "
            "(default: the spec's train section)"
        ),
    )
    parser.add_argument(
        "--data-dir", help="folder holding the cifar archives (default: the spec's, else ./data)"
    )


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """Overrides of the spec's recipe, and the device it runs on."""
    parser.add_argument("--epochs", type=int, help="override the spec's epochs")
    parser.add_argument(
        "--batch-size", type=int, help="override the spec's batch (the global batch under torchrun)"
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device: cpu, cuda, cuda:1 (default cpu)"
    )
    parser.add_argument("--seed", type=int, help="override the spec's seed")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The run folder, how members run, baselines and --set overrides."""
    parser.add_argument(
        "--out",
        help=(
            "run folder (default runs/<spec name>, with -single/-naive for baselines); "
            "a folder holding a checkpoint is resumed"
        ),
    )
    parser.add_argument(
        "--layout",
        choices=["auto", "grouped", "loop"],
        default="auto",
        help="how members run: side by side on the channel axis, or one after another",
    )
    parser.add_argument(
        "--baseline",
        choices=["single", "naive"],
        help="train one plain backbone (single) or M independent ones (naive) instead",
    )
    parser.add_argument(
        "--init-from",
        metavar="FILE",
        help="start a new run from one network's weights (mixc import --weights FILE): copied"
        " into every member, banked layers fitted by least squares (docs/importing.md)",
    )
    parser.add_argument(
        "--init-exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="layers (globs, e.g. fc) that keep their fresh initialisation under --init-from",
    )
    parser.add_argument(
        "--init-noise",
        type=float,
        default=0.0,
        metavar="F",
        help="under --init-from, multiply each member's own weights and alphas by 1 + F*N(0,1)"
        " so that members starting from one network can part (default 0)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "override a spec setting, e.g. --set members=2 --set train.optimizer.lr=0.05"
            " (repeatable)"
        ),
    )


def _add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """The backend and its threads."""
    add_backend_argument(
        parser,
        "train with (torch: DDP under torchrun; flax: data parallel over every local "
        "device of --device)",
    )
    add_threads_argument(parser)


def _add_validation_arguments(parser: argparse.ArgumentParser) -> None:
    """The validation split, the metric that picks the best checkpoint, and how many to keep."""
    parser.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help=(
            "hold out this share of the training set (seeded by --seed) for validation: per-epoch "
            "val metrics, best.safetensors; the test set is then scored after the last epoch"
        ),
    )
    parser.add_argument(
        "--best-metric",
        choices=["nll", "accuracy", "ece"],
        default="nll",
        help="the validation metric that picks best.safetensors (default nll)",
    )
    parser.add_argument(
        "--keep",
        type=int,
        default=1,
        metavar="K",
        help=(
            "keep the last K epochs' checkpoints as epoch-NNNN.safetensors (default 1: only "
            "checkpoint.safetensors, the last)"
        ),
    )


def _add_numerics_arguments(parser: argparse.ArgumentParser) -> None:
    """Arithmetic precision, gradient clipping and compilation."""
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        help=(
            "forward-pass arithmetic (default: the spec's, fp32): bf16, or fp16 with dynamic loss "
            "scaling; float32 master weights (torch: autocast; flax: a dtype policy)"
        ),
    )
    parser.add_argument(
        "--grad-clip",
        type=float,
        metavar="NORM",
        help="clip the global gradient norm before each step",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help=(
            "torch.compile the model (worth it on GPU for long runs; flax refuses: it always jits)"
        ),
    )


def _add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    """What is logged and plotted besides metrics.jsonl."""
    parser.add_argument(
        "--logger",
        choices=["none", "csv", "tensorboard"],
        default="none",
        help=(
            "also log each epoch to metrics.csv (csv) or TensorBoard event files in"
            " <out>/tensorboard (tensorboard; pip install 'mixc[log]'); metrics.jsonl is always"
            " written"
        ),
    )
    parser.add_argument(
        "--no-curves",
        action="store_true",
        help="skip curves.png/.pdf (written when matplotlib is installed)",
    )


def _add_streaming_arguments(parser: argparse.ArgumentParser) -> None:
    """Streaming an image folder from disk."""
    parser.add_argument(
        "--stream",
        action="store_true",
        help=(
            "read an image folder from disk batch by batch (DataLoader workers under torch) instead"
            " of decoding it into memory; automatic above MIXC_IMAGE_MEMORY bytes (4 GiB)"
        ),
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="loader processes for a streamed image folder (default min(4, threads))",
    )


def _add_behaviour_arguments(parser: argparse.ArgumentParser) -> None:
    """Test scoring, progress display and resuming with a changed recipe."""
    parser.add_argument(
        "--eval-test-every-epoch",
        action="store_true",
        help=(
            "with a validation set, score the test set after every epoch too (default: the last"
            " only)"
        ),
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="plain lines instead of a progress bar"
    )
    parser.add_argument(
        "--allow-recipe-change",
        action="store_true",
        help=(
            "resume a run with a recipe (learning rate, batch, schedule, data...) other than the"
            " one it was trained with; the change is recorded in its config.json history"
        ),
    )


def baseline_overrides(baseline: str | None, method: str = DEFAULT_METHOD) -> list[str]:
    """The compile overrides that turn an ensemble spec (whose method is ``method``) into its
    baseline: ``groups=none`` for a mixture (its grouping line may stay), ``method=naive`` for
    the other methods (grouping does not apply to them)."""
    plain = list(get_method(method).plain_backbone_override)
    return {SINGLE: ["members=1", *plain], NAIVE: plain}.get(baseline or "", [])


def tune_allocator() -> str:
    """Keep glibc from unmapping large blocks (see module doc); returns what was done, for
    config.json."""
    preload = os.environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preload or "jemalloc" in preload:
        return f"preloaded ({preload})"
    user = [k for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if k in os.environ]
    if user or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "set by the user's environment"
    if os.environ.get("MIXC_MALLOC", "").lower() == "off":
        return "left alone (MIXC_MALLOC=off)"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = (
            libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD) == 1
        )
    except (OSError, AttributeError):
        ok = False
    if not ok:
        print(
            "mixc: hint: glibc malloc returns large blocks to the OS every step (20-30% slower);"
            f" start with MALLOC_MMAP_THRESHOLD_={_THRESHOLD} MALLOC_TRIM_THRESHOLD_={_THRESHOLD}"
            " or LD_PRELOAD a tcmalloc",
            file=sys.stderr,
        )
        return "untuned (mallopt failed)"
    return f"glibc mallopt: mmap and trim thresholds {_THRESHOLD}"


def run(args: argparse.Namespace) -> int:
    """Run `mixc train` with parsed ``args``; returns the exit code (errors are ``MixcError``s for
    cli.main)."""
    import mixc
    from mixc.backends import get_backend
    from mixc.inspect_view import print_warnings
    from mixc.training import train

    allocator = tune_allocator()
    method = (
        mixc.compile(args.file, list(args.overrides or [])).method.name
        if args.baseline
        else DEFAULT_METHOD
    )
    overrides = list(args.overrides or []) + baseline_overrides(args.baseline, method)
    plan = mixc.compile(args.file, overrides)
    print_warnings(plan)  # allocation warnings, never silent
    recipe = recipe_of(plan)
    backend = get_backend(args.backend, "train")
    suffix = f"-{args.baseline}" if args.baseline else ""
    out = Path(args.out) if args.out else Path("runs") / f"{plan.name}{suffix}"
    try:
        metrics = train(
            backend,
            plan,
            recipe,
            out_dir=out,
            data=args.data,
            data_dir=args.data_dir,
            epochs=args.epochs,
            batch_size=args.batch_size,
            device=args.device,
            seed=args.seed,
            layout=args.layout,
            baseline=args.baseline,
            progress=not args.no_progress,
            config={
                "file": str(args.file),
                "overrides": overrides,
                "backend": backend.name,
                "allocator": allocator,
            },
            allow_recipe_change=args.allow_recipe_change,
            threads=args.threads,
            val_fraction=args.val_fraction,
            best_metric=args.best_metric,
            keep=args.keep,
            eval_test_every_epoch=args.eval_test_every_epoch,
            precision=args.precision,
            grad_clip=args.grad_clip,
            compile=args.compile,
            logger=args.logger,
            curves=not args.no_curves,
            init_from=args.init_from,
            init_exclude=tuple(args.init_exclude),
            init_noise=args.init_noise,
            stream=args.stream,
            workers=args.workers,
        )
    except KeyboardInterrupt:
        print(
            f"mixc train: error: interrupted; the last finished epoch is saved in {out}: run the"
            " same command to resume",
            file=sys.stderr,
        )
        return 130
    if metrics:  # rank 0 only
        print_summary(plan.name, metrics, out, args.baseline)
    return 0


def recipe_of(plan: Any) -> Any:
    """The plan's train section as a Recipe (TrainError naming the spec if it does not validate)."""
    from mixc.spec.recipe import Recipe

    try:
        return Recipe.model_validate(plan.train or {})
    except ValidationError as e:
        raise TrainError(
            f"the train section of {plan.source} is invalid: {first_problem(e)}"
        ) from None


def print_summary(
    name: str, metrics: dict[str, Any], out: Path, baseline: str | None = None
) -> None:
    """The final table: ensemble and members, test accuracy, NLL and ECE."""
    from rich.console import Console
    from rich.table import Table

    title = (
        f"{name}{f' ({baseline} baseline)' if baseline else ''}: test set after epoch"
        f" {metrics.get('epoch')}"
    )
    table = Table(title=title)
    for col in ("", "accuracy", "NLL", "ECE"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row(
        "ensemble",
        f"{metrics['accuracy'] * 100:.2f}%",
        f"{metrics['nll']:.4f}",
        f"{metrics['ece'] * 100:.2f}%",
        style="bold",
    )
    eces = metrics.get("member_ece") or [None] * len(metrics["member_accuracy"])
    for i, (a, n, c) in enumerate(zip(metrics["member_accuracy"], metrics["member_nll"], eces)):
        table.add_row(
            f"member {i}", f"{a * 100:.2f}%", f"{n:.4f}", "-" if c is None else f"{c * 100:.2f}%"
        )
    console = Console()
    console.print(table)
    extra = []
    if metrics.get("diversity") is not None:
        extra.append(f"diversity {metrics['diversity']:.3f}")
    if metrics.get("wall_time") is not None:
        extra.append(f"wall time {metrics['wall_time']:.1f}s")
    extra.append(f"files in {out}")
    console.print(", ".join(extra), highlight=False)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m mixc.commands.train``), e.g. for torchrun without the full
    CLI."""
    parser = argparse.ArgumentParser(prog="mixc train", description="Train a MixtureEnsemble spec.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    from mixc.cli import run_reporting

    return run_reporting("train", lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
