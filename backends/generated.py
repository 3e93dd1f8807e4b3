"""Run generated model source as a Python module with a stable, importable name.

Both backends run the very text that ``mixc compile`` writes, so what runs is what a user reads.
``load`` (the one entry point, for every backend) runs it as the module
``mixc.backends.compiled.<backend>_<name>_<plan hash>``: a stable name, so ``pickle``,
``copy.deepcopy``, ``torch.save(model)`` and ``torch.load`` in another process find the class.

Nothing in the cache folder is ever executed as it lies there. Python's import machinery would
prefer a planted ``__pycache__/<stem>.cpython-311.pyc`` or a package folder ``<stem>/`` to the
checked ``.py`` beside it, so it is not used at all for these names:

- in the building process the module is the source generated now, exec'd into a fresh module
  object registered under its name (no bytecode cache, no search path);
- in another process (unpickling), a meta-path finder owns the ``mixc.backends.compiled.`` names
  (the package's own search path is empty): it reads ``<stem>.plan.json`` from the cache through
  ``read_plan`` (validated, checked against its hash), requires the plan's hash and name to be the
  ones in the module name, generates the source again from it, and execs that. A plan cannot carry
  code (``backends/pysource.py`` quotes every string), so a planted plan builds at worst another
  honest model, and only under its own hash.

The cache (``$MIXC_CACHE_DIR``, else ``$XDG_CACHE_HOME/mixc``, else ``~/.cache/mixc``) keeps
``<stem>.py`` for readers and tracebacks and ``<stem>.plan.json`` for other processes, written
through ``mixc/core/safe_write.py`` (atomic, no links). A cache folder that is not the user's own,
or that others can write, is not used (a note says so once): models still build, only loading a
pickled model in another process then fails.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import linecache
import os
import re
import stat
import sys
import types
from pathlib import Path

from mixc.backends.emit import module_name
from mixc.compiler.plan import Plan

PACKAGE = "mixc.backends.compiled"
_PREFIX = PACKAGE + "."
#: the code generators a cached plan is lowered by again in another process
_EMITTERS = {"torch": "mixc.backends.torch.codegen", "flax": "mixc.backends.flax.codegen"}
_STEM = re.compile(r"^(?P<backend>[a-z]+)_(?P<name>[A-Za-z_][A-Za-z0-9_]*)_(?P<hash>[0-9a-f]{16})$")
_noted: set[str] = set()


def cache_dir() -> Path:
    """Where compiled models are kept (the environment is read on every call)."""
    if os.environ.get("MIXC_CACHE_DIR"):
        return Path(os.environ["MIXC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mixc"


def _note_once(text: str) -> None:
    if text not in _noted:
        _noted.add(text)
        print(f"mixc: note: {text}", file=sys.stderr, flush=True)


def private_cache() -> Path | None:
    """The cache folder, created ``0700`` if missing, when it is this user's and nobody else can
    write it; else None, with a note (once per process) saying why and what to do."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.stat(folder)
    except OSError:
        return None
    uid = os.geteuid() if hasattr(os, "geteuid") else st.st_uid
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
        why = (
            "is not yours"
            if st.st_uid != uid
            else f"can be written by other users (mode {stat.filemode(st.st_mode)})"
        )
        _note_once(
            f"the model cache {folder} {why}, so compiled models are not cached there (a file"
            " planted in it could run as you); models still build, but a model pickled here cannot"
            f" be loaded in another process; hint: chmod go-w {folder}, or set MIXC_CACHE_DIR to a"
            " folder of your own"
        )
        return None
    return folder


def write(plan: Plan, out_dir: str | Path, source: str) -> Path:
    """Write ``plan.json`` and ``<name>.py`` (``source``) into ``out_dir``; return the source's
    path."""
    from mixc.core.safe_write import write_text

    out = Path(out_dir)
    write_text(out / "plan.json", plan.to_json() + "\n")
    return write_text(out / f"{module_name(plan)}.py", source)


def _exec_into(mod: types.ModuleType, source: str, filename: str) -> types.ModuleType:
    """Exec ``source`` into ``mod`` (registered with linecache, so tracebacks show the text that
    ran)."""
    mod.__file__ = filename
    mod.__mixc_source__ = source
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    exec(compile(source, filename, "exec"), mod.__dict__)  # noqa: S102 - generated from a validated plan
    return mod


def _store(folder: Path, stem: str, source: str, plan: Plan) -> Path:
    """Keep ``<stem>.py`` and ``<stem>.plan.json`` in the cache (rewritten when they differ); the
    ``.py``'s path."""
    from mixc.core.safe_write import write_bytes

    for path, data in (
        (folder / f"{stem}.py", source.encode()),
        (folder / f"{stem}.plan.json", plan.to_json().encode()),
    ):
        try:
            same = not path.is_symlink() and path.read_bytes() == data
        except OSError:
            same = False
        if not same:
            write_bytes(path, data)  # atomic: a concurrent reader sees the old file or the new one
    return folder / f"{stem}.py"


def load(plan: Plan, backend: str, source: str | None = None) -> types.ModuleType:
    """The plan's generated module for ``backend``: the one way both backends run generated code.

    ``source`` (else the backend's ``emit_source(plan)``) runs as the module
    ``mixc.backends.compiled.<backend>_<name>_<plan hash>``, exec'd from the text itself (never
    from the cache's files), and is kept in the cache for other processes where it is private.
    """
    from mixc.core.errors import MixcError

    if backend not in _EMITTERS:
        raise ValueError(f"no code generator for backend {backend!r}")
    if source is None:
        source = importlib.import_module(_EMITTERS[backend]).emit_source(plan)

    stem = f"{backend}_{module_name(plan)}_{plan.content_hash()}"
    name = _PREFIX + stem
    filename = f"<mixc-generated {backend} {module_name(plan)}.py>"
    folder = private_cache()
    # kept for other processes (the cache may have moved since the last build)
    if folder is not None:
        try:
            filename = str(_store(folder, stem, source, plan))
        except (OSError, MixcError):  # a read-only or odd cache: the model still builds
            pass
    mod = sys.modules.get(name)
    if mod is not None and getattr(mod, "__mixc_source__", None) == source:
        return mod
    importlib.import_module(PACKAGE)  # the parent, as an import would have it
    mod = types.ModuleType(name)
    sys.modules[name] = (
        mod  # before exec, as an import does: classes are then found by pickle under this name
    )
    try:
        return _exec_into(mod, source, filename)
    except BaseException:
        sys.modules.pop(name, None)
        raise


def verified_source(stem: str) -> tuple[str, str]:
    """The source of cached module ``stem`` generated again from its cached plan, and its file name.

    ImportError (what an import raises) naming the file when the cache is not private, the plan is
    missing, invalid, or not the one the name says.
    """
    from mixc.compiler.plan import PlanFileError, read_plan

    m = _STEM.match(stem)
    if m is None or m["backend"] not in _EMITTERS:
        raise ImportError(f"{_PREFIX}{stem} is not the name of a mixc compiled model")
    folder = private_cache()
    if folder is None:
        raise ImportError(
            f"cannot import {_PREFIX}{stem}: the model cache {cache_dir()} is not private (see the "
            "note above)"
        )
    plan_path = folder / f"{stem}.plan.json"
    try:
        plan = read_plan(plan_path)
    except PlanFileError as e:
        raise ImportError(
            f"cannot import {_PREFIX}{stem} from the model cache: {e}; hint: build the model "
            "once in this cache (mixc.build) before loading it"
        ) from None
    if module_name(plan) != m["name"] or plan.content_hash() != m["hash"]:
        raise ImportError(
            f"cannot import {_PREFIX}{stem}: {plan_path} holds plan {plan.name!r} (hash"
            f" {plan.content_hash()}), not the one the name says; hint: delete it and build the"
            " model again"
        )
    source = importlib.import_module(_EMITTERS[m["backend"]]).emit_source(plan)
    return source, str(folder / f"{stem}.py")


class _Loader(importlib.abc.Loader):
    def __init__(self, stem: str) -> None:
        self.stem = stem

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        source, filename = verified_source(self.stem)
        _exec_into(module, source, filename)


class CacheFinder(importlib.abc.MetaPathFinder):
    """Owns ``mixc.backends.compiled.<stem>``: such a module is made from its cached plan, never
    read from files."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(_PREFIX) or "." in fullname[len(_PREFIX) :]:
            return None
        stem = fullname[len(_PREFIX) :]
        return importlib.machinery.ModuleSpec(
            fullname, _Loader(stem), origin=str(cache_dir() / f"{stem}.py")
        )


def install_finder() -> None:
    """Put :class:`CacheFinder` first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, CacheFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, CacheFinder())
