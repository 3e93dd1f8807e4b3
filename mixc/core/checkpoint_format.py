"""The mixc checkpoint format, framework-neutral: every backend reads every other backend's files.

A checkpoint is one safetensors file. It holds the bank form of the model
(templates, alphas, plain weights, BatchNorm parameters and running
statistics) under the plan's tensor names, in the plan's (PyTorch) layout, as
float32; extra tensors (optimiser state, by convention ``optim.<...>``) sit
beside them. The header records the format, the spec's name and hash, the plan
version, the epoch, the caller's metadata as JSON, and ``checksum``:
``sha256:<hex>`` over every tensor (name, shape and bytes, in name order).
Loading verifies the header (one validated model, ``mixc.core.run_models``), the
checksum (a file from before checksums loads with a note) and that every
tensor is finite; saving refuses non-finite tensors, so a diverged model never
replaces a good checkpoint. Files are written to a temporary file in the same
folder, fsynced and moved into place with ``os.replace``, so a crash never
leaves a half-written checkpoint.

The backends (``backends/torch/checkpoint.py``, ``backends/flax/checkpoint.py``)
convert their model's tensors to and from this format; the checks and messages
live here once.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mixc.compiler.plan import Plan
from mixc.core.errors import MixcError, RunFolderError
from mixc.core.finite import NonFiniteError, non_finite_tensors
from mixc.core.run_files import FORMAT
from mixc.core.run_read import parse_header
from mixc.core.safe_write import write_bytes

FORMAT_VERSION = "1"

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "NonFiniteTensorError",
    "spec_hash",
    "tensor_checksum",
    "check_finite",
    "header",
    "check_model_tensors",
    "check_extra_names",
    "canonical_safetensors",
    "save_arrays",
    "read_info",
    "check_spec",
    "read_tensors",
    "read_plan_arrays",
    "GRAD_SCALER_KEYS",
    "grad_scaler_arrays",
    "read_grad_scaler",
]


class CheckpointError(MixcError):
    """A checkpoint that cannot be loaded into this model (other spec, missing or misshapen tensors,
    damage)."""


class NonFiniteTensorError(CheckpointError, NonFiniteError):
    """Tensors holding NaN or infinity: refused when saving (divergence) and when loading
    (damage)."""


def spec_hash(plan: Plan) -> str:
    """The hash a checkpoint and a run folder record for ``plan`` (the spec's, else the plan's
    content hash)."""
    return plan.spec_hash or plan.content_hash()


def header(
    plan: Plan, epoch: int, metadata: dict[str, Any] | None = None, checksum: str | None = None
) -> dict[str, str]:
    """The safetensors header of a checkpoint of ``plan`` after ``epoch`` epochs."""
    head = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec_name": plan.name,
        "spec_hash": spec_hash(plan),
        "plan_version": str(plan.version),
        "epoch": str(int(epoch)),
        "metadata": json.dumps(metadata or {}, sort_keys=True),
    }
    if checksum is not None:
        head["checksum"] = checksum
    return head


def tensor_checksum(arrays: dict[str, Any]) -> str:
    """``sha256:<hex>`` over every array's name, shape and bytes, in name order.

    ``arrays`` hold host numpy arrays (or anything ``np.asarray`` views without
    a copy, e.g. CPU torch tensors): the checksum is of the bytes in the file.
    """
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[name]))
        h.update(f"{name}\0{list(a.shape)}\0{a.dtype.str}\0".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return "sha256:" + h.hexdigest()


def check_finite(arrays: dict[str, Any], what: str, after: str = "") -> None:
    """Raise ``NonFiniteTensorError`` naming every tensor of ``arrays`` that holds NaN or
    infinity."""
    bad = non_finite_tensors(arrays)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteTensorError(
            f"{what} non-finite tensor(s): {'; '.join(bad[:5])}{more}{after}"
        )


def check_model_tensors(shapes: dict[str, Iterable[int]], plan: Plan) -> None:
    """Before saving: the model's tensors are exactly the plan's, with the plan's shapes."""
    expected = {t.name: t.shape for t in plan.tensors}
    if set(shapes) != set(expected):
        raise CheckpointError(
            f"the model's tensors do not match plan {plan.name!r} ({spec_hash(plan)}); "
            "hint: save with the plan the model was built from"
        )
    for name, shape in shapes.items():
        if list(shape) != expected[name]:
            raise CheckpointError(
                f"tensor {name!r} has shape {list(shape)}, the plan says {expected[name]}"
            )


def check_extra_names(extra: Iterable[str], plan: Plan) -> None:
    names = {t.name for t in plan.tensors}
    for name in extra:
        if name in names:
            raise ValueError(
                f"extra tensor {name!r} collides with a plan tensor; prefix it, e.g. 'optim.'"
            )


def canonical_safetensors(data: bytes) -> bytes:
    """safetensors bytes with the JSON header's keys sorted. Its writer orders the header (and the
    metadata) as a hash map iterates, so the same tensors gave different bytes from one save to the
    next; sorted, a checkpoint is a function of its content (tensor data offsets are unchanged: they
    count from the header's end, which stays 8-byte aligned as the format asks)."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


def save_arrays(
    path: str | Path,
    tensors: dict[str, np.ndarray],
    plan: Plan,
    epoch: int,
    extra: dict[str, np.ndarray] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write numpy ``tensors`` (plan name -> array, cast to float32) and ``extra`` atomically."""
    from safetensors.numpy import save

    out = {
        name: np.ascontiguousarray(np.asarray(a, dtype=np.float32)) for name, a in tensors.items()
    }
    check_model_tensors({k: v.shape for k, v in out.items()}, plan)
    extra = extra or {}
    check_extra_names(extra, plan)
    out.update({name: np.ascontiguousarray(np.asarray(a)) for name, a in extra.items()})
    check_finite(out, f"refusing to save {path}:")
    head = header(plan, epoch, metadata, tensor_checksum(out))
    # written like every other file: temporary beside it, fsync, rename, never through a link
    return write_bytes(path, canonical_safetensors(save(out, metadata=head)))


def read_info(path: str | Path) -> dict[str, str]:
    """The checkpoint's header (spec_name, spec_hash, epoch, metadata JSON...) without loading
    tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{str(path)!r} is not a safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is a safetensors file but not a mixc checkpoint (no {FORMAT!r} header)"
        )
    return meta


def check_spec(
    meta: dict[str, str], plan: Plan, path: str | Path, model_hash: str | None = None
) -> None:
    """Refuse a checkpoint of another spec, or a model built from another plan, naming both."""
    want_name, want_hash = plan.name, spec_hash(plan)
    got_name, got_hash = meta.get("spec_name", "?"), meta.get("spec_hash", "?")
    if got_hash != want_hash:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written for spec {got_name!r} (hash {got_hash}), but"
            f" this model is spec {want_name!r} (hash {want_hash}). The hash covers everything that"
            " shapes the tensors (backbone, members, budget, grouping, template assignment), so"
            " the tensors would not line up. Hint: load it with the spec it was trained from"
            f" (compile {got_name!r} with the same overrides), or start a fresh run for this spec."
        )
    if model_hash is not None and model_hash != want_hash:
        raise CheckpointError(
            f"the model was built from spec hash {model_hash}, not from plan {want_name!r}"
            f" ({want_hash}); hint: pass the plan the model was built from"
        )


def read_tensors(
    path: str | Path, plan: Plan, framework: str = "numpy"
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(plan tensors, extra tensors, header) of a checkpoint already checked with ``check_spec``.

    ``framework`` is safetensors' (``numpy``, ``pt``...). Raises ``CheckpointError``
    naming missing and misshapen tensors.
    """
    from safetensors import safe_open

    path = Path(path)
    meta = read_info(path)
    with safe_open(str(path), framework=framework) as f:
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
                parts.append(
                    f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}"
                    + (" ..." if len(missing) > 5 else "")
                )
            if wrong:
                parts.append(
                    f"misshapen: {'; '.join(wrong[:5])}" + (" ..." if len(wrong) > 5 else "")
                )
            raise CheckpointError(
                f"checkpoint {str(path)!r} for spec {meta.get('spec_name', '?')!r} (hash"
                f" {meta.get('spec_hash', '?')}) does not hold this plan's tensors:"
                f" {'; '.join(parts)}. Hint: the file was written by an incompatible version or"
                " edited; re-save it from a model built with this plan."
            )
        loaded = {t.name: f.get_tensor(t.name) for t in plan.tensors}
        extra = {name: f.get_tensor(name) for name in sorted(names - set(loaded))}
    verify(path, meta, {**loaded, **extra})
    return loaded, extra, meta


def read_plan_arrays(
    path: str | Path, plan: Plan
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, str]]:
    """(plan arrays, extra arrays, header) of a checkpoint of ``plan``, as numpy: the spec checked,
    then everything ``read_tensors`` verifies. What a backend loads into its model, and what
    resume reads.
    """
    check_spec(read_info(path), plan, path)
    return read_tensors(path, plan)


#: fp16 training's dynamic loss scale and its growth tracker (good steps since the scale last
#: changed), saved beside the optimiser state so a resumed fp16 run skips and grows exactly where an
#: uninterrupted one would. Both backends write and read these names; a checkpoint of an fp32 or
#: bf16 run has neither.
GRAD_SCALER_KEYS = ("optim.grad_scaler.scale", "optim.grad_scaler.growth_tracker")


def grad_scaler_arrays(scale: float, growth_tracker: int) -> dict[str, np.ndarray]:
    """The loss scaler's state as checkpoint tensors (float32 and int64, shape ``[1]``)."""
    return {
        GRAD_SCALER_KEYS[0]: np.asarray([scale], np.float32),
        GRAD_SCALER_KEYS[1]: np.asarray([growth_tracker], np.int64),
    }


def read_grad_scaler(
    extra: dict[str, Any], path: str | Path = "checkpoint"
) -> tuple[float, int] | None:
    """(scale, growth tracker) from a checkpoint's extra tensors, or None when it holds no scaler
    state (a run that was not fp16). Checked like every other field: a value no scaler can hold
    is a CheckpointError.
    """
    present = [k for k in GRAD_SCALER_KEYS if k in extra]
    if not present:
        return None
    hint = "hint: use an undamaged copy of the run, or start a new one"
    if len(present) == 1:
        missing = next(k for k in GRAD_SCALER_KEYS if k not in extra)
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds {present[0]} but not {missing}; the fp16 loss "
            f"scaler's state is saved whole; {hint}"
        )
    scale, tracker = (np.asarray(extra[k]) for k in GRAD_SCALER_KEYS)
    if (
        scale.size != 1
        or not np.issubdtype(scale.dtype, np.floating)
        or not (0 < float(scale.reshape(-1)[0]) < np.inf)
    ):
        raise CheckpointError(
            f"checkpoint {str(path)!r}: {GRAD_SCALER_KEYS[0]} must be one positive finite "
            f"number, not {scale.dtype} {scale.reshape(-1)[:3].tolist()}; {hint}"
        )
    if (
        tracker.size != 1
        or not np.issubdtype(tracker.dtype, np.integer)
        or int(tracker.reshape(-1)[0]) < 0
    ):
        raise CheckpointError(
            f"checkpoint {str(path)!r}: {GRAD_SCALER_KEYS[1]} must be one integer of 0 or "
            f"more, not {tracker.dtype} {tracker.reshape(-1)[:3].tolist()}; {hint}"
        )
    return float(scale.reshape(-1)[0]), int(tracker.reshape(-1)[0])


_NOTED: set[str] = set()


def verify(path: str | Path, meta: dict[str, str], arrays: dict[str, Any]) -> None:
    """The header is valid, the tensors match its checksum (if it has one) and are finite; else
    CheckpointError."""
    epoch_and_metadata(meta, path)
    want = meta.get("checksum")
    if want is None:
        if str(path) not in _NOTED:
            _NOTED.add(str(path))
            print(
                f"mixc: note: {path} has no checksum (written before mixc recorded them), so its"
                " integrity cannot be verified; saving it again adds one",
                file=sys.stderr,
            )
    elif tensor_checksum(arrays) != want:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: its tensor data does not match the checksum recorded when"
            " it was saved (bytes were changed after writing: a damaged copy, or an edit); hint:"
            " copy the run again from where it was trained, or retrain"
        )
    check_finite(
        arrays,
        f"checkpoint {str(path)!r} holds",
        "; the weights are damaged (or were saved by a "
        "diverged run); hint: use an undamaged copy, or retrain",
    )


def epoch_and_metadata(
    meta: dict[str, str], path: str | Path = "checkpoint"
) -> tuple[int, dict[str, Any]]:
    """The epoch and the caller's metadata dict from a header, validated (CheckpointError naming
    each bad field)."""
    try:
        head = parse_header(meta, path)
    except RunFolderError as e:
        raise CheckpointError(str(e)) from None
    return head.epoch, json.loads(meta.get("metadata", "{}"))
