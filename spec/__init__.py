"""The .mix language: grammar, AST, imports, expressions and diagnostics.

Knows nothing of torch, jax or the allocation; ``mixc.compiler`` consumes it.
"""

from mixc.spec.diagnostics import Diagnostic, Pos, SpecError

__all__ = ["Diagnostic", "Pos", "SpecError"]
