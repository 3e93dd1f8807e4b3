"""Parse .mix source into the typed AST (``spec/ast.py``).

The grammar lives in ``mix.lark``; a Lark Transformer builds the AST with a
source position on every node. Syntax errors are collected with Lark's LALR
error recovery (drop the offending token, go on) so one run reports every
broken line, not just the first.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from importlib import resources

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from mixc.spec import ast as A
from mixc.spec.diagnostics import Diagnostic, Diagnostics, Pos, SpecError

MAX_SYNTAX_ERRORS = 20


class _DropNewlinesInBrackets:
    """Post-lexer: newlines separate statements, except inside (...) and [...]."""

    always_accept = ("_NL",)

    def __init__(self) -> None:
        self.open: list[Token] = []  # brackets not yet closed, for "'(' is never closed" errors

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        self.open = []
        for tok in stream:
            if tok.type in ("LPAR", "LSQB"):
                self.open.append(tok)
            elif tok.type in ("RPAR", "RSQB"):
                if self.open:
                    self.open.pop()
            elif tok.type == "_NL" and self.open:
                continue
            yield tok


_POSTLEX = _DropNewlinesInBrackets()


@functools.cache
def _parser(start: str = "start") -> Lark:
    grammar = resources.files("mixc.spec").joinpath("mix.lark").read_text()
    return Lark(
        grammar,
        parser="lalr",
        start=start,
        strict=True,
        propagate_positions=True,
        maybe_placeholders=True,
        postlex=_POSTLEX,
        cache=True,  # building (and strict-checking) the LALR tables costs ~1 s; reuse them
    )


def grammar_text() -> str:
    """The grammar, for hypothesis's ``from_lark`` and for documentation."""
    return resources.files("mixc.spec").joinpath("mix.lark").read_text()


# --- the transformer ---------------------------------------------------------


def _tok_pos(file: str, t: Token) -> Pos:
    return Pos(file, t.line or 1, t.column or 1, t.end_line, t.end_column)


def _meta_pos(file: str, meta) -> Pos:
    if getattr(meta, "empty", True):
        return Pos(file, 1, 1)
    return Pos(file, meta.line, meta.column, meta.end_line, meta.end_column)


_BINOPS = {
    "add": "+",
    "sub": "-",
    "mul": "*",
    "div": "/",
    "floordiv": "//",
    "mod": "%",
    "pow_": "**",
    "eq": "==",
    "ne": "!=",
    "lt": "<",
    "le": "<=",
    "gt": ">",
    "ge": ">=",
    "or_": "or",
    "and_": "and",
}


@v_args(meta=True)
class _ToAst(Transformer):
    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _p(self, meta) -> Pos:
        return _meta_pos(self.file, meta)

    # expressions
    def number(self, meta, c):
        text = str(c[0])
        # Beyond 19 digits an integer is past the evaluator's bound anyway: read it as a float (inf
        # when huge) so the bound check reports it, not int()'s 4300-digit limit or a slow
        # conversion.
        is_int = text.isdigit() and len(text.lstrip("0")) <= 19
        return A.Num(
            int(text.lstrip("0") or "0") if is_int else float(text), _tok_pos(self.file, c[0])
        )

    def quantity(self, meta, c):
        text = str(c[0])
        return A.Quantity(float(text[:-1]), text[-1], text, _tok_pos(self.file, c[0]))

    def string(self, meta, c):
        return A.Str(str(c[0])[1:-1], _tok_pos(self.file, c[0]))

    def true(self, meta, c):
        return A.Bool(True, self._p(meta))

    def false(self, meta, c):
        return A.Bool(False, self._p(meta))

    def name(self, meta, c):
        return A.Name(str(c[0]), _tok_pos(self.file, c[0]))

    def list_(self, meta, c):
        return A.ListExpr(tuple(x for x in c if x is not None), self._p(meta))

    def neg(self, meta, c):
        return A.UnaryOp("-", c[0], self._p(meta))

    def not_(self, meta, c):
        return A.UnaryOp("not", c[0], self._p(meta))

    def ifexpr(self, meta, c):
        return A.IfExpr(c[1], c[0], c[2], self._p(meta))

    def __default__(self, data, children, meta):
        if data in _BINOPS:
            return A.BinOp(_BINOPS[data], children[0], children[1], self._p(meta))
        return super().__default__(data, children, meta)

    # arguments and parameters
    def kwarg(self, meta, c):
        return A.Arg(str(c[0]), c[1], self._p(meta))

    def call_args(self, meta, c):
        out = []
        for x in c:
            if x is None:
                continue
            out.append(x if isinstance(x, A.Arg) else A.Arg(None, x, x.pos))
        return tuple(out)

    def param(self, meta, c):
        return A.Param(str(c[0]), c[1], _tok_pos(self.file, c[0]))

    def params(self, meta, c):
        return tuple(x for x in c if x is not None)

    # statements
    def body(self, meta, c):
        return tuple(c)

    def layer_stmt(self, meta, c):
        kind, name, args = c
        return A.Layer(
            str(kind),
            str(name) if name is not None else None,
            args or (),
            self._p(meta),
            _tok_pos(self.file, kind),
            _tok_pos(self.file, name) if name is not None else None,
        )

    def input_stmt(self, meta, c):
        return A.Input(str(c[0]), c[1], self._p(meta))

    def let_stmt(self, meta, c):
        return A.Let(str(c[0]), c[1], self._p(meta))

    def stage_stmt(self, meta, c):
        body = c[1] if isinstance(c[1], tuple) else (c[1],)
        return A.Stage(str(c[0]), body, self._p(meta))

    def repeat_stmt(self, meta, c):
        count, var, body = c
        single = not isinstance(body, tuple)
        return A.Repeat(
            count,
            str(var) if var is not None else None,
            (body,) if single else body,
            single,
            self._p(meta),
        )

    def residual_stmt(self, meta, c):
        return A.Residual(c[0], self._p(meta))

    def shortcut_stmt(self, meta, c):
        return A.Shortcut(c[0], c[1], self._p(meta))

    # top level
    def import_stmt(self, meta, c):
        return A.Import(str(c[0])[1:-1], self._p(meta))

    def block_def(self, meta, c):
        return A.Definition(
            "block", str(c[0]), c[1], c[2], self._p(meta), _tok_pos(self.file, c[0])
        )

    def backbone_def(self, meta, c):
        return A.Definition(
            "backbone", str(c[0]), c[1], c[2], self._p(meta), _tok_pos(self.file, c[0])
        )

    def call_value(self, meta, c):
        return A.CallValue(str(c[0]), c[1], self._p(meta))

    def body_value(self, meta, c):
        return A.BodyValue(c[0], self._p(meta))

    def setting(self, meta, c):
        return A.Setting(str(c[0]), c[1], self._p(meta), _tok_pos(self.file, c[0]))

    def backbone_setting(self, meta, c):
        value = A.CallValue(str(c[0]), c[1] or (), _tok_pos(self.file, c[0]))
        return A.Setting("backbone", value, self._p(meta), self._p(meta))

    def section_kind(self, meta, c):
        return str(c[0])

    def section(self, meta, c):
        return A.Section(c[0], tuple(c[1:]), self._p(meta))

    def start(self, meta, c):
        return c


# --- syntax errors -----------------------------------------------------------

_TOKEN_NAMES = {
    "NAME": "a name",
    "NUMBER": "a number",
    "QUANTITY": "a quantity (36.5M, 1.0x)",
    "STRING": "a string",
    "_NL": "end of line",
    "$END": "end of file",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "COMMA": "','",
    "EQUAL": "'='",
    "SEMICOLON": "';'",
    "COLON": "':'",
    "DOT": "'.'",
    "PLUS": "'+'",
    "MINUS": "'-'",
    "STAR": "'*'",
    "SLASH": "'/'",
    "__ANON_0": "'//'",
}


def _describe(term: str, value: str | None = None) -> str:
    if term in _TOKEN_NAMES:
        return _TOKEN_NAMES[term]
    if value:
        return f"'{value}'"
    return term.lower()


def _syntax_diag(e: UnexpectedInput, file: str, text: str) -> tuple[str, Pos, str]:
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else "?"
        return (
            f"unexpected character {ch!r}",
            Pos(file, e.line, e.column, e.line, e.column + 1),
            (
                "names start with a letter or '_'; numbers may carry a K/M/G or x suffix; comments"
                " start with '#'"
            ),
        )
    assert isinstance(e, UnexpectedToken)
    tok = e.token
    expected = sorted(
        {_describe(t) for t in e.expected if not t.startswith("__ANON") or t in _TOKEN_NAMES}
    )
    if tok.type == "$END":
        line = max(1, text.count("\n") + 1)
        last = text.split("\n")[-1]
        pos = Pos(file, line, len(last) + 1)
        msg = "unexpected end of file"
    else:
        pos = _tok_pos(file, tok)
        if tok.type in ("NAME", "NUMBER", "QUANTITY", "STRING"):
            msg = f"unexpected {tok.type.lower()} '{tok}'"
        else:
            msg = f"unexpected {_describe(tok.type, str(tok))}"
    opened = _POSTLEX.open[-1] if _POSTLEX.open else None
    if opened is not None and (tok.type == "$END" or (tok.line or 0) > (opened.line or 0)):
        closer = ")" if opened.type == "LPAR" else "]"
        return (
            f"'{opened}' is never closed",
            _tok_pos(file, opened),
            (
                f"add the matching '{closer}' (inside brackets a statement may span lines, so the"
                " next lines were read as part of it)"
            ),
        )
    if "'}'" in expected and tok.type == "$END":
        hint = "a '{' is never closed: add the matching '}'"
    elif tok.type == "_NL" and ("')'" in expected or "']'" in expected):
        hint = "a bracket is not closed on this statement"
    elif "end of line" in expected and tok.type in ("NAME", "NUMBER"):
        hint = "put each statement on its own line or separate statements with ';'"
    elif expected:
        shown = expected[:8]
        hint = "expected " + ", ".join(shown) + (" or more" if len(expected) > 8 else "")
    else:
        hint = "check the statement against the language reference in README.md"
    return msg, pos, hint


MAX_DEPTH = 100  # parse-tree levels; the zoo needs 11. Every later pass recurses over the tree.


def _too_deep(tree: Tree, limit: int) -> Tree | None:
    """The first subtree more than ``limit`` levels down, found without recursion (``-`` * 5000 must
    be an error, not a RecursionError in the transformer or the evaluator)."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return node
        stack.extend((c, depth + 1) for c in node.children if isinstance(c, Tree))
    return None


@functools.lru_cache(maxsize=256)
def parse(text: str, file: str = "<string>") -> A.Module:
    """Parse one file's text. Raises ``SpecError`` with every syntax error found.

    Cached: the AST is immutable, and `mixc verify` compiles one spec hundreds of times.
    """
    diags = Diagnostics(sources={file: text})
    seen_lines: set[int] = set()

    def on_error(e: UnexpectedInput) -> bool:
        msg, pos, hint = _syntax_diag(e, file, text)
        if pos.line not in seen_lines:  # one report per line: later ones are usually echoes
            seen_lines.add(pos.line)
            diags.error(msg, pos, hint)
        if msg.endswith("is never closed"):
            return False  # everything after an unclosed bracket is noise
        return len(diags.items) < MAX_SYNTAX_ERRORS

    try:
        tree = _parser().parse(text, on_error=on_error)
    except UnexpectedInput as e:  # recovery gave up (end of file, or too many errors)
        msg, pos, hint = _syntax_diag(e, file, text)
        if pos.line not in seen_lines:
            diags.error(msg, pos, hint)
        diags.raise_if_any()
        raise  # unreachable: an UnexpectedInput always records a diagnostic
    diags.raise_if_any()
    deep = _too_deep(tree, MAX_DEPTH)
    if deep is not None:
        diags.error(
            f"nested too deeply (more than {MAX_DEPTH} levels)",
            _meta_pos(file, deep.meta),
            "split the expression with let, or nest fewer blocks",
        )
        diags.raise_if_any()
    try:
        items = _ToAst(file).transform(tree)
    except VisitError as e:  # a bug in the transformer, not the user's fault
        raise RuntimeError(
            f"internal error while building the AST of {file}: {e.orig_exc!r}"
        ) from e
    return A.Module(
        file=file,
        imports=tuple(i for i in items if isinstance(i, A.Import)),
        definitions=tuple(i for i in items if isinstance(i, A.Definition)),
        sections=tuple(i for i in items if isinstance(i, A.Section)),
        lets=tuple(i for i in items if isinstance(i, A.Let)),
    )


def parse_value(text: str, origin: str = "<--set>") -> A.Expr | A.CallValue:
    """Parse the value of a ``--set key=value`` override: an expression or ``name(args)``."""
    wrapped = "train {\n" + "x " + text + "\n}\n"
    try:
        module = parse(wrapped, file=origin)
    except SpecError as err:
        # Re-anchor positions to the value itself (line 2, after "x ").
        fixed = []
        for d in err.diagnostics:
            p = d.pos
            col = max(1, (p.col - 2) if p and p.line == 2 else 1)
            fixed.append(Diagnostic(d.message, Pos(origin, 1, col), d.hint))
        raise SpecError(fixed, {origin: text}) from None
    settings = module.sections[0].settings if module.sections else ()
    if len(settings) != 1:
        raise SpecError(
            [
                Diagnostic(
                    f"cannot read {text!r} as one value",
                    Pos(origin, 1, 1),
                    "write key=value with one value",
                )
            ],
            {origin: text},
        )
    return A.relocate(settings[0].value, origin, 1, -2)  # the value starts at column 3 of line 2
