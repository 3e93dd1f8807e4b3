"""The backend registry: the ``mixc.backends`` entry-point group, read without importing a
framework.

A backend is an object implementing :class:`mixc.backends.base.Backend`,
published under the entry-point group ``mixc.backends``; mixc's own
``pyproject.toml`` publishes ``torch`` and ``flax`` there, and a third party adds
one with ``pip install`` and nothing else::

    [project.entry-points."mixc.backends"]
    mine = "my_package.mixc_backend:backend"

Listing names (``mixc --help``, ``--backend`` choices) reads metadata only;
:func:`get_backend` loads the one asked for and checks its framework imports,
each failure a :class:`~mixc.core.errors.BackendUnavailable` that says what to do.
From a source checkout whose installed metadata predates the group (or
without any install), the built-in torch and flax entries are used.
"""

from __future__ import annotations

import difflib
from importlib.metadata import EntryPoint, entry_points

from mixc.core.errors import BackendUnavailable

__all__ = [
    "GROUP",
    "BUILTIN",
    "DEFAULT",
    "BackendUnavailable",
    "available",
    "names",
    "get_backend",
    "check_name",
]

GROUP = "mixc.backends"

#: mixc's own backends, used when the installed metadata lacks them
BUILTIN: dict[str, str] = {
    "torch": "mixc.backends.torch.backend:backend",
    "flax": "mixc.backends.flax.backend:backend",
}


#: what --backend means when it is not given
DEFAULT = "torch"


def available() -> dict[str, EntryPoint]:
    """Every registered backend name -> its entry point (not loaded), the built-in ones included."""
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    for name, value in BUILTIN.items():
        found.setdefault(name, EntryPoint(name=name, value=value, group=GROUP))
    return found


def names() -> list[str]:
    """The registered backend names: the built-in ones first, then the others alphabetically."""
    found = available()
    return [n for n in BUILTIN if n in found] + sorted(n for n in found if n not in BUILTIN)


def check_name(name: str) -> str:
    """``name`` if a backend is registered under it, else BackendUnavailable with a did-you-mean and
    the list."""
    known = names()
    if name in known:
        return name
    close = difflib.get_close_matches(name, known, n=2, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise BackendUnavailable(
        f"unknown backend {name!r}; {hint}installed backends: {', '.join(known)} (a backend"
        f" registers itself in the {GROUP!r} entry-point group); hint: --backend"
        f" {close[0] if close else known[0]}"
    )


def get_backend(name: str, command: str | None = None):
    """The backend object called ``name``, its framework importable (and serving ``command``, if
    given)."""
    ep = available()[check_name(name)]
    try:
        obj = ep.load()
    except ImportError as e:
        raise BackendUnavailable(
            f"the {name} backend ({ep.value}) cannot be imported here ({e}); hint: reinstall the"
            " package that provides"
            f" it{', or: pip install mixc[' + name + ']' if name in BUILTIN else ''}"
        ) from None
    return obj.require(command)
