"""Running and writing a generated model file: the same steps for every backend that emits Python.

``build`` execs exactly the text ``write`` puts on disk, so what runs is what a
user can read; the file is registered with ``linecache`` so a traceback inside
the model shows its lines.
"""

from __future__ import annotations

import linecache
import types
from pathlib import Path

from mixc.compiler.plan import Plan

__all__ = ["exec_source", "write_model"]


def exec_source(source: str, filename: str, module: str) -> types.ModuleType:
    """Exec generated ``source`` into a fresh module called ``module``, shown in tracebacks as ``filename``."""
    mod = types.ModuleType(module)
    mod.__file__ = filename
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    exec(compile(source, filename, "exec"), mod.__dict__)  # noqa: S102 - our own generated code
    return mod


def write_model(plan: Plan, out_dir: str | Path, source: str, stem: str) -> Path:
    """Write ``plan.json`` and ``<stem>.py`` (``source``) into ``out_dir``; return the source's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(plan.to_json() + "\n")
    path = out / f"{stem}.py"
    path.write_text(source)
    return path
