"""The run folder's files as validated models (pydantic): what every reader of a run folder checks.

Users share run folders the way they share model files, so a tampered or truncated ``config.json``,
``metrics.jsonl``, checkpoint header or ``calibration.json`` must give one clear error naming the
field, never a silently wrong number: these models say what each file may hold. Unknown keys are
kept (a newer mixc may add some). Read through ``mixc.core.run_read``; written by
``mixc.run_writer`` and the checkpoint format.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mixc.core.layout_choice import LayoutChoice
from mixc.core.run_files import FORMAT, SUPPORTED_FORMAT_VERSIONS
from mixc.spec.recipe import Recipe

__all__ = [
    "MetricsLine",
    "RunOptions",
    "HistoryEntry",
    "RunConfig",
    "TrainMetadata",
    "CheckpointHeader",
    "Calibration",
]


class _Lenient(BaseModel):
    """Unknown keys are kept (newer mixc versions may add some); known keys are checked."""

    model_config = ConfigDict(extra="allow")


class MetricsLine(_Lenient):
    """One line of ``metrics.jsonl``: the metrics after an epoch (NaN is allowed: it is what was
    measured).

    Test metrics (``accuracy``, ``nll``, ``ece``...) are on every line of a run without a validation
    set; with one, they are on the last epoch's line (and every line under
    ``--eval-test-every-epoch``), and every line has the validation metrics under ``val_*``.
    """

    epoch: int = Field(ge=1)
    train_loss: float | None = None
    lr: float | None = None
    accuracy: float | None = Field(None, ge=0, le=1)
    nll: float | None = None
    ece: float | None = None
    val_accuracy: float | None = Field(None, ge=0, le=1)
    val_nll: float | None = None
    val_ece: float | None = None
    member_accuracy: list[float] = Field(default_factory=list)
    member_nll: list[float] = Field(default_factory=list)
    diversity: float | None = None
    train_time: float | None = Field(None, ge=0)  # seconds of the epoch's training steps
    images_per_s: float | None = Field(None, ge=0)  # training images (of the global batch) a second


#: the baselines a run can be (``mixc train --baseline``): kinds of run, not ensemble methods
SINGLE, NAIVE = "single", "naive"
BASELINES = (SINGLE, NAIVE)


class RunOptions(_Lenient):
    spec: str | None = None
    file: str | None = None
    spec_hash: str | None = None
    baseline: Literal["single", "naive"] | None = None  # BASELINES
    overrides: list[str] = Field(default_factory=list)
    world_size: int = Field(1, ge=1)
    threads: int | None = Field(None, ge=1)  # CPU threads of the framework (mixc/core/threads.py)
    layout_choice: LayoutChoice | None = None  # how the members ran (mixc/core/layout_choice.py)


class HistoryEntry(_Lenient):
    """A change to a run after it started (recipe changed on resume, epochs extended)."""

    event: str
    after_epoch: int = Field(ge=0)
    changes: dict[str, list[Any]] = Field(default_factory=dict)


def _json_object(value: Any) -> Any:
    """Header values are strings; some hold JSON objects (the recipe, the caller's metadata)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None
    return value


def _recorded_recipe(value: Any) -> Any:
    """A recipe as a run recorded it. Runs recorded before ``shared_gradient`` existed trained with
    the summed gradient: read them so, or resuming one would silently change its recipe to
    today's default."""
    value = _json_object(value)
    if isinstance(value, dict) and "shared_gradient" not in value:
        value = {**value, "shared_gradient": "sum"}
    return value


class RunConfig(_Lenient):
    """``config.json``: the recipe in force for the latest epochs, the options, and the history of
    changes."""

    recipe: Recipe | None = None
    options: RunOptions = Field(default_factory=RunOptions)
    history: list[HistoryEntry] = Field(default_factory=list)

    _parse_recipe = field_validator("recipe", mode="before")(_recorded_recipe)


class TrainMetadata(_Lenient):
    """The caller's metadata in a checkpoint written by `mixc train` (every key optional: files
    written by hand)."""

    seed: int | None = None
    optimizer: Literal["sgd", "adamw"] | None = None
    global_step: int | None = Field(None, ge=0)
    recipe: Recipe | None = None
    backend: str | None = None
    metrics: MetricsLine | None = None

    _parse_recipe = field_validator("recipe", mode="before")(_recorded_recipe)


class CheckpointHeader(_Lenient):
    """The safetensors header of a mixc checkpoint (every value a string in the file)."""

    format: Literal[FORMAT]
    format_version: str
    spec_name: str
    spec_hash: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    plan_version: str | None = None
    epoch: int = Field(ge=0)
    checksum: str | None = Field(None, pattern=r"^sha256:[0-9a-f]{64}$")
    metadata: TrainMetadata = Field(default_factory=TrainMetadata)

    _parse_metadata = field_validator("metadata", mode="before")(_json_object)

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: str) -> str:
        if v not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(
                f"format version {v!r} is not one this mixc reads"
                f" ({', '.join(SUPPORTED_FORMAT_VERSIONS)}); a newer mixc wrote it, or the header"
                " was edited"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> CheckpointHeader:
        r, m = self.metadata.recipe, self.metadata.metrics
        if r is not None and self.epoch > r.epochs:
            raise ValueError(
                f"epoch {self.epoch} is beyond the {r.epochs} epochs of the recipe it records"
            )
        if m is not None and m.epoch != self.epoch:
            raise ValueError(
                f"its metrics are of epoch {m.epoch}, but the header says epoch {self.epoch}"
            )
        return self


class Calibration(BaseModel):
    """``calibration.json``, written by `mixc calibrate`: the fitted temperatures and the checkpoint
    they fit.

    ``temperature`` divides every member's logits before the softmax-mean (``mixc.temperature``);
    ``member_temperatures[m]`` is member m's own. The checkpoint's sha256 is recorded so that a
    temperature is never applied to weights it was not fitted on (a resumed or retrained run).
    """

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    format: Literal["mixc-calibration"] = "mixc-calibration"
    method: Literal["temperature"] = "temperature"
    temperature: float = Field(ge=0.05, le=20.0)
    member_temperatures: list[float] = Field(default_factory=list)
    checkpoint: str = Field(min_length=1, max_length=255)
    checkpoint_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    epoch: int = Field(ge=0)
    spec_hash: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    fitted_on: str = Field(max_length=10_000)
    samples: int = Field(ge=1)
    nll_before: float
    nll_after: float
    #: why the temperature may not be trustworthy (held-out data without errors, a search bound
    #: reached)
    warning: str | None = Field(None, max_length=10_000)

    @field_validator("member_temperatures")
    @classmethod
    def _in_range(cls, v: list[float]) -> list[float]:
        if len(v) > 1024 or any(not 0.05 <= t <= 20.0 for t in v):
            raise ValueError("member temperatures must be at most 1,024 numbers in [0.05, 20]")
        return v
