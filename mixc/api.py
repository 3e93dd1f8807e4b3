"""The Python API: ``mixc.load``, ``mixc.compile``, ``mixc.build``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from mixc.compiler.plan import Plan


def load(spec: str | Path, overrides: Sequence[str] = (), import_paths: Sequence[str | Path] = ()):
    """Parse and check a spec (a path, or a zoo name such as ``"wrn28_10"``).

    ``import_paths``: folders its imports may read besides its own folder and the zoo.
    """
    from mixc.spec.loader import load_program

    return load_program(spec, overrides, import_paths=import_paths)


def compile(spec: str | Path | Plan, overrides: Sequence[str] = (),  # noqa: A001 - public name
            import_paths: Sequence[str | Path] = ()) -> Plan:
    """Compile a spec to its Plan. Raises ``mixc.spec.SpecError`` on bad input."""
    if isinstance(spec, Plan):
        return spec
    from mixc.compiler import compile_program
    from mixc.spec.loader import load_program

    return compile_program(load_program(spec, overrides, defer=True, import_paths=import_paths))


def compile_text(text: str, overrides: Sequence[str] = (), name: str = "spec.mix",
                 import_paths: Sequence[str | Path] = ()) -> Plan:
    """Compile spec source held in a string (``name`` is used in messages and as the plan's name)."""
    from mixc.compiler import compile_program
    from mixc.spec.loader import load_program

    return compile_program(load_program(name, overrides, defer=True, text=text, import_paths=import_paths))


def build(spec: str | Path | Plan, backend: str = "torch", overrides: Sequence[str] = (), **options: Any):
    """Compile ``spec`` and build the model with ``backend`` (options go to the backend)."""
    from mixc.backends import get_backend

    plan = compile(spec, overrides)
    return get_backend(backend).build(plan, **options)
