"""The one way a code generator writes a string from a Plan into Python source.

Generated model files are exec'd, and plans come from run folders that people
share, so a plan string must never become code: not in an expression, not in a
comment (a line break in a "comment" starts a statement), not in a docstring.
Every plan-derived string goes through ``literal`` (as a value) or ``comment``
(inside a ``#`` comment or a docstring); identifiers are names with every
character outside ASCII letters, digits and ``_`` replaced. Numbers are written
from validated ints and finite floats (``Plan`` checks them, see ``validated``).
"""

from __future__ import annotations

import json
import re
import textwrap

from pydantic import ValidationError

from mixc.compiler.plan import Plan, first_problem


def literal(s: str) -> str:
    """A double-quoted Python string literal: JSON escapes are valid Python, and ASCII-only
    output leaves no line break, quote, backslash or exotic character unescaped."""
    return json.dumps(str(s), ensure_ascii=True)


def comment(s: str) -> str:
    """``s`` made inert inside a ``#`` comment or a docstring: the escaped body of ``literal``
    (no line break, no quote that could close the docstring, no trailing backslash)."""
    return literal(s)[1:-1]


def validated(plan: Plan, error: type[Exception]) -> Plan:
    """``plan`` re-validated from its fields, or ``error``: ``model_copy(update=...)`` and
    ``model_construct`` skip pydantic's checks, and an emitter only lowers a plan that passed them.
    """
    try:
        return Plan.model_validate(plan.model_dump())
    except ValidationError as e:
        raise error(
            f"the plan is not valid, so it is not lowered to code: {first_problem(e)}"
        ) from None


# ---------------------------------------------------------------------------
# Layout: identifiers and lines of at most LINE_WIDTH characters

LINE_WIDTH = 100


def ident(s: str) -> str:
    """``s`` with every character outside ASCII letters, digits and ``_`` replaced by ``_``."""
    return re.sub(r"\W", "_", s, flags=re.ASCII)


def tup(v: list[int]) -> str:
    """A kernel/stride/padding argument: an int when all entries agree."""
    if len(set(v)) == 1:
        return str(v[0])
    return "(" + ", ".join(map(str, v)) + ")"


def call(head: str, args: list[str], indent: str, tail: str = "") -> list[str]:
    """``head(arg, ...)tail`` on one line, or one argument per line when too long."""
    one = f"{indent}{head}({', '.join(args)}){tail}"
    if len(one) <= LINE_WIDTH:
        return [one]
    return [f"{indent}{head}("] + [f"{indent}    {a}," for a in args] + [f"{indent}){tail}"]


def packed(head: str, args: list[str], indent: str, tail: str = "") -> list[str]:
    """``head(arg, ...)tail`` on one line, or the arguments filled into lines under the first one
    (a hanging indent), or, where that is too narrow, into lines below ``head(``."""
    one = f"{indent}{head}({', '.join(args)}){tail}"
    if len(one) <= LINE_WIDTH:
        return [one]
    hang = fill(args, f"{indent}{head}(", " " * len(f"{indent}{head}("), f"){tail}")
    if all(len(line) <= LINE_WIDTH for line in hang):
        return hang
    return (
        [f"{indent}{head}("]
        + fill(args, f"{indent}    ", f"{indent}    ", ",")
        + [f"{indent}){tail}"]
    )


def fill(args: list[str], first: str, rest: str, end: str) -> list[str]:
    """``args`` joined by ``", "``, as many to a line as fit; the last line ends with ``end``."""
    lines, cur = [], first
    for i, a in enumerate(args):
        piece = a + (end if i == len(args) - 1 else ",")
        if cur not in (first, rest) and len(cur) + 1 + len(piece) > LINE_WIDTH:
            lines.append(cur)
            cur = rest
        cur += piece if cur in (first, rest) else " " + piece
    return lines + [cur]


#: a space a comment's lines are not broken at (``comment`` escapes a NUL, so none comes from a
#: plan)
KEEP = "\x00"


def wrapped_comment(text: str, first: str = "# ", rest: str = "#   ") -> list[str]:
    """``text`` (already made inert, see ``comment``) as ``#`` lines of at most LINE_WIDTH
    characters."""
    lines = textwrap.wrap(
        text, LINE_WIDTH, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False
    )
    return [line.replace(KEEP, " ") for line in lines] or [first.rstrip()]
