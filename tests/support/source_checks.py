"""Checks on generated source shared by the backends' model tests."""

import ast


def import_roots(source: str) -> set[str]:
    """The top-level packages a Python source imports (``torch.nn`` counts as ``torch``)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    return roots


def import_written(write, plan, folder, stem: str, module: str):
    """``write(plan, folder)`` then import the file it wrote as ``module``: what a user copying it
    gets. Checks the plan.json beside it and the file's name on the way."""
    import importlib.util

    src_path = write(plan, folder)
    assert (folder / "plan.json").read_text().strip() == plan.to_json()
    assert src_path == folder / f"{stem}.py"
    spec = importlib.util.spec_from_file_location(module, src_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
