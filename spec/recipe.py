"""The training recipe: the validated ``train`` section, backend-neutral.

It lives in spec/ because both ends use it without a backwards import: the
spec layer validates a ``train { ... }`` section against these models (reporting
errors at the offending line), and the validated dict crosses to the backends
inside ``Plan.train``, where the training driver reads it back as a ``Recipe``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: seeds are 0 .. 2**32 - 1: what every framework's generator takes (numpy, torch, jax), and what
#: resume compares
MAX_SEED = 2**32 - 1


class _Model(BaseModel):
    # every float of a recipe is finite (lr=inf would train NaNs from the first step; the bounds
    # below say the rest)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Optimizer(_Model):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999])  # adamw only


class Schedule(_Model):
    name: Literal["step", "cosine", "constant"] = "step"
    milestones: list[int] = Field(default_factory=list)  # step: epochs at which lr *= gamma
    gamma: float = Field(0.2, gt=0)
    min_lr: float = Field(0.0, ge=0)  # cosine: the floor

    @model_validator(mode="after")
    def _sorted(self) -> Schedule:
        if self.milestones != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing, got {self.milestones}")
        return self


class Recipe(_Model):
    """Everything `mixc train` needs besides the model. Defaults follow the paper's CIFAR recipe."""

    data: str = "digits"  # digits | cifar10 | cifar100 | path to a .npz
    data_dir: str | None = None  # where cifar archives live
    epochs: int = Field(200, ge=1)
    batch: int = Field(128, ge=1)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    schedule: Schedule = Field(default_factory=Schedule)
    warmup: int = Field(0, ge=0)  # epochs of linear warm-up
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    # What weight decay skips (paper appendix: alphas; ImageNet recipe: BatchNorm too).
    weight_decay_exclude: list[Literal["alphas", "bn", "bias", "norm", "embedding"]] = Field(
        default_factory=lambda: ["alphas", "bn"]
    )
    # auto: crop_flip at 32x32, random_resized_crop above 32 pixels a side, none otherwise
    # (mixc.core.data.default_augment)
    augment: Literal["auto", "none", "crop_flip", "random_resized_crop"] = "auto"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # A seeded share of the training set held out for validation (per-epoch val metrics,
    # best.safetensors); 0: none (a dataset's own validation split, e.g. an image folder's val/, is
    # used when it has one).
    val_fraction: float = Field(0.0, ge=0, lt=1)
    # Arithmetic of the forward pass: fp32, or bf16/fp16 (torch: autocast; flax: a dtype policy;
    # fp16 with loss scaling).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # clip the global gradient norm to this before each step
    grad_clip: float | None = Field(None, gt=0)
    # Which weights that every member reads as they are (a mixture's plain layers, BatchEnsemble's
    # shared weights) take the mean of the members' gradients instead of their sum: "mean_output"
    # the output layer only (no normalisation follows it; the summed step there is what diverges at
    # width), "mean" all of them, "sum" none (mixc before 2026-12). Templates always take the sum:
    # members' orthonormal alphas keep their updates apart. Measurements: docs/execution.md, "Shared
    # weights".
    shared_gradient: Literal["mean_output", "mean", "sum"] = "mean_output"
