"""One module per subcommand that may need a framework; each has ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse

from mixc.backends import DEFAULT
from mixc.core.errors import MixcError


def add_backend_argument(
    parser: argparse.ArgumentParser, what: str, default: str | None = DEFAULT
) -> None:
    """``--backend NAME``, its choices and help from the registry (unknown names: did-you-mean, the
    list)."""
    from mixc.backends import check_name, names

    def backend_name(text: str) -> str:
        try:
            return check_name(text)
        except MixcError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    known = names()
    parser.add_argument(
        "--backend",
        type=backend_name,
        default=default,
        metavar="{" + ",".join(known) + "}",
        help=f"the framework to {what}; installed: {', '.join(known)}"
        + (f" (default {default})" if default else ""),
    )


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: CPU threads of the framework (default: the cores this process may use,
    capped by OMP_NUM_THREADS; see mixc/core/threads.py)."""
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help=(
            "CPU threads for the framework (default: the cores this process may run on, "
            "capped by OMP_NUM_THREADS if set)"
        ),
    )
