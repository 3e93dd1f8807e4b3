"""Training with jax/flax/optax: the :class:`~mixc.backends.base.Trainer` that ``mixc.training``
drives.

What is flax's: one jit-compiled step, optax chains equal to torch's optimisers, data parallel over
local devices with ``jax.sharding``, a dtype policy for bf16/fp16, and optimiser state saved under
the torch loop's names so a run resumes under either backend. The rules: docs/training.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixc.compiler.plan import Plan
from mixc.core.checkpoint_format import grad_scaler_arrays, read_grad_scaler, save_arrays, spec_hash
from mixc.core.errors import TrainError
from mixc.core.layout_choice import TIMED_STEPS, WARMUP_STEPS, LayoutChoice, choose_layout
from mixc.core.method_batches import FAST_ROLES, gradient_scales, lr_scale, mimo_rows
from mixc.core.run_files import CHECKPOINT, METRICS
from mixc.core.weight_decay import decay_skipped_roles
from mixc.spec.recipe import Recipe

__all__ = [
    "TrainError",
    "crop_flip",
    "random_resized_crop",
    "Trainer",
    "devices_for",
    "loss_scale_update",
    "CHECKPOINT",
    "METRICS",
]

_EVAL_BATCH = 1000

#: the forward pass's dtype under each ``precision`` (None: float32 throughout)
COMPUTE_DTYPES = {"fp32": None, "bf16": jnp.bfloat16, "fp16": jnp.float16}
#: fp16 loss scaling: torch.amp.GradScaler's defaults, so either backend scales (and resumes) a run
#: alike
SCALE_INIT, SCALE_GROWTH, SCALE_BACKOFF, SCALE_INTERVAL = 2.0**16, 2.0, 0.5, 2000


# ---------------------------------------------------------------------------
# Pure helpers


def crop_flip(key: jax.Array, x: jax.Array, pad: int = 4) -> jax.Array:
    """Pad-``pad`` random crop plus random horizontal flip of a batch ``[B, C, H, W]``, one draw per
    image."""
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


def random_resized_crop(
    key: jax.Array,
    x: jax.Array,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
    """ImageNet's training augmentation for a batch in memory ``[B, C, H, W]``, torch's rule
    (``backends/torch/train.py``): per image up to 10 draws of an area share in ``scale`` and a
    log-uniform aspect in ``ratio``, the first that fits (else the central crop clamped to
    ``ratio``), resized back to ``H x W`` (bilinear, edges clamped), and a random horizontal flip.
    """
    b, _, h, w = x.shape
    u = jax.random.uniform(key, (b, 23))
    target = h * w * (scale[0] + (scale[1] - scale[0]) * u[:, :10])
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = jnp.exp(log_r[0] + (log_r[1] - log_r[0]) * u[:, 10:20])
    cw, ch = jnp.round(jnp.sqrt(target * aspect)), jnp.round(jnp.sqrt(target / aspect))
    fits = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    first = jnp.argmax(fits, axis=1)[:, None]  # the first draw that fits
    a = w / h
    fw, fh = (
        (round(h * ratio[1]), h)
        if a > ratio[1]
        else (w, round(w / ratio[0]))
        if a < ratio[0]
        else (w, h)
    )
    ok = fits.any(1)
    cw = jnp.where(ok, jnp.take_along_axis(cw, first, 1)[:, 0], fw)
    ch = jnp.where(ok, jnp.take_along_axis(ch, first, 1)[:, 0], fh)
    x0 = jnp.where(ok, jnp.minimum(jnp.floor(u[:, 20] * (w - cw + 1)), w - cw), (w - fw) // 2)
    y0 = jnp.where(ok, jnp.minimum(jnp.floor(u[:, 21] * (h - ch + 1)), h - ch), (h - fh) // 2)
    # [B, W], flipped or not
    cols = jnp.where((u[:, 22] < 0.5)[:, None], w - 1 - jnp.arange(w), jnp.arange(w))
    # source coordinates of each output pixel
    sx = x0[:, None] + (cols + 0.5) * cw[:, None] / w - 0.5
    sy = y0[:, None] + (jnp.arange(h) + 0.5) * ch[:, None] / h - 0.5

    def taps(s, n):  # the two clamped neighbours of each coordinate and the far one's weight
        lo = jnp.floor(s)
        return (
            jnp.clip(lo, 0, n - 1).astype(jnp.int32),
            jnp.clip(lo + 1, 0, n - 1).astype(jnp.int32),
            s - lo,
        )

    def one(img, sy, sx):
        ya, yb, fy = taps(sy, h)
        xa, xb, fx = taps(sx, w)
        rows = img[:, ya, :] * (1 - fy)[None, :, None] + img[:, yb, :] * fy[None, :, None]
        return rows[:, :, xa] * (1 - fx) + rows[:, :, xb] * fx

    return jax.vmap(one)(x, sy, sx).astype(x.dtype)


def loss_scale_update(
    scale: jax.Array, tracker: jax.Array, finite: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The next (loss scale, growth tracker) after a step whose gradients were ``finite`` or not,
    torch's GradScaler rule: a non-finite step halves the scale and restarts the count; the
    2000th good step in a row doubles it (when the double is finite) and restarts the count."""
    grown = tracker + 1
    grow = grown >= SCALE_INTERVAL
    doubled = scale * SCALE_GROWTH
    new_scale = jnp.where(
        finite, jnp.where(grow & jnp.isfinite(doubled), doubled, scale), scale * SCALE_BACKOFF
    )
    new_tracker = jnp.where(finite & ~grow, grown, jnp.zeros_like(tracker))
    return new_scale.astype(scale.dtype), new_tracker.astype(tracker.dtype)


def devices_for(device: str) -> list[jax.Device]:
    """The local devices ``--device`` names: ``cpu``, ``gpu``/``cuda`` (all local ones),
    ``cuda:N``/``gpu:N``."""
    name = str(device).strip().lower()
    platform, _, index = name.partition(":")
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
    try:
        devs = jax.local_devices(backend=platform)
    except RuntimeError as e:
        raise TrainError(
            f"device {device!r} asked for, but jax {jax.__version__} has no {platform} backend here"
            f" ({e}); hint: --device cpu"
        ) from None
    if index:
        if not index.isdigit() or int(index) >= len(devs):
            raise TrainError(
                f"device {device!r}: there are {len(devs)} local {platform} device(s); hint:"
                f" --device {platform}"
            )
        devs = [devs[int(index)]]
    return devs


# ---------------------------------------------------------------------------
# Optimiser


def make_optimizer(
    recipe: Recipe,
    roles: dict[str, str],
    fast_lr: float = 1.0,
    grad_scales: dict[str, float] | None = None,
) -> optax.GradientTransformation:
    """The recipe's optimiser without the learning rate (the step multiplies by -lr).

    ``roles`` maps each parameter key to its plan role, for the weight-decay mask. BatchEnsemble's
    fast weights get no decay and their updates times ``fast_lr`` (torch: their own group's learning
    rate). ``grad_scales`` (parameter key -> factor, ``mixc.core.method_batches.gradient_scales``)
    multiply those gradients first, before clipping and decay, as the torch trainer does after its
    backward.
    """
    skip = decay_skipped_roles(recipe)
    mask = {k: role not in skip and role not in FAST_ROLES for k, role in roles.items()}
    o = recipe.optimizer
    decay = optax.add_decayed_weights(recipe.weight_decay, mask=mask)
    # torch clips the raw gradients (clip_grad_norm_) before its optimiser adds decay: the same
    # order here
    clip = [optax.clip_by_global_norm(recipe.grad_clip)] if recipe.grad_clip else []
    clip = [
        optax.masked(optax.scale(f), {k: (grad_scales or {}).get(k) == f for k in roles})
        for f in sorted(set((grad_scales or {}).values()))
    ] + clip
    fast = {k: role in FAST_ROLES for k, role in roles.items()}
    scale = (
        [optax.masked(optax.scale(fast_lr), fast)] if fast_lr != 1.0 and any(fast.values()) else []
    )
    if o.name == "sgd":
        return optax.chain(
            *clip,
            decay,
            optax.trace(decay=o.momentum, nesterov=o.nesterov and o.momentum > 0),
            *scale,
        )
    return optax.chain(
        *clip, optax.scale_by_adam(b1=o.betas[0], b2=o.betas[1], eps=1e-8), decay, *scale
    )


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


def restore_optimizer(
    state: Any, names: dict[str, str], recipe: Recipe, extra: dict[str, np.ndarray]
) -> Any:
    """``state`` with the buffers found in ``extra`` (missing ones stay zero: torch creates them
    lazily)."""

    def fill(tree: dict, suffix: str) -> dict:
        return {
            k: (
                jnp.asarray(extra[f"optim.{names[k]}.{suffix}"].reshape(v.shape), v.dtype)
                if f"optim.{names[k]}.{suffix}" in extra
                else v
            )
            for k, v in tree.items()
        }

    parts = list(state)
    for i, s in enumerate(parts):
        if isinstance(s, optax.TraceState):
            parts[i] = s._replace(trace=fill(s.trace, "momentum_buffer"))
        elif isinstance(s, optax.ScaleByAdamState):
            steps = [float(v.reshape(-1)[0]) for k, v in extra.items() if k.endswith(".step")]
            count = jnp.asarray(int(max(steps)) if steps else 0, s.count.dtype)
            parts[i] = s._replace(
                count=count, mu=fill(s.mu, "exp_avg"), nu=fill(s.nu, "exp_avg_sq")
            )
    return tuple(parts)


# ---------------------------------------------------------------------------
# The compiled step


_COMPILED: dict[
    tuple, tuple
] = {}  # jitted steps, reused by every Trainer of the same plan and recipe


def _compiled_steps(
    plan: Plan,
    recipe: Recipe,
    graphdef: Any,
    tx: optax.GradientTransformation,
    augment: str,
    replicated: NamedSharding,
    key: tuple,
    compute_graphdef: Any = None,
) -> tuple[Any, Any]:
    """(train step, predict step), jit-compiled once per ``key`` (plan, layout, loss, optimiser and
    precision settings, devices). ``compute_graphdef``: the model built for the forward's dtype
    under bf16/fp16.
    """
    from mixc.backends.flax.model import apply

    hit = _COMPILED.get(key)
    if hit is not None:
        return hit
    eps, classes = recipe.label_smoothing, plan.classes
    compute = COMPUTE_DTYPES[recipe.precision]
    scaled = recipe.precision == "fp16"
    forward_def = graphdef if compute is None else compute_graphdef

    def loss_fn(params, stats, x, y, drop_key, scale):
        if compute is not None:  # the dtype policy: fp32 masters, the forward in `compute`
            params = jax.tree.map(lambda p: p.astype(compute), params)
            x = x.astype(compute)
        logits, new_stats = apply(forward_def, params, stats, x, True, drop_key)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, M, C]
        # [B, C], or [B, M, C] (MIMO)
        target = jax.nn.one_hot(y, classes) * (1.0 - eps) + eps / classes
        member_ce = -((target if y.ndim == 2 else target[:, None, :]) * logp).sum(-1).mean(0)  # [M]
        loss = member_ce.sum()
        return (loss * scale if scaled else loss), (new_stats, loss)

    def train_step(params, stats, opt_state, scaler, x, y, lr, step_key, rows):
        aug_key, drop_key = jax.random.split(step_key)
        if augment == "crop_flip":
            x = crop_flip(aug_key, x)
        elif augment == "random_resized_crop":
            x = random_resized_crop(aug_key, x)
        if rows is not None:  # MIMO: each member its own rows, [b * repetitions, M, ...]
            x, y = x[rows], y[rows]
        scale, tracker = scaler
        (_, (stats, loss)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, stats, x, y, drop_key, scale
        )
        if scaled:
            inv = (1.0 / scale).astype(jnp.float32)
            grads = jax.tree.map(lambda g: g * inv, grads)
            finite = jnp.all(jnp.stack([jnp.isfinite(g).all() for g in jax.tree.leaves(grads)]))
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = jax.tree.map(lambda p, u: p - lr * u.astype(p.dtype), params, updates)
        # a step with inf/NaN gradients is skipped (BatchNorm statistics still move, as in torch)
        if scaled:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            new_params, new_opt_state = keep(new_params, params), keep(new_opt_state, opt_state)
            scaler = loss_scale_update(scale, tracker, finite)
        return new_params, stats, new_opt_state, scaler, loss

    def predict_step(params, stats, x):
        logits, _ = apply(graphdef, params, stats, x, False)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    hit = _COMPILED[key] = (
        jax.jit(train_step, donate_argnums=(0, 1, 2, 3), out_shardings=replicated),
        jax.jit(predict_step, out_shardings=replicated),
    )
    return hit


def _fits_on_devices(nbytes: int, devices: list[jax.Device]) -> bool:
    """Whether a training set of ``nbytes`` goes to the accelerators (each holds a copy): at most
    half the memory each has free, as under torch. On the CPU the host array is used as it is."""
    if devices[0].platform == "cpu":
        return False
    stats = [d.memory_stats() or {} for d in devices]
    free = [s.get("bytes_limit", 0) - s.get("bytes_in_use", 0) for s in stats]
    return nbytes <= min(free) // 2


class Trainer:
    """The model's functional state and its jit-compiled train and predict steps over a device mesh:
    the driver's Trainer.

    ``params``/``stats``/``opt_state`` are pytrees keyed by module attribute;
    ``names`` maps those keys to plan tensor names.
    """

    def __init__(
        self,
        plan: Plan,
        recipe: Recipe,
        devices: list[jax.Device],
        layout: str = "auto",
        augment: str = "none",
        seed: int = 0,
        compile: bool = False,
    ) -> None:
        if compile:
            raise TrainError(
                "--compile is torch.compile; the flax backend's steps are always jit-compiled by"
                " XLA; hint: drop --compile"
            )
        self.plan, self.recipe, self.augment, self.seed = plan, recipe, augment, seed
        self.devices = devices
        self.rank, self.world = 0, len(devices)
        platform = devices[0].platform  # the training devices', not the process's default backend
        self.device_label = f"{platform}{f' x{self.world}' if self.world > 1 else ''} (flax)"
        self.run_options = {
            "device": f"{platform} x{self.world}",
            "world_size": self.world,
            "jax": jax.__version__,
        }
        self.mesh = Mesh(np.array(devices), ("data",))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        self.layout = layout  # "auto" is made concrete by begin()
        #: the layout trained in: chosen by begin() (the driver sets a run folder's recorded one)
        self.layout_choice: LayoutChoice | None = None

    def begin(self, x_train: np.ndarray, y_train: np.ndarray, batch: int) -> None:
        """Hold the training set on the host, choose the layout (mixc.core.layout_choice: timed on
        an accelerator under auto), then build the model (from ``seed``) and its optimiser and jit
        the steps."""
        if batch % self.world:
            raise TrainError(
                f"the batch of {batch} does not split evenly over {self.world}"
                f" {self.devices[0].platform} devices; hint: --batch-size"
                f" {batch - batch % self.world or self.world}"
            )
        self.x_train, self.y_train = x_train, y_train.astype(np.int32)
        self.on_device = None  # (x, y) on the devices when the set fits there: gathered there
        if _fits_on_devices(x_train.nbytes, self.devices):
            self.on_device = tuple(
                jax.device_put(a, self.replicated) for a in (self.x_train, self.y_train)
            )
        self.method_rng = np.random.default_rng(self.recipe.seed)  # MIMO's (reseeded per epoch)
        if self.layout_choice is None:
            self.layout_choice = choose_layout(
                self.layout,
                self.devices[0].platform,
                False,  # flax's convolutions are channels-last already
                lambda c: self._time_steps(c[0], batch),
            )
        self._install(self.layout_choice.layout)

    def _time_steps(self, layout: str, batch: int) -> list[float]:
        """Seconds of each timed step of ``layout`` (after the warm-up steps, which compile it) on
        the first batch of the training set, at learning rate 0; the state is rebuilt afterwards."""
        self._install(layout)
        self.begin_epoch(0, 0)
        idx, times = np.arange(batch), []
        for i in range(WARMUP_STEPS + TIMED_STEPS):
            t0 = time.perf_counter()
            jax.block_until_ready(self.step(idx, 0.0, i))
            times.append(time.perf_counter() - t0)
        return times[WARMUP_STEPS:]

    def _install(self, layout: str) -> None:
        """Build the model in ``layout`` (from ``seed``) with its optimiser state and jit-compiled
        steps (cached by their settings, so the timed layout is not compiled twice)."""
        from mixc.backends.flax.model import attr_to_plan, build, compute_graphdef, split

        plan, recipe, devices = self.plan, self.recipe, self.devices
        with jax.default_device(devices[0]):
            model = build(plan, layout=layout, seed=self.seed, platform=devices[0].platform)
        self.graphdef, params, stats = split(model)
        self.names = attr_to_plan(model)
        roles = {t.name: t.role for t in plan.tensors}
        scales = gradient_scales(plan, recipe.shared_gradient)
        self.tx = make_optimizer(
            recipe,
            {k: roles[self.names[k]] for k in params},
            lr_scale(plan, "fast_in"),
            {k: scales[self.names[k]] for k in params if self.names[k] in scales},
        )
        self.params = jax.device_put(params, self.replicated)
        self.stats = jax.device_put(stats, self.replicated)
        self.opt_state = jax.device_put(self.tx.init(params), self.replicated)
        self.scaler = jax.device_put(
            (jnp.float32(SCALE_INIT if recipe.precision == "fp16" else 1.0), jnp.int32(0)),
            self.replicated,
        )
        compute = COMPUTE_DTYPES[recipe.precision]
        forward_def = (
            None
            if compute is None
            else compute_graphdef(plan, layout, compute, devices[0].platform)
        )

        def steps(augment: str) -> tuple[Any, Any]:
            key = (
                spec_hash(plan),
                layout,
                augment,
                recipe.label_smoothing,
                recipe.optimizer.model_dump_json(),
                recipe.weight_decay,
                tuple(recipe.weight_decay_exclude),
                tuple(d.id for d in devices),
                devices[0].platform,
                recipe.grad_clip,
                recipe.precision,
                recipe.shared_gradient,
                plan.method.model_dump_json(),  # fast_lr shapes the optimiser but not the spec hash
            )
            return _compiled_steps(
                plan, recipe, self.graphdef, self.tx, augment, self.replicated, key, forward_def
            )

        self._step, self._predict = steps(self.augment)
        # a streamed batch was random-resized-cropped by the loader: only crop_flip is applied to it
        # here
        self._stream_step = (
            self._step if self.augment != "random_resized_crop" else steps("none")[0]
        )

    def begin_epoch(self, augment_seed: int, dropout_seed: int) -> None:
        """One key per epoch (augmentation and dropout split it per step; ``dropout_seed`` is not
        needed)."""
        self.epoch_key = jax.random.key(augment_seed & 0x7FFFFFFF)
        self.method_rng = np.random.default_rng(augment_seed)  # the torch trainer's MIMO rows

    def step(self, idx: np.ndarray, lr: float, step: int) -> jax.Array:
        """One optimiser step on the global batch ``idx``; returns the (on-device) summed member
        loss."""
        key = jax.random.fold_in(self.epoch_key, step)
        if self.on_device is None:
            return self.step_arrays(self.x_train[idx], self.y_train[idx], lr, key)
        rows = jax.device_put(np.asarray(idx, np.int32), self.replicated)
        x, y = (jnp.take(a, rows, axis=0) for a in self.on_device)
        return self.step_arrays(x, y, lr, key)

    def step_batch(self, x: np.ndarray, y: np.ndarray, lr: float, step: int) -> jax.Array:
        """One step on a streamed batch (numpy, from the shared folder loader, which crops it if
        that is the augmentation)."""
        return self.step_arrays(
            np.asarray(x),
            np.asarray(y, np.int32),
            lr,
            jax.random.fold_in(self.epoch_key, step),
            streamed=True,
        )

    def step_arrays(
        self, x: Any, y: Any, lr: float, key: jax.Array, streamed: bool = False
    ) -> jax.Array:
        """One optimiser step on the global batch ``x``, ``y`` with the step's random ``key``."""
        xs = jax.device_put(x, self.batch_sharding)  # from the host, or resharded on the devices
        ys = jax.device_put(y, self.batch_sharding)
        rows = mimo_rows(len(x), self.plan, self.method_rng)
        rows = None if rows is None else jax.device_put(rows.astype(np.int32), self.replicated)
        self.params, self.stats, self.opt_state, self.scaler, loss = (
            self._stream_step if streamed else self._step
        )(self.params, self.stats, self.opt_state, self.scaler, xs, ys, jnp.float32(lr), key, rows)
        return loss

    def fetch_losses(self, losses: list[jax.Array]) -> Callable[[], list[float]]:
        """Start copying step losses to the host; the returned function waits for those steps alone
        (jax tracks each array's readiness, so nothing queued after them is waited for)."""
        values = jnp.stack(losses).astype(jnp.float32)
        values.copy_to_host_async()
        return lambda: np.asarray(values).tolist()

    def predict(self, x: np.ndarray, batch: int = _EVAL_BATCH) -> np.ndarray:
        """Each member's softmax over ``x``, ``[N, M, classes]`` float32 numpy, in eval mode."""
        out = [
            np.asarray(
                self._predict(
                    self.params, self.stats, jax.device_put(x[i : i + batch], self.replicated)
                )
            )
            for i in range(0, len(x), batch)
        ]
        return np.concatenate(out)

    predict_member_probs = predict

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Every plan tensor (parameters and BatchNorm statistics) as host arrays."""
        out = {self.names[k]: np.asarray(v) for k, v in {**self.params, **self.stats}.items()}
        return {t.name: out[t.name] for t in self.plan.tensors}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace every plan tensor (``arrays``: plan name -> array, e.g. from a checkpoint)."""
        params = {k: jnp.asarray(arrays[self.names[k]], v.dtype) for k, v in self.params.items()}
        stats = {k: jnp.asarray(arrays[self.names[k]], v.dtype) for k, v in self.stats.items()}
        self.params = jax.device_put(params, self.replicated)
        self.stats = jax.device_put(stats, self.replicated)

    def optimizer_arrays(self) -> dict[str, np.ndarray]:
        """The optimiser state and, under fp16, the loss scaler's (torch's names for both)."""
        out = optimizer_arrays(self.opt_state, self.names, self.recipe)
        if self.recipe.precision == "fp16":
            out.update(grad_scaler_arrays(float(self.scaler[0]), int(self.scaler[1])))
        return out

    def load_optimizer(self, arrays: dict[str, np.ndarray]) -> None:
        state = restore_optimizer(self.opt_state, self.names, self.recipe, arrays)
        self.opt_state = jax.device_put(state, self.replicated)
        scaler = read_grad_scaler(arrays)
        # another precision's run: a fresh scaler
        if scaler is not None and self.recipe.precision == "fp16":
            self.scaler = jax.device_put(
                (jnp.float32(scaler[0]), jnp.int32(scaler[1])), self.replicated
            )

    def save(self, path: Path, epoch: int, metadata: dict[str, Any]) -> None:
        save_arrays(path, self.state_arrays(), self.plan, epoch, self.optimizer_arrays(), metadata)

    def close(self) -> None:
        """Nothing to release: jax owns its devices for the life of the process."""
