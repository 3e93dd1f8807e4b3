"""Assign: fill every (layer, member) slot with templates from a cyclic counter.

Slots are visited layer by layer in graph order and, under ``greedy_disjoint``,
member by member within a layer; each slot takes the next ``k`` templates of
its group's counter. Under ``shared`` all members of a layer take one slot.
So usage is balanced (max - min <= 1), every template is used once demand
covers the bank, and a layer's members are disjoint while ``M * k <= n``.
The single blob is swept the same way, ``k * size`` entries per slot.
"""

from __future__ import annotations


def assign_bank(
    n_layers: int, n: int, k: int, members: int, policy: str
) -> tuple[list[list[list[int]]], list[int]]:
    """Per layer, per member, the template indices; and how many slots use each template."""
    counter = 0
    usage = [0] * n
    out: list[list[list[int]]] = []
    for _ in range(n_layers):
        per_member: list[list[int]] = []
        for m in range(members):
            if policy == "shared" and m > 0:
                idx = per_member[0]  # the same slot: usage counts it once
            else:
                idx = [(counter + j) % n for j in range(k)]
                counter = (counter + k) % n
                for t in idx:
                    usage[t] += 1
            per_member.append(list(idx))
        out.append(per_member)
    return out, usage


def assign_blob(
    sizes: list[int], ks: list[int], blob: int, members: int, policy: str
) -> tuple[list[list[int]], int, int]:
    """Per layer, per member, the start offset in the blob; and (min, max) usage of blob entries.

    Usage is swept over the breakpoints of the slots' intervals, so it costs
    O(slots log slots), not O(blob size).
    """
    cursor = 0
    offsets: list[list[int]] = []
    delta: dict[int, int] = {0: 0}
    full_sweeps = 0

    def cover(a: int, b: int) -> None:  # entries [a, b)
        delta[a] = delta.get(a, 0) + 1
        delta[b] = delta.get(b, 0) - 1

    for s, k in zip(sizes, ks):
        per_member: list[int] = []
        for m in range(members):
            if policy == "shared" and m > 0:
                per_member.append(per_member[0])  # the same slot: usage counts it once
                continue
            start = cursor
            cursor = (cursor + k * s) % blob
            full_sweeps += (k * s) // blob
            end = start + (k * s) % blob
            if end <= blob:
                cover(start, end)
            else:
                cover(start, blob)
                cover(0, end - blob)
            per_member.append(start)
        offsets.append(per_member)
    lo = hi = None
    run = 0
    points = sorted(delta)
    for a, b in zip(points, points[1:] + [blob]):
        run += delta[a]
        if a < b <= blob:
            lo = run if lo is None else min(lo, run)
            hi = run if hi is None else max(hi, run)
    return offsets, (lo or 0) + full_sweeps, (hi or 0) + full_sweeps
