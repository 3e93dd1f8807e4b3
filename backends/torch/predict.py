"""Member probabilities from a torch model: the :class:`~mixc.backends.base.Runner` for eval and
interpolate."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mixc.backends.torch.model import build, named_plan_tensors
from mixc.compiler.plan import Plan
from mixc.core.errors import BackendError

__all__ = ["TorchRunner", "predict_member_probs", "torch_device"]

_EVAL_BATCH = 1000


def torch_device(device: str | torch.device, error: type[Exception] = BackendError) -> torch.device:
    """``--device`` as a torch device, refused clearly (as ``error``) when it is unknown or has no
    GPU behind it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise error(
            f"unknown device {device!r} ({e}); hint: --device cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise error(
            f"device {device!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
            "hint: --device cpu"
        )
    return dev


def host_tensor(x: np.ndarray) -> torch.Tensor:
    """``x`` as a CPU tensor sharing its memory (no copy): a memory-mapped dataset stays mapped.
    Such arrays are read-only, which torch warns about; mixc only reads them (gathers and copies
    to the device).
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(x)


@torch.no_grad()
def predict_member_probs(
    model: nn.Module,
    x: torch.Tensor | np.ndarray,
    batch: int = _EVAL_BATCH,
    train_bn: bool = False,
    device: torch.device | None = None,
    logits: bool = False,
) -> np.ndarray:
    """Each member's softmax over ``x``, ``[N, M, classes]`` float32 numpy; eval mode unless
    ``train_bn`` (batch statistics), the model's mode restored after. Host arrays go to
    ``device`` one batch at a time, so an evaluation set need not fit in the device's memory.
    ``logits``: the members' logits instead.
    """
    was = model.training
    model.train(train_bn)
    if isinstance(x, np.ndarray):
        device = device or next(model.parameters()).device

        def part(i: int) -> torch.Tensor:
            return host_tensor(np.ascontiguousarray(x[i : i + batch], dtype=np.float32)).to(device)

    else:
        part = lambda i: x[i : i + batch]  # noqa: E731
    out_fn = (lambda z: z) if logits else (lambda z: F.softmax(z, dim=-1))  # noqa: E731
    out = [out_fn(model(part(i)).float()).cpu() for i in range(0, len(x), batch)]
    model.train(was)
    return torch.cat(out).numpy()


class TorchRunner:
    """The plan's model on one device, loaded with plan arrays, predicting numpy in and out."""

    def __init__(
        self, plan: Plan, device: str = "cpu", batch_size: int = 500, layout: str = "auto"
    ) -> None:
        self.plan, self.batch = plan, batch_size
        self.device = torch_device(device)
        self.model = build(plan, layout=layout, device=self.device)
        self.targets = named_plan_tensors(self.model)

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, a in arrays.items():
                t = self.targets[name]
                # a copy: file arrays are read-only
                t.copy_(torch.from_numpy(np.array(a)).reshape(t.shape))

    def member_probs(self, x: np.ndarray, bn: Literal["eval", "train"] = "eval") -> np.ndarray:
        return predict_member_probs(
            self.model, np.asarray(x), batch=self.batch, train_bn=bn == "train", device=self.device
        )

    def member_logits(self, x: np.ndarray) -> np.ndarray:
        """Member logits ``[N, M, classes]`` (BatchNorm in eval mode): for scores that need them
        (energy)."""
        return predict_member_probs(
            self.model, np.asarray(x), batch=self.batch, device=self.device, logits=True
        )

    def composed_weights(self) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {
                k: v.detach().float().cpu().numpy().copy() for k, v in self.model.compose().items()
            }
