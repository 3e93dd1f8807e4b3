"""The PyTorch backend: lower a Plan to an nn.Module, run it, read/write checkpoints.

``backend`` (``backend.py``) is the :class:`~mixc.backends.base.Backend` object
the registry hands out; importing this package does not import torch. The
functions below load their module (and torch) on first access:

- ``emit_source(plan, standalone=False)``: the model as a Python file (importing ``runtime.py``'s
  layer classes, or holding them).
- ``write(plan, out_dir)``: ``plan.json`` + ``<name>.py``.
- ``build(plan, layout, device, dtype, channels_last)``: exec that source, instantiate.
- ``named_plan_tensors(model)``: plan tensor names -> Parameters/buffers.
- ``ensemble_probs(logits)``: the ensemble prediction (mean of member softmaxes).
- ``save_checkpoint`` / ``load_checkpoint``: safetensors, plan tensor names.

Training (``train.py``) and prediction (``predict.py``) are imported on demand.
"""

from __future__ import annotations

from mixc.backends.base import lazy_attributes
from mixc.backends.torch.backend import backend

_LAZY = {
    "CheckpointError": "checkpoint",
    "load_checkpoint": "checkpoint",
    "read_checkpoint_info": "checkpoint",
    "save_checkpoint": "checkpoint",
    "CodegenError": "codegen",
    "emit_source": "codegen",
    "build": "model",
    "ensemble_probs": "model",
    "named_plan_tensors": "model",
    "write": "model",
}

__all__ = ["backend", *_LAZY]


__getattr__ = lazy_attributes(__name__, _LAZY)
