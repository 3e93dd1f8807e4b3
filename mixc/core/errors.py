"""The one base of every error a user can cause, and the exit code each stands for.

``cli.main`` catches :class:`MixcError` once, prints ``mixc <command>: error:
<message>`` (or a spec's positioned report) and exits with ``exit_code``; any
other exception is a bug in mixc and keeps its traceback. A message is one
paragraph: what is wrong, naming the file/field/option, then ``hint: ...``.

Exit codes (README, "Exit codes"): 0 done; 1 a spec, option, backend, run,
checkpoint or plot problem (``MixcError``); 2 a data problem (``DataError``,
and argparse's usage errors); 130 interrupted; 141 stdout's reader went away.

This module imports nothing from mixc, so every layer (spec/, compiler/, the
core, backends/) may derive its errors from it.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "MixcError",
    "UsageError",
    "BackendError",
    "BackendUnavailable",
    "RunFolderError",
    "TrainError",
]


class MixcError(Exception):
    """A problem the user can fix; printed as one paragraph without a traceback."""

    exit_code: ClassVar[int] = 1

    def render(self) -> str:
        """The text ``cli.main`` prints (specs override it with their positioned report)."""
        return str(self)


class UsageError(MixcError):
    """An option whose value cannot work (``--points 1``, an empty ``--budgets``)."""


class BackendError(MixcError):
    """A backend cannot do what was asked (unknown name, missing framework, missing capability)."""


class BackendUnavailable(BackendError):
    """The named backend is not installed, or its framework cannot be imported here."""


class RunFolderError(MixcError, ValueError):
    """A run folder file that is not what mixc wrote: one paragraph naming the file, line and
    field."""


class TrainError(MixcError, RuntimeError):
    """A user-facing problem with a training run (its folder, its options); printed without a
    traceback."""
