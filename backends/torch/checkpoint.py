"""Checkpoints for torch models, in mixc's framework-neutral format
(``mixc.core.checkpoint_format``).

A checkpoint holds the bank form (templates, alphas, plain weights, BatchNorm
parameters and running statistics) under the plan's tensor names, in the
plan's layout, as float32; its size therefore tracks the budget, not M times
the backbone. Extra tensors (optimizer state, by convention named
``optim.<...>``) sit beside them under the caller's names. The header records
the spec's name and hash, the epoch, and the caller's metadata as JSON.
Files are written atomically, so a crash never leaves a half-written
checkpoint. The flax backend reads and writes the same files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from mixc.backends.torch.model import named_plan_tensors
from mixc.compiler.plan import Plan
from mixc.core.checkpoint_format import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    NonFiniteTensorError,
    canonical_safetensors,
    check_extra_names,
    check_finite,
    check_model_tensors,
    check_spec,
    epoch_and_metadata,
    header,
    read_info,
    read_tensors,
    spec_hash,
    tensor_checksum,
)
from mixc.core.safe_write import write_bytes

__all__ = [
    "CheckpointError",
    "NonFiniteTensorError",
    "FORMAT",
    "FORMAT_VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_info",
]

_spec_hash = spec_hash  # the old private name


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    plan: Plan,
    epoch: int,
    extra: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model``'s plan tensors (+ ``extra`` tensors) to ``path`` atomically; return the path.

    Refuses non-finite tensors (``NonFiniteTensorError``, the file untouched)
    and records the checksum of the tensor bytes in the header.
    """
    tensors = {
        name: t.detach().to(device="cpu", dtype=torch.float32).contiguous()
        for name, t in named_plan_tensors(model).items()
    }
    check_model_tensors({k: v.shape for k, v in tensors.items()}, plan)
    check_extra_names(extra or {}, plan)
    for name, t in (extra or {}).items():
        tensors[name] = t.detach().to("cpu").contiguous()
    host = {name: t.numpy() for name, t in tensors.items()}  # views, no copies
    check_finite(host, f"refusing to save {path}:")
    head = header(plan, epoch, metadata, tensor_checksum(host))
    return write_bytes(path, canonical_safetensors(save(tensors, metadata=head)))


def read_checkpoint_info(path: str | Path) -> dict[str, str]:
    """The checkpoint's header (spec_name, spec_hash, epoch, metadata JSON...) without loading
    tensors."""
    return read_info(path)


def load_checkpoint(
    path: str | Path, model: nn.Module, plan: Plan
) -> tuple[int, dict[str, torch.Tensor], dict[str, str]]:
    """Load ``path`` into ``model`` (built from ``plan``); return (epoch, extra tensors, metadata).

    Raises ``CheckpointError`` when the checkpoint belongs to another spec, its
    header is invalid, its tensors are missing, misshapen, non-finite or do not
    match its checksum; the model is left untouched then.
    """
    meta = read_info(path)
    check_spec(meta, plan, path, getattr(model, "spec_hash", spec_hash(plan)))
    targets = named_plan_tensors(model)
    loaded, extra, meta = read_tensors(path, plan, framework="pt")
    with torch.no_grad():
        for name, t in loaded.items():
            targets[name].copy_(t)
    epoch, metadata = epoch_and_metadata(meta, path)
    return epoch, extra, metadata
