"""Backends lower a Plan to a framework model. Each registers itself by name.

The registry maps a name to the module that implements it, imported only when
asked for, so ``mixc inspect`` never imports torch or jax. Adding a backend
means adding a folder and one line here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS: dict[str, str] = {
    "torch": "mixc.backends.torch",
    "flax": "mixc.backends.flax",
}


class BackendUnavailable(RuntimeError):
    pass


def get_backend(name: str) -> ModuleType:
    """Import and return the backend module called ``name``."""
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(sorted(BACKENDS))}")
    try:
        return importlib.import_module(BACKENDS[name])
    except ImportError as e:  # the framework is an optional extra
        extra = "torch" if name == "torch" else "flax"
        raise BackendUnavailable(
            f"the {name} backend needs its framework, which is not importable here ({e}); "
            f"hint: pip install 'mixc[{extra}]'"
        ) from e
