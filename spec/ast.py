"""The typed AST of a .mix file. Every node carries the ``Pos`` it came from.

Plain frozen dataclasses: the AST never leaves the process, and the compiler
walks it once to elaborate the backbone (the IR that crosses stages is the
pydantic ``Plan``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mixc.spec.diagnostics import Pos

# --- expressions -------------------------------------------------------------


@dataclass(frozen=True)
class Num:
    value: int | float
    pos: Pos


@dataclass(frozen=True)
class Quantity:
    """``36.5M`` (an absolute count) or ``1.0x`` (a multiple of one plain backbone)."""

    number: float
    suffix: str  # K, M, G or x
    text: str
    pos: Pos


@dataclass(frozen=True)
class Str:
    value: str
    pos: Pos


@dataclass(frozen=True)
class Bool:
    value: bool
    pos: Pos


@dataclass(frozen=True)
class Name:
    id: str
    pos: Pos


@dataclass(frozen=True)
class ListExpr:
    items: tuple[Expr, ...]
    pos: Pos


@dataclass(frozen=True)
class BinOp:
    op: str  # + - * / // % ** == != < <= > >= and or
    left: Expr
    right: Expr
    pos: Pos


@dataclass(frozen=True)
class UnaryOp:
    op: str  # - not
    operand: Expr
    pos: Pos


@dataclass(frozen=True)
class IfExpr:
    cond: Expr
    then: Expr
    orelse: Expr
    pos: Pos


Expr = Num | Quantity | Str | Bool | Name | ListExpr | BinOp | UnaryOp | IfExpr


@dataclass(frozen=True)
class Arg:
    name: str | None  # None for a positional argument
    value: Expr
    pos: Pos


@dataclass(frozen=True)
class Param:
    name: str
    default: Expr | None
    pos: Pos


# --- statements (backbone and block bodies) ---------------------------------


@dataclass(frozen=True)
class Layer:
    """``kind [name] [(args)]``: a layer, an activation or a block call."""

    kind: str
    name: str | None
    args: tuple[Arg, ...]
    pos: Pos
    kind_pos: Pos
    name_pos: Pos | None = None


@dataclass(frozen=True)
class Input:
    layout: str
    args: tuple[Arg, ...]
    pos: Pos


@dataclass(frozen=True)
class Let:
    name: str
    value: Expr
    pos: Pos


@dataclass(frozen=True)
class Stage:
    name: str
    body: tuple[Stmt, ...]
    pos: Pos


@dataclass(frozen=True)
class Repeat:
    count: Expr
    var: str | None
    body: tuple[Stmt, ...]
    single: bool  # ``repeat n blk(...)`` (children b0, b1, ...) vs ``repeat n { ... }``
    pos: Pos


@dataclass(frozen=True)
class Residual:
    body: tuple[Stmt, ...]
    pos: Pos


@dataclass(frozen=True)
class Shortcut:
    cond: Expr | None
    body: tuple[Stmt, ...]
    pos: Pos


Stmt = Layer | Input | Let | Stage | Repeat | Residual | Shortcut


# --- top level ---------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    path: str
    pos: Pos


@dataclass(frozen=True)
class Definition:
    """A ``block`` or a ``backbone``: a parameterised sub-graph."""

    kind: str  # "block" or "backbone"
    name: str
    params: tuple[Param, ...]
    body: tuple[Stmt, ...]
    pos: Pos
    name_pos: Pos


@dataclass(frozen=True)
class CallValue:
    """A setting value such as ``sgd(lr = 0.1)``."""

    name: str
    args: tuple[Arg, ...]
    pos: Pos


@dataclass(frozen=True)
class BodyValue:
    """A setting value that is a ``{ ... }`` body (explicit groups)."""

    body: tuple[Stmt, ...]
    pos: Pos


@dataclass(frozen=True)
class Setting:
    key: str
    value: Expr | CallValue | BodyValue
    pos: Pos
    key_pos: Pos


@dataclass(frozen=True)
class Section:
    kind: str  # "ensemble" or "train"
    settings: tuple[Setting, ...]
    pos: Pos


@dataclass(frozen=True)
class Module:
    file: str
    imports: tuple[Import, ...]
    definitions: tuple[Definition, ...]
    sections: tuple[Section, ...]
    lets: tuple[Let, ...]


def relocate(node: Any, file: str, line: int, dcol: int) -> Any:
    """A copy of ``node`` with every position moved to ``file``, ``line``, shifted ``dcol`` columns.

    For ``--set`` values: they are parsed inside a wrapper, then reported
    against the override text itself.
    """
    if not dataclasses.is_dataclass(node) or isinstance(node, type):
        return node
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(node):
        v = getattr(node, f.name)
        if isinstance(v, Pos):
            changes[f.name] = Pos(
                file,
                line,
                max(1, v.col + dcol),
                line,
                (v.end_col + dcol) if v.end_col and v.end_line == v.line else None,
            )
        elif isinstance(v, tuple):
            changes[f.name] = tuple(relocate(x, file, line, dcol) for x in v)
        elif dataclasses.is_dataclass(v):
            changes[f.name] = relocate(v, file, line, dcol)
    return dataclasses.replace(node, **changes)
