"""A small, safe evaluator for .mix expressions (never Python ``eval``).

Values are ints, floats, bools, strings, lists, and ``Multiple`` (``1.0x``:
a budget relative to one plain backbone). ``/`` of two integers that divide
exactly stays an integer, so ``(depth - 4) / 6`` can be a layer count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mixc.spec import ast as A
from mixc.spec.diagnostics import Pos, did_you_mean

_SUFFIX = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}
# every number a spec computes stays within +-LIMIT (the largest layer or budget is far below)
LIMIT = 10**18
MAX_STR = 10_000  # characters in a computed string (names and globs are short)
MAX_LIST = 100_000  # numbers and strings inside one list, nested lists counted through
MAX_NEST = 32  # lists inside lists


@dataclass(frozen=True)
class Multiple:
    """A budget written as a multiple of one plain backbone, e.g. ``1.0x``."""

    factor: float

    def __str__(self) -> str:
        return f"{self.factor:g}x"


class ExprError(Exception):
    """An expression that cannot be evaluated; the section checks turn it into a positioned
    diagnostic."""

    def __init__(self, message: str, pos: Pos, hint: str | None = None):
        super().__init__(message)
        self.message, self.pos, self.hint = message, pos, hint


def type_name(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, Multiple):
        return "a multiple such as 1.0x"
    return type(v).__name__


def _num(v: Any, pos: Pos, what: str) -> int | float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ExprError(f"{what} needs numbers, got {type_name(v)} ({render(v)})", pos)
    return v


def render(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(render(x) for x in v) + "]"
    return str(v)


def _tidy(x: float) -> int | float:
    """Turn an integral float from a quantity (36.5M) into an int."""
    return int(x) if float(x).is_integer() and abs(x) < 2**62 else x


def evaluate(e: A.Expr, env: Mapping[str, Any], symbols: bool = False) -> Any:
    """Evaluate ``e`` in ``env``. With ``symbols``, an unbound name is its own string.

    ``symbols`` is for settings such as ``assign shared`` where a bare word is a
    choice, not a variable.
    """
    if isinstance(e, A.Num):
        return _finite(e.value, e.pos)
    if isinstance(e, A.Quantity):
        if e.suffix == "x":
            return Multiple(_finite(e.number, e.pos))
        return _tidy(_finite(e.number * _SUFFIX[e.suffix], e.pos))
    if isinstance(e, A.BinOp):
        v = _binop(e, env, symbols)
        return _finite(v, e.pos) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    if isinstance(e, A.Str):
        return e.value
    if isinstance(e, A.Bool):
        return e.value
    if isinstance(e, A.Name):
        if e.id in env:
            return env[e.id]
        if symbols:
            return e.id
        raise ExprError(
            f"unknown name '{e.id}'", e.pos, did_you_mean(e.id, env) or _bound_hint(env)
        )
    if isinstance(e, A.ListExpr):
        items = [evaluate(x, env, symbols) for x in e.items]
        leaves, depth = _measure(items)
        if leaves > MAX_LIST:
            raise ExprError(
                "list too large", e.pos, f"a list in a spec holds at most {MAX_LIST:,} values"
            )
        if depth > MAX_NEST:
            raise ExprError(
                "lists nested too deeply", e.pos, f"lists in a spec nest at most {MAX_NEST} deep"
            )
        return items
    if isinstance(e, A.IfExpr):
        cond = evaluate(e.cond, env, symbols)
        if not isinstance(cond, bool):
            raise ExprError(
                f"an if-expression needs a boolean condition, got {type_name(cond)}", e.cond.pos
            )
        return evaluate(e.then if cond else e.orelse, env, symbols)
    if isinstance(e, A.UnaryOp):
        v = evaluate(e.operand, env, symbols)
        if e.op == "not":
            if not isinstance(v, bool):
                raise ExprError(f"'not' needs a boolean, got {type_name(v)}", e.operand.pos)
            return not v
        return -_num(v, e.operand.pos, "'-'")
    # e.g. --set train.optimizer.lr=sgd(): a call where a value belongs
    if isinstance(e, A.CallValue):
        raise ExprError(
            f"'{e.name}(...)' is a call, not a value",
            e.pos,
            "calls such as sgd(lr = 0.1) are whole settings; here give a number, string or list",
        )
    if isinstance(e, A.BodyValue):
        raise ExprError("a { ... } body is not a value", e.pos, "only 'groups' takes a body")
    raise TypeError(f"not an expression: {e!r}")  # a parser bug, never user input


def _finite(v: int | float, pos: Pos) -> int | float:
    """Refuse numbers beyond +-LIMIT (and inf/nan): later stages size tensors and loops from
    them."""
    if (
        isinstance(v, float)
        and not (math.isfinite(v) and abs(v) <= LIMIT)
        or isinstance(v, int)
        and abs(v) > LIMIT
    ):
        raise ExprError("number too large", pos, "numbers in a spec stay below 1e18")
    return v


def _measure(items: list, memo: dict[int, tuple[int, int]] | None = None) -> tuple[int, int]:
    """(values inside, nesting depth) of a list; shared sublists (``[l, l]``) are counted per use
    but measured once. Every sublist was measured when it was built, so the recursion stays
    shallow."""
    memo = {} if memo is None else memo
    key = id(items)
    if key not in memo:
        leaves, depth = 0, 0
        for x in items:
            n, d = _measure(x, memo) if isinstance(x, list) else (1, 0)
            leaves, depth = leaves + n, max(depth, d)
        memo[key] = (leaves, depth + 1)
    return memo[key]


def _bound_hint(env: Mapping[str, Any]) -> str:
    names = sorted(k for k in env if not k.startswith("_"))
    if not names:
        return "no names are bound here"
    return "names bound here: " + ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")


def _binop(e: A.BinOp, env: Mapping[str, Any], symbols: bool) -> Any:
    if e.op in ("and", "or"):
        left = evaluate(e.left, env, symbols)
        if not isinstance(left, bool):
            raise ExprError(f"'{e.op}' needs booleans, got {type_name(left)}", e.left.pos)
        if (e.op == "and" and not left) or (e.op == "or" and left):
            return left
        right = evaluate(e.right, env, symbols)
        if not isinstance(right, bool):
            raise ExprError(f"'{e.op}' needs booleans, got {type_name(right)}", e.right.pos)
        return right
    a = evaluate(e.left, env, symbols)
    b = evaluate(e.right, env, symbols)
    if e.op in ("==", "!="):
        eq = a == b and type(a) is type(b) or (_isnum(a) and _isnum(b) and a == b)
        return eq if e.op == "==" else not eq
    what = f"'{e.op}'"
    if e.op == "+" and isinstance(a, str) and isinstance(b, str):
        if len(a) + len(b) > MAX_STR:
            raise ExprError(
                "string too long", e.pos, f"a string in a spec holds at most {MAX_STR:,} characters"
            )
        return a + b
    x = _num(a, e.left.pos, what)
    y = _num(b, e.right.pos, what)
    if e.op in ("<", "<=", ">", ">="):
        return {"<": x < y, "<=": x <= y, ">": x > y, ">=": x >= y}[e.op]
    if e.op == "+":
        return x + y
    if e.op == "-":
        return x - y
    if e.op == "*":
        return x * y
    if e.op == "**":
        return _power(x, y, e)
    if y == 0:
        raise ExprError("division by zero", e.right.pos)
    try:
        if e.op == "/":
            if isinstance(x, int) and isinstance(y, int) and x % y == 0:
                return x // y
            return x / y
        if e.op == "//":
            if isinstance(x, float) or isinstance(y, float):
                q = x / y
                if not math.isfinite(q) or abs(q) > LIMIT:
                    raise ExprError("number too large", e.pos, "numbers in a spec stay below 1e18")
                return math.floor(q)
            return x // y
        if e.op == "%":
            return x % y
    # float underflow to 0 in y, or a quotient past float range
    except (OverflowError, ZeroDivisionError):
        raise ExprError("number too large", e.pos, "numbers in a spec stay below 1e18") from None
    raise TypeError(f"unknown operator {e.op}")


def _power(x: int | float, y: int | float, e: A.BinOp) -> int | float:
    """``x ** y``, its size bounded from logarithms first: ``9**9**9`` must fail in microseconds,
    not hang."""
    if x == 0 and y < 0:
        raise ExprError("0 cannot be raised to a negative power", e.pos, "division by zero")
    if x < 0 and not float(y).is_integer():
        raise ExprError(
            f"a negative number to a fractional power (({render(x)}) ** {render(y)}) is not real",
            e.pos,
        )
    if abs(x) not in (0, 1) and y * math.log10(abs(x)) > 18.5:  # |x ** y| > ~3e18
        raise ExprError("number too large", e.pos, "numbers in a spec stay below 1e18")
    try:
        r = x**y
    except (OverflowError, ZeroDivisionError):
        raise ExprError("number too large", e.pos, "numbers in a spec stay below 1e18") from None
    if isinstance(r, complex):
        raise ExprError("not a real number", e.pos)
    return r


def _isnum(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
