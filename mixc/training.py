"""The one training loop behind `mixc train`, for every backend: framework-free.

A backend supplies a :class:`~mixc.backends.base.Trainer`; everything that decides *what* is
trained (the loss, the schedule, batches, seeding, the loss watch, the run folder) lives here once,
so the backends cannot drift apart. The rules: docs/training.md.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mixc.compiler.plan import Plan
from mixc.core.checkpoint_format import spec_hash
from mixc.core.data import (
    Dataset,
    check_compatible,
    default_augment,
    load_dataset,
    resolve_data_path,
    split_validation,
)
from mixc.core.errors import TrainError
from mixc.core.layout_choice import LayoutChoice
from mixc.core.run_files import BEST_METRICS
from mixc.core.run_read import read_metrics
from mixc.core.threads import resolve_threads
from mixc.loggers import make_logger
from mixc.loss_watch import LossWatch
from mixc.metrics import evaluate
from mixc.reporter import Reporter, epoch_line
from mixc.run_writer import RunWriter, seed_of
from mixc.spec.recipe import Recipe

if TYPE_CHECKING:
    from mixc.backends.base import Backend, Trainer

__all__ = ["train", "learning_rate", "augment_mode", "with_overrides", "epoch_line"]

# ---------------------------------------------------------------------------
# Pure rules


def learning_rate(recipe: Recipe, step: int, steps_per_epoch: int, epochs: int) -> float:
    """The learning rate of global step ``step`` (0-based), warm-up included."""
    base = recipe.optimizer.lr
    s = recipe.schedule
    if s.name == "step":
        passed = sum(1 for m in s.milestones if step >= m * steps_per_epoch)
        lr = base * s.gamma**passed
    elif s.name == "cosine":
        start = recipe.warmup * steps_per_epoch
        span = max(1, epochs * steps_per_epoch - start)
        t = min(max((step - start) / span, 0.0), 1.0)
        lr = s.min_lr + (base - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        lr = base
    warm = recipe.warmup * steps_per_epoch
    if warm and step < warm:
        lr *= (step + 1) / warm
    return lr


def augment_mode(recipe: Recipe, plan: Plan) -> str:
    """``crop_flip``, ``random_resized_crop`` or ``none``: ``auto`` is
    :func:`mixc.core.data.default_augment` (crop_flip at 32x32, the random-resized crop above 32
    pixels a side, none otherwise); crop_flip needs images.
    """
    is_image = plan.input_layout == "image" and len(plan.input_shape) == 3
    if recipe.augment == "auto":
        return default_augment(plan.input_shape, plan.input_layout)
    if recipe.augment in ("crop_flip", "random_resized_crop") and not is_image:
        raise TrainError(
            f"augment {recipe.augment} needs image input, but {plan.name} takes {plan.input_layout}"
            f" {plan.input_shape}; hint: set augment none (--set train.augment=none)"
        )
    return recipe.augment


def with_overrides(recipe: Recipe, **values: Any) -> Recipe:
    """``recipe`` with the non-None ``values`` (epochs, batch, seed, data, data_dir, val_fraction),
    validated like the file (TrainError naming the option otherwise: ``--epochs 0`` is the user's
    to fix, not a traceback).
    """
    from pydantic import ValidationError

    from mixc.compiler.plan import first_problem

    updates = {k: str(v) if k == "data_dir" else v for k, v in values.items() if v is not None}
    try:
        return Recipe.model_validate({**recipe.model_dump(), **updates})
    except ValidationError as e:
        raise TrainError(
            f"invalid training option: {first_problem(e)}; hint: check --epochs, --batch-size, "
            "--seed, --data and --val-fraction"
        ) from None


# ---------------------------------------------------------------------------
# The run


@dataclass
class _Run:
    """What one training run holds while it goes: its parts and the batch arithmetic."""

    plan: Plan
    recipe: Recipe
    dataset: Dataset
    trainer: Trainer
    folder: RunWriter
    reporter: Reporter
    batch: int
    steps: int
    backend_name: str
    best_metric: str = "nll"
    keep: int = 1
    baseline: str | None = None
    test_every_epoch: bool = False
    logger: Any = None  # mixc.loggers.Logger (rank 0)
    batches: Any = None  # Backend.batches with the worker count bound, for a streamed image folder
    watch: Any = None  # mixc.loss_watch.LossWatch: the per-step divergence check

    @property
    def main(self) -> bool:
        return self.trainer.rank == 0


def train(
    backend: Backend | str,
    plan: Plan,
    recipe: Recipe,
    *,
    out_dir: str | os.PathLike,
    data: Dataset | str | None = None,
    data_dir: str | os.PathLike | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    seed: int | None = None,
    layout: str = "auto",
    baseline: str | None = None,
    progress: bool = True,
    config: dict[str, Any] | None = None,
    allow_recipe_change: bool = False,
    threads: int | None = None,
    val_fraction: float | None = None,
    best_metric: str = "nll",
    keep: int = 1,
    eval_test_every_epoch: bool = False,
    precision: str | None = None,
    grad_clip: float | None = None,
    compile: bool = False,
    logger: str = "none",
    curves: bool = True,
    stream: bool = False,
    workers: int | None = None,
    init_from: str | os.PathLike | None = None,
    init_exclude: tuple[str, ...] = (),
    init_noise: float = 0.0,
) -> dict[str, Any]:
    """Train ``plan`` with ``recipe`` on ``backend`` into ``out_dir`` (resuming it if it holds a
    checkpoint).

    Options other than plan/recipe override the recipe where it has them (``None`` keeps it); the
    rest are the CLI's (README, "Training"): ``baseline`` only labels the run (pass the recompiled
    plan), ``config`` adds entries to ``config.json``, ``threads`` defaults to
    :func:`mixc.core.threads.default_threads`, ``best_metric``/``keep``/``eval_test_every_epoch``
    choose the checkpoints and test scoring, ``logger`` and ``curves`` the extra outputs; ``stream``
    reads an image folder from disk with ``workers`` loader processes (default min(4, threads))
    instead of decoding it into memory. ``init_from`` starts a new run from one network's weights
    (``mixc import --weights``; ``mixc/init_from.py``), but for layers matching ``init_exclude``
    globs, with ``init_noise`` apart. Returns the final test metrics
    (:func:`mixc.metrics.evaluate`) plus ``epoch``, ``train_loss`` and ``wall_time``; ``{}`` on
    data-parallel ranks other than 0.
    """
    arguments = locals()  # the keyword options, handed on as one (their names are _Options')
    options = _Options(**{f.name: arguments[f.name] for f in fields(_Options)})
    return _train(backend, plan, recipe, options)


@dataclass(frozen=True)
class _Options:
    """train()'s keyword arguments, handed on as one (train's docstring says what each does)."""

    out_dir: str | os.PathLike
    data: Dataset | str | None
    data_dir: str | os.PathLike | None
    epochs: int | None
    batch_size: int | None
    device: str
    seed: int | None
    layout: str
    baseline: str | None
    progress: bool
    config: dict[str, Any] | None
    allow_recipe_change: bool
    threads: int | None
    val_fraction: float | None
    best_metric: str
    keep: int
    eval_test_every_epoch: bool
    precision: str | None
    grad_clip: float | None
    compile: bool
    logger: str
    curves: bool
    stream: bool
    workers: int | None
    init_from: str | os.PathLike | None
    init_exclude: tuple[str, ...]
    init_noise: float


def _train(backend: Backend | str, plan: Plan, recipe: Recipe, o: _Options) -> dict[str, Any]:
    """The recipe with the options' overrides, checked options and data, then the run in its
    folder; the trainer is closed however it ends."""
    if isinstance(backend, str):
        from mixc.backends import get_backend

        backend = get_backend(backend, "train")
    recipe = with_overrides(
        recipe,
        epochs=o.epochs,
        batch=o.batch_size,
        seed=o.seed,
        data=_data_path(o.data, plan, recipe),
        data_dir=o.data_dir,
        val_fraction=o.val_fraction,
        precision=o.precision,
        grad_clip=o.grad_clip,
    )
    _check_options(o.best_metric, o.keep, o.layout, backend)
    dataset = _dataset(o.data, plan, recipe, o.stream)
    augment = augment_mode(recipe, plan)
    n_threads = resolve_threads(o.threads)
    thread_info = backend.set_threads(n_threads)
    t_start = time.perf_counter()
    trainer = backend.trainer(
        plan, recipe, device=o.device, layout=o.layout, augment=augment, compile=o.compile
    )
    try:
        with RunWriter(
            Path(o.out_dir),
            plan,
            recipe,
            main=trainer.rank == 0,
            allow_recipe_change=o.allow_recipe_change,
        ) as folder:
            run = _start_run(o, backend, plan, recipe, dataset, trainer, folder, augment, n_threads)
            _announce(
                run,
                o.layout,
                augment,
                o.baseline,
                {**thread_info, "compile": o.compile, **(o.config or {})},
            )
            return _finish(run, o.curves, t_start)
    finally:
        trainer.close()


def _start_run(
    o: _Options,
    backend: Backend,
    plan: Plan,
    recipe: Recipe,
    dataset: Dataset,
    trainer: Trainer,
    folder: RunWriter,
    augment: str,
    n_threads: int,
) -> _Run:
    """Hand the training set to the trainer, load the checkpoint when resuming, gather the run."""
    batch = min(recipe.batch, len(dataset.y_train))
    if o.layout == "auto":  # a resumed run goes on in the layout it started in
        trainer.layout_choice = _recorded_layout(folder)
    trainer.begin(dataset.x_train, dataset.y_train[: len(dataset.x_train)], batch)
    if folder.header is not None:
        _resume(folder, trainer, plan)
        if o.init_from is not None and trainer.rank == 0:
            print(f"note: --init-from {o.init_from} ignored: the run resumes from its checkpoint")
    elif o.init_from is not None:
        _initialise(o, trainer, plan, recipe.seed)
    return _Run(
        plan,
        recipe,
        dataset,
        trainer,
        folder,
        Reporter(trainer.rank == 0, o.progress and sys.stdout.isatty()),
        batch,
        len(dataset.y_train) // batch,  # the last partial batch is dropped
        backend.name,
        best_metric=o.best_metric,
        keep=o.keep,
        baseline=o.baseline,
        test_every_epoch=o.eval_test_every_epoch,
        logger=make_logger(o.logger, folder.out) if trainer.rank == 0 else None,
        batches=_batches(backend, dataset, trainer, o.workers, n_threads, augment),
    )


def _finish(run: _Run, curves: bool, t_start: float) -> dict[str, Any]:
    """Train the epochs; rank 0 writes the curves and returns the last epoch's record and the wall
    time (the checkpoint's test scores when no epoch was left)."""
    try:
        last = _epochs(run)
    finally:
        if run.logger is not None:
            run.logger.close()
    if not run.main:
        return {}
    if curves:
        _write_curves(run)
    if last is None:  # nothing left to train: report the checkpoint as it stands
        last = {"epoch": run.folder.start_epoch, "train_loss": None, **_evaluate(run, "test")}
    return {**last, "wall_time": time.perf_counter() - t_start}


def _initialise(o: _Options, trainer: Trainer, plan: Plan, recipe_seed: int) -> None:
    """A new run's tensors from a pretrained network (``--init-from``), reported line by line."""
    from mixc.init_from import initialise, read_pretrained

    pretrained = read_pretrained(o.init_from)
    state, lines = initialise(
        trainer.state_arrays(), plan, pretrained, list(o.init_exclude), o.init_noise, recipe_seed
    )
    trainer.load_state(state)
    if trainer.rank == 0:
        for line in lines:
            print(f"init from {o.init_from}: {line}")


def _resume(folder: RunWriter, trainer: Trainer, plan: Plan) -> None:
    """Load the run's checkpoint (verified: spec, header, checksum, finite tensors) into the
    trainer."""
    from mixc.core.checkpoint_format import CheckpointError, read_plan_arrays

    try:
        arrays, extra, _ = read_plan_arrays(folder.ckpt, plan)
    except CheckpointError as e:
        raise TrainError(
            f"cannot resume from {folder.ckpt}: {e}; hint: pass another --out folder for"
            f" {plan.name}, or delete that one to start over"
        ) from e
    trainer.load_state(arrays)
    try:
        trainer.load_optimizer(extra)
    except CheckpointError as e:
        raise TrainError(f"cannot resume from {folder.ckpt}: {e}") from e


def _recorded_layout(folder: RunWriter) -> LayoutChoice | None:
    """The layout choice a resumed run folder's config.json recorded (None: a new run, or a folder
    from before choices were recorded)."""
    if folder.header is None or folder.config is None:
        return None
    recorded = folder.config.options.layout_choice
    return None if recorded is None else recorded.model_copy(update={"how": "resumed"})


def _announce(
    run: _Run, layout: str, augment: str, baseline: str | None, config: dict[str, Any]
) -> None:
    """Write plan.json and config.json (rank 0) and print the run's one-line description."""
    plan, recipe, trainer = run.plan, run.recipe, run.trainer
    choice = trainer.layout_choice
    run.folder.begin(
        {
            "spec": plan.source,
            "spec_hash": spec_hash(plan),
            "layout": choice.layout if choice else layout,
            "layout_choice": choice.model_dump(mode="json") if choice else None,
            "baseline": baseline,
            "augment": augment,
            **trainer.run_options,
            **config,
        }
    )
    kind = f"{baseline} baseline" if baseline else f"{plan.members} members"
    start = run.folder.start_epoch
    run.reporter.line(
        f"{plan.name}: {kind}, {plan.accounting.total_params:,} parameters;"
        f" {run.dataset.description}; {recipe.epochs} epochs x {run.steps} steps of {run.batch};"
        f" {recipe.optimizer.name} lr {recipe.optimizer.lr}"
        + (f", {recipe.precision}" if recipe.precision != "fp32" else "")
        + (f", grad clip {recipe.grad_clip}" if recipe.grad_clip else "")
        + f"; device {trainer.device_label}, {_threads_text(config.get('threads'))}"
        + (f", {choice.describe()}" if choice else "")
        + "; out"
        f" {run.folder.out}" + (f"; resuming after epoch {start}" if start else "")
    )


def _epochs(run: _Run) -> dict[str, Any] | None:
    """The epochs from the run's start epoch; rank 0 checks and saves each. Returns the last epoch's
    record."""
    recipe, trainer, epochs = run.recipe, run.trainer, run.recipe.epochs
    run.watch = LossWatch(
        run.plan.members,
        run.steps,
        run.reporter.line,
        _divergence_hint(run.plan, recipe),
        fetch=trainer.fetch_losses,
    )
    last: dict[str, Any] | None = None
    with run.reporter:
        for epoch in range(run.folder.start_epoch, epochs):
            t0 = time.perf_counter()
            train_loss, lr, train_time = _one_epoch(run, epoch)
            if not math.isfinite(train_loss):
                raise TrainError(
                    f"the training loss became {train_loss} in epoch {epoch + 1}; hint: lower the"
                    " learning rate (--set train.optimizer.lr=...) or add warm-up (--set"
                    " train.warmup=...)"
                )
            if not run.main:
                continue
            rec = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "lr": lr,
                **_scores(run, epoch + 1 == epochs),
                "epoch_time": time.perf_counter() - t0,
                "train_time": train_time,
                "images_per_s": run.steps * run.batch / train_time,
            }
            run.folder.save_epoch(
                rec,
                lambda meta: trainer.save(run.folder.ckpt, epoch + 1, meta),  # noqa: B023 (called here)
                {"global_step": str((epoch + 1) * run.steps), "backend": run.backend_name},
            )
            best = run.folder.keep_best(rec, run.best_metric)
            run.logger.log(rec, [m.model_dump() for m in read_metrics(run.folder.out)])
            run.folder.keep_last(epoch + 1, run.keep)
            run.reporter.line(epoch_line({**rec, "best": best}, epochs))
            last = rec
    return last


def _data_path(data: Dataset | str | None, plan: Plan, recipe: Recipe) -> str | None:
    """The data the run reads, absolute: ``--data`` from the current folder, the spec's ``data``
    from the spec's folder (like its imports), dataset names as they are."""
    if isinstance(data, Dataset):
        return None
    if isinstance(data, str):
        return resolve_data_path(data, None)
    return resolve_data_path(recipe.data, Path(plan.source).parent if plan.source else None)


def _write_curves(run: _Run) -> None:
    """curves.png and curves.pdf from metrics.jsonl, titled by what was trained (not by the folder's
    name); without matplotlib, a note instead (the run itself is complete)."""
    from mixc.plots import PlotError, training_curves

    plan, acc = run.plan, run.plan.accounting
    what = f"{run.baseline} baseline" if run.baseline else f"{plan.members}-member MixtureEnsemble"
    title = (
        f"{plan.name}: {what}, {acc.total_params:,} parameters"
        f" ({acc.total_params / acc.backbone_params:.2f}x one backbone)"
    )
    try:
        training_curves(
            [m.model_dump() for m in read_metrics(run.folder.out)],
            run.folder.out / "curves.png",
            title,
        )
    except PlotError as e:
        run.reporter.line(f"note: no curves.png: {e}")


def _dataset(data: Dataset | str | None, plan: Plan, recipe: Recipe, stream: bool) -> Dataset:
    """The run's data: loaded (image folders at the plan's input size), validation held out, checked
    against the plan."""
    dataset = (
        data
        if isinstance(data, Dataset)
        else load_dataset(recipe.data, recipe.data_dir, plan.input_shape, stream)
    )
    if stream and dataset.folder is None:
        raise TrainError(
            f"--stream reads image folders from disk; {dataset.name} is not one; hint: drop"
            " --stream"
        )
    dataset = split_validation(dataset, recipe.val_fraction, recipe.seed)
    check_compatible(dataset, plan.input_shape, plan.classes)
    return dataset


def _batches(
    backend: Backend,
    dataset: Dataset,
    trainer: Trainer,
    workers: int | None,
    threads: int,
    augment: str,
) -> Any:
    """``split, train, batch, epoch -> batches`` for a streamed folder (None otherwise); one process
    only, with ``workers`` loader processes (default min(4, threads)). The loader draws the
    random-resized crop (on the full image) when ``augment`` asks for it; crop_flip is the
    trainer's, as in memory."""
    if dataset.folder is None:
        return None
    workers = min(4, threads) if workers is None else workers
    if trainer.world > 1:
        raise TrainError(
            "a streamed image folder trains in one process for now; hint: run without torchrun, or "
            "use a folder that fits in memory (MIXC_IMAGE_MEMORY)"
        )
    if workers < 0:
        raise TrainError(f"--workers must be 0 or more, not {workers}")
    return lambda split, train, batch, seed, epoch: backend.batches(
        split,
        list(dataset.x_train.shape[1:]),
        train=train,
        batch=batch,
        seed=seed,
        epoch=epoch,
        workers=workers,
        random_crop=augment == "random_resized_crop",
    )


def _evaluate(run: _Run, split: str) -> dict[str, Any]:
    """Metrics of ``split`` (val or test): from memory, or streamed batch by batch (resize + center
    crop)."""
    ds = run.dataset
    y = ds.y_val if split == "val" else ds.y_test
    if run.batches is None:
        return evaluate(run.trainer.predict(ds.x_val if split == "val" else ds.x_test), y)
    folder = ds.folder.val if split == "val" else ds.folder.test
    probs = [run.trainer.predict(np.asarray(x)) for x, _ in run.batches(folder, False, 250, 0, 0)]
    return evaluate(np.concatenate(probs), y)


def _check_options(best_metric: str, keep: int, layout: str, backend: Backend) -> None:
    """``--best-metric``, ``--keep`` and ``--layout`` (TrainError naming the option)."""
    if layout not in backend.capabilities.layouts:
        raise TrainError(
            f"layout must be {', '.join(backend.capabilities.layouts)}, not {layout!r}"
        )
    if best_metric not in BEST_METRICS:
        raise TrainError(f"--best-metric must be {', '.join(BEST_METRICS)}, not {best_metric!r}")
    if keep < 1:
        raise TrainError(f"--keep must be 1 or more (1: only the last checkpoint), not {keep}")


def _scores(run: _Run, last: bool) -> dict[str, Any]:
    """An epoch's evaluation: validation metrics (``val_*``) when there is a validation set; test
    metrics without one, at the last epoch, or every epoch when asked (the test set is not for
    choosing epochs).
    """
    ds, out = run.dataset, {}
    if ds.x_val is not None:
        v = _evaluate(run, "val")
        out.update({f"val_{k}": v[k] for k in ("accuracy", "nll", "ece", "brier") if k in v})
    if ds.x_val is None or last or run.test_every_epoch:
        out.update(_evaluate(run, "test"))
    return out


def _one_epoch(run: _Run, epoch: int) -> tuple[float, float, float]:
    """Every step of ``epoch``; returns (mean member loss, the last learning rate, the seconds the
    steps took). The losses reach the host only through the loss watch, a batch of steps late, so
    no step waits for the device (docs/training.md, "Speed")."""
    recipe, trainer, steps, batch, watch = run.recipe, run.trainer, run.steps, run.batch, run.watch
    seed = recipe.seed
    perm = np.random.default_rng([seed, epoch]).permutation(len(run.dataset.y_train))
    trainer.begin_epoch(
        seed_of(seed, epoch, trainer.rank, 1), seed_of(seed, epoch, trainer.rank, 2)
    )
    update = run.reporter.epoch_task(epoch + 1, recipe.epochs, steps)
    loss_sum, lr = 0.0, recipe.optimizer.lr
    stream = (
        None
        if run.batches is None
        else iter(run.batches(run.dataset.folder.train, True, batch, seed, epoch))
    )
    t0 = time.perf_counter()
    for step in range(steps):
        lr = learning_rate(recipe, epoch * steps + step, steps, recipe.epochs)
        if stream is not None:  # the loader shuffles with the same default_rng([seed, epoch]) rule
            x, y = next(stream)
            loss = trainer.step_batch(x, y, lr, step)
        else:
            loss = trainer.step(perm[step * batch : (step + 1) * batch], lr, step)
        watch.add(epoch * steps + step, loss)  # a NaN stops the run within a few steps
        if read := watch.take():  # the bar shows the latest loss read, a few steps back
            loss_sum += sum(v for _, v in read)
            update(step + 1, read[-1][1])
    watch.check()  # the epoch's last losses: the one wait for the device
    read = watch.take()
    loss_sum += sum(v for _, v in read)
    update(steps, read[-1][1] if read else None)
    return loss_sum / steps, lr, time.perf_counter() - t0


def _divergence_hint(plan: Plan, recipe: Recipe) -> str:
    """What to add to a divergence message about this run: shared weights that take their members'
    summed gradient, when the mean would reach more of them."""
    from mixc.core.method_batches import gradient_scales

    if set(gradient_scales(plan, "mean")) - set(gradient_scales(plan, recipe.shared_gradient)):
        return (
            f"; under shared_gradient {recipe.shared_gradient}, weights the members share take"
            " their summed gradient, which diverges at width: --set train.shared_gradient=mean"
            " divides it by the member count"
        )
    return ""


def _threads_text(n: Any) -> str:
    """ "1 thread", "2 threads" (the run header states how many the run uses)."""
    return f"{n} thread" + ("" if n == 1 else "s")
