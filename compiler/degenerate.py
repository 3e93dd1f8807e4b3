"""Degenerate ensembles: members whose composed weights are scalar multiples of one another.

A layer whose members each mix ``k = 1`` template, the same one for every
member (or a plain layer, shared outright), gives weights ``alpha_i * T``: the
members differ by a scale that the following BatchNorm removes. A group is
degenerate when every one of its layers is; an ensemble is when every weight
layer is (and there are several members), so all members compute the same
function. Pure functions over the Plan's slots, used by the compiler (errors,
warnings), `mixc inspect` and the invariants.
"""

from __future__ import annotations

from mixc.compiler.plan import Slot


def collinear(slot: Slot) -> bool:
    """Every member's weight in this layer is a scalar multiple of every other member's."""
    if slot.k != 1:
        return False
    reads = slot.templates if slot.templates is not None else [[o] for o in slot.offsets or []]
    return all(r == reads[0] for r in reads)


def distinct_template_sets(slots: list[Slot]) -> int:
    """How many different template selections (over the given layers) the members use."""
    if not slots:
        return 0
    members = len(slots[0].templates if slots[0].templates is not None else slots[0].offsets or [])
    per_member = set()
    for m in range(members):
        per_member.add(
            tuple(
                tuple(s.templates[m]) if s.templates is not None else (s.offsets[m],) for s in slots
            )
        )
    return len(per_member)


def degenerate_groups(slots: list[Slot]) -> list[str]:
    """Names of the groups (or "blob") every one of whose layers is collinear, in first-seen
    order."""
    by_group: dict[str, list[Slot]] = {}
    for s in slots:
        by_group.setdefault(s.group, []).append(s)
    return [g for g, ss in by_group.items() if all(collinear(s) for s in ss)]


def all_collinear(members: int, slots: list[Slot], member_layers: int) -> bool:
    """The whole ensemble degenerates: several members, no per-member layer, every banked layer
    collinear (plain layers are shared, hence identical)."""
    return members > 1 and member_layers == 0 and all(collinear(s) for s in slots)
