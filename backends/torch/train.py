"""Training with torch: the :class:`~mixc.backends.base.Trainer` that ``mixc.training`` drives.

What is torch's: the optimiser groups and the gradient scales, augmentation on the device, where
the training set lives, DistributedDataParallel, and the fp16 loss scaler in the checkpoint. The
rules: docs/training.md.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixc.backends.torch.predict import host_tensor, predict_member_probs, torch_device
from mixc.compiler.plan import Plan
from mixc.core.data import shard
from mixc.core.errors import TrainError
from mixc.core.layout_choice import (
    TIMED_STEPS,
    WARMUP_STEPS,
    Candidate,
    LayoutChoice,
    choose_layout,
)
from mixc.core.method_batches import FAST_ROLES, gradient_scales, lr_scale, mimo_rows
from mixc.core.run_files import CHECKPOINT, METRICS
from mixc.core.weight_decay import decay_skipped_roles
from mixc.spec.recipe import Recipe

__all__ = [
    "TrainError",
    "TorchTrainer",
    "crop_flip",
    "random_resized_crop",
    "predict_member_probs",
    "CHECKPOINT",
    "METRICS",
]


# ---------------------------------------------------------------------------
# Pure helpers


def crop_flip(
    x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4
) -> torch.Tensor:
    """Pad-``pad`` random crop plus random horizontal flip of a batch ``[B, C, H, W]``, one draw per
    image."""
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


def crop_boxes(
    u: torch.Tensor,
    h: int,
    w: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[torch.Tensor, ...]:
    """(x0, y0, crop width, crop height) per image, from uniforms ``u [B, 22]``, by the image-folder
    loader's rule (``mixc.core.imagefolder.random_resized_crop``, torchvision's): up to 10 draws
    of an area share in ``scale`` and a log-uniform aspect in ``ratio``, the first that fits;
    else the central crop clamped to ``ratio``.
    """
    area, log_r = h * w, torch.log(torch.tensor(ratio, dtype=torch.float64))
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, :10].double())
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[:, 10:20].double())
    cw, ch = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
    fits = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    first = fits.int().argmax(1, keepdim=True)  # the first draw that fits
    a = w / h
    fw, fh = (
        (round(h * ratio[1]), h)
        if a > ratio[1]
        else (w, round(w / ratio[0]))
        if a < ratio[0]
        else (w, h)
    )
    ok = fits.any(1)
    cw = torch.where(ok, cw.gather(1, first)[:, 0], float(fw))
    ch = torch.where(ok, ch.gather(1, first)[:, 0], float(fh))
    x0 = torch.where(
        ok, torch.floor(u[:, 20].double() * (w - cw + 1)).clamp(max=w - cw), float((w - fw) // 2)
    )
    y0 = torch.where(
        ok, torch.floor(u[:, 21].double() * (h - ch + 1)).clamp(max=h - ch), float((h - fh) // 2)
    )
    return x0, y0, cw, ch


def random_resized_crop(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """ImageNet's training augmentation for a batch in memory ``[B, C, H, W]``: per image a random
    crop (:func:`crop_boxes`) resized back to ``H x W`` (bilinear, edges clamped) and a random
    horizontal flip. In memory the images are already at the model's size, so this upsamples a
    part of that; a streamed folder's loader crops the full-size file instead."""
    b, _, h, w = x.shape
    dev = x.device
    u = torch.rand(b, 23, generator=generator, device=dev)
    x0, y0, cw, ch = crop_boxes(u[:, :22], h, w, scale, ratio)
    flip = u[:, 22] < 0.5
    # affine_grid maps output coordinates in [-1, 1] (pixel centres, align_corners=False) to input
    # ones: source pixel = x0 + (j + 0.5) * cw / W - 0.5, i.e. normalised sx * u + tx
    theta = torch.zeros(b, 2, 3, dtype=torch.float64, device=dev)
    theta[:, 0, 0] = torch.where(flip, -cw / w, cw / w)
    theta[:, 0, 2] = (2 * x0 + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * y0 + ch) / h - 1
    grid = F.affine_grid(theta.to(x.dtype), [b, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


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
    """Import DDP's lazily imported modules before any process group exists (see
    ``_DDP_MODULES``)."""
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
        dev = torch_device(device, TrainError)
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
        """Free the process group while gloo's worker threads are idle.

        The group's destructor joins those threads with the GIL held; a worker still tearing
        down its last collective needs the GIL for that (its work object holds Python
        thread-local state), so freeing the group right after a collective can deadlock (seen
        in rank 1, which goes straight from its last backward to here). So: a barrier, a short
        GIL-free sleep for the workers to finish it, then the group goes.
        """
        if self.owns_group:
            import torch.distributed as dist

            # whatever still references the group (a DistributedDataParallel reducer) goes first
            gc.collect()
            dist.barrier()
            time.sleep(0.2)
            dist.destroy_process_group()


def _param_names(model: nn.Module, plan_tensors: dict[str, torch.Tensor]) -> dict[int, str]:
    """Stable names for every trainable parameter: the plan's, else the module path."""
    names = {id(t): n for n, t in plan_tensors.items()}
    for n, p in model.named_parameters():
        names.setdefault(id(p), "module." + n)
    return names


def _optimizer(
    model: nn.Module, plan: Plan, recipe: Recipe, names: dict[int, str]
) -> torch.optim.Optimizer:
    """SGD or AdamW over three groups: decayed, not decayed, and BatchEnsemble's fast weights (no
    decay, their own learning-rate multiplier ``lr_scale``, applied in ``_step``)."""
    roles = {t.name: t.role for t in plan.tensors}
    skip = decay_skipped_roles(recipe)
    decay, no_decay, fast = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            role = roles.get(names[id(p)])
            (fast if role in FAST_ROLES else no_decay if role in skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": recipe.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": fast, "weight_decay": 0.0, "lr_scale": lr_scale(plan, "fast_in")},
    ]
    groups = [g for g in groups if g["params"]]
    o = recipe.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(
            groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0
        )
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))


def _optimizer_state(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value):
                    out[f"optim.{names[id(p)]}.{key}"] = (
                        value.detach().reshape(value.shape or (1,)).cpu().contiguous()
                    )
    return out


def _load_optimizer_state(
    opt: torch.optim.Optimizer, names: dict[int, str], extra: dict[str, torch.Tensor]
) -> None:
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
# The Trainer


def _weights_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether a training set of ``nbytes`` goes to the accelerator: at most half its free memory,
    the rest left for the model, its activations and the optimiser."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= free // 2


def _training_set(x: np.ndarray, device: torch.device) -> tuple[torch.Tensor, bool]:
    """(the training inputs where steps gather from, whether that is host memory apart from
    ``device``)."""
    host = host_tensor(x)
    if device.type == "cpu":
        return host, False  # the host is the device: no copy (a mapped file stays mapped)
    if _fits_on_device(x.nbytes, device):
        return host.to(device), False
    return host, True


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without waiting for the device: a copy from pageable host memory waits
    for every queued kernel first, one from pinned memory is queued like a kernel."""
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (timing only: training steps never wait)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None: fp32, autocast off)."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _backward_and_step(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    scaler: Any,
    clip: float | None,
    model: nn.Module,
    scales: list[tuple[torch.Tensor, float]] = (),
) -> None:
    """Backward, the shared weights' gradient scales (``mixc.core.method_batches.gradient_scales``),
    optional global-norm clipping, optimiser step; under fp16 through the gradient scaler
    (gradients are unscaled before clipping, so ``clip`` means the true norm)."""
    (loss if scaler is None else scaler.scale(loss)).backward()
    with torch.no_grad():
        for p, factor in scales:
            if p.grad is not None:
                p.grad.mul_(factor)
    if scaler is None:
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        return
    if clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(opt)
    scaler.update()


class TorchTrainer:
    """An nn.Module and its optimiser under training (DDP across ``torchrun`` ranks): the driver's
    Trainer."""

    def __init__(
        self,
        plan: Plan,
        recipe: Recipe,
        *,
        device: str = "cpu",
        layout: str = "auto",
        augment: str = "none",
        compile: bool = False,
    ) -> None:
        self.plan, self.recipe, self.layout, self.augment, self.compile = (
            plan,
            recipe,
            layout,
            augment,
            compile,
        )
        self.dist = _Dist(device)
        self.rank, self.world, self.device = self.dist.rank, self.dist.world, self.dist.device
        self.device_label = f"{self.device}{f' x{self.world}' if self.world > 1 else ''}"
        self.run_options = {
            "device": str(self.device),
            "world_size": self.world,
            "torch": torch.__version__,
        }
        self.model: nn.Module | None = None
        #: the layout trained in: chosen by begin() (the driver sets a run folder's recorded one)
        self.layout_choice: LayoutChoice | None = None

    def begin(self, x_train: np.ndarray, y_train: np.ndarray, batch: int) -> None:
        dev = self.device
        self.amp = _autocast_dtype(self.recipe.precision)
        self.x_train, self.x_on_host = _training_set(x_train, dev)
        self.y_train = torch.from_numpy(np.ascontiguousarray(y_train)).to(dev)
        self.gen = torch.Generator(device=dev)
        # MIMO's shuffles (reseeded per epoch)
        self.method_rng = np.random.default_rng(self.recipe.seed)
        self.part = shard(batch, self.rank, self.world)
        if self.layout_choice is None:
            self.layout_choice = self._choose_layout(batch)
        torch.manual_seed(self.recipe.seed)  # the same initial weights on every rank
        self._install(self.layout_choice, wrap=True)

    def _install(self, choice: LayoutChoice, wrap: bool) -> None:
        """Build the model in ``choice``'s layout with its optimiser; ``wrap``: also under
        DistributedDataParallel across ranks and torch.compile when asked (not for timing)."""
        from mixc.backends.torch.model import build, named_plan_tensors

        dev = self.device
        self.model = build(
            self.plan, layout=choice.layout, device=dev, channels_last=choice.channels_last
        )
        self.names = _param_names(self.model, named_plan_tensors(self.model))
        self.opt = _optimizer(self.model, self.plan, self.recipe, self.names)
        tensors = named_plan_tensors(self.model)
        self.grad_scales = [
            (tensors[n], f)
            for n, f in gradient_scales(self.plan, self.recipe.shared_gradient).items()
        ]
        self.net: nn.Module = self.model
        if wrap and self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(
                self.model, device_ids=[dev.index] if dev.type == "cuda" else None
            )
        if wrap and self.compile:
            self.net = torch.compile(self.net)
        self.scaler = torch.amp.GradScaler(dev.type) if self.recipe.precision == "fp16" else None

    def _choose_layout(self, batch: int) -> LayoutChoice:
        """``self.layout`` made concrete (mixc.core.layout_choice): on an accelerator under auto, by
        timing a few steps of each candidate on a throwaway model (eager, one process each); the
        ranks take rank 0's choice."""
        image = self.plan.input_layout == "image" and len(self.plan.input_shape) == 3
        choice = choose_layout(
            self.layout, self.device.type, image, lambda c: self._time_steps(c, batch)
        )
        if self.world > 1:
            import torch.distributed as dist

            shared = [choice]
            dist.broadcast_object_list(shared, src=0)
            choice = shared[0]
        return choice

    def _time_steps(self, candidate: Candidate, batch: int) -> list[float]:
        """Seconds of each timed step of ``candidate`` (after the warm-up steps) on the first batch
        of the training set, at learning rate 0; the model is dropped afterwards."""
        layout, channels_last = candidate
        self._install(LayoutChoice(layout=layout, channels_last=channels_last, how="rule"), False)
        self.net.train()
        idx, times = np.arange(batch), []
        for i in range(WARMUP_STEPS + TIMED_STEPS):
            _synchronize(self.device)
            t0 = time.perf_counter()
            self.step(idx, 0.0, i)
            _synchronize(self.device)
            times.append(time.perf_counter() - t0)
        self.model = self.net = self.opt = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return times[WARMUP_STEPS:]

    def begin_epoch(self, augment_seed: int, dropout_seed: int) -> None:
        self.gen.manual_seed(augment_seed)
        self.method_rng = np.random.default_rng(augment_seed)  # MIMO's shuffles
        torch.manual_seed(dropout_seed)
        self.net.train()

    def step(self, idx: np.ndarray, lr: float, step: int) -> torch.Tensor:
        host_rows = torch.from_numpy(np.ascontiguousarray(idx[self.part]))
        rows = _to_device(host_rows, self.device)
        # the set did not fit on the device: gather in host memory, copy the batch over
        if self.x_on_host:
            xb = _to_device(self.x_train.index_select(0, host_rows), self.device)
        else:
            xb = self.x_train.index_select(0, rows)
        return self._step(xb, self.y_train.index_select(0, rows), lr, self.augment)

    def step_batch(self, x: Any, y: Any, lr: float, step: int) -> torch.Tensor:
        """One step on a streamed batch (numpy or a DataLoader's pinned tensors),
        random-resized-cropped by the loader if at all: only crop_flip is applied here."""
        xb = _to_device(torch.as_tensor(x), self.device)
        yb = _to_device(torch.as_tensor(y), self.device).long()
        return self._step(xb, yb, lr, "crop_flip" if self.augment == "crop_flip" else "none")

    def fetch_losses(self, losses: list[torch.Tensor]) -> Callable[[], list[float]]:
        """Start copying step losses to the host; the returned function waits for that copy alone.

        ``Tensor.item()`` would wait for every kernel queued so far, draining the queue the host
        keeps ahead of the GPU; an asynchronous copy into pinned memory and an event wait only for
        the losses' own steps, long finished when the driver reads them."""
        values = torch.stack(losses).float()
        if self.device.type != "cuda":
            return values.tolist
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def read() -> list[float]:
            copied.synchronize()
            return host.tolist()

        return read

    def _step(self, xb: torch.Tensor, yb: torch.Tensor, lr: float, augment: str) -> torch.Tensor:
        if augment == "crop_flip":
            xb = crop_flip(xb, self.gen)
        elif augment == "random_resized_crop":
            xb = random_resized_crop(xb, self.gen)
        for g in self.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        M = self.plan.members
        rows = mimo_rows(len(xb), self.plan, self.method_rng)
        if rows is not None:  # MIMO: each member its own rows, [b * repetitions, M, ...]
            rows = _to_device(torch.from_numpy(rows), xb.device)
            xb, yb = xb[rows], yb[rows]
        else:
            yb = yb[:, None].expand(-1, M)
        with torch.autocast(
            self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None
        ):
            logits = self.net(xb)  # [b, M, classes]
            loss = (
                F.cross_entropy(
                    logits.float().transpose(1, 2), yb, label_smoothing=self.recipe.label_smoothing
                )
                * M
            )
        self.opt.zero_grad(set_to_none=True)
        _backward_and_step(
            loss, self.opt, self.scaler, self.recipe.grad_clip, self.model, self.grad_scales
        )
        return loss.detach()

    def predict(self, x: np.ndarray) -> np.ndarray:
        # batch by batch to the device
        return predict_member_probs(self.model, x, device=self.device)

    def state_arrays(self) -> dict[str, np.ndarray]:
        from mixc.backends.torch.model import named_plan_tensors

        return {
            n: t.detach().float().cpu().numpy() for n, t in named_plan_tensors(self.model).items()
        }

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        from mixc.backends.torch.model import named_plan_tensors

        targets = named_plan_tensors(self.model)
        with torch.no_grad():
            for name, a in arrays.items():
                # a copy: file arrays are read-only
                targets[name].copy_(torch.from_numpy(np.array(a)))

    def optimizer_arrays(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self._extra_state().items()}

    def load_optimizer(self, arrays: dict[str, np.ndarray]) -> None:
        from mixc.core.checkpoint_format import GRAD_SCALER_KEYS, read_grad_scaler

        scaler = read_grad_scaler(arrays)
        # another precision's run: a fresh scaler
        if scaler is not None and self.scaler is not None:
            state = self.scaler.state_dict()
            self.scaler.load_state_dict({**state, "scale": scaler[0], "_growth_tracker": scaler[1]})
        _load_optimizer_state(
            self.opt,
            self.names,
            {
                k: torch.from_numpy(np.array(v))
                for k, v in arrays.items()
                if k not in GRAD_SCALER_KEYS
            },
        )

    def _extra_state(self) -> dict[str, torch.Tensor]:
        """The optimiser state and, under fp16, the GradScaler's (scale, growth tracker): what
        resume needs."""
        out = _optimizer_state(self.opt, self.names)
        if self.scaler is not None:
            from mixc.core.checkpoint_format import grad_scaler_arrays

            state = self.scaler.state_dict()
            out.update(
                {
                    k: torch.from_numpy(v)
                    for k, v in grad_scaler_arrays(state["scale"], state["_growth_tracker"]).items()
                }
            )
        return out

    def save(self, path: Path, epoch: int, metadata: dict[str, Any]) -> None:
        from mixc.backends.torch.checkpoint import save_checkpoint

        save_checkpoint(path, self.model, self.plan, epoch, self._extra_state(), metadata)

    def close(self) -> None:
        hash_dir = os.environ.get("MIXC_WEIGHTS_HASH_DIR")
        try:
            if hash_dir and self.model is not None:
                Path(hash_dir).mkdir(parents=True, exist_ok=True)
                (Path(hash_dir) / f"rank{self.rank}.sha256").write_text(
                    _weights_hash(self.model) + "\n"
                )
        finally:
            # drop DistributedDataParallel: its reducer holds the process group
            self.net = self.model
            self.dist.close()
