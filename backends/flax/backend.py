"""The flax backend object: the :class:`~mixc.backends.base.Backend` interface over this folder.

Importing this module does not import jax or flax (``mixc --help`` lists
backends through it); each method imports what it needs on first use.
"""

from __future__ import annotations

from mixc.backends.base import Backend, Capabilities, Runner, Trainer
from mixc.compiler.plan import Plan
from mixc.spec.recipe import Recipe

__all__ = ["FlaxBackend", "backend"]


class FlaxBackend(Backend):
    """jax/flax.nnx/optax: one jit-compiled step, data parallel over every local device of a
    platform."""

    name = "flax"
    package = "mixc.backends.flax"
    extra = "flax"
    modules = ("jax", "flax", "optax", "safetensors")
    capabilities = Capabilities(
        layouts=("auto", "grouped", "loop"),
        devices="cpu, gpu (cuda), cuda:N",
        data_parallel="one SPMD step over every local device of --device's platform (jax.sharding)",
        methods=frozenset({"mixture", "naive", "batch_ensemble", "mimo", "packed"}),
    )

    def count_params(self, plan: Plan) -> int:
        from mixc.backends.flax.model import count_params

        return int(count_params(plan))

    def trainer(
        self,
        plan: Plan,
        recipe: Recipe,
        *,
        device: str,
        layout: str,
        augment: str,
        compile: bool = False,
    ) -> Trainer:
        from mixc.backends.flax.train import Trainer as FlaxTrainer
        from mixc.backends.flax.train import devices_for

        return FlaxTrainer(plan, recipe, devices_for(device), layout, augment, recipe.seed, compile)

    def runner(
        self, plan: Plan, *, device: str = "cpu", batch_size: int = 500, layout: str = "auto"
    ) -> Runner:
        from mixc.backends.flax.predict import FlaxRunner

        return FlaxRunner(plan, device=device, batch_size=batch_size, layout=layout)


backend = FlaxBackend()
