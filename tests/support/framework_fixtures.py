"""Module-scoped autouse fixtures that the flax-and-torch test modules share: import them by name
(``from framework_fixtures import fast_xla_compiles, one_torch_thread``) and they apply to that
module.
"""

import pytest


@pytest.fixture(autouse=True, scope="module")
def fast_xla_compiles():
    """Compiling dominates these tests and XLA's optimisations do not change what is checked."""
    import jax

    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The torch side is tiny; two OpenMP threads on a busy 2-core machine can be 100x slower."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
