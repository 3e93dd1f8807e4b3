"""BatchEnsemble's training call keeps for the backward pass what the naive ensemble's keeps (flax).

``jax.vjp`` returns a closure whose leaves are the residuals; their bytes are counted once per
array, parameters included. Eager residuals (not under jit, where XLA may fuse or recompute): the
formulation's own choice of what to keep. The net of tests/backends/torch/
test_batch_ensemble_memory.py: a small Wide ResNet (depth 10, width 2), 4 members, batch 16.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from framework_fixtures import fast_xla_compiles  # noqa: F401 (autouse)
from spec_texts import small_wrn_plan  # noqa: E402

from mixc.backends.flax import apply, build, runtime, split  # noqa: E402


def residual_bytes(method: str, layout: str) -> int:
    """Bytes of the residuals of one training call of the small WRN."""
    plan = small_wrn_plan(method)
    graphdef, params, stats = split(build(plan, layout=layout, seed=0))
    x = np.random.default_rng(0).standard_normal((16, *plan.input_shape))
    x = jnp.asarray(x, jnp.float32)
    _, vjp_fn = jax.vjp(lambda p: apply(graphdef, p, stats, x, True)[0], params)
    arrays = {id(a): a for a in jax.tree_util.tree_leaves(vjp_fn) if hasattr(a, "nbytes")}
    return sum(a.nbytes for a in arrays.values())


@pytest.mark.parametrize("layout", ["loop", "grouped"])
def test_batch_ensemble_keeps_what_the_naive_ensemble_keeps(layout, monkeypatch):
    naive = residual_bytes("naive", layout)
    assert residual_bytes("batch_ensemble", layout) <= 1.05 * naive
    monkeypatch.setattr(runtime._BatchEnsemble, "formulation", "scale")  # activations scaled
    assert residual_bytes("batch_ensemble", layout) > 1.5 * naive
