"""What changed between two recipes: how a resume names each field it refuses (or records), old ->
new."""

from __future__ import annotations

from typing import Any

from mixc.spec.recipe import Recipe

__all__ = ["recipe_changes"]


_NOT_COMPARED = {"data_dir", "seed"}  # where the files live; the seed has its own check and message


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_changes(old: Recipe, new: Recipe) -> dict[str, tuple[Any, Any]]:
    """Every recipe field (dotted) whose value differs, old and new; not data_dir nor seed."""
    a, b = _flat(old.model_dump(mode="json")), _flat(new.model_dump(mode="json"))
    return {
        k: (a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if k not in _NOT_COMPARED and a.get(k) != b.get(k)
    }
