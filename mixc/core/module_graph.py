"""A framework's model described without the framework, for `mixc import` (docs/importing.md).

A backend traces a model it knows (torch: an ``nn.Module``) into these plain dataclasses; the
application (``mixc/importing.py``) turns them into ``.mix`` text and a weight-name map. The type
sits in the core so that both floors can name it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mixc.core.errors import MixcError

__all__ = ["ModuleImportError", "GraphNode", "ModuleGraph", "ImportCheck"]


class ModuleImportError(MixcError):
    """A model that `mixc import` cannot express in the language (the node, its op, its line)."""


@dataclass
class GraphNode:
    """One value of a traced forward.

    ``kind``: ``input`` (the forward's argument), ``layer`` (a ``.mix`` layer: ``layer`` is its
    kind, ``args`` its arguments by name), ``add`` (two values summed), ``call`` (a sub-module whose
    own graph is ``graph``) or ``output``. ``path`` is the module's dotted path from the root (empty
    for a function), ``tensors`` maps a plan field (``weight``, ``running_mean``...) to the
    framework's state name, ``shape`` is one sample's output shape, ``where`` the source line.
    ``label`` is the layer's name in the text, chosen by the application. ``tokens``: the value is
    a token sequence, its ``shape`` written as the language holds it, ``[D, N]``. A ``tensors``
    field may name a sub-layer (``q.weight`` of an ``attention``), and a state name may end in
    ``[i/n]``: the i-th of n equal row blocks (a fused qkv projection split into q, k, v).
    """

    name: str
    kind: str
    inputs: list[str] = field(default_factory=list)
    shape: list[int] = field(default_factory=list)
    layer: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    tensors: dict[str, str] = field(default_factory=dict)
    where: str = ""
    graph: ModuleGraph | None = None
    label: str = ""  # the layer's name in the .mix text (set by the application)
    tokens: bool = False


@dataclass
class ModuleGraph:
    """A module's forward as nodes in execution order; ``cls`` its class name, ``path`` its dotted
    path from the root (``""`` for the root), ``containers`` the paths of its plain containers
    (``nn.Sequential``, ``nn.ModuleList``), which group sub-module calls into stages."""

    cls: str
    path: str
    nodes: list[GraphNode]
    containers: set[str] = field(default_factory=set)


@dataclass
class ImportCheck:
    """The faithfulness check: parameter counts of the original and of the compiled plain member,
    and the largest absolute logit difference with the original's weights copied in."""

    original_params: int
    compiled_params: int
    max_abs_diff: float
    dtype: str = "float64"
