"""Build a runnable flax.nnx model from a Plan, write it to disk, and name its tensors.

``build`` runs the source ``emit_source`` generates through ``generated.load``
(``backends/generated.py``, as the torch backend does), so what runs is what
``write`` puts on disk. The functional helpers (``split``/``apply``) are what
jit-compiled training uses: pure dicts of arrays in, pure dicts out.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixc.backends import generated
from mixc.backends.flax.codegen import class_name, emit_source
from mixc.compiler.plan import Plan

LAYOUTS = ("auto", "grouped", "loop")

_SOURCES: dict[
    str, types.ModuleType
] = {}  # content hash -> exec'd module (the source depends only on the plan)


def model_class(plan: Plan) -> type:
    """The generated nnx.Module class for ``plan`` (generated and exec'd once per plan)."""
    key = plan.content_hash()  # not spec_hash: a copied plan (dropout off, say) keeps its parent's
    mod = _SOURCES.get(key)
    if mod is None:
        mod = _SOURCES[key] = generated.load(plan, "flax")
    return getattr(mod, class_name(plan))


def build(
    plan: Plan,
    layout: str = "auto",
    seed: int = 0,
    dtype: Any = None,
    rngs: nnx.Rngs | None = None,
    platform: str = "auto",
) -> nnx.Module:
    """Generate the plan's module and instantiate it, initialised from ``seed`` (or ``rngs``).

    ``layout``: "grouped", "loop", or "auto" (loop on CPU, where XLA's grouped
    convolutions are slow; grouped on accelerators). ``platform``: where it will
    run ("cpu", "gpu"; "auto": jax's default backend at call time), which picks
    the auto layout and, on CPU, a faster convolution gradient. ``dtype``
    defaults to float32 (float64 needs ``jax_enable_x64``). The initialisation
    runs as one jit-compiled function (cached per plan), much faster than op by op.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    from mixc.backends.base import check_fits_in_memory

    check_fits_in_memory(plan)
    graphdef, init = _initializer(plan, layout, jnp.dtype(dtype or jnp.float32), platform)
    key = rngs.params() if rngs is not None else jax.random.key(seed)
    return nnx.merge(graphdef, init(key))


def _initializer(plan: Plan, layout: str, dtype: Any, platform: str) -> tuple[nnx.GraphDef, Any]:
    """(graphdef, jitted key -> initial state) for the plan's module, cached."""
    cache_key = (plan.content_hash(), layout, str(dtype), platform)
    hit = _INITS.get(cache_key)
    if hit is None:
        cls = model_class(plan)
        opts = dict(layout=layout, dtype=dtype, platform=platform)
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: cls(**opts)))
        init = jax.jit(lambda key: nnx.state(cls(rngs=nnx.Rngs(params=key), **opts)))
        hit = _INITS[cache_key] = (graphdef, init)
    return hit


_INITS: dict[tuple, tuple] = {}


def write(plan: Plan, out_dir: str | Path, standalone: bool = False) -> Path:
    """Write ``plan.json`` and ``<name>.py`` (the flax module) into ``out_dir``; return the source's
    path."""
    return generated.write(plan, out_dir, emit_source(plan, standalone=standalone))


def _mapping(model: nnx.Module) -> dict[str, str]:
    mapping = getattr(model, "plan_tensors", None)
    if mapping is None:
        raise TypeError(
            f"{type(model).__name__} is not a mixc-generated model (it has no plan_tensors)"
        )
    return mapping


def named_plan_tensors(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Every plan tensor name (``bank.g0``, ``bn.s1.b0.bn0.running_mean``...) -> the model's
    Variable.

    Read a value with ``v[...]``, write one with ``v[...] = array``.
    """
    return {name: _resolve(model, path) for name, path in _mapping(model).items()}


def _resolve(model: nnx.Module, path: str) -> nnx.Variable:
    """The Variable at a dotted module path (``s1.0.conv1.alpha``, ``banks.conv_32x32x3x3``)."""
    node: Any = model
    for part in path.split("."):
        node = (
            node[int(part)]
            if part.isdigit()
            else (node[part] if isinstance(node, nnx.Dict) else getattr(node, part))
        )
    return node


def plan_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every plan tensor as a host numpy array, in plan order."""
    return {name: np.asarray(v[...]) for name, v in named_plan_tensors(model).items()}


def assign_plan_arrays(model: nnx.Module, arrays: dict[str, Any]) -> None:
    """Copy ``arrays`` (plan name -> array of the plan's shape) into the model, keeping its
    dtypes."""
    targets = named_plan_tensors(model)
    unknown = sorted(set(arrays) - set(targets))
    if unknown:
        raise KeyError(f"not tensors of this model: {', '.join(unknown[:5])}")
    for name, value in arrays.items():
        v = targets[name]
        if tuple(np.shape(value)) != tuple(v[...].shape):
            raise ValueError(
                f"tensor {name!r} has shape {list(np.shape(value))}, the model has"
                f" {list(v[...].shape)}"
            )
        v[...] = jnp.asarray(value, dtype=v[...].dtype)


def ensemble_probs(logits: jax.Array) -> jax.Array:
    """THE ensemble prediction: the mean over members of their softmax.

    ``logits`` [B, M, classes] -> probabilities [B, classes] (float32 at least).
    """
    if logits.ndim != 3:
        raise ValueError(f"expected member logits [B, M, classes], got shape {list(logits.shape)}")
    if logits.dtype in (jnp.float16, jnp.bfloat16):
        logits = logits.astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1).mean(axis=1)


def count_params(plan: Plan) -> int:
    """Trainable parameters of the model ``build(plan)`` makes, from shapes only (no memory, no
    init)."""
    cls = model_class(plan)
    abstract = nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(0)))
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


# ---------------------------------------------------------------------------
# Functional form, for jit


def split(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, jax.Array], dict[str, jax.Array]]:
    """(graphdef, params, stats): the model's trainable parameters and BatchNorm statistics as pure
    dicts keyed by dotted module path (``s1.0.conv1.alpha``)."""
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return graphdef, _flat(nnx.to_pure_dict(params)), _flat(nnx.to_pure_dict(stats))


def _flat(tree: dict, prefix: str = "") -> dict[str, jax.Array]:
    """A nested pure dict as one dict keyed by dotted module paths (the plan_tensors values)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out |= _flat(v, key + ".") if isinstance(v, dict) else {key: v}
    return out


def _nested(flat: dict) -> dict:
    """The inverse of ``_flat`` (digit parts are list indices)."""
    out: dict = {}
    for key, v in flat.items():
        parts = [int(p) if p.isdigit() else p for p in key.split(".")]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def merge(graphdef: nnx.GraphDef, params: dict, stats: dict) -> nnx.Module:
    """The inverse of ``split``."""
    return nnx.merge(graphdef, nnx.State(_nested(params)), nnx.State(_nested(stats)))


def apply(
    graphdef: nnx.GraphDef,
    params: dict,
    stats: dict,
    x: jax.Array,
    train: bool = False,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """Pure call: (member logits, new stats). Safe under ``jax.jit``/``jax.grad``."""
    model = merge(graphdef, params, stats)
    logits = model(x, train=train, dropout_key=dropout_key)
    return logits, (_flat(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))) if train else stats)


def attr_to_plan(model: nnx.Module) -> dict[str, str]:
    """Module path (the keys of ``split``'s dicts) -> plan tensor name."""
    return {attr: name for name, attr in _mapping(model).items()}


def compute_graphdef(
    plan: Plan, layout: str = "auto", dtype: Any = None, platform: str = "auto"
) -> nnx.GraphDef:
    """The module's structure for arithmetic in ``dtype`` (bf16/fp16 under a mixed-precision
    policy), to merge with parameters cast to that dtype: the module's own constants
    (composition's one-hot rows) take its dtype, so a graphdef built for float32 would mix dtypes
    that XLA's convolutions refuse."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    return _initializer(plan, layout, jnp.dtype(dtype or jnp.float32), platform)[0]
