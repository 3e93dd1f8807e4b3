"""One module per subcommand that may need a framework; each has ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse

from mixc.backends import DEFAULT
from mixc.errors import MixcError


def add_backend_argument(parser: argparse.ArgumentParser, what: str, default: str | None = DEFAULT) -> None:
    """``--backend NAME``, its choices and help from the registry (unknown names: did-you-mean, the list)."""
    from mixc.backends import check_name, names

    def backend_name(text: str) -> str:
        try:
            return check_name(text)
        except MixcError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    known = names()
    parser.add_argument("--backend", type=backend_name, default=default, metavar="{" + ",".join(known) + "}",
                        help=f"the framework to {what}; installed: {', '.join(known)}"
                             + (f" (default {default})" if default else ""))
