"""Positioned plan warnings: they keep their source line so they render like errors anywhere."""

from __future__ import annotations

import re

from mixc.compiler import plan as P
from mixc.spec.diagnostics import Pos


def plan_warning(
    message: str, pos: Pos | None, hint: str | None, sources: dict[str, str]
) -> P.PlanWarning:
    """A positioned warning; it keeps its source line so it renders like an error anywhere."""
    line = None
    if pos is not None and pos.file in sources:
        lines = sources[pos.file].split("\n")
        line = lines[pos.line - 1] if 1 <= pos.line <= len(lines) else None
    if line is not None:
        # A plan holds one-line text only (a tab or a CRLF's \r would not validate); one space
        # per character keeps the caret under the column it names.
        line = re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", " ", line.rstrip("\r"))[:4096]
    return P.PlanWarning(
        message=message,
        hint=hint,
        file=pos.file if pos else None,
        line=pos.line if pos else None,
        col=pos.col if pos else None,
        source_line=line,
    )
