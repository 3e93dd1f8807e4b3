"""The flax backend object: the :class:`~mixc.backends.base.Backend` interface over this folder.

Importing this module does not import jax or flax (``mixc --help`` lists
backends through it); each method imports what it needs on first use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mixc.backends.base import Backend, Capabilities, Runner, Trainer
from mixc.compiler.plan import Plan
from mixc.spec.recipe import Recipe

__all__ = ["FlaxBackend", "backend"]


class FlaxBackend(Backend):
    """jax/flax.nnx/optax: one jit-compiled step, data parallel over every local device of a platform."""

    name = "flax"
    extra = "flax"
    modules = ("jax", "flax", "optax", "safetensors")
    capabilities = Capabilities(
        layouts=("auto", "grouped", "loop"),
        devices="cpu, gpu (cuda), cuda:N",
        data_parallel="one SPMD step over every local device of --device's platform (jax.sharding)",
    )

    def emit_source(self, plan: Plan) -> str:
        from mixc.backends.flax.codegen import emit_source

        return emit_source(plan)

    def write(self, plan: Plan, out_dir: str | os.PathLike) -> Path:
        from mixc.backends.flax.model import write

        return write(plan, out_dir)

    def build(self, plan: Plan, **options: Any) -> Any:
        from mixc.backends.flax.model import build

        return build(plan, **options)

    def count_params(self, plan: Plan) -> int:
        from mixc.backends.flax.model import count_params

        return int(count_params(plan))

    def save_checkpoint(self, path, model, plan, epoch, extra=None, metadata=None) -> Path:
        from mixc.backends.flax.checkpoint import save_checkpoint

        return save_checkpoint(path, model, plan, epoch, extra, metadata)

    def load_checkpoint(self, path, model, plan):
        from mixc.backends.flax.checkpoint import load_checkpoint

        return load_checkpoint(path, model, plan)

    def trainer(self, plan: Plan, recipe: Recipe, *, device: str, layout: str, augment: str) -> Trainer:
        from mixc.backends.flax.train import Trainer as FlaxTrainer, devices_for

        return FlaxTrainer(plan, recipe, devices_for(device), layout, augment, recipe.seed)

    def runner(self, plan: Plan, *, device: str = "cpu", batch_size: int = 500, layout: str = "auto") -> Runner:
        from mixc.backends.flax.predict import FlaxRunner

        return FlaxRunner(plan, device=device, batch_size=batch_size, layout=layout)


backend = FlaxBackend()
