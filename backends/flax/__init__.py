"""The flax backend: lower a Plan to a flax.nnx Module, run it, read/write checkpoints.

``backend`` (``backend.py``) is the :class:`~mixc.backends.base.Backend` object
the registry hands out; importing this package does not import jax. The
functions below load their module (and jax) on first access:

- ``emit_source(plan, standalone=False)``: the model as a Python file (importing ``runtime.py``'s
  layer classes, or holding them).
- ``write(plan, out_dir)``: ``plan.json`` + ``<name>.py``.
- ``build(plan, layout, seed, dtype)``: exec that source, instantiate.
- ``named_plan_tensors(model)``: plan tensor names -> nnx Variables;
  ``plan_arrays``/``assign_plan_arrays``.
- ``ensemble_probs(logits)``: the ensemble prediction (mean of member softmaxes).
- ``count_params(plan)``: trainable parameters of the built model, from shapes only.
- ``save_checkpoint`` / ``load_checkpoint``: the torch backend's safetensors format, plan tensor
  names.
- ``predict_member_probs(model, x)`` / ``load_predictor(plan, checkpoint)``: member probabilities
  (numpy).

Training (``train.py``) is imported on demand.
"""

from __future__ import annotations

from mixc.backends.base import lazy_attributes
from mixc.backends.flax.backend import backend

_LAZY = {
    "CheckpointError": "checkpoint",
    "load_checkpoint": "checkpoint",
    "read_checkpoint_info": "checkpoint",
    "save_checkpoint": "checkpoint",
    "CodegenError": "codegen",
    "emit_source": "codegen",
    "apply": "model",
    "assign_plan_arrays": "model",
    "build": "model",
    "count_params": "model",
    "ensemble_probs": "model",
    "named_plan_tensors": "model",
    "plan_arrays": "model",
    "split": "model",
    "write": "model",
    "load_predictor": "predict",
    "predict_member_probs": "predict",
}

__all__ = ["backend", *_LAZY]


__getattr__ = lazy_attributes(__name__, _LAZY)
