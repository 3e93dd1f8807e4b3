"""Run generated model source as a Python module.

Both backends exec the very text that ``mixc compile`` writes, so what runs is
what a user reads; the text is registered with ``linecache`` so tracebacks
show the generated lines.
"""

from __future__ import annotations

import linecache
import types

from mixc.backends.emit import module_name
from mixc.compiler.plan import Plan


def load_source(source: str, plan: Plan, backend: str) -> types.ModuleType:
    """Exec generated ``source`` into a fresh module (registered with linecache for tracebacks)."""
    filename = f"<mixc-generated {backend} {module_name(plan)}.py>"
    mod = types.ModuleType(f"mixc_generated_{backend}_{module_name(plan)}")
    mod.__file__ = filename
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    exec(compile(source, filename, "exec"), mod.__dict__)  # noqa: S102 - our own generated code
    return mod
