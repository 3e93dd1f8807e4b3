"""Member probabilities from a flax model or a checkpoint: the :class:`~mixc.backends.base.Runner`
behind `mixc eval` and `mixc interpolate` with ``--backend flax``.

One jit-compiled forward per model and BatchNorm mode; in eval mode inputs go
through it in batches of a fixed size (the last one zero-padded), so any number
of inputs costs one compile. In train mode (each batch normalised with its own
statistics) the last batch is not padded: padding would change its statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixc.backends.flax.model import apply, attr_to_plan, build, merge, split
from mixc.compiler.plan import Plan

__all__ = ["FlaxRunner", "predict_member_probs", "load_predictor"]


class FlaxRunner:
    """The plan's model (functional form) on one device, loaded with plan arrays, numpy in and
    out."""

    def __init__(
        self,
        plan: Plan | None = None,
        device: str = "cpu",
        batch_size: int = 500,
        layout: str = "auto",
        model: nnx.Module | None = None,
    ) -> None:
        self.batch = batch_size
        self.device: jax.Device | None = None
        if model is None:
            from mixc.backends.flax.train import devices_for

            self.device = devices_for(device)[0]
            with jax.default_device(self.device):
                model = build(plan, layout=layout, platform=self.device.platform)
        self.members, self.classes = model.members, model.classes
        self.graphdef, params, stats = split(model)
        self.names = attr_to_plan(model)
        self.params, self.stats = self._put((params, stats))
        self._fns: dict[bool, Callable] = {}

    def _put(self, tree):
        return tree if self.device is None else jax.device_put(tree, self.device)

    def _fn(self, train: bool, logits: bool = False) -> Callable:
        key = (train, logits)
        if key not in self._fns:
            graphdef = self.graphdef

            def probs(params, stats, x):
                z, _ = apply(graphdef, params, stats, x, train)
                z = z.astype(jnp.float32)
                return z if logits else jax.nn.softmax(z, axis=-1)

            self._fns[key] = jax.jit(probs)
        return self._fns[key]

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        def fill(tree: dict) -> dict:
            return {
                k: (
                    jnp.asarray(np.asarray(arrays[self.names[k]]).reshape(v.shape), v.dtype)
                    if self.names[k] in arrays
                    else v
                )
                for k, v in tree.items()
            }

        self.params, self.stats = self._put((fill(self.params), fill(self.stats)))

    def member_probs(
        self, x: np.ndarray, bn: Literal["eval", "train"] = "eval", logits: bool = False
    ) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        train, batch = bn == "train", self.batch
        fn, out = self._fn(train, logits), []
        for i in range(0, len(x), batch):
            chunk = x[i : i + batch]
            n = len(chunk)
            if n < batch and len(x) > batch and not train:  # keep one compiled shape
                chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.float32)])
            out.append(np.asarray(fn(self.params, self.stats, self._put(jnp.asarray(chunk))))[:n])
        if not out:
            return np.zeros((0, self.members, self.classes), np.float32)
        return np.concatenate(out)

    def member_logits(self, x: np.ndarray) -> np.ndarray:
        """Member logits ``[N, M, classes]`` (BatchNorm in eval mode): for scores that need them
        (energy)."""
        return self.member_probs(x, logits=True)

    def composed_weights(self) -> dict[str, np.ndarray]:
        model = merge(self.graphdef, self.params, self.stats)
        return {k: np.array(v) for k, v in model.compose().items()}


def predict_member_probs(model: nnx.Module, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Each member's softmax over ``x``, ``[N, M, classes]`` float32 numpy, in eval mode."""
    return FlaxRunner(model=model, batch_size=batch).member_probs(x)


def load_predictor(
    plan: Plan,
    checkpoint: str | Path,
    device: str = "cpu",
    batch_size: int = 500,
    layout: str = "auto",
) -> Callable[[np.ndarray], np.ndarray]:
    """A function from inputs ``[N, ...]`` to member probabilities ``[N, M, classes]``, for
    ``checkpoint``.

    Raises ``CheckpointError`` for a checkpoint of another spec; ``device`` as
    in `mixc train --backend flax` (the first device of that platform is used).
    """
    from mixc.backends.flax.backend import backend

    return backend.load_predictor(plan, checkpoint, device=device, batch_size=batch_size)
