"""Build a runnable model from a Plan, write it to disk, and name its tensors.

``build`` runs the source ``emit_source`` generates through ``generated.load``
(``backends/generated.py``), so what runs is what ``write`` puts on disk, and the
class has a stable module name (``torch.save(model)`` works).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mixc.backends import generated
from mixc.backends.torch.codegen import class_name, emit_source
from mixc.compiler.plan import Plan

LAYOUTS = ("auto", "grouped", "loop")


def build(
    plan: Plan,
    layout: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> nn.Module:
    """Generate the plan's module, instantiate and initialise it (global torch RNG).

    ``layout``: "grouped", "loop", or "auto" (grouped on CUDA, loop elsewhere,
    decided per call from the input's device). ``channels_last`` converts 4-D
    inputs to channels_last inside forward; prefer it to
    ``model.to(memory_format=...)``, which rejects the 5-D per-member weights.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    from mixc.backends.base import check_fits_in_memory

    check_fits_in_memory(plan)
    if device is not None:
        from mixc.backends.torch.predict import torch_device

        # a clear BackendError for "bogus" or a missing GPU, not torch's own
        device = torch_device(device)
    mod = generated.load(plan, "torch")  # a stable module name: pickle and deepcopy work
    model = getattr(mod, class_name(plan))(layout=layout, channels_last=channels_last)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


def write(plan: Plan, out_dir: str | Path, standalone: bool = False) -> Path:
    """Write ``plan.json`` and ``<name>.py`` into ``out_dir``; return the source's path."""
    return generated.write(plan, out_dir, emit_source(plan, standalone=standalone))


def named_plan_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every plan tensor name (``bank.g0``, ``bn.s1.b0.bn0.running_mean``...) -> the model's
    Parameter/buffer.

    The one place where the checkpoint format's names (the Plan's) meet the module's hierarchical
    state_dict keys: the generated model's ``plan_tensors()`` says which key holds which name."""
    mapping = getattr(model, "plan_tensors", None)
    if not callable(mapping):
        raise TypeError(
            f"{type(model).__name__} is not a mixc-generated model (it has no plan_tensors)"
        )
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {name: tensors[key] for name, key in mapping().items()}


def ensemble_probs(logits: torch.Tensor) -> torch.Tensor:
    """THE ensemble prediction: the mean over members of their softmax.

    ``logits`` [B, M, classes] -> probabilities [B, classes] (float32 at least,
    so bf16 logits average without loss).
    """
    if logits.dim() != 3:
        raise ValueError(f"expected member logits [B, M, classes], got shape {list(logits.shape)}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.softmax(logits, dim=-1).mean(dim=1)
