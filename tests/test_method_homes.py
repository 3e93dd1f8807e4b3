"""One home per ensemble method (compiler/methods/): code elsewhere asks a method's capabilities
instead of comparing its name. The counts of the name comparisons that remain are pinned as upper
bounds, so they only go down; every registered method declares every capability; the runtimes'
tensor tables equal the compiler's.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mixc.compiler.methods import CAPABILITIES, get_method, registered
from mixc.compiler.plan import METHODS
from mixc.compiler.tensor_names import LAYER_TENSORS

# this file checks the whole tree, like test_layering.py
REPO = Path(__file__).resolve().parent.parent
NAMES = frozenset(METHODS)

#: method-name comparisons left outside compiler/methods/, per top-level folder: upper bounds, never
#: raised. spec/sections.py checks which settings a method's syntax takes (spec/ cannot import the
#: compiler); mixc/export.py compares a layer's weight source, which shares BatchEnsemble's name.
MAX_COMPARISONS = {"spec": 2, "compiler": 0, "backends": 0, "mixc": 1, "bench": 0}


def _names(node: ast.AST) -> bool:
    """A method name, or a tuple/list/set holding one."""
    if isinstance(node, ast.Constant):
        return node.value in NAMES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(isinstance(e, ast.Constant) and e.value in NAMES for e in node.elts)
    return False


def comparisons(path: Path) -> list[str]:
    """``line: expression`` of every ==, !=, in or not in with a method name on either side."""
    tree, out = ast.parse(path.read_text()), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(
            isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops
        ):
            if _names(node.left) or any(_names(c) for c in node.comparators):
                out.append(f"{node.lineno}: {ast.unparse(node)}")
    return out


def _found(folder: str) -> list[str]:
    home = REPO / "compiler" / "methods"
    return [
        f"{p.relative_to(REPO)}:{c}"
        for p in sorted((REPO / folder).rglob("*.py"))
        if home not in p.parents
        for c in comparisons(p)
    ]


@pytest.mark.parametrize("folder", sorted(MAX_COMPARISONS))
def test_method_name_comparisons_only_go_down(folder):
    found = _found(folder)
    assert len(found) <= MAX_COMPARISONS[folder], (
        f"{folder}/ compares method names {len(found)} times (at most {MAX_COMPARISONS[folder]}):"
        " ask the method's capabilities (compiler/methods/base.py) instead:\n" + "\n".join(found)
    )


def test_every_method_is_registered_with_every_capability():
    assert {m.name for m in registered()} == NAMES
    for method in registered():
        assert get_method(method.name) is method
        for capability in CAPABILITIES:
            assert hasattr(type(method), capability), f"{method.name} does not set {capability}"
        assert method.execution in ("per_member", "single_path")
        assert method.weight_sources and method.weight_sources <= set(LAYER_TENSORS) - {"bn"}
        assert method.has_templates == bool(method.weight_sources & {"bank", "blob"})
        assert method.budget_solves is None or method.uses_budget
        assert method.budget_is_ceiling <= method.uses_budget
        assert ("budget" in method.searched_settings) == method.uses_budget


@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_runtime_tensor_tables_equal_the_compilers(backend):
    """The runtimes stand alone (``--standalone`` copies them), so each keeps its own copy of the
    table."""
    text = (REPO / "backends" / backend / "runtime.py").read_text()
    node = next(
        n
        for n in ast.parse(text).body
        if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", None) == "LAYER_TENSORS"
    )
    assert ast.literal_eval(node.value) == LAYER_TENSORS
