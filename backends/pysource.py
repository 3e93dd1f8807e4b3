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
    ``model_construct`` skip pydantic's checks, and an emitter only lowers a plan that passed them."""
    try:
        return Plan.model_validate(plan.model_dump())
    except ValidationError as e:
        raise error(f"the plan is not valid, so it is not lowered to code: {first_problem(e)}") from None
