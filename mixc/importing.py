"""`mixc import`: a model the user already has, as a `.mix` spec (docs/importing.md).

A backend traces the model into a neutral :class:`~mixc.core.module_graph.ModuleGraph`; this
module, free of any framework, turns it into statements (chains, ``residual { } shortcut { }``),
recognises the model's own sub-module classes as ``block``s and its containers of one block class
as ``stage NAME = repeat N as i ...``, writes the text, and maps every weight of the original onto
the plan tensor of one plain member (``members=1``, ``groups=none``) for the faithfulness check.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixc.core.errors import MixcError
from mixc.core.module_graph import GraphNode, ImportCheck, ModuleGraph, ModuleImportError

__all__ = ["Imported", "load_factory", "parse_input", "spec_from_graph", "import_module"]

#: words of the grammar: never a name
_RESERVED = set(
    "and as backbone block else ensemble false if import input let not or repeat residual"
    " shortcut stage train true in_channels in_height in_width in_length i".split()
)
#: the language's defaults (compiler/layers.py), left out of the text
_DEFAULTS = {
    "conv": {"stride": 1, "dilation": 1, "groups": 1, "bias": False},
    "linear": {"bias": True},
    "bn": {"eps": 1e-5, "momentum": 0.1},
    "layernorm": {"eps": 1e-5},
    "leaky_relu": {"slope": 0.01},
    "dropout": {"p": 0.5},
    "maxpool": {"padding": 0},
    "avgpool": {"padding": 0},
    "attention": {"bias": True},
}
_POSITIONAL = {"conv": "out", "linear": "out", "maxpool": "kernel", "avgpool": "kernel"}
_POSITIONAL.update(dropout="p", leaky_relu="slope", attention="heads", token_pool="mode")
_QUOTED = {("token_pool", "mode")}  # string arguments (others are numbers or parameter names)
PLAIN = ["members=1", "groups=none"]


# ---------------------------------------------------------------------------
# Loading the user's factory


def load_factory(target: str, args: dict[str, Any] | None = None) -> Any:
    """Import ``MODULE:FACTORY`` (a module path from the current folder, or ``file.py:factory``)
    and call the factory with ``args``: running the user's own code is this command's purpose
    (docs/security.md)."""
    module_name, sep, factory = target.rpartition(":")
    if not sep or not module_name or not factory.isidentifier():
        raise MixcError(
            f"{target!r} is not MODULE:FACTORY; hint: mixc import mymodel.py:make_net or"
            " mixc import package.module:make_net"
        )
    module = _import(module_name)
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise MixcError(
            f"{module_name} has no callable {factory!r}; hint: name a function or class that"
            " returns the model"
        )
    try:
        return fn(**(args or {}))
    except Exception as e:
        raise MixcError(
            f"calling {factory}(**{args or {}}) from {module_name} raised {type(e).__name__}: {e};"
            " hint: check --args (a JSON object of keyword arguments)"
        ) from None


def _import(name: str) -> Any:
    if name.endswith(".py") or "/" in name or "\\" in name:
        path = Path(name)
        if not path.is_file():
            raise MixcError(f"{name}: no such Python file; hint: give a path to a .py file")
        sys.path.insert(0, str(path.resolve().parent))  # so the file imports its neighbours
        spec = importlib.util.spec_from_file_location(f"_mixc_import_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        runner = lambda: spec.loader.exec_module(module)  # noqa: E731
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        module = None
        runner = lambda: importlib.import_module(name)  # noqa: E731
    try:
        loaded = runner()
    except Exception as e:
        raise MixcError(
            f"importing {name} raised {type(e).__name__}: {e}; hint: the module must import from"
            " the current folder (or give its file: path/to/file.py:factory)"
        ) from None
    return module if module is not None else loaded


def parse_input(text: str) -> list[int]:
    """``--input C,H,W`` (image), ``C,L`` (signal) or ``D`` (vector)."""
    try:
        dims = [int(t) for t in text.split(",")]
    except ValueError:
        dims = []
    if not 1 <= len(dims) <= 3 or min(dims) < 1:
        raise MixcError(
            f"--input {text!r} is not a shape; hint: C,H,W for images (1,8,8), C,L for signals,"
            " D for vectors"
        )
    return dims


def parse_args_json(text: str | None) -> dict[str, Any]:
    """``--args`` as a JSON object of keyword arguments."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise MixcError(f"--args is not JSON ({e}); hint: --args '{{\"width\": 32}}'") from None
    if not isinstance(value, dict):
        raise MixcError("--args must be a JSON object; hint: --args '{\"width\": 32}'")
    return value


# ---------------------------------------------------------------------------
# Statements: a graph's nodes as chains and residuals


@dataclass
class Residual:
    main: list
    shortcut: list | None


def _fail(node: GraphNode, what: str, hint: str) -> ModuleImportError:
    at = f", at {node.where}" if node.where else ""
    op = node.layer or node.kind
    return ModuleImportError(f"node {node.name!r} ({op}) {what}{at}; hint: {hint}")


_ADD_HINT = (
    "the language adds only the two paths of a residual block, both from one value:"
    " `residual { main } shortcut { projection }`"
)


class _Walker:
    """Series-parallel parsing of one graph: a value used twice opens a residual whose two paths
    meet at one add."""

    def __init__(self, graph: ModuleGraph):
        self.nodes = {n.name: n for n in graph.nodes}
        self.users: dict[str, list[GraphNode]] = defaultdict(list)
        for n in graph.nodes:
            for i in dict.fromkeys(n.inputs):
                self.users[i].append(n)
        self.input = next(n for n in graph.nodes if n.kind == "input")

    def statements(self) -> list:
        stmts, last, merge = self.walk(self.input.name)
        if merge is not None:
            raise _fail(merge, "adds a value to one that does not branch from it", _ADD_HINT)
        return stmts

    def walk(self, v: str) -> tuple[list, str, GraphNode | None]:
        stmts: list = []
        while True:
            us = self.users[v]
            if len(us) == 1 and us[0].kind == "output":
                return stmts, v, None
            if len(us) == 1 and us[0].kind == "add":
                return stmts, v, us[0]
            if len(us) == 1:
                stmts.append(us[0])
                v = us[0].name
            elif len(us) == 2:
                stmt, merge = self.fork(v, us)
                stmts.append(stmt)
                v = merge.name
            else:
                what = "is not used" if not us else f"feeds {len(us)} operations"
                raise _fail(self.nodes[v], what, "mixc expresses chains and residual blocks")

    def fork(self, v: str, us: list[GraphNode]) -> tuple[Residual, GraphNode]:
        branches = []
        for u in us:
            if u.kind == "add":
                branches.append(([], v, u))
            elif u.kind == "output":
                raise _fail(u, "returns a value that is also used further", "return one value")
            else:
                rest, last, merge = self.walk(u.name)
                branches.append(([u, *rest], last, merge))
        adds = {b[2].name if b[2] is not None else None for b in branches}
        if len(adds) != 1 or None in adds or all(not b[0] for b in branches):
            node = next((b[2] for b in branches if b[2] is not None), self.nodes[v])
            raise _fail(node, "joins paths that do not form one residual block", _ADD_HINT)
        add = branches[0][2]
        (a, _, _), (b, _, _) = branches
        if not a or not b:
            return Residual(a or b, None), add
        first = branches[0] if add.inputs[0] == branches[0][1] else branches[1]
        second = branches[1] if first is branches[0] else branches[0]
        main, short = (first, second) if _size(first[0]) >= _size(second[0]) else (second, first)
        return Residual(main[0], short[0]), add


def _size(stmts: list) -> int:
    return sum(
        _size(s.main) + _size(s.shortcut or []) if isinstance(s, Residual) else 1 for s in stmts
    )


def _has_residual(stmts: list) -> bool:
    return any(isinstance(s, Residual) for s in stmts)


def _layers(stmts: list) -> list[GraphNode]:
    """Every layer of ``stmts`` in text order (residual: main, then shortcut)."""
    out = []
    for s in stmts:
        if isinstance(s, Residual):
            out += _layers(s.main) + _layers(s.shortcut or [])
        elif isinstance(s, GraphNode):
            out.append(s)
    return out


# ---------------------------------------------------------------------------
# Names


def snake(name: str) -> str:
    """``BasicBlock`` -> ``basic_block``; any text -> a valid, unreserved name."""
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()
    return ident(s)


def ident(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_]", "_", text)
    if not s or s[0].isdigit():
        s = "l_" + s
    return s + "_" if s in _RESERVED else s


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return str(v)


# ---------------------------------------------------------------------------
# Layer text


def _default_padding(args: dict[str, Any]) -> Any:
    k, d = args.get("kernel", 3), args.get("dilation", 1)
    ks = k if isinstance(k, list) else [k]
    ds = d if isinstance(d, list) else [d] * len(ks)
    pads = [dd * (kk // 2) for kk, dd in zip(ks, ds * len(ks) if len(ds) == 1 else ds)]
    return pads[0] if len(set(pads)) == 1 else pads


def _same(a: Any, b: Any) -> bool:
    """Equal as the language reads them (``3`` and ``[3, 3]`` alike)."""
    if isinstance(a, list) and len(set(map(str, a))) == 1:
        a = a[0]
    if isinstance(b, list) and len(set(map(str, b))) == 1:
        b = b[0]
    return a == b


def layer_text(node: GraphNode, name: str | None, bound: dict[str, str] | None = None) -> str:
    """``conv conv1(64, kernel = 3, stride = stride)``: defaults left out, ``bound`` arguments
    written as the block parameter (or expression) they are bound to."""
    bound = bound or {}
    kind, args = node.layer, node.args
    defaults = dict(_DEFAULTS.get(kind, {}))
    if kind == "conv" and not {"kernel", "dilation", "padding"} & set(bound):
        defaults["padding"] = _default_padding(args)
    if kind in ("maxpool", "avgpool") and not {"kernel", "stride"} & set(bound):
        defaults["stride"] = args.get("kernel")
    items = []
    for key, val in args.items():
        if key not in bound and key in defaults and _same(defaults[key], val):
            continue
        text = bound.get(key, f'"{val}"' if (kind, key) in _QUOTED else _value(val))
        items.append(text if key == _POSITIONAL.get(kind) else f"{key} = {text}")
    head = f"{kind} {name}" if name else kind
    return head + (f"({', '.join(items)})" if items else "")


# ---------------------------------------------------------------------------
# Blocks: one per sub-module class (and body shape), parameters where instances differ


@dataclass
class _Instance:
    call: GraphNode  # the call in the root's graph
    stmts: list
    layers: dict[tuple, GraphNode] = field(default_factory=dict)  # structure path -> layer
    shortcuts: dict[tuple, bool] = field(default_factory=dict)  # residual path -> has one


def _index(stmts: list, inst: _Instance, path: tuple = ()) -> tuple:
    """Fill ``inst``'s maps; return the body's signature (shortcuts left out: they may vary)."""
    sig = []
    for i, s in enumerate(stmts):
        p = (*path, i)
        if isinstance(s, Residual):
            inst.shortcuts[p] = s.shortcut is not None
            sig.append(("residual", _index(s.main, inst, (*p, "m"))))
            if s.shortcut is not None:
                _index(s.shortcut, inst, (*p, "s"))
        else:
            inst.layers[p] = s
            sig.append((s.layer, s.label))
    return tuple(sig)


@dataclass
class _Block:
    name: str
    instances: list[_Instance]
    template: _Instance | None = None
    params: dict[str, list] = field(default_factory=dict)  # name -> value per instance
    keys: dict[str, str] = field(default_factory=dict)  # parameter -> the argument it stands for
    bound: dict[tuple, dict[str, str]] = field(default_factory=dict)  # layer path -> key -> text
    conditions: dict[tuple, str] = field(default_factory=dict)  # residual path -> shortcut if


def _order(path: tuple) -> tuple:
    """Text order of a structure path: a residual's main path before its shortcut."""
    return tuple(x if isinstance(x, int) else (0.25 if x == "m" else 0.75) for x in path)


def _param_name(key: str, taken: dict) -> str:
    base = {"out": "width", "p": "drop"}.get(key, ident(key))
    name, n = base, 2
    while name in taken:
        name, n = f"{base}{n}", n + 1
    return name


def _compatible(a: list, b: list) -> bool:
    return all(x is None or y is None or x == y for x, y in zip(a, b))


def _bind_params(block: _Block) -> None:
    """An argument whose value differs between instances becomes a parameter (one per distinct
    vector of values, ``None`` where an instance lacks the layer)."""
    paths = sorted({p for inst in block.instances for p in inst.layers}, key=_order)
    for p in paths:
        keys = next(inst.layers[p].args for inst in block.instances if p in inst.layers)
        for key in keys:
            vals = [
                inst.layers[p].args[key] if p in inst.layers else None for inst in block.instances
            ]
            known = [v for v in vals if v is not None]
            same = [n for n, pv in block.params.items() if block.keys[n] == key]
            name = next((n for n in same if _compatible(block.params[n], vals)), None)
            if all(v == known[0] for v in known) and (name is None or None not in vals):
                continue
            if name is None:
                name = _param_name(key, block.params)
                block.params[name], block.keys[name] = vals, key
            else:
                old = block.params[name]
                block.params[name] = [a if a is not None else b for a, b in zip(old, vals)]
            block.bound.setdefault(p, {})[key] = name


def _conditions(block: _Block) -> None:
    """``shortcut if stride != 1 or in_channels != width`` where that is exactly when an instance
    has its projection; else a boolean parameter ``project``; no condition when all have one."""
    paths = sorted({p for inst in block.instances for p in inst.shortcuts}, key=_order)
    for p in paths:
        has = [inst.shortcuts.get(p, False) for inst in block.instances]
        if all(has) or not any(has):
            continue
        first = next(
            (q for q in sorted(block.template.layers, key=_order) if q[: len(p) + 1] == (*p, "s")),
            None,
        )
        cond = _projection_condition(block, first, has) if first else None
        if cond is None:
            name = _param_name("project", block.params)
            block.params[name], block.keys[name] = has, "project"
            cond = name
        block.conditions[p] = cond


def _projection_condition(block: _Block, path: tuple, has: list[bool]) -> str | None:
    """``stride != 1 or in_channels != W`` from the shortcut's first layer, if it says exactly
    which instances have the shortcut."""
    args, bound = block.template.layers[path].args, block.bound.get(path, {})
    stride = bound.get("stride") if "stride" in args else None
    width = bound.get("out", _value(args["out"])) if "out" in args else None
    terms = ([f"{stride} != 1"] if stride else []) + ([f"in_channels != {width}"] if width else [])
    if not terms:
        return None
    for i, inst in enumerate(block.instances):
        s = block.params[stride][i] if stride else 1
        w = block.params[width][i] if width in block.params else args.get("out")
        if s is None or w is None:
            return None
        c_in = inst.call.graph.nodes[0].shape[0]
        if (not _same(s, 1) or c_in != w) != has[i]:
            return None
    return " or ".join(terms)


def _block_text(block: _Block) -> str:
    params = ", ".join(block.params)
    lines = [f"block {block.name}({params}) {{"]
    lines += _body_lines(block.template.stmts, "    ", block, ())
    return "\n".join(lines + ["}"])


def _body_lines(stmts: list, pad: str, block: _Block | None, path: tuple) -> list[str]:
    lines = []
    for i, s in enumerate(stmts):
        p = (*path, i)
        if isinstance(s, Residual):
            lines.append(f"{pad}residual {{")
            lines += _body_lines(s.main, pad + "    ", block, (*p, "m"))
            short = s.shortcut
            if short is not None:
                cond = block.conditions.get(p) if block else None
                lines.append(f"{pad}}}")
                lines.append(f"{pad}shortcut{' if ' + cond if cond else ''} {{")
                lines += _body_lines(short, pad + "    ", block, (*p, "s"))
            lines.append(f"{pad}}}")
        else:
            bound = block.bound.get(p) if block else None
            lines.append(pad + layer_text(s, s.label or None, bound))
    return lines


# ---------------------------------------------------------------------------
# The whole spec


@dataclass
class Imported:
    """The spec's text, and each weight layer's tensors: ``.mix`` layer name -> plan field
    (``weight``, ``running_mean``...) -> the original's state name."""

    text: str
    name: str
    tensors: dict[str, dict[str, str]]
    blocks: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    note: str = ""  # what the user should know (a budget above 1.0x, and why)


def _inline(stmts: list, calls: list[_Instance], top: bool) -> list:
    """Root statements with each sub-module call either kept (a block instance, top level only)
    or replaced by its own statements."""
    out = []
    for s in stmts:
        if isinstance(s, Residual):
            short = None if s.shortcut is None else _inline(s.shortcut, calls, False)
            out.append(Residual(_inline(s.main, calls, False), short))
        elif s.kind == "call":
            inner = _Walker(s.graph).statements()
            if top and _has_residual(inner):
                calls.append(_Instance(s, inner))
                out.append(calls[-1])
            else:
                out += _inline(inner, calls, False)
        else:
            out.append(s)
    return out


def _label(layers: list[GraphNode], prefix: str, full: str, tensors: dict) -> None:
    """Name every weight layer by its module path (relative to ``prefix``); record its tensors
    under its full ``.mix`` name (``full`` + label)."""
    for node in layers:
        if not node.tensors:
            continue
        rel = node.path[len(prefix) :] if prefix and node.path.startswith(prefix) else node.path
        node.label = ident(f"{node.layer}_{rel}" if rel[:1].isdigit() else rel)
        key = full + node.label
        if key in tensors:
            raise _fail(
                node,
                f"uses module {node.path!r} a second time (shared weights)",
                "mixc layers own their weights: give each use its own module",
            )
        tensors[key] = dict(node.tensors)


def _make_blocks(calls: list[_Instance]) -> dict[int, _Block]:
    """One block per (class, body shape); returns each call's block by ``id``."""
    groups: dict[tuple, list[_Instance]] = defaultdict(list)
    for inst in calls:
        _label(_layers(inst.stmts), inst.call.path + ".", "", {})
        sig = _index(inst.stmts, inst)
        groups[(inst.call.graph.cls, sig)].append(inst)
    by_call, names = {}, set()
    for (cls, _), insts in groups.items():
        base = _block_name(cls, insts[0])
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.add(name)
        block = _Block(name, insts)
        block.template = max(insts, key=lambda i: sum(i.shortcuts.values()))
        _bind_params(block)
        _conditions(block)
        by_call.update({id(i): block for i in insts})
    return by_call


def _block_name(cls: str, inst: _Instance) -> str:
    """``BasicBlock`` -> ``basic_block``; timm's ``Block`` (a reserved word) holding attention ->
    ``vit_block``, as zoo/blocks/vit.mix names it."""
    name = snake(cls)
    if name.endswith("_") and name[:-1] in _RESERVED:
        if any(n.layer == "attention" for n in _layers(inst.stmts)):
            return "vit_block"
    return name


def _expr(values: list) -> str | None:
    """One expression of the repeat's ``i`` giving ``values`` in order, or None."""
    known = [v for v in values if v is not None]
    fill = [v if v is not None else known[0] for v in values]
    if all(v == fill[0] for v in fill):
        return _value(fill[0])
    if len(fill) > 1 and all(v == fill[1] for v in fill[1:]):
        return f"{_value(fill[0])} if i == 0 else {_value(fill[1])}"
    return None


def _call_args(block: _Block, inst: _Instance) -> str:
    k = block.instances.index(inst)
    vals = {
        n: v[k] if v[k] is not None else next(x for x in v if x is not None)
        for n, v in block.params.items()
    }
    return ", ".join(f"{n} = {_value(v)}" for n, v in vals.items())


def _stage_lines(stage: str, block: _Block, run: list[_Instance], tensors: dict) -> list[str]:
    """``stage NAME = repeat N as i block(...)``, or the calls one by one where an argument is no
    simple expression of ``i``; the instances' tensors under ``NAME.bK.<layer>``."""
    for k, inst in enumerate(run):
        for node in _layers(inst.stmts):
            if node.tensors:
                tensors[f"{stage}.b{k}.{node.label}"] = dict(node.tensors)
    at = [block.instances.index(inst) for inst in run]
    exprs = {n: _expr([v[k] for k in at]) for n, v in block.params.items()}
    if all(e is not None for e in exprs.values()):
        args = ", ".join(f"{n} = {e}" for n, e in exprs.items())
        as_i = " as i" if any("i == 0" in e for e in exprs.values()) else ""
        return [f"    stage {stage} = repeat {len(run)}{as_i} {block.name}({args})"]
    calls = [f"        {block.name} b{k}({_call_args(block, inst)})" for k, inst in enumerate(run)]
    return [f"    stage {stage} {{", *calls, "    }"]


def _root_lines(items: list, graph: ModuleGraph, blocks: dict, tensors: dict) -> list[str]:
    """The backbone's body: layers and residuals, block calls, containers of one block class as
    stages."""
    lines: list[str] = []
    taken: set[str] = set()

    def unique(name: str) -> str:
        out, n = name, 2
        while out in taken:
            out, n = f"{name}_{n}", n + 1
        taken.add(out)
        return out

    i = 0
    while i < len(items):
        s = items[i]
        if not isinstance(s, _Instance):
            lines += _body_lines([s], "    ", None, ())
            i += 1
            continue
        block, parent = blocks[id(s)], s.call.path.rpartition(".")[0]
        run = [s]
        while parent in graph.containers and i + len(run) < len(items):
            nxt = items[i + len(run)]
            if not isinstance(nxt, _Instance) or blocks[id(nxt)] is not block:
                break
            if nxt.call.path.rpartition(".")[0] != parent:
                break
            run.append(nxt)
        if parent in graph.containers:
            lines += _stage_lines(unique(ident(parent)), block, run, tensors)
        else:
            name = unique(ident(s.call.path))
            lines.append(f"    {block.name} {name}({_call_args(block, s)})")
            for node in _layers(s.stmts):
                if node.tensors:
                    tensors[f"{name}.{node.label}"] = dict(node.tensors)
        i += len(run)
    return lines


def _input_line(shape: list[int]) -> str:
    kind = {1: "vector", 2: "signal", 3: "image"}[len(shape)]
    return f"    input {kind}({', '.join(map(str, shape))})"


ENSEMBLE = """\
ensemble {{
    backbone {name}({call})
    members 4
    budget {budget}
    groups {groups}
    templates_per_layer 4
    assign shared
}}

train {{
    # data digits        # the default; or cifar10, cifar100, "data.npz", an image folder
    epochs 30
    batch 64
    optimizer sgd(lr = 0.05, momentum = 0.9, nesterov = true)
    schedule cosine
    weight_decay 5e-4
    weight_decay_exclude [alphas, bn]
}}
"""


_CONVNET_TRAIN = """\
    optimizer sgd(lr = 0.05, momentum = 0.9, nesterov = true)
    schedule cosine
    weight_decay 5e-4
    weight_decay_exclude [alphas, bn]
"""
#: a transformer's recipe, as the zoo's ViTs (AdamW, warm-up, no decay on norms and embeddings)
_VIT_TRAIN = """\
    optimizer adamw(lr = 1e-3)
    schedule cosine
    warmup 5
    weight_decay 0.05
    weight_decay_exclude [alphas, norm, embedding, bias]
"""


def _all_layers(items: list) -> list[GraphNode]:
    """The root's layers and its block instances' layers."""
    out = []
    for s in items:
        out += _layers(s.stmts) if isinstance(s, _Instance) else _layers([s])
    return out


def spec_from_graph(graph: ModuleGraph, input_shape: list[int], origin: str) -> Imported:
    """The ``.mix`` text of a traced model (blocks, stages, backbone, default ensemble and
    train sections) and its weight layers' tensors."""
    calls: list[_Instance] = []
    items = _inline(_Walker(graph).statements(), calls, top=True)
    blocks = _make_blocks(calls)
    tensors: dict[str, dict[str, str]] = {}
    _label(_layers(items), "", "", tensors)
    name = snake(graph.cls)
    block_names = {b.name for b in blocks.values()}
    if name in block_names:
        name += "_net"
    params, call = "", ""
    last = items[-1] if items else None
    if isinstance(last, GraphNode) and last.layer == "linear" and last.tensors:
        classes = last.args["out"]
        last.args = {**last.args, "out": "classes"}  # written as the parameter's name
        params, call = f"classes = {classes}", f"classes = {classes}"
    body = _root_lines(items, graph, blocks, tensors)
    unique_blocks = list({id(b): b for b in blocks.values()}.values())
    text = [f"# {name}.mix: imported by `mixc import {origin}`", ""]
    text += [_block_text(b) + "\n" for b in unique_blocks]
    text += [f"backbone {name}({params}) {{", _input_line(input_shape), *body, "}", ""]
    sections = ENSEMBLE.format(name=name, call=call, budget="{budget}", groups="{groups}")
    if any(n.layer == "attention" for n in _all_layers(items)):
        sections = sections.replace(_CONVNET_TRAIN, _VIT_TRAIN)
    text.append(sections)
    stages = [ln.split()[1] for ln in body if ln.strip().startswith("stage ")]
    return Imported("\n".join(text), name, tensors, [b.name for b in unique_blocks], stages)


def name_map(imported: Imported, plan: Any) -> dict[str, str]:
    """The original's state name -> the plan tensor's name, for one plain member's ``plan``."""
    from mixc.compiler.tensor_names import tensor_name

    out = {}
    for layer, fields in imported.tensors.items():
        for attr, original in fields.items():
            sub, _, attr = attr.rpartition(".")  # an attention's q.weight: its layer attn.q
            name = f"{layer}.{sub}" if sub else layer
            op = plan.op(name)
            source = getattr(op, "source", None) or op.kind
            out[original] = tensor_name(source, name, attr)
    return out


# ---------------------------------------------------------------------------
# Driving a backend


def _importer(backend: str) -> Any:
    from mixc.backends import get_backend

    chosen = get_backend(backend)
    if not chosen.capabilities.imports:
        raise MixcError(
            f"the {backend} backend cannot import models; hint: --backend torch imports a"
            " torch.nn.Module"
        )
    return chosen


def import_graph(
    module: Any, input_shape: list[int], origin: str = "a module", backend: str = "torch"
) -> tuple[Imported, Any]:
    """The spec of ``module`` and the plan of one plain member of it (``members=1``,
    ``groups=none``), compiled."""
    from mixc.api import compile_text

    graph = _importer(backend).describe_module(module, list(input_shape))
    imported = spec_from_graph(graph, list(input_shape), origin)
    _choose_budget(imported)
    try:
        plan = compile_text(imported.text, PLAIN, name=f"{imported.name}.mix")
    except MixcError as e:
        raise ModuleImportError(
            f"the spec written for {origin} does not compile ({e.render()}); hint: this is a"
            " bug in mixc import, please report it with the model"
        ) from None
    return imported, plan


#: the default ensemble's budgets, tried in order until one compiles
BUDGETS = ("1.0x", "1.25x", "1.5x", "2.0x", "3.0x")


def _choose_budget(imported: Imported) -> None:
    """``groups by_shape``, ``budget 1.0x`` when the default ensemble compiles so, else the first
    that does of BUDGETS, then of ``groups single``, then banking singletons (a small model may
    bank too little at 1.0x for its members to differ, or have no two layers of one shape), with a
    note saying why."""
    from mixc.api import compile_text

    template, first_error = imported.text, None
    for groups in ("by_shape", "single", "by_shape\n    bank_singletons true"):
        for budget in BUDGETS:
            imported.text = template.replace("{budget}", budget).replace("{groups}", groups)
            try:
                compile_text(imported.text, name=f"{imported.name}.mix")
            except MixcError as e:
                first_error = first_error or e.render().splitlines()[0]
                continue
            if first_error:
                chosen = groups.replace("\n   ", ";")
                imported.note = (
                    f"groups {chosen}, budget {budget} in the ensemble section: with by_shape at"
                    f" 1.0x, {first_error}"
                )
                imported.text = imported.text.replace(
                    f"    budget {budget}", f"    budget {budget}  # see `mixc inspect`: 1.0x fails"
                )
            return
    imported.text = template.replace("{budget}", "1.0x").replace("{groups}", "by_shape")
    imported.note = f"the default ensemble section does not compile: {first_error}; edit it"


def check(
    module: Any, imported: Imported, plan: Any, input_shape: list[int], backend: str = "torch"
) -> tuple[dict[str, str], ImportCheck]:
    """The weight-name map and the faithfulness check of ``imported`` against ``module``."""
    names = name_map(imported, plan)
    return names, _importer(backend).check_import(module, plan, names, list(input_shape))


def faithful(result: ImportCheck, tolerance: float = 1e-5) -> bool:
    return result.original_params == result.compiled_params and result.max_abs_diff <= tolerance


def import_module(module: Any, input_shape: Any, backend: str = "torch") -> str:
    """``mixc.import_module(net, (1, 8, 8))``: the ``.mix`` text of ``net``, checked like `mixc
    import` (parameter counts equal, logits within 1e-5 with the weights copied) or a
    ModuleImportError saying how they differ."""
    shape = [int(d) for d in input_shape]
    imported, plan = import_graph(module, shape, type(module).__name__, backend)
    _, result = check(module, imported, plan, shape, backend)
    if not faithful(result):
        raise ModuleImportError(mismatch_message(result))
    return imported.text


def mismatch_message(result: ImportCheck) -> str:
    return (
        f"the imported spec is not the module: {result.compiled_params:,} parameters against the"
        f" module's {result.original_params:,}, logits differ by up to {result.max_abs_diff:.3g}"
        " (tolerance 1e-5); hint: an operation of the forward may be missing from the spec"
        " (check the text), or pass --force to write it anyway"
    )
