"""`mixc train --init-from FILE`: start an ensemble from one network's weights (docs/importing.md).

``FILE`` holds one plain member's tensors (``mixc import --weights``: ``member.<layer>.weight``
with a member axis of 1, ``bn.<layer>.*``, ``ln.<layer>.*``). Into the new run's state, in numpy:

- per-member tensors (BatchNorm, LayerNorm, embeddings, a naive member's weights): copied into
  every member, exactly;
- a mixture's plain layers (shared by all members): copied, exactly;
- a mixture's banked layers: templates and alphas fitted by alternating least squares so that each
  member's composed weight ``sum_j alpha[j] T[t_j]`` comes as close to the pretrained weight as
  the bank allows (exact when the group holds at least as many templates as layers; the relative
  error of each group is reported);
- blob layers (``groups single``) and other methods' tensors: left as initialised, named in the
  report.

Layers matching an ``--init-exclude`` glob keep their fresh initialisation. Members that start
from one network are one network: with the same batches they get the same gradients and stay
identical. ``--init-noise F`` multiplies every member's own tensors (alphas, a naive member's
weights) by ``1 + F * N(0, 1)``, drawn per member from the run's seed, so that they can part.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import numpy as np

from mixc.compiler.tensor_names import bank_name
from mixc.core.errors import TrainError

__all__ = ["read_pretrained", "initialise"]


def read_pretrained(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of ``path`` (a safetensors file), or one paragraph saying why not."""
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # missing file, not safetensors, damaged header
        raise TrainError(
            f"--init-from {path}: cannot read it as safetensors ({type(e).__name__}: {e}); hint:"
            " write one with `mixc import ... --weights FILE`"
        ) from None
    for name, value in tensors.items():
        if value.dtype.kind != "f" or not np.isfinite(value).all():
            raise TrainError(
                f"--init-from {path}: tensor {name!r} is not finite floating point (dtype"
                f" {value.dtype}); hint: write the file again with `mixc import ... --weights FILE`"
            )
    return tensors


def _pretrained_layer(pre: dict[str, np.ndarray], layer: str) -> np.ndarray | None:
    """The layer's weight (then bias) flattened, as a bank row holds it, or None."""
    w = pre.get(f"member.{layer}.weight")
    if w is None:
        w = pre.get(f"plain.{layer}.weight")
        return None if w is None else _flat(w, pre.get(f"plain.{layer}.bias"))
    return _flat(w[0], None if (b := pre.get(f"member.{layer}.bias")) is None else b[0])


def _flat(w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    return np.concatenate([w.ravel(), b.ravel()]) if b is not None else w.ravel()


def initialise(
    state: dict[str, np.ndarray],
    plan: Any,
    pre: dict[str, np.ndarray],
    exclude: list[str],
    noise: float = 0.0,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """``state`` (the new run's plan tensors) with the pretrained weights put in; the report's
    lines (what was exact, what approximate, what left alone)."""
    if not (np.isfinite(noise) and noise >= 0):
        raise TrainError(
            f"--init-noise is a finite factor of at least 0, got {noise}; hint: 0.05 parts the"
            " members gently"
        )
    out = dict(state)
    skip = lambda layer: any(fnmatch.fnmatchcase(layer, g) for g in exclude)  # noqa: E731
    copied, left, banked = 0, [], {}
    for name, value in pre.items():
        kind, _, rest = name.partition(".")
        layer = rest.rpartition(".")[0]
        if skip(layer):
            continue
        if name in out and kind != "plain":
            _check_one_member(name, value, out[name].shape)
            out[name] = np.broadcast_to(value, out[name].shape).astype(out[name].dtype)
            copied += 1
            continue
        plain = f"plain.{rest}"
        if kind == "member" and plain in out and out[plain].shape == value.shape[1:]:
            out[plain] = value[0].astype(out[plain].dtype)
            copied += 1
            continue
        slot = plan.slot(layer) if kind == "member" else None
        if slot is not None and slot.templates is not None:
            banked.setdefault(slot.group, []).append(layer)
        elif kind == "member" and name.endswith(".weight"):
            left.append(layer)
    lines = [f"{copied} tensors copied exactly (every member)"]
    for group, layers in banked.items():
        err = _fit_group(out, plan, group, sorted(set(layers)), pre)
        lines.append(
            f"group {group} ({len(set(layers))} layers): templates and alphas fitted by least"
            f" squares, relative error {err:.3g} (0 is exact)"
        )
    if left:
        lines.append(f"left as initialised (no exact or fitted form): {', '.join(left)}")
    if noise:
        _jitter(out, noise, seed)
        lines.append(f"members' own weights and alphas multiplied by 1 + {noise} * N(0, 1)")
    if not copied and not banked:
        raise TrainError(
            "--init-from: no tensor of the file matches the plan's layers; hint: the file must"
            " come from `mixc import --weights` of this spec's model"
        )
    return out, lines


def _check_one_member(name: str, value: np.ndarray, shape: tuple[int, ...]) -> None:
    """A per-member tensor of the file must be one member's, [1, *shape[1:]]."""
    if value.shape != (1, *shape[1:]):
        raise TrainError(
            f"--init-from: tensor {name!r} has shape {list(value.shape)}, but one member of this"
            f" plan holds {[1, *shape[1:]]}; hint: the file must come from `mixc import --weights`"
            " of this spec's model"
        )


def _fit_group(
    out: dict[str, np.ndarray], plan: Any, group: str, layers: list[str], pre: dict
) -> float:
    """Alternating least squares over one bank: templates given the alphas (one system for every
    coordinate), then each member's alphas given the templates."""
    bank = out[bank_name(group)].astype(np.float64)
    targets = {layer: _pretrained_layer(pre, layer) for layer in layers}
    for layer, target in targets.items():
        if target is None or target.size != bank.shape[1]:
            size = None if target is None else target.size
            raise TrainError(
                f"--init-from: layer {layer!r} has {size} weights and biases in the file, but its"
                f" bank's templates hold {bank.shape[1]}; hint: the file must come from `mixc"
                " import --weights` of this spec's model"
            )
    slots = {layer: plan.slot(layer) for layer in layers}
    alphas = {layer: out[f"alpha.{layer}"].astype(np.float64) for layer in layers}
    rows = [(layer, m) for layer in layers for m in range(alphas[layer].shape[0])]
    for _ in range(20):
        a = np.zeros((len(rows), bank.shape[0]))
        for r, (layer, m) in enumerate(rows):
            for j, t in enumerate(slots[layer].templates[m]):
                a[r, t] += alphas[layer][m, j]
        b = np.stack([targets[layer] for layer, _ in rows])
        bank = np.linalg.lstsq(a, b, rcond=None)[0]
        for layer, m in rows:
            basis = bank[slots[layer].templates[m]].T
            alphas[layer][m] = np.linalg.lstsq(basis, targets[layer], rcond=None)[0]
    out[bank_name(group)] = bank.astype(out[bank_name(group)].dtype)
    num = den = 0.0
    for layer, m in rows:
        out[f"alpha.{layer}"] = alphas[layer].astype(out[f"alpha.{layer}"].dtype)
        got = alphas[layer][m] @ bank[slots[layer].templates[m]]
        num += float(((got - targets[layer]) ** 2).sum())
        den += float((targets[layer] ** 2).sum())
    return (num / den) ** 0.5 if den else 0.0


def _jitter(out: dict[str, np.ndarray], noise: float, seed: int) -> None:
    """Multiplicative noise on the members' own weights and alphas (their leading axis)."""
    rng = np.random.default_rng([seed, 7])
    for name, value in out.items():
        if name.startswith("alpha.") or name.startswith("member.") and name.endswith(".weight"):
            out[name] = (value * (1 + noise * rng.standard_normal(value.shape))).astype(value.dtype)
