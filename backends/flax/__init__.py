"""The flax backend: lower a Plan to a flax.nnx Module, run it, read/write checkpoints.

- ``emit_source(plan)``: the model as a self-contained Python file (jax and flax only).
- ``write(plan, out_dir)``: ``plan.json`` + ``<name>.py``.
- ``build(plan, layout, seed, dtype)``: exec that source, instantiate.
- ``named_plan_tensors(model)``: plan tensor names -> nnx Variables; ``plan_arrays``/``assign_plan_arrays``.
- ``ensemble_probs(logits)``: the ensemble prediction (mean of member softmaxes).
- ``count_params(plan)``: trainable parameters of the built model, from shapes only.
- ``save_checkpoint`` / ``load_checkpoint``: the torch backend's safetensors format, plan tensor names.
- ``predict_member_probs(model, x)`` / ``load_predictor(plan, checkpoint)``: member probabilities (numpy),
  what `mixc eval --backend flax` uses.

Training lives in ``train.py`` (imported on demand, not here).
"""

from mixc.backends.flax.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_info, save_checkpoint
from mixc.backends.flax.codegen import CodegenError, emit_source
from mixc.backends.flax.model import (
    apply,
    assign_plan_arrays,
    build,
    count_params,
    ensemble_probs,
    load_source,
    named_plan_tensors,
    plan_arrays,
    split,
    write,
)
from mixc.backends.flax.predict import load_predictor, predict_member_probs

__all__ = [
    "CheckpointError",
    "CodegenError",
    "apply",
    "assign_plan_arrays",
    "build",
    "count_params",
    "emit_source",
    "ensemble_probs",
    "load_checkpoint",
    "load_predictor",
    "load_source",
    "named_plan_tensors",
    "plan_arrays",
    "predict_member_probs",
    "read_checkpoint_info",
    "save_checkpoint",
    "split",
    "write",
]
