"""The torch backend object: the :class:`~mixc.backends.base.Backend` interface over this folder.

Importing this module does not import torch (``mixc --help`` lists backends
through it); each method imports what it needs on first use.
"""

from __future__ import annotations

from mixc.backends.base import Backend, Capabilities, Runner, Trainer
from mixc.compiler.plan import Plan
from mixc.spec.recipe import Recipe

__all__ = ["TorchBackend", "backend"]


class TorchBackend(Backend):
    """PyTorch: nn.Module source, DDP under ``torchrun``, CPU and CUDA."""

    name = "torch"
    package = "mixc.backends.torch"
    extra = "torch"
    modules = ("torch", "safetensors")
    capabilities = Capabilities(
        layouts=("auto", "grouped", "loop"),
        devices="cpu, cuda, cuda:N",
        data_parallel="DistributedDataParallel, one process per device under torchrun",
    )

    def count_params(self, plan: Plan) -> int:
        """Built on torch's meta device: shapes only, no memory."""
        import torch

        from mixc.backends.torch.model import build

        with torch.device("meta"):
            model = build(plan)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def trainer(self, plan: Plan, recipe: Recipe, *, device: str, layout: str, augment: str) -> Trainer:
        from mixc.backends.torch.train import TorchTrainer

        return TorchTrainer(plan, recipe, device=device, layout=layout, augment=augment)

    def runner(self, plan: Plan, *, device: str = "cpu", batch_size: int = 500, layout: str = "auto") -> Runner:
        from mixc.backends.torch.predict import TorchRunner

        return TorchRunner(plan, device=device, batch_size=batch_size, layout=layout)


backend = TorchBackend()
