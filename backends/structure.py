"""The spec's structure recovered from a Plan: blocks as modules, repeats as module lists.

Op names are hierarchical (``s1.b0.conv1``) and the Plan's ``scopes`` say which scope is a call
of which ``.mix`` block and at which repeat index. This module turns that into a tree of nodes a
backend emits as one class per distinct block body (``WideBasic``, ``WideBasicProj``), a stage
of repeats as a module list iterated in a loop, and a forward per class whose statements reuse
few variable names (``x``, ``h``), as a person would write it. Backend-neutral: a backend supplies
how one item becomes a statement.
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass, field
from typing import Any

from mixc.backends.pysource import ident
from mixc.compiler.plan import Plan


@dataclass
class Node:
    """A scope of the spec emitted as a module (the model itself is the node with path "")."""

    path: str
    block: str | None = None  # the .mix block it instantiates
    index: int | None = None  # its position in a repeat
    items: list[Any] = field(default_factory=list)  # ops and child Nodes, in execution order
    cls: str = ""  # the emitted class (set by name_classes)

    @property
    def local(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    def ops(self) -> list[Any]:
        """Every op in this node and below, in order."""
        out = []
        for it in self.items:
            out += it.ops() if isinstance(it, Node) else [it]
        return out

    @property
    def output(self) -> str:
        last = self.items[-1]
        return last.output if isinstance(last, Node) else last.name

    def inputs(self) -> list[str]:
        """Values read from outside this node."""
        inside = {op.name for op in self.ops()}
        return sorted({i for op in self.ops() for i in op.inputs if i not in inside})

    @property
    def is_list(self) -> bool:
        """A stage of repeats only: emitted as a module list iterated in a loop."""
        return bool(self.items) and all(
            isinstance(it, Node) and it.index == i for i, it in enumerate(self.items)
        )


def attr(local: str) -> str:
    """An attribute name for a relative op or scope name (``b0.conv1`` inlined: ``b0_conv1``)."""
    name = ident(local.replace(".", "_")) or "v"
    return (
        f"l_{name}"
        if name[0].isdigit() or keyword.iskeyword(name) or name.startswith("_")
        else name
    )


def relative(node: Node, name: str) -> str:
    return name[len(node.path) + 1 :] if node.path else name


def build_tree(plan: Plan) -> Node:
    """The model as nested nodes; a scope that is not a clean chain (one value in, its last value
    out, contiguous in the op order) is inlined into its parent, so any plan can be emitted."""
    scopes = {s.name: s for s in plan.scopes}
    root = Node("")
    nodes = {"": root}
    for op in plan.ops[1:]:
        parts = op.name.split(".")
        parent = root
        for i in range(1, len(parts)):
            path = ".".join(parts[:i])
            node = nodes.get(path)
            if node is None:
                s = scopes.get(path)
                node = nodes[path] = Node(path, s.block if s else None, s.index if s else None)
                parent.items.append(node)
            elif parent.items[-1] is not node:  # the scope resumes after other ops: no tree
                return Node("", items=list(plan.ops[1:]))
            parent = node
        parent.items.append(op)
    _settle(root, plan)
    return root


def _settle(node: Node, plan: Plan) -> None:
    """Inline the children that are not clean chains."""
    users: dict[str, set[str]] = {}
    for op in plan.ops:
        for i in op.inputs:
            users.setdefault(i, set()).add(op.name)
    items: list[Any] = []
    for it in node.items:
        if isinstance(it, Node):
            _settle(it, plan)
            inside = {op.name for op in it.ops()}
            leaks = {op.name for op in it.ops() if users.get(op.name, set()) - inside} - {it.output}
            if len(it.inputs()) != 1 or leaks:
                items += it.items
                continue
        items.append(it)
    node.items = items


def camel(s: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in ident(s).split("_") if p) or "Block"


def class_bodies(root: Node, body, taken: set[str]) -> dict[str, list[Node]]:
    """Group the nodes below ``root`` by emitted body (``body(node)`` -> lines, without the class
    line) and name each group's class after its block: the commonest body gets the plain name,
    others the first layer it has that the commonest lacks (``WideBasicProj``). Deeper nodes are
    named first, as a body names its children's classes."""
    levels: dict[int, list[tuple[str, Node]]] = {}

    def walk(n: Node, parent: Node, depth: int) -> None:
        for it in n.items:
            if isinstance(it, Node):
                walk(it, n, depth + 1)
        if n is root or n.is_list:
            return
        base = (
            camel(n.block) if n.block else camel(parent.local if n.index is not None else n.local)
        )
        if not n.block and n.index is not None:
            base += "Block"
        levels.setdefault(depth, []).append((base, n))

    walk(root, root, 0)
    taken = set(taken)
    out: dict[str, list[Node]] = {}
    for depth in sorted(levels, reverse=True):
        groups: dict[str, dict[tuple, list[Node]]] = {}
        for base, n in levels[depth]:
            groups.setdefault(base, {}).setdefault(tuple(body(n)), []).append(n)
        for base, variants in groups.items():
            order = sorted(variants.values(), key=lambda ns: -len(ns))
            common = {relative(order[0][0], op.name) for op in order[0][0].ops()}
            for j, nodes in enumerate(order):
                name = base
                if j:
                    extra = [relative(nodes[0], op.name) for op in nodes[0].ops()]
                    extra = [e for e in extra if e not in common]
                    name = base + (camel(extra[0].split(".")[-1]) if extra else "")
                n_ = 2
                while name in taken:
                    name, n_ = f"{name.rstrip('0123456789')}{n_}", n_ + 1
                taken.add(name)
                for n in nodes:
                    n.cls = name
                out[name] = nodes
    return out


def assign_vars(
    node: Node, noop: set[str]
) -> tuple[dict[str, str], list[tuple[Any, str, list[str]]]]:
    """Variable names for a node's forward: ``x`` for its input, then as few names as liveness
    allows (``x``, ``h``, ``h1``...). Returns (value -> variable, [(item, out var, input vars)]).
    Items whose op is in ``noop`` (dropout of 0) emit nothing: their output is their input."""
    items = node.items
    ins_of = [it.inputs() if isinstance(it, Node) else list(it.inputs) for it in items]
    out_of = [it.output if isinstance(it, Node) else it.name for it in items]
    last: dict[str, int] = {}
    for i, ins in enumerate(ins_of):
        for v in ins:
            last[v] = i
    last[node.output] = len(items)
    var: dict[str, str] = {v: "x" for v in node.inputs()}
    steps = []

    def free(name: str, i: int) -> bool:
        return all(last.get(v, -1) <= i for v, n in var.items() if n == name)

    for i, (it, ins, out) in enumerate(zip(items, ins_of, out_of)):
        in_vars = [var.get(v, "x") for v in ins]
        if not isinstance(it, Node) and it.name in noop:
            var[out] = in_vars[0]
            continue
        cands = ["x", *in_vars[:1], "h", *(f"h{j}" for j in range(1, 100))]
        name = next(c for c in cands if free(c, i))
        var[out] = name
        steps.append((it, name, in_vars))
    return var, steps
