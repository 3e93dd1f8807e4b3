"""mixc: a compiler for parameter-efficient neural-network ensembles.

The pipeline is ``.mix`` source -> ``mixc.spec`` (parse) -> ``mixc.compiler``
(elaborate, group, allocate, assign: a ``Plan``) -> ``mixc.backends.<name>``.
"""

import os as _os

# In a source checkout the stages live beside this folder (spec/, compiler/,
# backends/, zoo/) and pyproject maps them to mixc.<stage>. When Python finds
# this folder directly (``python -m mixc`` from the repo root shadows the
# installed package), extend the package path so the same names resolve.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "compiler", "plan.py")) and _root not in __path__:
    __path__.append(_root)

__version__ = "0.1.0"

from mixc.api import build, compile, compile_text, import_module, load  # noqa: E402

__all__ = ["build", "compile", "compile_text", "import_module", "load", "__version__"]
