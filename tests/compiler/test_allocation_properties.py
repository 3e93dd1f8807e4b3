"""Property tests: every invariant of docs/allocation.md over generated backbones and settings."""

import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import backbones, ensembles, specs, zoo_variants

import mixc
from mixc.compiler.assign import assign_bank, assign_blob
from mixc.compiler.invariants import check_plan
from mixc.spec import SpecError
from mixc.spec.loader import zoo_specs

# raise for a long run (a few hundred per spec)
SCALE = int(os.environ.get("MIXC_FUZZ_SCALE", "1"))
MIN_RE = re.compile(r"below the minimum ([\d,]+)")
DIFFER_RE = re.compile(r"smallest budget at which members can differ is ([\d,]+)")
SETTING_RE = re.compile(r"set templates_per_layer (\d+) and a budget of at least ([\d,]+)")


def _count(text: str) -> int:
    return int(text.replace(",", ""))


def stated_fix(err: SpecError) -> list[str] | None:
    """The overrides a rejection states as its remedy (None: a structural error that names a setting
    only)."""
    text = err.render()
    if m := MIN_RE.search(text):
        return [f"budget={_count(m.group(1))}"]
    if m := DIFFER_RE.search(text):
        return [f"budget={_count(m.group(1))}"]
    if m := SETTING_RE.search(text):
        return [f"templates_per_layer={m.group(1)}", f"budget={_count(m.group(2))}"]
    return None


def _minimum(err: SpecError) -> int | None:
    m = MIN_RE.search(err.render())
    return _count(m.group(1)) if m else None


def compile_or_fix(compile_, overrides: list[str]):
    """Compile; on a rejection, the stated remedy must compile to a sound plan (which is
    returned)."""
    try:
        return compile_(overrides)
    except SpecError as err:
        fix = stated_fix(err)
        if fix is None:
            assert "no layer is factorised" in err.render(), err.render()
            return None
        plan = compile_(overrides + fix)  # a remedy that does not compile raises here
        assert check_plan(plan) == [], (err.render(), check_plan(plan))
        return plan


@given(specs())
def test_generated_specs_keep_every_invariant(text):
    try:
        plan = mixc.compile_text(text)
    except SpecError as err:
        fix = stated_fix(err)
        if fix is None:
            assert "no layer is factorised" in err.render(), err.render()
            return
        # The stated remedy compiles; for a plain minimum, one parameter less does not.
        plan = mixc.compile_text(text, fix)
        minimum = _minimum(err)
        if minimum is not None:
            assert plan.accounting.total_params <= minimum
            with pytest.raises(SpecError):
                mixc.compile_text(text, [f"budget={minimum - 1}"])
    assert check_plan(plan) == []
    # The plan round-trips through JSON unchanged.
    assert type(plan).from_json(plan.to_json()) == plan


@settings(max_examples=12 * SCALE)
@given(st.sampled_from([p.stem for p in zoo_specs()]), zoo_variants())
def test_zoo_variants_read_every_template(name, overrides):
    """Random --set variants of every zoo spec give no unread template, and every
    rejection states a remedy that compiles."""
    plan = compile_or_fix(lambda extra: mixc.compile(name, extra), overrides)
    if plan is None:
        return
    assert check_plan(plan) == []
    for g in plan.groups:
        assert min(g.usage) >= 1 and g.templates <= g.capacity
    if plan.blob is not None:
        assert plan.blob.usage_min >= 1


@given(backbones(), ensembles(budget=False), st.integers(1, 40))
def test_fixed_template_counts_need_no_budget(backbone, ensemble, n):
    ensemble = ensemble.replace("groups single", "groups by_shape")
    text = backbone + ensemble.replace(
        "backbone gen", f'backbone gen\n    groups {{ group all("*", templates = {n}) }}'
    ).replace("groups by_shape\n", "")
    try:
        plan = mixc.compile_text(text)
    except SpecError as err:
        text = err.render()
        # a group fixed beyond what its slots read, or members that cannot differ, is refused
        assert (
            "mixes layers of different shapes" in text
            or "its slots read at most" in text
            or "members would be identical" in text
        ), text
        return
    assert plan.accounting.budget is None
    assert [g.templates for g in plan.groups] == [n]
    assert check_plan(plan) == []


@given(
    st.integers(1, 12),
    st.integers(1, 30),
    st.integers(1, 8),
    st.integers(1, 6),
    st.sampled_from(["shared", "greedy_disjoint"]),
)
def test_round_robin_counter(n_layers, n, k_req, members, policy):
    k = min(k_req, n)
    table, usage = assign_bank(n_layers, n, k, members, policy)
    slots = n_layers * (1 if policy == "shared" else members)
    assert sum(usage) == slots * k
    assert max(usage) - min(usage) <= 1
    if slots * k >= n:
        assert min(usage) >= 1
    # the cyclic counter, layer-major then member order
    flat = [
        t
        for layer in table
        for m, idx in enumerate(layer)
        if policy != "shared" or m == 0
        for t in idx
    ]
    assert flat == [i % n for i in range(len(flat))]
    for layer in table:
        for idx in layer:
            assert len(set(idx)) == k
        if policy == "greedy_disjoint" and members * k <= n:
            sets = [set(i) for i in layer]
            assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1 :])


@given(
    st.lists(st.integers(1, 50), min_size=1, max_size=8),
    st.integers(1, 4),
    st.integers(1, 4),
    st.sampled_from(["shared", "greedy_disjoint"]),
    st.integers(0, 120),
)
def test_blob_sweep(sizes, tpl, members, policy, extra):
    blob = max(sizes) + extra
    ks = [min(tpl, blob // s) for s in sizes]
    offsets, lo, hi = assign_blob(sizes, ks, blob, members, policy)
    # brute force the usage of every blob entry
    use = [0] * blob
    cursor = 0
    for s, k, offs in zip(sizes, ks, offsets):
        for m in range(members):
            if policy == "shared" and m > 0:
                assert offs[m] == offs[0]
                continue
            assert offs[m] == cursor
            for j in range(k * s):
                use[(cursor + j) % blob] += 1
            cursor = (cursor + k * s) % blob
    assert (lo, hi) == (min(use), max(use))
    assert hi - lo <= 1
