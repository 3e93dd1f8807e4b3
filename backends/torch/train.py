"""Training a Plan's ensemble with torch: the loop behind `mixc train`.

What it does, and the choices that matter for reproducing results:

- Loss: every member sees the same batch and gets its own cross-entropy; the
  loss is the sum over members of each member's batch-mean CE (paper, 3.2).
  The logged ``train_loss`` is that sum divided by M (the mean member CE).
- Optimiser: SGD with (Nesterov) momentum, or AdamW. Weight decay is coupled
  L2 for SGD, decoupled for AdamW, and skips the roles listed in
  ``recipe.weight_decay_exclude`` (``alphas`` -> alpha, ``bn`` -> bn_weight and
  bn_bias, ``bias`` -> plain and member biases; a bank's template biases stay
  in their template and are decayed with it).
- Learning rate: set by hand before every step from :func:`learning_rate`, a
  pure function of the global step, so a resumed run replays it exactly.
  ``step`` multiplies by gamma at each milestone epoch, ``cosine`` anneals from
  the base rate to ``min_lr`` over the epochs after warm-up, ``constant`` keeps
  it; a warm-up of W epochs multiplies the first W epochs' steps by
  ``(step + 1) / (W * steps_per_epoch)``.
- Batches: each epoch draws a permutation of the train set from
  ``(seed, epoch)`` and takes ``batch``-sized slices; the last partial batch is
  dropped (BatchNorm dislikes tiny batches) unless the set is smaller than one
  batch. ``batch`` is the global batch: under data parallelism each rank takes
  its :func:`mixc.data.shard` of every slice.
- Randomness: augmentation and dropout are reseeded at each epoch from
  ``(seed, epoch, rank)``. Since checkpoints are written at epoch ends, a
  resumed run needs no saved RNG state to replay the rest exactly.
- Augmentation (``crop_flip``, the default for 32x32 images): pad 4 with
  zeros, random 32x32 crop, random horizontal flip, on batched tensors on the
  device.
- Files (rank 0 only): ``plan.json``, ``config.json``, ``metrics.jsonl`` (one
  JSON line per epoch), ``checkpoint.safetensors`` (weights, optimiser state
  under ``optim.*``, epoch, the epoch's metrics; written atomically after every
  epoch). The run folder's rules (one writer, the recipe check on resume,
  divergence, crash repair) are ``mixc.run_folder.RunWriter``'s, shared with
  the flax loop. A folder holding a checkpoint is resumed; one of another spec
  or recipe is refused.
- Data parallel: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is
  gloo on CPU and nccl on CUDA and the model is wrapped in
  DistributedDataParallel. torch.distributed modules that DDP imports lazily
  are imported before the process group exists (see :func:`_import_ddp_modules`),
  so ``destroy_process_group`` really frees it. With ``MIXC_WEIGHTS_HASH_DIR`` set, every rank
  writes ``rank<r>.sha256`` of its trainable tensors at the end (a test hook:
  ranks must agree; BN running statistics are per rank and excluded).
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixc.compiler.plan import Plan
from mixc.spec.recipe import Recipe
from mixc.data import Dataset, check_compatible, load_dataset, shard
from mixc.metrics import evaluate
from mixc.run_folder import CHECKPOINT, METRICS, Reporter, RunWriter, TrainError, epoch_line, seed_of

__all__ = ["train", "TrainError", "learning_rate", "crop_flip", "predict_member_probs", "CHECKPOINT", "METRICS"]

_EVAL_BATCH = 1000

_EXCLUDE_ROLES = {
    "alphas": {"alpha"},
    "bn": {"bn_weight", "bn_bias"},
    "bias": {"plain_bias", "member_bias"},
}


# ---------------------------------------------------------------------------
# Pure helpers


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


def crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Pad-``pad`` random crop plus random horizontal flip of a batch ``[B, C, H, W]``, one draw per image."""
    b, _, h, w = x.shape
    dev = x.device
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    flip = torch.rand(b, generator=generator, device=dev) < 0.5
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = oy[:, None] + ar_h  # [B, H]
    cols = ox[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # [B, W]
    # Advanced indices split by a slice put their dims first: [B, H, W, C].
    out = xp[torch.arange(b, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def predict_member_probs(model: nn.Module, x: torch.Tensor, batch: int = _EVAL_BATCH) -> np.ndarray:
    """Each member's softmax over ``x``, ``[N, M, classes]`` float32 numpy, in eval mode."""
    was = model.training
    model.eval()
    out = [F.softmax(model(x[i : i + batch]).float(), dim=-1).cpu() for i in range(0, len(x), batch)]
    model.train(was)
    return torch.cat(out).numpy()


_seed_of = seed_of
_epoch_line = epoch_line  # a module attribute: tests interrupt a run by replacing it


def spec_hash(plan: Plan) -> str:
    return plan.spec_hash or plan.content_hash()


# ---------------------------------------------------------------------------
# Setup


#: What DistributedDataParallel imports on first construction. Some of these modules evaluate
#: ``group=group.WORLD`` as default arguments at import: imported after ``init_process_group``
#: they hold the default process group for the life of the process, ``destroy_process_group``
#: cannot free it, and its gloo threads run on into interpreter shutdown, where a rank can die
#: with "terminate called without an active exception" (SIGABRT) once the C++ objects are torn
#: down. Imported first, their defaults are the "no group" sentinel.
_DDP_MODULES = (
    "torch.nn.parallel",
    "torch.distributed.nn",
    "torch.distributed.algorithms._optimizer_overlap",
    "torch.distributed.algorithms.ddp_comm_hooks.optimizer_overlap_hooks",
    "torch.distributed.algorithms.ddp_comm_hooks.mixed_precision_hooks",
    "torch.distributed._functional_collectives",
)


def _import_ddp_modules() -> None:
    """Import DDP's lazily imported modules before any process group exists (see ``_DDP_MODULES``)."""
    for name in _DDP_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # another torch version: nothing to pin
            pass


class _Dist:
    """Rank, world and device; sets up torch.distributed when launched by torchrun."""

    def __init__(self, device: str | torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        self.owns_group = False
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise TrainError(f"unknown device {device!r} ({e}); hint: --device cpu, cuda or cuda:N") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise TrainError(f"device {device!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                             "hint: --device cpu")
        if self.world > 1:
            import torch.distributed as dist

            if dev.type == "cuda":
                dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(dev)
            if not dist.is_initialized():
                _import_ddp_modules()
                dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
                self.owns_group = True
            self.rank = dist.get_rank()
        self.device = dev

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _augment_mode(recipe: Recipe, plan: Plan) -> str:
    is_image = plan.input_layout == "image" and len(plan.input_shape) == 3
    if recipe.augment == "auto":
        return "crop_flip" if is_image and plan.input_shape[1:] == [32, 32] else "none"
    if recipe.augment == "crop_flip" and not is_image:
        raise TrainError(
            f"augment crop_flip needs image input, but {plan.name} takes {plan.input_layout} "
            f"{plan.input_shape}; hint: set augment none (--set train.augment=none)"
        )
    return recipe.augment


def _param_names(model: nn.Module, plan_tensors: dict[str, torch.Tensor]) -> dict[int, str]:
    """Stable names for every trainable parameter: the plan's, else the module path."""
    names = {id(t): n for n, t in plan_tensors.items()}
    for n, p in model.named_parameters():
        names.setdefault(id(p), "module." + n)
    return names


def _optimizer(model: nn.Module, plan: Plan, recipe: Recipe, names: dict[int, str]) -> torch.optim.Optimizer:
    roles = {t.name: t.role for t in plan.tensors}
    skip = set().union(*(_EXCLUDE_ROLES[e] for e in recipe.weight_decay_exclude)) if recipe.weight_decay_exclude else set()
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if roles.get(names[id(p)]) in skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    o = recipe.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))


def _optimizer_state(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value):
                    out[f"optim.{names[id(p)]}.{key}"] = value.detach().reshape(value.shape or (1,)).cpu().contiguous()
    return out


def _load_optimizer_state(opt: torch.optim.Optimizer, names: dict[int, str], extra: dict[str, torch.Tensor]) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            prefix = f"optim.{names[id(p)]}."
            state = {}
            for k, v in extra.items():
                if k.startswith(prefix):
                    key = k[len(prefix) :]
                    if key == "step":  # optimiser step counters are 0-dim, on the CPU
                        state[key] = v.reshape(()).to(torch.float32)
                    else:
                        state[key] = v.to(device=p.device, dtype=p.dtype).reshape(p.shape)
            if state:
                opt.state[p] = state


# ---------------------------------------------------------------------------
# Output


def _weights_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------
# The loop


def train(
    plan: Plan,
    recipe: Recipe,
    *,
    out_dir: str | os.PathLike,
    data: Dataset | str | None = None,
    data_dir: str | os.PathLike | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    layout: str = "auto",
    baseline: str | None = None,
    progress: bool = True,
    config: dict[str, Any] | None = None,
    allow_recipe_change: bool = False,
) -> dict[str, Any]:
    """Train ``plan`` with ``recipe`` into ``out_dir`` (resuming it if it holds a checkpoint).

    Arguments other than plan/recipe override the recipe (``None`` keeps it).
    ``baseline`` only labels the run: pass the already recompiled plan.
    ``config`` adds entries (e.g. the CLI's overrides) to ``config.json``.
    ``allow_recipe_change`` lets a resume go on with a recipe other than the
    checkpoint's (recorded in ``config.json``'s history); without it that is
    refused. Returns the final test metrics (see :func:`mixc.metrics.evaluate`)
    plus ``epoch``, ``train_loss`` and ``wall_time``; ``{}`` on ranks other than 0.
    """
    updates: dict[str, Any] = {}
    if epochs is not None:
        updates["epochs"] = epochs
    if batch_size is not None:
        updates["batch"] = batch_size
    if seed is not None:
        updates["seed"] = seed
    if isinstance(data, str):
        updates["data"] = data
    if data_dir is not None:
        updates["data_dir"] = str(data_dir)
    recipe = Recipe.model_validate({**recipe.model_dump(), **updates})  # validates the overrides too

    if isinstance(data, Dataset):
        dataset = data
    else:
        dataset = load_dataset(recipe.data, recipe.data_dir)
    check_compatible(dataset, plan.input_shape, plan.classes)
    augment = _augment_mode(recipe, plan)

    t_start = time.perf_counter()
    dist = _Dist(device)
    try:
        with RunWriter(Path(out_dir), plan, recipe, main=dist.main, allow_recipe_change=allow_recipe_change) as run:
            return _run(plan, recipe, dataset, augment, dist, run, layout, baseline, progress, config or {}, t_start)
    finally:
        dist.close()


def _resume(run: RunWriter, model: nn.Module, plan: Plan, opt: torch.optim.Optimizer, names: dict[int, str]) -> None:
    """Load the run's checkpoint (verified: header, checksum, finite tensors) into the model and optimiser."""
    from mixc.backends.torch.checkpoint import CheckpointError, load_checkpoint

    try:
        _, extra, _ = load_checkpoint(run.ckpt, model, plan)
    except CheckpointError as e:
        raise TrainError(
            f"cannot resume from {run.ckpt}: {e}; hint: pass another --out folder for {plan.name}, "
            "or delete that one to start over"
        ) from e
    _load_optimizer_state(opt, names, extra or {})


def _run(
    plan: Plan, recipe: Recipe, dataset: Dataset, augment: str, dist: _Dist, run: RunWriter, layout: str,
    baseline: str | None, progress: bool, config: dict[str, Any], t_start: float,
) -> dict[str, Any]:
    from mixc.backends.torch import build, named_plan_tensors

    dev = dist.device
    torch.manual_seed(recipe.seed)  # the same initial weights on every rank
    model = build(plan, layout=layout, device=dev)
    names = _param_names(model, named_plan_tensors(model))
    opt = _optimizer(model, plan, recipe, names)
    start_epoch = run.start_epoch
    if run.header is not None:
        _resume(run, model, plan, opt, names)

    n_train = len(dataset.y_train)
    batch = min(recipe.batch, n_train)
    steps = n_train // batch  # drop the last partial batch
    net: nn.Module = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    run.begin({
        "spec": plan.source, "spec_hash": spec_hash(plan), "device": str(dev), "layout": layout,
        "baseline": baseline, "world_size": dist.world, "augment": augment, "torch": torch.__version__, **config,
    })
    reporter = Reporter(dist.main, progress and sys.stdout.isatty())
    acc = plan.accounting
    kind = f"{baseline} baseline" if baseline else f"{plan.members} members"
    reporter.line(
        f"{plan.name}: {kind}, {acc.total_params:,} parameters; {dataset.description}; "
        f"{recipe.epochs} epochs x {steps} steps of {batch}; {recipe.optimizer.name} lr {recipe.optimizer.lr}; "
        f"device {dev}{f' x{dist.world}' if dist.world > 1 else ''}; out {run.out}"
        + (f"; resuming after epoch {start_epoch}" if start_epoch else "")
    )
    x_test = torch.from_numpy(dataset.x_test).to(dev)
    last = _loop(model, net, opt, names, plan, recipe, dataset, augment, dist, run, reporter, batch, steps)

    hash_dir = os.environ.get("MIXC_WEIGHTS_HASH_DIR")
    if hash_dir:
        Path(hash_dir).mkdir(parents=True, exist_ok=True)
        (Path(hash_dir) / f"rank{dist.rank}.sha256").write_text(_weights_hash(model) + "\n")
    if not dist.main:
        return {}
    if last is None:  # nothing left to train: report the checkpoint as it stands
        last = {"epoch": start_epoch, "train_loss": None, **evaluate(predict_member_probs(model, x_test), dataset.y_test)}
    return {**last, "wall_time": time.perf_counter() - t_start}


def _loop(
    model: nn.Module, net: nn.Module, opt: torch.optim.Optimizer, names: dict[int, str], plan: Plan, recipe: Recipe,
    dataset: Dataset, augment: str, dist: _Dist, run: RunWriter, reporter: Reporter, batch: int, steps: int,
) -> dict[str, Any] | None:
    """The epochs from the run's start epoch; rank 0 checks and saves each. Returns the last epoch's record."""
    from mixc.backends.torch.checkpoint import save_checkpoint

    dev, M, seed, epochs = dist.device, plan.members, recipe.seed, recipe.epochs
    n_train = len(dataset.y_train)
    x_train = torch.from_numpy(dataset.x_train).to(dev)
    y_train = torch.from_numpy(dataset.y_train).to(dev)
    x_test = torch.from_numpy(dataset.x_test).to(dev)
    gen = torch.Generator(device=dev)
    last: dict[str, Any] | None = None
    with reporter:
        for epoch in range(run.start_epoch, epochs):
            t0 = time.perf_counter()
            perm = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n_train)).to(dev)
            gen.manual_seed(_seed_of(seed, epoch, dist.rank, 1))
            torch.manual_seed(_seed_of(seed, epoch, dist.rank, 2))
            update = reporter.epoch_task(epoch + 1, epochs, steps)
            net.train()
            loss_sum = torch.zeros((), device=dev)
            lr = recipe.optimizer.lr
            for step in range(steps):
                idx = perm[step * batch : (step + 1) * batch][shard(batch, dist.rank, dist.world)]
                xb = x_train.index_select(0, idx)
                yb = y_train.index_select(0, idx)
                if augment == "crop_flip":
                    xb = crop_flip(xb, gen)
                lr = learning_rate(recipe, epoch * steps + step, steps, epochs)
                for g in opt.param_groups:
                    g["lr"] = lr
                logits = net(xb)  # [b, M, classes]
                loss = F.cross_entropy(
                    logits.transpose(1, 2), yb[:, None].expand(-1, M), label_smoothing=recipe.label_smoothing
                ) * M
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach()
                if reporter.progress is not None and (step % 10 == 0 or step == steps - 1):
                    update(step + 1, float(loss) / M)
            train_loss = float(loss_sum) / steps / M
            if not math.isfinite(train_loss):
                raise TrainError(
                    f"the training loss became {train_loss} in epoch {epoch + 1}; hint: lower the learning rate "
                    f"(--set train.optimizer.lr=...) or add warm-up (--set train.warmup=...)"
                )
            if not dist.main:
                continue
            rec = {"epoch": epoch + 1, "train_loss": train_loss, "lr": lr,
                   **evaluate(predict_member_probs(model, x_test), dataset.y_test),
                   "epoch_time": time.perf_counter() - t0}
            extra = _optimizer_state(opt, names)
            run.save_epoch(rec, lambda meta: save_checkpoint(run.ckpt, model, plan, epoch + 1, extra, meta),
                           {"global_step": str((epoch + 1) * steps)})
            reporter.line(_epoch_line(rec, epochs))
            last = rec
    return last
