"""The layering rules of docs/architecture.md, checked on the source: frameworks only in backends/,
no backend compared by name outside backends/, the floors (spec/ and compiler/ below mixc/core,
below backends/, below the application; each imports only from below), no function over 80 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FRAMEWORK_FREE = ("spec", "compiler", "mixc")

_IMPORT = re.compile(r"^\s*(import|from)\s+(torch|jax|flax|optax)\b", re.M)
_NAME_CHECK = re.compile(
    r"""(==|!=|\bin\b)\s*\(?\s*["'](torch|flax)["']|["'](torch|flax)["']\s*(==|!=)"""
)


def _files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (REPO / f).rglob("*.py"))


@pytest.mark.parametrize("path", _files(*FRAMEWORK_FREE), ids=lambda p: str(p.relative_to(REPO)))
def test_no_framework_import_or_backend_name_check(path):
    text = path.read_text()
    assert not _IMPORT.search(text), f"{path}: imports a framework; ask a Backend object instead"
    assert not _NAME_CHECK.search(text), (
        f"{path}: compares with a backend's name; use its capabilities"
    )


def test_spec_never_imports_the_compiler():
    imports = re.compile(r"^\s*(from|import)\s+mixc\.compiler\b", re.M)
    for path in _files("spec"):
        assert not imports.search(path.read_text()), path


#: The floors, lowest first: what each folder may import of mixc (``import mixc`` alone loads the
#: application).
_LOWER = ("mixc.spec", "mixc.compiler")
_CORE = (*_LOWER, "mixc.core")
_BACKENDS = (*_CORE, "mixc.backends")


def _module_of(path: Path) -> str:
    """``backends/torch/train.py`` -> ``mixc.backends.torch.train`` (the folders map into one
    package)."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] != "mixc":
        parts.insert(0, "mixc")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> list[tuple[int, str]]:
    """Every mixc module ``path`` imports (top-level, function-local and TYPE_CHECKING alike), with
    its line."""
    package = (
        _module_of(path) if path.name == "__init__.py" else _module_of(path).rpartition(".")[0]
    )
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # ``from mixc import training`` imports a module: name it, so the check sees which
            found += [
                (node.lineno, f"{base}.{a.name}" if base == "mixc" else base) for a in node.names
            ]
    return [(line, name) for line, name in found if name == "mixc" or name.startswith("mixc.")]


def _outside(folders: tuple[str, ...], allowed: tuple[str, ...]) -> list[str]:
    bad = []
    for path in _files(*folders):
        for line, name in _imported(path):
            if not any(name == a or name.startswith(a + ".") for a in allowed):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    return bad


def test_backends_import_only_the_core_and_below():
    """A backend is written against mixc.core, the spec and the plan: never the application that
    drives it."""
    bad = _outside(("backends",), _BACKENDS)
    assert not bad, (
        "backends/ imports the application; move what it needs to mixc/core: " + "; ".join(bad)
    )


def test_the_core_imports_neither_the_application_nor_the_backends():
    bad = _outside(("mixc/core",), _CORE)
    assert not bad, "mixc/core imports above its floor: " + "; ".join(bad)


def test_spec_and_compiler_import_neither_the_application_nor_the_backends():
    """spec/ and compiler/ may derive their errors from mixc.core.errors, nothing more of the floors
    above."""
    bad = _outside(("spec", "compiler"), (*_LOWER, "mixc.core.errors"))
    assert not bad, "spec/ or compiler/ imports above its floor: " + "; ".join(bad)


def test_the_layering_check_sees_local_and_relative_imports(tmp_path, monkeypatch):
    """The parser above must catch the imports a shortcut would hide: inside a function, from a
    package."""
    src = "def f():\n    from mixc import training\n    import mixc.cli\n"
    path = REPO / "backends" / "torch" / "train.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: src)
    assert [n for _, n in _imported(path)] == ["mixc.training", "mixc.cli"]
    src = "from ..core.errors import MixcError\n"
    assert [n for _, n in _imported(REPO / "mixc" / "core" / "data.py")] == ["mixc.core.errors"]


def test_the_backends_import_each_other_never():
    """torch and flax are siblings: what both need lives in backends/ itself (emit.py,
    structure.py)."""
    for mine, other in (("flax", "torch"), ("torch", "flax")):
        imports = re.compile(rf"^\s*(from|import)\s+mixc\.backends\.{other}\b", re.M)
        for path in _files(f"backends/{mine}"):
            assert not imports.search(path.read_text()), f"{path} imports mixc.backends.{other}"


#: Functions allowed over the limit, as "path:function": none. Split a long function rather than
#: list it.
LONG_FUNCTION_EXCEPTIONS: set[str] = set()
MAX_LINES = 80


def test_no_function_over_80_lines():
    long, seen = [], set()
    for path in _files("spec", "compiler", "backends", "mixc"):
        rel = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    key = f"{rel}:{node.name}"
                    seen.add(key)
                    if key not in LONG_FUNCTION_EXCEPTIONS:
                        long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "split these functions: " + "; ".join(long)
    stale = LONG_FUNCTION_EXCEPTIONS - seen
    assert not stale, (
        f"no longer over {MAX_LINES} lines, drop from LONG_FUNCTION_EXCEPTIONS: {sorted(stale)}"
    )
