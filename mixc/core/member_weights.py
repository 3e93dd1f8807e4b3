"""One member's own weights, composed out of the banks: what an export hands a backend to fold in.

In the core because ``mixc.export`` (the application) composes them and a backend's export
(``backends/torch/export.py``) consumes them: the type sits below both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["LayerWeights", "MemberWeights"]


@dataclass(frozen=True)
class LayerWeights:
    weight: np.ndarray  # the op's weight_shape (PyTorch layout)
    bias: np.ndarray | None


@dataclass(frozen=True)
class MemberWeights:
    """One member as a plain network: weights per weight op, BatchNorm per bn op (weight, bias,
    mean, var), and the member's row of every other per-member tensor (LayerNorm, class token,
    position embedding) by plan tensor name."""

    layers: dict[str, LayerWeights]
    bn: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    own: dict[str, np.ndarray] = field(default_factory=dict)
