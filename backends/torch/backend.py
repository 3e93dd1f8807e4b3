"""The torch backend object: the :class:`~mixc.backends.base.Backend` interface over this folder.

Importing this module does not import torch (``mixc --help`` lists backends
through it); each method imports what it needs on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixc.backends.base import Backend, Capabilities, GraphRunner, Runner, Trainer
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
        export_formats=("onnx", "torch-export"),
        methods=frozenset({"mixture", "naive", "batch_ensemble", "mimo", "packed"}),
        imports="torch.nn.Module",
    )

    def count_params(self, plan: Plan) -> int:
        """Built on torch's meta device: shapes only, no memory."""
        import torch

        from mixc.backends.torch.model import build

        with torch.device("meta"):
            model = build(plan)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

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
        from mixc.backends.torch.train import TorchTrainer

        return TorchTrainer(
            plan, recipe, device=device, layout=layout, augment=augment, compile=compile
        )

    def batches(
        self,
        split: Any,
        input_shape: list[int],
        *,
        train: bool,
        batch: int,
        seed: int,
        epoch: int,
        workers: int,
        random_crop: bool | None = None,
    ) -> Any:
        from mixc.backends.torch.data import folder_loader

        return folder_loader(
            split,
            input_shape,
            train=train,
            batch=batch,
            workers=workers,
            seed=seed,
            epoch=epoch,
            random_crop=random_crop,
        )

    def runner(
        self, plan: Plan, *, device: str = "cpu", batch_size: int = 500, layout: str = "auto"
    ) -> Runner:
        from mixc.backends.torch.predict import TorchRunner

        return TorchRunner(plan, device=device, batch_size=batch_size, layout=layout)

    def export_graph(
        self, plan: Plan, composed: list[Any], fmt: str, path: Path
    ) -> tuple[str, int | None]:
        """ONNX through torch.onnx's dynamo exporter, or a ``torch.export`` program (``.pt2``)."""
        import torch

        from mixc.backends.torch.export import ONNX_OPSET, DeployedEnsemble, export_onnx, export_pt2

        module = DeployedEnsemble(plan, composed).eval()
        if fmt == "onnx":
            return export_onnx(module, path), ONNX_OPSET
        export_pt2(module, path)
        return f"torch.export, torch {torch.__version__}", None

    def graph_runner(self, fmt: str, path: Path) -> GraphRunner:
        from mixc.backends.torch.export import onnx_runner, pt2_runner

        return onnx_runner(path) if fmt == "onnx" else pt2_runner(path)

    def describe_module(self, module: Any, input_shape: list[int]) -> Any:
        """torch.fx, hierarchically (``importer.py``)."""
        from mixc.backends.torch.importer import describe_module

        return describe_module(module, input_shape)

    def check_import(
        self, module: Any, plan: Plan, name_map: dict[str, str], input_shape: list[int]
    ) -> Any:
        from mixc.backends.torch.importer import check_import

        return check_import(module, plan, name_map, input_shape)

    def imported_arrays(self, module: Any, name_map: dict[str, str], plan: Plan) -> dict[str, Any]:
        from mixc.backends.torch.importer import mapped_arrays

        return {k: v.numpy() for k, v in mapped_arrays(module, name_map, plan).items()}


backend = TorchBackend()
