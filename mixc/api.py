"""The Python API: ``mixc.load``, ``mixc.compile``, ``mixc.build``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mixc.compiler.plan import Plan

Overrides = Mapping[str, Any] | Sequence[str]


def override_list(overrides: Overrides | None = None, **keywords: Any) -> list[str]:
    """``--set`` items (``key=value``) from a mapping (dotted keys: ``{"train.epochs": 3}``), a
    list of ``key=value`` strings, and keywords (``members=2``; ``train__epochs=3`` for a dotted
    key). They are checked by the loader exactly as ``--set`` is: unknown keys and bad values are
    positioned SpecErrors."""
    if isinstance(overrides, (str, bytes)):
        raise TypeError(
            "overrides must be a mapping ({'train.epochs': 3}) or a list of 'key=value' strings, "
            f"not the string {overrides!r}; hint: overrides=[{overrides!r}]"
        )
    if overrides is None:
        items: list[str] = []
    elif isinstance(overrides, Mapping):
        items = [f"{k}={_value(v)}" for k, v in overrides.items()]
    else:
        items = list(overrides)
        bad = [o for o in items if not isinstance(o, str)]
        if bad:
            raise TypeError(f"overrides in a list are 'key=value' strings, not {bad[0]!r}")
    return items + [f"{k.replace('__', '.')}={_value(v)}" for k, v in keywords.items()]


def _value(v: Any) -> str:
    """A Python value as ``--set`` text: true/false, numbers, names and lists as written in a
    spec."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


def import_path_list(import_paths: Sequence[str | Path] | None) -> list[str | Path]:
    """``import_paths`` checked as the CLI's repeated ``--import-path``: a list of folder paths,
    never a string (iterated, ``"/some/dir"`` would allow ``/`` and every letter as a folder)."""
    if import_paths is None:
        return []
    if isinstance(import_paths, (str, bytes, os.PathLike)):
        raise TypeError(
            f"import_paths must be a list of folders, not the single path {import_paths!r}; "
            f"hint: import_paths=[{str(import_paths)!r}]"
        )
    items = list(import_paths)
    bad = [p for p in items if not isinstance(p, (str, os.PathLike)) or not str(p)]
    if bad:
        raise TypeError(f"import_paths holds folder paths (str or pathlib.Path), not {bad[0]!r}")
    return items


def load(spec: str | Path, overrides: Overrides = (), import_paths: Sequence[str | Path] = ()):
    """Parse and check a spec (a path, or a zoo name such as ``"wrn28_10"``).

    ``import_paths``: folders its imports may read besides its own folder and the zoo.
    """
    from mixc.spec.loader import load_program

    return load_program(
        _spec(spec), override_list(overrides), import_paths=import_path_list(import_paths)
    )


def compile(
    spec: str | Path | Plan,
    overrides: Overrides = (),  # noqa: A001 - public name
    import_paths: Sequence[str | Path] = (),
) -> Plan:
    """Compile a spec to its Plan. Raises ``mixc.spec.SpecError`` on bad input."""
    items = override_list(overrides)
    if isinstance(spec, Plan):
        if items:
            raise TypeError("overrides apply to a spec, not to a compiled Plan")
        return spec
    from mixc.compiler import compile_program
    from mixc.spec.loader import load_program

    return compile_program(
        load_program(_spec(spec), items, defer=True, import_paths=import_path_list(import_paths))
    )


def compile_text(
    text: str,
    overrides: Sequence[str] = (),
    name: str = "spec.mix",
    import_paths: Sequence[str | Path] = (),
) -> Plan:
    """Compile spec source held in a string (``name`` is used in messages and as the plan's
    name)."""
    from mixc.compiler import compile_program
    from mixc.spec.loader import load_program

    if not isinstance(text, str):  # None would read the file called ``name`` instead
        raise TypeError(
            f"compile_text takes the spec's text as a str, not {type(text).__name__}; hint: "
            "mixc.compile(path) compiles a file"
        )
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str (used in messages), not {name!r}")
    return compile_program(
        load_program(
            name,
            override_list(overrides),
            defer=True,
            text=text,
            import_paths=import_path_list(import_paths),
        )
    )


def _spec(spec: Any) -> str | Path:
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        raise TypeError(f"spec is a path or a zoo name (str or pathlib.Path), not {spec!r}")
    return spec


def build(
    spec: str | Path | Plan,
    backend: str = "torch",
    overrides: Overrides | None = None,
    **keywords: Any,
):
    """Compile ``spec`` and build its model with ``backend``.

    Keywords that the backend's ``build`` takes (``layout``, ``device``, ``channels_last``...)
    go to it; every other keyword is a spec override checked like ``--set``:
    ``mixc.build("digits", members=2, budget="0.5x", layout="loop")``. Dotted keys go through
    ``overrides={"train.epochs": 3}`` (or ``overrides=["train.epochs=3"]``, or ``train__epochs=3``).
    """
    from mixc.backends import get_backend

    chosen = get_backend(backend)
    accepted = chosen.build_options()
    options = {k: v for k, v in keywords.items() if k in accepted}
    spec_keys = {k: v for k, v in keywords.items() if k not in accepted}
    plan = compile(spec, override_list(overrides, **spec_keys))
    return chosen.build(plan, **options)


def import_module(module: Any, input_shape: Sequence[int], backend: str = "torch") -> str:
    """The ``.mix`` text of a model you already have (a ``torch.nn.Module``), with its blocks and
    stages, checked against it (``mixc import``; docs/importing.md)."""
    from mixc.importing import import_module as run

    return run(module, input_shape, backend)
