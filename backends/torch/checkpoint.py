"""Checkpoints: safetensors files named by the plan, so every backend reads every other's.

A checkpoint holds the bank form (templates, alphas, plain weights, BatchNorm
parameters and running statistics) under the plan's tensor names, in the
plan's layout, as float32; its size therefore tracks the budget, not M times
the backbone. Extra tensors (optimizer state, by convention named
``optim.<...>``) sit beside them under the caller's names. The header records
the spec's name and hash, the epoch, and the caller's metadata as JSON.
Files are written to a temporary file in the same folder and moved into place
with ``os.replace``, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mixc.backends.torch.model import named_plan_tensors
from mixc.compiler.plan import Plan

FORMAT = "mixc-checkpoint"
FORMAT_VERSION = "1"


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded into this model (other spec, missing or misshapen tensors)."""


def _spec_hash(plan: Plan) -> str:
    return plan.spec_hash or plan.content_hash()


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    plan: Plan,
    epoch: int,
    extra: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model``'s plan tensors (+ ``extra`` tensors) to ``path`` atomically; return the path."""
    path = Path(path)
    tensors = {
        name: t.detach().to(device="cpu", dtype=torch.float32).contiguous()
        for name, t in named_plan_tensors(model).items()
    }
    expected = {t.name: t.shape for t in plan.tensors}
    if set(tensors) != set(expected):
        raise CheckpointError(
            f"the model's tensors do not match plan {plan.name!r} ({_spec_hash(plan)}); "
            "hint: save with the plan the model was built from"
        )
    for name, t in tensors.items():
        if list(t.shape) != expected[name]:
            raise CheckpointError(f"tensor {name!r} has shape {list(t.shape)}, the plan says {expected[name]}")
    for name, t in (extra or {}).items():
        if name in tensors:
            raise ValueError(f"extra tensor {name!r} collides with a plan tensor; prefix it, e.g. 'optim.'")
        tensors[name] = t.detach().to("cpu").contiguous()
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec_name": plan.name,
        "spec_hash": _spec_hash(plan),
        "plan_version": str(plan.version),
        "epoch": str(int(epoch)),
        "metadata": json.dumps(metadata or {}, sort_keys=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_checkpoint_info(path: str | Path) -> dict[str, str]:
    """The checkpoint's header (spec_name, spec_hash, epoch, metadata JSON...) without loading tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{str(path)!r} is not a safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is a safetensors file but not a mixc checkpoint (no {FORMAT!r} header)")
    return meta


def load_checkpoint(
    path: str | Path, model: nn.Module, plan: Plan
) -> tuple[int, dict[str, torch.Tensor], dict[str, str]]:
    """Load ``path`` into ``model`` (built from ``plan``); return (epoch, extra tensors, metadata).

    Raises ``CheckpointError`` when the checkpoint belongs to another spec or
    its tensors are missing or misshapen; the model is left untouched then.
    """
    path = Path(path)
    meta = read_checkpoint_info(path)
    want_name, want_hash = plan.name, _spec_hash(plan)
    got_name, got_hash = meta.get("spec_name", "?"), meta.get("spec_hash", "?")
    if got_hash != want_hash:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written for spec {got_name!r} (hash {got_hash}), but this model is "
            f"spec {want_name!r} (hash {want_hash}). The hash covers everything that shapes the tensors "
            "(backbone, members, budget, grouping, template assignment), so the tensors would not line up. "
            f"Hint: load it with the spec it was trained from (compile {got_name!r} with the same overrides), "
            "or start a fresh run for this spec."
        )
    model_hash = getattr(model, "spec_hash", want_hash)
    if model_hash != want_hash:
        raise CheckpointError(
            f"the model was built from spec hash {model_hash}, not from plan {want_name!r} ({want_hash}); "
            "hint: pass the plan the model was built from"
        )
    targets = named_plan_tensors(model)
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        missing = [t.name for t in plan.tensors if t.name not in names]
        wrong = []
        for t in plan.tensors:
            if t.name in names:
                shape = list(f.get_slice(t.name).get_shape())
                if shape != t.shape:
                    wrong.append(f"{t.name} {shape} (expected {t.shape})")
        if missing or wrong:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
            if wrong:
                parts.append(f"misshapen: {'; '.join(wrong[:5])}" + (" ..." if len(wrong) > 5 else ""))
            raise CheckpointError(
                f"checkpoint {str(path)!r} for spec {got_name!r} (hash {got_hash}) does not hold this plan's "
                f"tensors: {'; '.join(parts)}. Hint: the file was written by an incompatible version or edited; "
                "re-save it from a model built with this plan."
            )
        loaded = {t.name: f.get_tensor(t.name) for t in plan.tensors}
        extra = {name: f.get_tensor(name) for name in sorted(names - set(loaded))}
    with torch.no_grad():
        for name, t in loaded.items():
            targets[name].copy_(t)
    epoch = int(meta.get("epoch", "0"))
    return epoch, extra, json.loads(meta.get("metadata", "{}"))
