"""The PyTorch backend: lower a Plan to an nn.Module, run it, read/write checkpoints.

- ``emit_source(plan)``: the model as a self-contained Python file (torch only).
- ``write(plan, out_dir)``: ``plan.json`` + ``<name>.py``.
- ``build(plan, layout, device, dtype, channels_last)``: exec that source, instantiate.
- ``named_plan_tensors(model)``: plan tensor names -> Parameters/buffers.
- ``ensemble_probs(logits)``: the ensemble prediction (mean of member softmaxes).
- ``save_checkpoint`` / ``load_checkpoint``: safetensors, plan tensor names.

Training lives in ``train.py`` (imported on demand, not here).
"""

from mixc.backends.torch.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_info, save_checkpoint
from mixc.backends.torch.codegen import CodegenError, emit_source
from mixc.backends.torch.model import build, ensemble_probs, load_source, named_plan_tensors, write

__all__ = [
    "CheckpointError",
    "CodegenError",
    "build",
    "emit_source",
    "ensemble_probs",
    "load_checkpoint",
    "load_source",
    "named_plan_tensors",
    "read_checkpoint_info",
    "save_checkpoint",
    "write",
]
