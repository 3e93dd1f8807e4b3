"""Compiled models as importable modules (``mixc.backends.compiled.<backend>_<name>_<plan hash>``).

This package has no search path: its modules are made by ``mixc.backends.generated`` from the
source generated from a validated plan, never imported from files, so nothing planted in the model
cache (a ``.py``, a ``__pycache__`` bytecode file, a package folder) can run. A process that
unpickles a model (``torch.load(..., weights_only=False)``) reaches the name through the finder
installed here, which generates the source again from the plan kept in the cache.
"""

from mixc.backends.generated import install_finder

__path__: list[str] = []  # nothing is found by searching folders
install_finder()
