"""Run generated model source as a Python module, importable where the cache allows.

Both backends run the very text that ``mixc compile`` writes, so what runs is what a user reads.
``importable`` writes it (atomically) into a cache folder keyed by the plan hash and imports it as
``mixc.backends.compiled.<backend>_<name>_<hash>``: a stable module name, so ``pickle``,
``copy.deepcopy``, ``torch.save(model)`` and ``torch.load`` in another process that has the cache
find the class. The cache is ``$MIXC_CACHE_DIR``, else ``$XDG_CACHE_HOME/mixc``, else
``~/.cache/mixc``. A cached file is imported only after checking it holds exactly the source
generated now; where the cache cannot be written, ``load_source`` execs the text instead.
"""

from __future__ import annotations

import importlib
import linecache
import os
import sys
import tempfile
import types
from pathlib import Path

from mixc.backends.emit import module_name
from mixc.compiler.plan import Plan

PACKAGE = "mixc.backends.compiled"


def cache_dir() -> Path:
    """Where compiled models are kept (the environment is read on every call)."""
    if os.environ.get("MIXC_CACHE_DIR"):
        return Path(os.environ["MIXC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mixc"


def write(plan: Plan, out_dir: str | Path, source: str) -> Path:
    """Write ``plan.json`` and ``<name>.py`` (``source``) into ``out_dir``; return the source's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(plan.to_json() + "\n")
    path = out / f"{module_name(plan)}.py"
    path.write_text(source)
    return path


def load_source(source: str, plan: Plan, backend: str) -> types.ModuleType:
    """Exec generated ``source`` into a fresh module (registered with linecache for tracebacks)."""
    filename = f"<mixc-generated {backend} {module_name(plan)}.py>"
    mod = types.ModuleType(f"mixc_generated_{backend}_{module_name(plan)}")
    mod.__file__ = filename
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    exec(compile(source, filename, "exec"), mod.__dict__)  # noqa: S102 - our own generated code
    return mod


def importable(source: str, plan: Plan, backend: str) -> types.ModuleType:
    """``source`` as the module ``mixc.backends.compiled.<backend>_<name>_<plan hash>``, written to
    the cache if it is not there yet; ``load_source`` where the cache is not writable."""
    stem = f"{backend}_{module_name(plan)}_{plan.content_hash()}"
    folder = cache_dir()
    path = folder / f"{stem}.py"
    try:
        if not path.is_file() or path.read_text() != source:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{stem}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(source)
            os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError:
        return load_source(source, plan, backend)
    package = importlib.import_module(PACKAGE)
    package.__path__[:] = [str(folder)]
    name = f"{PACKAGE}.{stem}"
    mod = sys.modules.get(name)
    if mod is None or getattr(mod, "__file__", None) != str(path):
        sys.modules.pop(name, None)
        importlib.invalidate_caches()
        mod = importlib.import_module(name)
    return mod
