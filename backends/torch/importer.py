"""`mixc import` on torch's side: trace an ``nn.Module`` with torch.fx into the neutral
:class:`~mixc.core.module_graph.ModuleGraph`, and check a compiled plan against the original.

Tracing is hierarchical so the module's own class structure survives: the root is traced with
every user-defined sub-module as a leaf (``call`` nodes, each traced on its own, flat), and plain
containers (``nn.Sequential``, ``nn.ModuleList``) traced through; layers of ``torch.nn`` are always
leaves. Shapes come from running each traced graph once (``ShapeProp``) in eval mode. What the
language cannot express stops with a :class:`ModuleImportError` naming the node, its op and the
source line. The ``.mix`` text is written by the application (``mixc/importing.py``).
"""

from __future__ import annotations

import copy
import inspect
import operator
import os
import re
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from mixc.backends.torch.import_transformer import (
    attention_layer,
    attention_like,
    param_layer,
    token_layer,
)
from mixc.compiler.plan import Plan
from mixc.core.module_graph import GraphNode, ImportCheck, ModuleGraph, ModuleImportError

__all__ = ["describe_module", "check_import", "mapped_arrays"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_TORCH_DIR = os.path.dirname(torch.__file__)
_ACT_MODULES = {nn.ReLU: "relu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Tanh: "tanh"}
_ACT_MODULES[nn.Sigmoid] = "sigmoid"
_ACT_FUNCS = {
    F.relu: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.gelu: "gelu",
    F.silu: "silu",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
_ADDS = (operator.add, operator.iadd, torch.add)
_RESHAPES = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape"}
_NOOP_METHODS = {"contiguous", "clone"}
_PARAM_HINT_SHORT = (
    "mixc reads a parameter in forward only as a class token or a position embedding: keep other"
    " weights inside torch.nn layers"
)


def _is_torch_layer(m: nn.Module) -> bool:
    """A module of torch.nn itself (a layer, supported or not): always a leaf of the trace."""
    return not isinstance(m, _CONTAINERS) and type(m).__module__.startswith("torch.nn")


class _Tracer(fx.Tracer):
    """torch.fx's tracer with the leaves of :mod:`backends.torch.importer`'s docstring: ``shallow``
    also stops at user-defined sub-modules (the root's trace), else only at torch.nn layers."""

    def __init__(self, shallow: bool):
        super().__init__()
        self.shallow = shallow
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _is_torch_layer(m) or attention_like(m):
            return True
        return self.shallow and not isinstance(m, _CONTAINERS)


def _where_from(frames: list[tuple[str, str, str]]) -> str:
    """The last frame outside torch (the user's line): ``file:line: code``."""
    mine = [f for f in frames if not os.path.abspath(f[0]).startswith(_TORCH_DIR)]
    if not mine:
        return ""
    file, line, code = mine[-1]
    return f"{file}:{line}: {code.strip()}"


def _where(node: fx.Node) -> str:
    found = re.findall(r'File "(.+?)", line (\d+), in \S+\n\s*(.*)', node.stack_trace or "")
    return _where_from(found)


def _trace(module: nn.Module, shallow: bool, label: str) -> fx.GraphModule:
    """``module`` traced, or one paragraph naming what stopped the trace and where."""
    tracer = _Tracer(shallow)
    try:
        graph = tracer.trace(module)
    except Exception as e:  # torch.fx raises TraceError, TypeError, NotImplementedError...
        import traceback

        frames = [
            (f.filename, str(f.lineno), f.line or "") for f in traceback.extract_tb(e.__traceback__)
        ]
        at = _where_from(frames)
        raise ModuleImportError(
            f"cannot trace {label} ({type(module).__name__}) with torch.fx: {e}"
            + (f" (at {at})" if at else "")
            + "; hint: data-dependent control flow (an `if` or loop on a tensor's values) and"
            " other Python that needs real tensors cannot be traced: write that forward without"
            " it, or describe the model in .mix by hand (README, 'The language')"
        ) from None
    return fx.GraphModule(module, graph)


def describe_module(module: nn.Module, input_shape: list[int]) -> ModuleGraph:
    """The neutral graph of ``module`` for inputs of one sample's shape ``input_shape``."""
    if not isinstance(module, nn.Module):
        raise ModuleImportError(
            f"the factory returned a {type(module).__name__}, not a torch.nn.Module; hint: the"
            " factory must return the model (an nn.Module instance)"
        )
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            x = torch.randn(2, *input_shape)
            return _describe(module, module, "", x, shallow=True, tokens=False)
    finally:
        module.train(was_training)


def _describe(
    root: nn.Module, module: nn.Module, path: str, x: torch.Tensor, shallow: bool, tokens: bool
) -> ModuleGraph:
    label = f"module {path!r}" if path else "the model"
    gm = _trace(module, shallow, label)
    try:
        ShapeProp(gm).propagate(x)
    except Exception as e:  # the model does not accept this input: its shape is wrong
        raise ModuleImportError(
            f"{label} ({type(module).__name__}) fails on an input of shape {list(x.shape[1:])}"
            f" (one sample): {type(e).__name__}: {e}; hint: check --input (C,H,W for images, C,L"
            " for signals, D for vectors)"
        ) from None
    prefix = f"{path}." if path else ""
    containers = {
        prefix + name for name, m in module.named_modules() if name and isinstance(m, _CONTAINERS)
    }
    converter = _Converter(root, module, prefix, shallow, tokens)
    nodes = converter.convert(gm)
    return ModuleGraph(cls=type(module).__name__, path=path, nodes=nodes, containers=containers)


def _shape(node: fx.Node) -> list[int] | None:
    meta = node.meta.get("tensor_meta")
    return list(meta.shape[1:]) if hasattr(meta, "shape") else None


def _bind(fn: Any, node: fx.Node) -> dict[str, Any]:
    """A function call's arguments by name (the input first)."""
    try:
        return dict(inspect.signature(fn).bind(*node.args, **node.kwargs).arguments)
    except (TypeError, ValueError):
        return {"input": node.args[0] if node.args else None}


def _one(v: Any, what: str) -> int:
    """An int or a tuple of one int repeated, as the language writes a kernel or stride."""
    if isinstance(v, (tuple, list)):
        return v[0] if len(set(v)) == 1 else list(v)
    return v


class _Converter:
    """fx nodes of one traced graph -> GraphNodes (aliases for no-ops)."""

    def __init__(
        self, root: nn.Module, module: nn.Module, prefix: str, shallow: bool, tokens: bool
    ):
        self.root, self.module, self.prefix, self.shallow = root, module, prefix, shallow
        self.tokens_in = tokens  # the forward's input is a token sequence
        self.alias: dict[str, str] = {}
        self.kinds: dict[str, str] = {}
        self.values: set[str] = set()  # the GraphNodes made so far
        self.seq: set[str] = set()  # ... of them, the token sequences
        self.params: dict[str, str] = {}  # a node reading a parameter -> its path from the root
        self.flat: set[str] = set()  # images flattened, to become tokens at their transpose
        self.tuples: set[str] = set()  # MultiheadAttention calls (a tuple: [0] is the output)

    def is_seq(self, v: Any) -> bool:
        return isinstance(v, fx.Node) and self.alias.get(v.name, v.name) in self.seq

    def fail(self, node: fx.Node, what: str, hint: str) -> ModuleImportError:
        at = _where(node)
        return ModuleImportError(
            f"node {node.name!r} ({node.op} {_target_name(node)}) {what}"
            + (f", at {at}" if at else "")
            + f"; hint: {hint}"
        )

    def ref(self, v: Any, node: fx.Node) -> str:
        if isinstance(v, fx.Node) and v.name in self.params:
            raise self.fail(node, f"reads the parameter {self.params[v.name]!r}", _PARAM_HINT_SHORT)
        name = self.alias.get(v.name, v.name) if isinstance(v, fx.Node) else None
        if name not in self.values:
            raise self.fail(
                node,
                "takes a value that is not the output of a layer",
                "mixc imports chains of layers, residual adds and the ViT token ops",
            )
        return name

    def convert(self, gm: fx.GraphModule) -> list[GraphNode]:
        out: list[GraphNode] = []
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise ModuleImportError(
                f"{type(self.module).__name__}.forward takes {len(inputs)} inputs; mixc imports"
                " a forward of one tensor; hint: wrap the model so forward(x) takes one input"
            )
        for node in gm.graph.nodes:
            made = self.node(node)
            if made is not None:
                self.kinds[made.name] = made.layer or made.kind
                self.values.add(made.name)
                if made.tokens:
                    self.seq.add(made.name)
                out.append(made)
        return out

    def node(self, node: fx.Node) -> GraphNode | None:
        if node.op == "placeholder":
            shape = _shape(node) or []
            if self.tokens_in:
                shape = shape[::-1]
            return GraphNode(node.name, "input", shape=shape, tokens=self.tokens_in)
        if node.op == "output":
            arg = node.args[0]
            if not isinstance(arg, fx.Node):
                raise self.fail(node, "returns several values", "return the logits alone")
            src = self.ref(arg, node)
            seq = src in self.seq
            shape = (_shape(arg) or [])[:: -1 if seq else 1]
            return GraphNode(node.name, "output", [src], shape, tokens=seq)
        if node.op == "get_attr":
            return self.attribute(node)
        if node.op == "call_module" and attention_like(self.module.get_submodule(node.target)):
            return self.module_node(node)
        if _shape(node) is None:
            if (
                node.op == "call_method"
                and node.target == "size"
                or node.op == "call_function"
                and node.target in (getattr, operator.getitem)
                and not (isinstance(node.args[0], fx.Node) and node.args[0].name in self.tuples)
            ):
                return None  # a size read for a reshape, checked by the reshape's shapes
            raise self.fail(node, "does not produce a tensor", "mixc imports tensor ops only")
        if node.op == "call_function" and node.target is operator.getitem:
            src = node.args[0]
            if isinstance(src, fx.Node) and src.name in self.tuples:
                if node.args[1] != 0:
                    raise self.fail(node, "reads the attention weights", "use attn(x, x, x)[0]")
                self.alias[node.name] = self.ref(src, node)
                return None
        if node.op == "call_module":
            return self.module_node(node)
        return self.function_node(node)

    def attribute(self, node: fx.Node) -> None:
        """A parameter read in forward: remembered for a class token or position embedding."""
        try:
            self.module.get_parameter(node.target)
        except AttributeError:
            raise self.fail(
                node,
                "reads a buffer or constant directly in forward",
                "keep weights inside torch.nn layers (Conv, Linear, BatchNorm...)",
            ) from None
        self.params[node.name] = self.prefix + node.target
        return None

    def made(
        self,
        node: fx.Node,
        layer: str,
        args: dict,
        inputs: list,
        tokens: bool | None = None,
        shape: list[int] | None = None,
        **kw: Any,
    ) -> GraphNode:
        """A layer node; a token sequence when ``tokens`` says so, else when an input is one
        (its shape then written ``[D, N]``)."""
        refs = [self.ref(i, node) for i in inputs]
        seq = any(r in self.seq for r in refs) if tokens is None else tokens
        shape = shape if shape is not None else _shape(node)
        if seq and shape is not None:
            shape = shape[::-1]
        return GraphNode(
            node.name,
            "layer",
            refs,
            shape,
            layer=layer,
            args=args,
            where=_where(node),
            tokens=seq,
            **kw,
        )

    def module_node(self, node: fx.Node) -> GraphNode | None:
        m = self.module.get_submodule(node.target)
        path = self.prefix + node.target
        if attention_like(m):
            return attention_layer(m, self, node, path)
        if not _is_torch_layer(m):  # a user-defined sub-module of the root: its own graph
            x = node.args[0]
            if len(node.args) != 1 or node.kwargs or not isinstance(x, fx.Node):
                raise self.fail(node, "calls a sub-module with several inputs", "one input each")
            sample = torch.randn(2, *_shape(x))
            graph = _describe(self.root, m, path, sample, shallow=False, tokens=self.is_seq(x))
            out = graph.nodes[-1]
            return GraphNode(
                node.name,
                "call",
                [self.ref(x, node)],
                out.shape,
                path=path,
                graph=graph,
                where=_where(node),
                tokens=out.tokens,
            )
        if isinstance(m, (nn.Identity, nn.Flatten)):
            return self.reshape(node, node.args[0])
        layer = _module_layer(m, self, node)
        if layer is None:
            raise self.fail(
                node,
                f"is a {type(m).__name__}, which mixc cannot express",
                "supported: Conv1d/2d, Linear, BatchNorm1d/2d, LayerNorm, ReLU, GELU, SiLU, Tanh,"
                " Sigmoid, LeakyReLU, Max/AvgPool, AdaptiveAvgPool(1), Flatten, Dropout, Identity",
            )
        kind, args = layer
        tensors = {k: f"{path}.{k}" for k, _ in m.named_parameters(recurse=False)}
        tensors.update({k: f"{path}.{k}" for k, _ in m.named_buffers(recurse=False)})
        tensors.pop("num_batches_tracked", None)
        return self.made(node, kind, args, [node.args[0]], path=path, tensors=tensors)

    def reshape(self, node: fx.Node, x: Any) -> GraphNode | None:
        """A flatten (any reshape that keeps the batch and makes one axis), or a no-op."""
        src, into = _shape(x), _shape(node)
        if src == into:
            self.alias[node.name] = self.ref(x, node)
            return None
        if self.is_seq(x):
            raise self.fail(
                node,
                f"reshapes a token sequence {src} to {into}",
                "mixc reads a sequence only by its layers, x[:, 0] or x.mean(dim=1)",
            )
        if into is None or src is None or len(into) != 1:
            raise self.fail(
                node,
                f"reshapes {src} to {into}",
                "mixc reshapes only by flatten ([C, ...] -> [C * ...]) keeping the batch axis",
            )
        if self.kinds.get(self.ref(x, node), "").startswith("global_"):
            self.alias[node.name] = self.ref(x, node)  # global pooling already gives [C]
            return None
        return self.made(node, "flatten", {}, [x])

    def function_node(self, node: fx.Node) -> GraphNode | None:
        t = node.target
        for special in (param_layer, token_layer):
            made = special(node, self)
            if made is not False:
                return made
        if (
            node.op == "call_function"
            and t in _ADDS
            or node.op == "call_method"
            and t in ("add", "add_")
        ):
            a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
            if (
                not (isinstance(a, fx.Node) and isinstance(b, fx.Node))
                or node.kwargs.get("alpha", 1) != 1
            ):
                raise self.fail(
                    node,
                    "adds a constant or a scaled value",
                    "mixc adds only two paths of a residual block (`residual { } shortcut { }`)",
                )
            seq = self.is_seq(a) or self.is_seq(b)
            return GraphNode(
                node.name,
                "add",
                [self.ref(a, node), self.ref(b, node)],
                _shape(node)[:: -1 if seq else 1],
                where=_where(node),
                tokens=seq,
            )
        layer = _function_layer(node, self)
        if layer is not None or node.name in self.alias:
            return layer
        raise self.fail(
            node,
            "is an operation mixc cannot express",
            "the language has no op for it (concatenation, products and custom functions"
            " included); supported: the layers of README 'The language', residual adds, flatten",
        )


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    mod = getattr(t, "__module__", None) or ""
    return f"{mod}.{getattr(t, '__name__', repr(t))}".lstrip(".")


def _conv(m: nn.Module, conv: _Converter, node: fx.Node) -> dict[str, Any]:
    if m.padding_mode != "zeros":
        raise conv.fail(node, f"pads with {m.padding_mode!r}", "mixc convolutions pad with zeros")
    pad = m.padding
    if isinstance(pad, str):
        if pad == "valid":
            pad = (0,) * len(m.kernel_size)
        elif any((k - 1) * d % 2 for k, d in zip(m.kernel_size, m.dilation)):
            raise conv.fail(node, "uses padding='same' with an even kernel", "pad explicitly")
        else:
            pad = tuple((k - 1) * d // 2 for k, d in zip(m.kernel_size, m.dilation))
    args = {"out": m.out_channels, "kernel": _one(m.kernel_size, "kernel")}
    args.update(stride=_one(m.stride, "stride"), padding=_one(pad, "padding"))
    args.update(dilation=_one(m.dilation, "dilation"), groups=m.groups, bias=m.bias is not None)
    return args


def _pool(m: nn.Module, conv: _Converter, node: fx.Node) -> dict[str, Any]:
    if (
        m.ceil_mode
        or getattr(m, "return_indices", False)
        or _one(getattr(m, "dilation", 1), "") != 1
    ):
        raise conv.fail(node, "pools with ceil_mode, indices or dilation", "use the defaults")
    if not getattr(m, "count_include_pad", True) or getattr(m, "divisor_override", None):
        raise conv.fail(node, "averages without the padding", "use count_include_pad=True")
    stride = m.stride if m.stride is not None else m.kernel_size
    return {
        "kernel": _one(m.kernel_size, ""),
        "stride": _one(stride, ""),
        "padding": _one(m.padding, ""),
    }


def _module_layer(m: nn.Module, conv: _Converter, node: fx.Node) -> tuple[str, dict] | None:
    """The language's layer kind and arguments for a torch.nn layer, or None."""
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return "conv", _conv(m, conv, node)
    if isinstance(m, nn.Linear):
        if len(_shape(node.args[0]) or []) != 1 and not conv.is_seq(node.args[0]):
            raise conv.fail(
                node,
                "applies a Linear to a tensor of more than one axis",
                "flatten first (or apply it to a token sequence)",
            )
        return "linear", {"out": m.out_features, "bias": m.bias is not None}
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if not (m.affine and m.track_running_stats) or m.momentum is None:
            raise conv.fail(
                node, "is a BatchNorm without affine, running stats or momentum", "use the defaults"
            )
        return "bn", {"eps": m.eps, "momentum": m.momentum}
    if isinstance(m, nn.LayerNorm):
        if (
            len(m.normalized_shape) != 1
            or not m.elementwise_affine
            or m.bias is None
            or not (len(_shape(node.args[0]) or []) == 1 or conv.is_seq(node.args[0]))
        ):
            raise conv.fail(
                node,
                "is a LayerNorm mixc cannot express",
                "LayerNorm(D) on vectors [D] or token sequences [N, D]",
            )
        return "layernorm", {"eps": m.eps}
    for cls, kind in _ACT_MODULES.items():
        if type(m) is cls:
            if kind == "gelu" and m.approximate != "none":
                raise conv.fail(node, "is a tanh-approximated GELU", "use approximate='none'")
            return kind, {}
    if isinstance(m, nn.LeakyReLU):
        return "leaky_relu", {"slope": m.negative_slope}
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)):
        return ("maxpool" if "Max" in type(m).__name__ else "avgpool"), _pool(m, conv, node)
    if isinstance(
        m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
    ):
        size = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size,)
        if any(s != 1 for s in size) or getattr(m, "return_indices", False):
            raise conv.fail(node, f"pools to {m.output_size}", "mixc pools globally: output size 1")
        return ("global_maxpool" if "Max" in type(m).__name__ else "global_avgpool"), {}
    if type(m) is nn.Dropout:
        return "dropout", {"p": m.p}
    return None


def _function_layer(node: fx.Node, conv: _Converter) -> GraphNode | None:
    """A function or method call the language has a layer for (None: it has none)."""
    t, x = node.target, node.args[0] if node.args else None
    method = node.op == "call_method"
    if (
        method
        and t in _NOOP_METHODS
        or method
        and t in _RESHAPE_METHODS
        or not method
        and t in _RESHAPES
    ):
        return conv.reshape(node, x)
    kind = _ACT_METHODS.get(t) if method else _ACT_FUNCS.get(t)
    if kind is not None:
        if kind == "gelu" and _bind(t, node).get("approximate", "none") != "none":
            raise conv.fail(node, "is a tanh-approximated GELU", "use approximate='none'")
        return conv.made(node, kind, {}, [x])
    if not method and t is F.leaky_relu:
        return conv.made(
            node, "leaky_relu", {"slope": _bind(t, node).get("negative_slope", 0.01)}, [x]
        )
    if not method and t is F.dropout:
        return conv.made(node, "dropout", {"p": _bind(t, node).get("p", 0.5)}, [x])
    if not method and t in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        if size in (1, (1,), (1, 1), [1, 1]):
            return conv.made(node, "global_avgpool", {}, [x])
    if method and t == "mean" and _shape(x) is not None and _shape(node) == _shape(x)[:1]:
        return conv.made(node, "global_avgpool", {}, [x])
    if not method and t in (F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d):
        a = _bind(t, node)
        if (
            a.get("ceil_mode")
            or a.get("dilation", 1) not in (1, (1, 1))
            or a.get("count_include_pad") is False
            or a.get("divisor_override")
        ):
            raise conv.fail(node, "pools with ceil_mode, dilation or a divisor", "use the defaults")
        k = a["kernel_size"]
        s = a.get("stride") or k
        args = {
            "kernel": _one(k, ""),
            "stride": _one(s, ""),
            "padding": _one(a.get("padding", 0), ""),
        }
        return conv.made(node, "maxpool" if "max" in t.__name__ else "avgpool", args, [x])
    return None


# ---------------------------------------------------------------------------
# The faithfulness check and the weights


def _state_tensor(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """A state tensor by its name in a name map: ``name[i/n]`` is the i-th of its n row blocks
    (q, k or v of a fused projection)."""
    m = re.fullmatch(r"(.+)\[(\d+)/(\d+)\]", key)
    if m is None:
        return state[key]
    return state[m.group(1)].chunk(int(m.group(3)), dim=0)[int(m.group(2))]


def mapped_arrays(module: nn.Module, name_map: dict[str, str], plan: Plan) -> dict[str, Any]:
    """The module's state under plan names, shaped as the plan's (a leading member axis of 1)."""
    from mixc.backends.torch.model import build, named_plan_tensors

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in named_plan_tensors(build(plan)).items()}
    state = module.state_dict()
    return {
        p: _state_tensor(state, t).detach().reshape(shapes[p]).contiguous()
        for t, p in name_map.items()
    }


def check_import(
    module: nn.Module, plan: Plan, name_map: dict[str, str], input_shape: list[int], seed: int = 0
) -> ImportCheck:
    """Build ``plan`` (one plain member) in float64, copy ``module``'s weights in through
    ``name_map``, and compare logits on a random batch (eval mode)."""
    from mixc.backends.torch.model import build, named_plan_tensors

    original = copy.deepcopy(module).double().eval()
    compiled = build(plan, dtype=torch.float64).eval()
    tensors = named_plan_tensors(compiled)
    missing = sorted(set(tensors) - set(name_map.values()))
    if missing:
        raise ModuleImportError(
            "the imported spec has tensors no weight of the module maps to:"
            f" {', '.join(missing[:5])}; hint: this is a bug in mixc import, please report it"
            " with the model"
        )
    state = original.state_dict()
    with torch.no_grad():
        for t, p in name_map.items():
            tensors[p].copy_(_state_tensor(state, t).reshape(tensors[p].shape))
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(8, *input_shape, generator=g, dtype=torch.float64)
        want = original(x)
        got = compiled(x)[:, 0]
    diff = float((want - got).abs().max()) if want.shape == got.shape else float("inf")
    return ImportCheck(
        original_params=sum(p.numel() for p in module.parameters()),
        compiled_params=sum(p.numel() for p in compiled.parameters() if p.requires_grad),
        max_abs_diff=diff,
    )
