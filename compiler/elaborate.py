"""Elaborate: instantiate the backbone into a flat graph of named, shaped ops.

Walks the AST once with an environment of bound names. Blocks are lexically
scoped (they see their parameters, their own lets and the file's constants)
plus the shape builtins of their input (``in_channels``, ``in_height``,
``in_width``, ``in_length``). Names are hierarchical: a stage or block call
opens a scope (``s2``), ``repeat`` makes copies ``b0, b1, ...`` and unnamed
layers are numbered per kind within their scope (``bn0``, ``relu1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mixc.compiler import plan as P
from mixc.compiler.layers import ARG_TYPES, INPUT_LAYOUTS, LAYERS, ShapeError
from mixc.spec import ast as A
from mixc.spec.diagnostics import Diagnostics, Pos, choices_hint
from mixc.spec.expr import ExprError, evaluate, render, type_name
from mixc.spec.loader import Program

MAX_OPS = 20_000
MAX_DEPTH = 64


class _Abort(Exception):
    """Stop elaborating this path; the error is already recorded."""


@dataclass
class Graph:
    ops: list[Any] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    pos: dict[str, Pos] = field(default_factory=dict)  # op name -> where it was written
    # named scopes in order (blocks, stages, repeats)
    scopes: list[P.Scope] = field(default_factory=list)


@dataclass
class _Cur:
    name: str
    shape: list[int]


class _Scope:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.counters: dict[str, int] = {}
        self.explicit: set[str] = set()

    def full(self, local: str) -> str:
        return f"{self.prefix}.{local}" if self.prefix else local

    def auto(self, kind: str) -> str:
        i = self.counters.get(kind, 0)
        self.counters[kind] = i + 1
        return f"{kind}{i}"


def elaborate(program: Program, diags: Diagnostics) -> tuple[Graph, A.Definition] | None:
    """The backbone named by the ensemble section, as a flat op graph."""
    ens = program.ensemble
    if ens is None:
        diags.error(
            f"{program.main_file} has no ensemble section, so there is nothing to compile",
            None,
            "add: ensemble { backbone NAME(...)  members 4  budget 1.0x }",
        )
        return None
    if ens.backbone not in program.definitions:  # already reported by the section checker
        return None
    defn = program.definitions[ens.backbone]
    el = _Elaborator(program, diags)
    call = A.Layer(
        defn.name,
        None,
        ens.backbone_args,
        ens.pos.get("backbone", defn.pos),
        ens.pos.get("backbone", defn.pos),
    )
    try:
        env = el.bind(defn, call, dict(program.consts), caller_env=dict(program.consts))
        scope = _Scope("")
        cur = el.body(defn.body, env, scope, None, depth=0)
        if cur is None:
            diags.error(
                f"backbone '{defn.name}' has no input statement",
                defn.name_pos,
                "start it with input image(C, H, W), input signal(C, L) or input vector(D)",
            )
            raise _Abort
        if el.errored:
            raise _Abort
        if len(cur.shape) != 1:
            diags.error(
                f"backbone '{defn.name}' must end in a vector of class scores, but it ends in shape"
                f" {cur.shape}",
                defn.name_pos,
                "finish with global_avgpool (or flatten) and a linear layer",
            )
            raise _Abort
        if not any(isinstance(o, (P.ConvOp, P.LinearOp)) for o in el.g.ops):
            diags.error(
                f"backbone '{defn.name}' has no conv or linear layer: there is nothing to ensemble",
                defn.name_pos,
            )
            raise _Abort
    except _Abort:
        return None
    return el.g, defn


class _Elaborator:
    def __init__(self, program: Program, diags: Diagnostics):
        self.program, self.diags, self.g = program, diags, Graph()
        # After an error, elaboration goes on past the bad statement to find more
        # mistakes, but shape errors are then likely echoes of the first, so they are muted.
        self.errored = False

    # --- helpers -----------------------------------------------------------

    def fail(self, message: str, pos: Pos, hint: str | None = None):
        self.diags.error(message, pos, hint)
        raise _Abort

    def fail_shape(self, message: str, pos: Pos, hint: str | None = None):
        if not self.errored:
            self.diags.error(message, pos, hint)
        raise _Abort

    def eval(self, e: A.Expr, env: dict) -> Any:
        try:
            return evaluate(e, env)
        except ExprError as err:
            self.fail(err.message, err.pos, err.hint)

    def add(self, op, pos: Pos) -> _Cur:
        if op.name in self.g.names:
            self.fail(f"duplicate layer name '{op.name}'", pos, "give the layer a different name")
        if len(self.g.ops) >= MAX_OPS:
            self.fail(f"the backbone has more than {MAX_OPS} ops", pos, "check repeat counts")
        self.g.names.add(op.name)
        self.g.ops.append(op)
        self.g.pos[op.name] = pos
        return _Cur(op.name, list(op.out_shape))

    @staticmethod
    def shape_env(env: dict, cur: _Cur | None) -> dict:
        if cur is None:
            return env
        e = dict(env)
        e["in_channels"] = cur.shape[0]
        if len(cur.shape) == 3:
            e["in_height"], e["in_width"] = cur.shape[1], cur.shape[2]
        elif len(cur.shape) == 2:
            e["in_length"] = cur.shape[1]
        return e

    def bind(
        self,
        defn: A.Definition,
        call: A.Layer,
        base_env: dict,
        caller_env: dict,
        cur: _Cur | None = None,
    ) -> dict:
        """Bind a call's arguments (evaluated in ``caller_env``) to a definition's parameters."""
        env = dict(base_env)
        names = [p.name for p in defn.params]
        given: dict[str, Any] = {}
        positional = [a for a in call.args if a.name is None]
        if len(positional) > len(names):
            self.fail(
                f"{defn.kind} '{defn.name}' takes {len(names)} argument(s), got {len(positional)}"
                " positional",
                positional[len(names)].pos,
                f"its parameters are ({', '.join(names)})",
            )
        for p, a in zip(defn.params, positional):
            given[p.name] = self.eval(a.value, caller_env)
        for a in call.args:
            if a.name is None:
                continue
            if a.name not in names:
                self.fail(
                    f"{defn.kind} '{defn.name}' has no parameter '{a.name}'",
                    a.pos,
                    (
                        choices_hint(a.name, names)
                        if names
                        else f"{defn.kind} '{defn.name}' takes no arguments"
                    ),
                )
            if a.name in given:
                self.fail(f"argument '{a.name}' given twice", a.pos)
            given[a.name] = self.eval(a.value, caller_env)
        for p in defn.params:
            if p.name in given:
                env[p.name] = given[p.name]
            elif p.default is not None:
                env[p.name] = self.eval(p.default, self.shape_env(env, cur))
            else:
                self.fail(
                    f"missing argument '{p.name}' of {defn.kind} '{defn.name}'",
                    call.pos,
                    f"{defn.name}({', '.join(names)}) is defined at"
                    f" {defn.name_pos.file}:{defn.name_pos.line}",
                )
        return env

    # --- statements --------------------------------------------------------

    def body(
        self, stmts: tuple, env: dict, scope: _Scope, cur: _Cur | None, depth: int
    ) -> _Cur | None:
        if depth > MAX_DEPTH:
            self.fail(
                "blocks nest too deeply (recursion?)",
                stmts[0].pos if stmts else Pos("?", 1, 1),
                "a block must not call itself",
            )
        env = dict(env)
        i = 0
        while i < len(stmts):
            st = stmts[i]
            step = 1
            try:
                if isinstance(st, A.Residual):
                    sc = (
                        stmts[i + 1]
                        if i + 1 < len(stmts) and isinstance(stmts[i + 1], A.Shortcut)
                        else None
                    )
                    step = 2 if sc is not None else 1
                    cur = self.residual(st, sc, env, scope, cur, depth)
                elif isinstance(st, A.Shortcut):
                    self.fail(
                        "a shortcut must follow a residual { ... }",
                        st.pos,
                        "write: residual { main path } then shortcut if COND { projection }",
                    )
                elif cur is None and not isinstance(st, (A.Input, A.Let)):
                    self.fail(
                        "the backbone must start with an input statement",
                        st.pos,
                        "add input image(C, H, W), input signal(C, L) or input vector(D) first",
                    )
                else:
                    cur = self.stmt(st, env, scope, cur, depth)
            except _Abort:
                if cur is None or len(self.diags.items) > 50:
                    raise
                self.errored = True  # skip the statement, keep looking for other mistakes
            i += step
        return cur

    def stmt(self, st, env: dict, scope: _Scope, cur: _Cur | None, depth: int) -> _Cur | None:
        if isinstance(st, A.Let):
            env[st.name] = self.eval(st.value, self.shape_env(env, cur))
            return cur
        if isinstance(st, A.Input):
            return self.input(st, env, cur)
        if isinstance(st, A.Stage):
            if st.name in scope.explicit:
                self.fail(f"duplicate name '{st.name}'", st.pos)
            scope.explicit.add(st.name)
            self.g.scopes.append(P.Scope(name=scope.full(st.name)))
            return self.body(st.body, env, _Scope(scope.full(st.name)), cur, depth + 1)
        if isinstance(st, A.Repeat):
            return self.repeat(st, env, scope, cur, depth)
        if isinstance(st, A.Layer):
            return self.layer(st, env, scope, cur, depth)
        raise TypeError(f"unknown statement {st!r}")

    def input(self, st: A.Input, env: dict, cur: _Cur | None) -> _Cur:
        if cur is not None:
            self.fail(
                "a second input statement", st.pos, "a backbone has exactly one input, at its start"
            )
        if st.layout not in INPUT_LAYOUTS:
            self.fail(
                f"unknown input kind '{st.layout}'", st.pos, choices_hint(st.layout, INPUT_LAYOUTS)
            )
        dims = INPUT_LAYOUTS[st.layout]
        if len(st.args) != len(dims) or any(a.name for a in st.args):
            self.fail(
                f"input {st.layout} takes {len(dims)} positional sizes ({', '.join(dims)})", st.pos
            )
        shape = []
        for a in st.args:
            v = self.eval(a.value, env)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                self.fail(f"input sizes are positive integers, got {render(v)}", a.pos)
            shape.append(v)
        return self.add(
            P.InputOp(name="input", inputs=[], in_shape=shape, out_shape=shape, layout=st.layout),
            st.pos,
        )

    def repeat(self, st: A.Repeat, env: dict, scope: _Scope, cur: _Cur, depth: int) -> _Cur:
        n = self.eval(st.count, self.shape_env(env, cur))
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            self.fail(
                f"repeat needs a count that is a non-negative integer, got {render(n)}",
                st.count.pos,
                "use // for integer division, e.g. (depth - 4) // 6",
            )
        if n > MAX_OPS:
            self.fail(f"repeat count {n} is too large", st.count.pos)
        for i in range(n):
            e = dict(env)
            if st.var:
                e[st.var] = i
            if st.single:
                layer = st.body[0]
                is_block = layer.kind in self.program.definitions
                if is_block or layer.name:
                    name = f"{layer.name or 'b'}{i}"
                    cur = self.layer(layer, e, scope, cur, depth, name=name, index=i)
                else:
                    cur = self.layer(layer, e, scope, cur, depth)
            else:
                local = f"b{i}"
                if local in scope.explicit:
                    self.fail(f"duplicate name '{scope.full(local)}'", st.pos)
                scope.explicit.add(local)
                self.g.scopes.append(P.Scope(name=scope.full(local), index=i))
                cur = self.body(st.body, e, _Scope(scope.full(local)), cur, depth + 1)
        return cur

    def residual(
        self, st: A.Residual, sc: A.Shortcut | None, env: dict, scope: _Scope, cur: _Cur, depth: int
    ) -> _Cur:
        if cur is None:
            self.fail("the backbone must start with an input statement", st.pos)
        x = cur
        main = self.body(st.body, env, scope, x, depth + 1)
        short = x
        if sc is not None:
            take = True
            if sc.cond is not None:
                take = self.eval(sc.cond, self.shape_env(env, x))
                if not isinstance(take, bool):
                    self.fail(
                        f"a shortcut condition must be true or false, got {type_name(take)}",
                        sc.cond.pos,
                    )
            if take:
                short = self.body(sc.body, env, scope, x, depth + 1)
        if main.shape != short.shape:
            where = "shortcut" if short is not x else "identity shortcut"
            self.fail_shape(
                f"shape mismatch in residual add: the main path gives {main.shape}, the {where}"
                f" gives {short.shape}",
                st.pos,
                "add or fix a projection: shortcut if stride != 1 or in_channels != width { conv"
                " proj(width, kernel = 1, stride = stride) }",
            )
        name = scope.full(scope.auto("add"))
        return self.add(
            P.AddOp(
                name=name, inputs=[main.name, short.name], in_shape=main.shape, out_shape=main.shape
            ),
            st.pos,
        )

    def layer(
        self,
        st: A.Layer,
        env: dict,
        scope: _Scope,
        cur: _Cur,
        depth: int,
        name: str | None = None,
        index: int | None = None,
    ) -> _Cur:
        local = name or st.name
        if local is not None:
            if local in scope.explicit:
                self.fail(
                    f"duplicate name '{scope.full(local)}'",
                    st.name_pos or st.pos,
                    "names must be unique within a block or stage",
                )
            scope.explicit.add(local)
        defn = self.program.definitions.get(st.kind)
        if defn is not None:
            if defn.kind != "block":
                self.fail(
                    f"'{st.kind}' is a backbone; only blocks can be used inside a body",
                    st.kind_pos,
                    f"turn it into a block: block {st.kind}(...) {{ ... }}",
                )
            local = local or scope.auto(st.kind)
            benv = self.bind(defn, st, dict(self.program.consts), self.shape_env(env, cur), cur)
            self.g.scopes.append(P.Scope(name=scope.full(local), block=st.kind, index=index))
            return self.body(defn.body, benv, _Scope(scope.full(local)), cur, depth + 1)
        kind = LAYERS.get(st.kind)
        if kind is None:
            cands = list(LAYERS) + [
                n for n, d in self.program.definitions.items() if d.kind == "block"
            ]
            self.fail(
                f"unknown layer or block '{st.kind}'", st.kind_pos, choices_hint(st.kind, cands)
            )
        full = scope.full(local or scope.auto(st.kind))
        args = self.layer_args(st, kind, self.shape_env(env, cur), full)
        try:
            op = kind.build(full, [cur.name], cur.shape, args)
        except ShapeError as e:
            pos = next((a.pos for a in st.args if a.name == e.arg), st.pos) if e.arg else st.pos
            self.fail_shape(f"{e.message} (in layer '{full}')", pos, e.hint)
        if not isinstance(op, list):
            return self.add(op, st.pos)
        self.g.scopes.append(P.Scope(name=full, block=st.kind))  # a composite layer: its own scope
        for part in op:
            cur = self.add(part, st.pos)
        return cur

    def layer_args(self, st: A.Layer, kind, env: dict, full: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        positional = [a for a in st.args if a.name is None]
        if len(positional) > len(kind.params):
            what = (
                f"at most {len(kind.params)} positional argument(s) ({', '.join(kind.params)})"
                if kind.params
                else "no arguments"
            )
            self.fail(f"{st.kind} takes {what}", positional[len(kind.params)].pos)
        for pname, a in zip(kind.params, positional):
            out[pname] = (self.eval(a.value, env), a.pos)
        for a in st.args:
            if a.name is None:
                continue
            if a.name not in kind.params:
                self.fail(
                    f"{st.kind} has no argument '{a.name}'",
                    a.pos,
                    (
                        choices_hint(a.name, kind.params)
                        if kind.params
                        else f"{st.kind} takes no arguments"
                    ),
                )
            if a.name in out:
                self.fail(f"argument '{a.name}' given twice", a.pos)
            out[a.name] = (self.eval(a.value, env), a.pos)
        values: dict[str, Any] = {}
        for p in kind.params:
            if p in out:
                v, pos = out[p]
                values[p] = self.check_type(st.kind, p, v, pos, full)
            elif p in kind.required:
                self.fail(
                    f"{st.kind} needs '{p}'",
                    st.pos,
                    (
                        f"for example: {st.kind}({', '.join(kind.required)} = ...)"
                        if len(kind.required) > 1
                        else (
                            f"pass it first: {st.kind}(64)"
                            if p == "out"
                            else f"{st.kind}({p} = ...)"
                        )
                    ),
                )
            else:
                values[p] = kind.defaults[p]
        return values

    def check_type(self, kind: str, arg: str, v: Any, pos: Pos, full: str) -> Any:
        t = ARG_TYPES.get(arg, "any")
        bad = None
        if t == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                bad = "an integer"
            elif v < 1:
                self.fail(f"{kind} '{arg}' must be at least 1, got {v} (in layer '{full}')", pos)
        elif t in ("ints", "ints?"):
            if t == "ints?" and v is None:
                return v
            ok = (isinstance(v, int) and not isinstance(v, bool)) or (
                isinstance(v, list)
                and v
                and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            )
            if not ok:
                bad = "an integer or a list of integers"
        elif t == "bool":
            if not isinstance(v, bool):
                bad = "true or false"
        elif t == "str":
            if not isinstance(v, str):
                bad = "a string"
        elif t == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                bad = "a number"
            else:
                v = float(v)
        if bad:
            hint = (
                "use // for integer division"
                if isinstance(v, float) and t.startswith("int")
                else None
            )
            self.fail(
                f"{kind} '{arg}' must be {bad}, got {type_name(v)} ({render(v)}) (in layer"
                f" '{full}')",
                pos,
                hint,
            )
        return v
