"""BatchEnsemble's training forward saves for backward what the naive ensemble's saves.

Bytes are counted with ``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd keeps for
the backward pass, once per distinct storage (views of one tensor share it), parameters included
(the naive ensemble's saved weights are its parameters, BatchEnsemble's its composed weights). The
net is a small Wide ResNet (depth 10, width 2, 32x32 images), 4 members, batch 16.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from spec_texts import small_wrn_plan  # noqa: E402

from mixc.backends.torch import build, runtime  # noqa: E402


def saved_bytes(method: str, layout: str) -> int:
    """Bytes autograd saves (distinct storages) in one training forward of the small WRN."""
    plan = small_wrn_plan(method)
    torch.manual_seed(0)
    model = build(plan, layout=layout).train()
    x = torch.randn(16, *plan.input_shape)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(storages.values())


@pytest.mark.parametrize("layout", ["loop", "grouped"])
def test_batch_ensemble_saves_what_the_naive_ensemble_saves(layout):
    naive = saved_bytes("naive", layout)
    assert saved_bytes("batch_ensemble", layout) <= 1.05 * naive


@pytest.mark.parametrize("layout", ["loop", "grouped"])
def test_scaling_activations_saved_much_more(layout, monkeypatch):
    """The scaled formulation (forced) keeps x, x * r and the layer's output: the reason for the
    composed one."""
    monkeypatch.setattr(runtime._BatchEnsemble, "formulation", "scale")
    assert saved_bytes("batch_ensemble", layout) > 1.5 * saved_bytes("naive", layout)
