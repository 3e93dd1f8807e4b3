"""Member probabilities from a flax model or a checkpoint: what `mixc eval --backend flax` needs.

One jit-compiled eval-mode forward per model; inputs go through it in batches
of a fixed size (the last one zero-padded), so any number of inputs costs one
compile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixc.backends.flax.checkpoint import load_checkpoint
from mixc.backends.flax.model import apply, build, split
from mixc.compiler.plan import Plan

__all__ = ["predict_member_probs", "load_predictor"]


def _predictor(model: nnx.Module, batch: int, device: jax.Device | None = None) -> Callable[[np.ndarray], np.ndarray]:
    graphdef, params, stats = split(model)
    if device is not None:
        params, stats = jax.device_put((params, stats), device)

    @jax.jit
    def probs(params, stats, x):
        logits, _ = apply(graphdef, params, stats, x, False)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    def predict(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = []
        for i in range(0, len(x), batch):
            chunk = x[i : i + batch]
            n = len(chunk)
            if n < batch and len(x) > batch:  # keep one compiled shape
                chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.float32)])
            xs = jnp.asarray(chunk) if device is None else jax.device_put(chunk, device)
            out.append(np.asarray(probs(params, stats, xs))[:n])
        if not out:
            return np.zeros((0, model.members, model.classes), np.float32)
        return np.concatenate(out)

    return predict


def predict_member_probs(model: nnx.Module, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Each member's softmax over ``x``, ``[N, M, classes]`` float32 numpy, in eval mode."""
    return _predictor(model, batch)(x)


def load_predictor(
    plan: Plan, checkpoint: str | Path, device: str = "cpu", batch_size: int = 500, layout: str = "auto"
) -> Callable[[np.ndarray], np.ndarray]:
    """A function from inputs ``[N, ...]`` to member probabilities ``[N, M, classes]``, for ``checkpoint``.

    Raises ``CheckpointError`` for a checkpoint of another spec; ``device`` as
    in `mixc train --backend flax` (the first device of that platform is used).
    """
    from mixc.backends.flax.train import devices_for

    dev = devices_for(device)[0]
    with jax.default_device(dev):
        model = build(plan, layout=layout, platform=dev.platform)
    load_checkpoint(checkpoint, model, plan)
    return _predictor(model, batch_size, dev)
