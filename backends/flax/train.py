"""Training a Plan's ensemble with jax/flax/optax: `mixc train --backend flax`.

The same recipe, files and output as the torch loop (``backends/torch/train.py``);
what differs is only how a step runs:

- One jit-compiled step: augmentation, forward, the loss (sum over members of
  each member's batch-mean cross-entropy, with label smoothing), gradients,
  the optimiser update, new BatchNorm statistics. The learning rate is an
  argument of the step, computed on the host by :func:`learning_rate` (the
  torch loop's function of the global step), so schedules never recompile.
- Optimiser (optax): SGD is ``add_decayed_weights`` (coupled L2, masked) then
  ``trace`` (momentum, Nesterov), exactly PyTorch's SGD; AdamW is
  ``scale_by_adam`` then masked decoupled decay. The mask skips the roles in
  ``recipe.weight_decay_exclude`` (``alphas`` -> alpha, ``bn`` -> bn_weight and
  bn_bias, ``bias`` -> plain and member biases).
- Data parallel over every local device of the chosen platform with
  ``jax.sharding``: parameters replicated, each batch split along a ``data``
  mesh axis. The step is one SPMD program over the global batch, so its
  result equals the one-device run's up to float rounding (BatchNorm
  statistics are the global batch's, unlike per-rank statistics under torch DDP).
- Randomness: each epoch's permutation is numpy's ``default_rng([seed, epoch])``
  (the torch loop's), augmentation and dropout keys fold the step into a key
  derived from ``(seed, epoch)``; checkpoints at epoch ends, so a resumed run
  replays the rest exactly.
- Checkpoints: the shared format (``mixc.checkpoint_format``), plan tensor
  names; the optimiser state under the torch loop's names
  (``optim.<tensor>.momentum_buffer``; AdamW ``exp_avg``, ``exp_avg_sq``,
  ``step``), so a run folder resumes under either backend.
- The run folder (lock, recipe check on resume, divergence, crash repair,
  files): ``mixc.run_folder.RunWriter``, the torch loop's own.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixc.checkpoint_format import CheckpointError, read_tensors, save_arrays, spec_hash
from mixc.compiler.plan import Plan
from mixc.spec.recipe import Recipe
from mixc.data import Dataset, check_compatible, load_dataset
from mixc.metrics import evaluate
from mixc.run_folder import CHECKPOINT, METRICS, Reporter, RunWriter, TrainError, epoch_line, seed_of

__all__ = ["train", "TrainError", "learning_rate", "crop_flip", "Trainer", "CHECKPOINT", "METRICS"]

_EVAL_BATCH = 1000

_EXCLUDE_ROLES = {
    "alphas": {"alpha"},
    "bn": {"bn_weight", "bn_bias"},
    "bias": {"plain_bias", "member_bias"},
}


# ---------------------------------------------------------------------------
# Pure helpers


def learning_rate(recipe: Recipe, step: int, steps_per_epoch: int, epochs: int) -> float:
    """The learning rate of global step ``step`` (0-based), warm-up included (the torch loop's rule)."""
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


def crop_flip(key: jax.Array, x: jax.Array, pad: int = 4) -> jax.Array:
    """Pad-``pad`` random crop plus random horizontal flip of a batch ``[B, C, H, W]``, one draw per image."""
    b, c, h, w = x.shape
    xp = jnp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ky, kx, kf = jax.random.split(key, 3)
    oy = jax.random.randint(ky, (b,), 0, 2 * pad + 1)
    ox = jax.random.randint(kx, (b,), 0, 2 * pad + 1)
    flip = jax.random.bernoulli(kf, 0.5, (b,))

    def one(img, y0, x0, f):
        crop = jax.lax.dynamic_slice(img, (0, y0, x0), (c, h, w))
        return jnp.where(f, crop[..., ::-1], crop)

    return jax.vmap(one)(xp, oy, ox, flip)


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


def devices_for(device: str) -> list[jax.Device]:
    """The local devices ``--device`` names: ``cpu``, ``gpu``/``cuda`` (all local ones), ``cuda:N``/``gpu:N``."""
    name = str(device).strip().lower()
    platform, _, index = name.partition(":")
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
    try:
        devs = jax.local_devices(backend=platform)
    except RuntimeError as e:
        raise TrainError(
            f"device {device!r} asked for, but jax {jax.__version__} has no {platform} backend here ({e}); "
            "hint: --device cpu"
        ) from None
    if index:
        if not index.isdigit() or int(index) >= len(devs):
            raise TrainError(f"device {device!r}: there are {len(devs)} local {platform} device(s); hint: --device {platform}")
        devs = [devs[int(index)]]
    return devs


# ---------------------------------------------------------------------------
# Optimiser


def make_optimizer(recipe: Recipe, roles: dict[str, str]) -> optax.GradientTransformation:
    """The recipe's optimiser without the learning rate (the step multiplies by -lr).

    ``roles`` maps each parameter key to its plan role, for the weight-decay mask.
    """
    skip = set().union(*(_EXCLUDE_ROLES[e] for e in recipe.weight_decay_exclude))
    mask = {k: role not in skip for k, role in roles.items()}
    o = recipe.optimizer
    decay = optax.add_decayed_weights(recipe.weight_decay, mask=mask)
    if o.name == "sgd":
        return optax.chain(decay, optax.trace(decay=o.momentum, nesterov=o.nesterov and o.momentum > 0))
    return optax.chain(optax.scale_by_adam(b1=o.betas[0], b2=o.betas[1], eps=1e-8), decay)


def _find(state: Any, kind: type) -> Any:
    for s in state:
        if isinstance(s, kind):
            return s
    raise AssertionError(f"no {kind.__name__} in the optimiser state")


def optimizer_arrays(state: Any, names: dict[str, str], recipe: Recipe) -> dict[str, np.ndarray]:
    """The optimiser state as checkpoint tensors, under the torch loop's names."""
    out = {}
    if recipe.optimizer.name == "sgd":
        trace = _find(state, optax.TraceState).trace
        for k, v in trace.items():
            out[f"optim.{names[k]}.momentum_buffer"] = np.asarray(v, dtype=np.float32)
    else:
        adam = _find(state, optax.ScaleByAdamState)
        step = np.asarray([float(adam.count)], dtype=np.float32)
        for k in adam.mu:
            out[f"optim.{names[k]}.exp_avg"] = np.asarray(adam.mu[k], dtype=np.float32)
            out[f"optim.{names[k]}.exp_avg_sq"] = np.asarray(adam.nu[k], dtype=np.float32)
            out[f"optim.{names[k]}.step"] = step
    return out


def restore_optimizer(state: Any, names: dict[str, str], recipe: Recipe, extra: dict[str, np.ndarray]) -> Any:
    """``state`` with the buffers found in ``extra`` (missing ones stay zero: torch creates them lazily)."""

    def fill(tree: dict, suffix: str) -> dict:
        return {
            k: jnp.asarray(extra[f"optim.{names[k]}.{suffix}"].reshape(v.shape), v.dtype)
            if f"optim.{names[k]}.{suffix}" in extra else v
            for k, v in tree.items()
        }

    parts = list(state)
    for i, s in enumerate(parts):
        if isinstance(s, optax.TraceState):
            parts[i] = s._replace(trace=fill(s.trace, "momentum_buffer"))
        elif isinstance(s, optax.ScaleByAdamState):
            steps = [float(v.reshape(-1)[0]) for k, v in extra.items() if k.endswith(".step")]
            count = jnp.asarray(int(max(steps)) if steps else 0, s.count.dtype)
            parts[i] = s._replace(count=count, mu=fill(s.mu, "exp_avg"), nu=fill(s.nu, "exp_avg_sq"))
    return tuple(parts)


# ---------------------------------------------------------------------------
# The compiled step


_COMPILED: dict[tuple, tuple] = {}  # jitted steps, reused by every Trainer of the same plan and recipe


def _compiled_steps(plan: Plan, recipe: Recipe, graphdef: Any, tx: optax.GradientTransformation, augment: str,
                    replicated: NamedSharding, key: tuple) -> tuple[Any, Any]:
    """(train step, predict step), jit-compiled once per ``key`` (plan, layout, loss and optimiser settings, devices)."""
    from mixc.backends.flax.model import apply

    hit = _COMPILED.get(key)
    if hit is not None:
        return hit
    eps, classes = recipe.label_smoothing, plan.classes

    def loss_fn(params, stats, x, y, drop_key):
        logits, new_stats = apply(graphdef, params, stats, x, True, drop_key)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, M, C]
        target = jax.nn.one_hot(y, classes) * (1.0 - eps) + eps / classes
        member_ce = -(target[:, None, :] * logp).sum(-1).mean(0)  # [M]: each member's batch-mean CE
        return member_ce.sum(), new_stats

    def train_step(params, stats, opt_state, x, y, lr, step_key):
        aug_key, drop_key = jax.random.split(step_key)
        if augment == "crop_flip":
            x = crop_flip(aug_key, x)
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y, drop_key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - lr * u.astype(p.dtype), params, updates)
        return params, stats, opt_state, loss

    def predict_step(params, stats, x):
        logits, _ = apply(graphdef, params, stats, x, False)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    hit = _COMPILED[key] = (
        jax.jit(train_step, donate_argnums=(0, 1, 2), out_shardings=replicated),
        jax.jit(predict_step, out_shardings=replicated),
    )
    return hit


class Trainer:
    """The model's functional state and its jit-compiled train and predict steps, over a device mesh.

    ``params``/``stats``/``opt_state`` are pytrees keyed by module attribute;
    ``names`` maps those keys to plan tensor names.
    """

    def __init__(self, plan: Plan, recipe: Recipe, devices: list[jax.Device], layout: str = "auto",
                 augment: str = "none", seed: int = 0) -> None:
        from mixc.backends.flax.model import attr_to_plan, build, split

        self.plan, self.recipe, self.augment = plan, recipe, augment
        self.devices = devices
        self.mesh = Mesh(np.array(devices), ("data",))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        platform = devices[0].platform  # the training devices', not the process's default backend
        with jax.default_device(devices[0]):
            model = build(plan, layout=layout, seed=seed, platform=platform)
        self.layout = layout if layout != "auto" else ("loop" if platform == "cpu" else "grouped")
        self.graphdef, params, stats = split(model)
        self.names = attr_to_plan(model)
        roles = {t.name: t.role for t in plan.tensors}
        self.tx = make_optimizer(recipe, {k: roles[self.names[k]] for k in params})
        self.params = jax.device_put(params, self.replicated)
        self.stats = jax.device_put(stats, self.replicated)
        self.opt_state = jax.device_put(self.tx.init(params), self.replicated)
        key = (
            spec_hash(plan), self.layout, augment, recipe.label_smoothing, recipe.optimizer.model_dump_json(),
            recipe.weight_decay, tuple(recipe.weight_decay_exclude), tuple(d.id for d in devices), devices[0].platform,
        )
        self._step, self._predict = _compiled_steps(plan, recipe, self.graphdef, self.tx, augment, self.replicated, key)

    # -- host side -------------------------------------------------------------

    def step(self, x: np.ndarray, y: np.ndarray, lr: float, key: jax.Array) -> jax.Array:
        """One optimiser step on the global batch ``x``, ``y``; returns the (on-device) summed member loss."""
        xs = jax.device_put(x, self.batch_sharding)
        ys = jax.device_put(y, self.batch_sharding)
        self.params, self.stats, self.opt_state, loss = self._step(
            self.params, self.stats, self.opt_state, xs, ys, jnp.float32(lr), key
        )
        return loss

    def predict_member_probs(self, x: np.ndarray, batch: int = _EVAL_BATCH) -> np.ndarray:
        """Each member's softmax over ``x``, ``[N, M, classes]`` float32 numpy, in eval mode."""
        out = [
            np.asarray(self._predict(self.params, self.stats, jax.device_put(x[i : i + batch], self.replicated)))
            for i in range(0, len(x), batch)
        ]
        return np.concatenate(out)

    def plan_arrays(self) -> dict[str, np.ndarray]:
        """Every plan tensor (parameters and BatchNorm statistics) as host arrays."""
        out = {self.names[k]: np.asarray(v) for k, v in {**self.params, **self.stats}.items()}
        return {t.name: out[t.name] for t in self.plan.tensors}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace every plan tensor (``arrays``: plan name -> array, e.g. from a checkpoint)."""
        params = {k: jnp.asarray(arrays[self.names[k]], v.dtype) for k, v in self.params.items()}
        stats = {k: jnp.asarray(arrays[self.names[k]], v.dtype) for k, v in self.stats.items()}
        self.params = jax.device_put(params, self.replicated)
        self.stats = jax.device_put(stats, self.replicated)

    def optimizer_arrays(self) -> dict[str, np.ndarray]:
        return optimizer_arrays(self.opt_state, self.names, self.recipe)

    def load_optimizer(self, extra: dict[str, np.ndarray]) -> None:
        state = restore_optimizer(self.opt_state, self.names, self.recipe, extra)
        self.opt_state = jax.device_put(state, self.replicated)

    def save(self, path: Path, epoch: int, metadata: dict[str, str]) -> None:
        save_arrays(path, self.plan_arrays(), self.plan, epoch, self.optimizer_arrays(), metadata)


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
    device: str = "cpu",
    seed: int | None = None,
    layout: str = "auto",
    baseline: str | None = None,
    progress: bool = True,
    config: dict[str, Any] | None = None,
    allow_recipe_change: bool = False,
) -> dict[str, Any]:
    """Train ``plan`` with ``recipe`` into ``out_dir`` (resuming it if it holds a checkpoint).

    The torch loop's signature and behaviour; ``device`` picks the jax
    platform (``cpu``, ``gpu``/``cuda``, ``cuda:N``) and every local device of
    it is used, data parallel. Returns the final test metrics (see
    :func:`mixc.metrics.evaluate`) plus ``epoch``, ``train_loss`` and ``wall_time``.
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
    recipe = Recipe.model_validate({**recipe.model_dump(), **updates})

    dataset = data if isinstance(data, Dataset) else load_dataset(recipe.data, recipe.data_dir)
    check_compatible(dataset, plan.input_shape, plan.classes)
    augment = _augment_mode(recipe, plan)
    if layout not in ("auto", "grouped", "loop"):
        raise TrainError(f"layout must be auto, grouped or loop, not {layout!r}")
    t_start = time.perf_counter()
    devices = devices_for(device)
    with RunWriter(Path(out_dir), plan, recipe, allow_recipe_change=allow_recipe_change) as run:
        return _run(plan, recipe, dataset, augment, devices, run, layout, baseline, progress, config or {}, t_start)


def _resume(run: RunWriter, trainer: Trainer, plan: Plan) -> None:
    """Load the run's checkpoint (verified: header, checksum, finite tensors) into the trainer."""
    try:
        loaded, extra, _ = read_tensors(run.ckpt, plan)
    except CheckpointError as e:
        raise TrainError(
            f"cannot resume from {run.ckpt}: {e}; hint: pass another --out folder for {plan.name}, "
            "or delete that one to start over"
        ) from e
    trainer.load_arrays(loaded)
    trainer.load_optimizer(extra)


def _run(
    plan: Plan, recipe: Recipe, dataset: Dataset, augment: str, devices: list[jax.Device], run: RunWriter,
    layout: str, baseline: str | None, progress: bool, config: dict[str, Any], t_start: float,
) -> dict[str, Any]:
    n_train = len(dataset.y_train)
    batch = min(recipe.batch, n_train)
    steps = n_train // batch  # drop the last partial batch
    world = len(devices)
    if batch % world:
        raise TrainError(
            f"the batch of {batch} does not split evenly over {world} {devices[0].platform} devices; "
            f"hint: --batch-size {batch - batch % world or world}"
        )
    trainer = Trainer(plan, recipe, devices, layout, augment, recipe.seed)
    start_epoch = run.start_epoch
    if run.header is not None:
        _resume(run, trainer, plan)
    run.begin({
        "spec": plan.source, "spec_hash": spec_hash(plan), "device": f"{devices[0].platform} x{world}",
        "layout": layout, "baseline": baseline, "world_size": world, "augment": augment, "jax": jax.__version__,
        **config,
    })
    reporter = Reporter(True, progress and sys.stdout.isatty())
    acc = plan.accounting
    kind = f"{baseline} baseline" if baseline else f"{plan.members} members"
    reporter.line(
        f"{plan.name}: {kind}, {acc.total_params:,} parameters; {dataset.description}; "
        f"{recipe.epochs} epochs x {steps} steps of {batch}; {recipe.optimizer.name} lr {recipe.optimizer.lr}; "
        f"device {devices[0].platform}{f' x{world}' if world > 1 else ''} (flax); out {run.out}"
        + (f"; resuming after epoch {start_epoch}" if start_epoch else "")
    )
    last = _loop(trainer, plan, recipe, dataset, run, reporter, batch, steps)
    if last is None:  # nothing left to train: report the checkpoint as it stands
        last = {"epoch": start_epoch, "train_loss": None,
                **evaluate(trainer.predict_member_probs(dataset.x_test), dataset.y_test)}
    return {**last, "wall_time": time.perf_counter() - t_start}


def _loop(trainer: Trainer, plan: Plan, recipe: Recipe, dataset: Dataset, run: RunWriter, reporter: Reporter,
          batch: int, steps: int) -> dict[str, Any] | None:
    """The epochs from the run's start epoch, each checked and saved; returns the last epoch's record."""
    M, seed, epochs = plan.members, recipe.seed, recipe.epochs
    n_train = len(dataset.y_train)
    x_train, y_train = dataset.x_train, dataset.y_train.astype(np.int32)
    last: dict[str, Any] | None = None
    with reporter:
        for epoch in range(run.start_epoch, epochs):
            t0 = time.perf_counter()
            perm = np.random.default_rng([seed, epoch]).permutation(n_train)
            epoch_key = jax.random.key(seed_of(seed, epoch, 0, 1) & 0x7FFFFFFF)
            update = reporter.epoch_task(epoch + 1, epochs, steps)
            loss_sum = jnp.zeros(())
            lr = recipe.optimizer.lr
            for step in range(steps):
                idx = perm[step * batch : (step + 1) * batch]
                lr = learning_rate(recipe, epoch * steps + step, steps, epochs)
                loss = trainer.step(x_train[idx], y_train[idx], lr, jax.random.fold_in(epoch_key, step))
                loss_sum = loss_sum + loss
                if reporter.progress is not None and (step % 10 == 0 or step == steps - 1):
                    update(step + 1, float(loss) / M)
            train_loss = float(loss_sum) / steps / M
            if not math.isfinite(train_loss):
                raise TrainError(
                    f"the training loss became {train_loss} in epoch {epoch + 1}; hint: lower the learning rate "
                    f"(--set train.optimizer.lr=...) or add warm-up (--set train.warmup=...)"
                )
            rec = {"epoch": epoch + 1, "train_loss": train_loss, "lr": lr,
                   **evaluate(trainer.predict_member_probs(dataset.x_test), dataset.y_test),
                   "epoch_time": time.perf_counter() - t0}
            run.save_epoch(rec, lambda meta: trainer.save(run.ckpt, epoch + 1, meta),
                           {"global_step": str((epoch + 1) * steps), "backend": "flax"})
            reporter.line(epoch_line(rec, epochs))
            last = rec
    return last
