"""Checkpoints for flax models, in the format the torch backend writes
(``mixc.core.checkpoint_format``).

The model stores every parameter in the plan's layout under the plan's names,
so saving is a copy to host float32 and loading a copy back: a file written by
either backend loads in the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from mixc.backends.flax.model import assign_plan_arrays, plan_arrays
from mixc.compiler.plan import Plan
from mixc.core.checkpoint_format import (
    CheckpointError,
    check_spec,
    epoch_and_metadata,
    read_info,
    read_tensors,
    save_arrays,
)

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "read_checkpoint_info"]


def save_checkpoint(
    path: str | Path,
    model: nnx.Module,
    plan: Plan,
    epoch: int,
    extra: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model``'s plan tensors (+ ``extra`` arrays) to ``path`` atomically; return the
    path."""
    extra_np = {k: np.asarray(v) for k, v in (extra or {}).items()}
    return save_arrays(path, plan_arrays(model), plan, epoch, extra_np, metadata)


def read_checkpoint_info(path: str | Path) -> dict[str, str]:
    """The checkpoint's header (spec_name, spec_hash, epoch, metadata JSON...) without loading
    tensors."""
    return read_info(path)


def load_checkpoint(
    path: str | Path, model: nnx.Module, plan: Plan
) -> tuple[int, dict[str, np.ndarray], dict[str, str]]:
    """Load ``path`` into ``model`` (built from ``plan``); return (epoch, extra arrays, metadata).

    Raises ``CheckpointError`` when the checkpoint belongs to another spec or
    its tensors are missing or misshapen; the model is left untouched then.
    """
    meta = read_info(path)
    check_spec(meta, plan, path, getattr(model, "spec_hash", None))
    loaded, extra, meta = read_tensors(path, plan)
    assign_plan_arrays(model, loaded)
    epoch, metadata = epoch_and_metadata(meta, path)
    return epoch, extra, metadata
