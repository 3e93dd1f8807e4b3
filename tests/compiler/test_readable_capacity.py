"""Every budgeted parameter is readable, ties go to the shares, degenerate ensembles are
refused."""

import json
import math
import shutil
import time

import pytest
from paths import GOLDEN
from test_allocation_properties import compile_or_fix

import mixc

# where mixture calls the allocator and the assigner
import mixc.compiler.methods.mixture as mixture_module
from mixc.cli import main
from mixc.compiler.allocate import Allocation, allocate_banks, readable_blob
from mixc.compiler.group import GroupDraft
from mixc.compiler.invariants import check_plan
from mixc.compiler.plan import Plan
from mixc.spec import SpecError
from mixc.spec.loader import zoo_dir
from mixc.verify import Space, verify

CNN = GOLDEN / "errors" / "degenerate_members.mix"

# Reproducers: each held templates (or blob entries) no slot reads.
REPRODUCERS = [
    ("wrn28_10", ["templates_per_layer=1"]),
    ("wrn28_5", ["templates_per_layer=2"]),
    ("wrn28_10_120m", ["templates_per_layer=3"]),
    ("resnet50_51m", ["members=7", "templates_per_layer=1", "assign=shared", "budget=52706943"]),
    (
        "wrn28_5",
        [
            "members=7",
            "templates_per_layer=1",
            "assign=shared",
            "bank_singletons=true",
            "groups=single",
            "budget=38487435",
        ],
    ),
    ("wrn28_10", ["members=8", "templates_per_layer=8", "bank_singletons=true", "budget=62690179"]),
]


def _unread(plan) -> int:
    n = sum(1 for g in plan.groups for u in g.usage if u == 0)
    return n + (1 if plan.blob is not None and plan.blob.usage_min == 0 else 0)


@pytest.mark.parametrize("name,overrides", REPRODUCERS)
def test_reproducers_read_every_template(name, overrides):
    # As written (a degenerate one is refused and its remedy must compile soundly) ...
    plan = compile_or_fix(lambda extra: mixc.compile(name, extra), overrides)
    assert plan is not None and _unread(plan) == 0 and check_plan(plan) == []
    # ... and with one member (never degenerate), where the old allocator left templates unread.
    one = mixc.compile(name, overrides + ["members=1"])
    assert _unread(one) == 0 and check_plan(one) == []
    for g in one.groups:  # shared: the slots are the layers, each reads k templates
        assert g.templates <= len(g.layers) * g.requested_templates_per_layer


def test_the_stem_bank_is_not_overfilled():
    plan = mixc.compile(
        "wrn28_10",
        ["members=8", "templates_per_layer=8", "bank_singletons=true", "budget=62690179"],
    )
    stem = next(g for g in plan.groups if g.layers == ["stem"])
    # one layer, one slot (shared), 8 templates per layer: 8 readable, not 9
    assert stem.templates == 8


def _max_useful_wrn28_10() -> int:
    """Derived by hand: plain layers + 4 members' BN + every group at 7 layers x 5 templates, all
    alphas."""
    plan = mixc.compile("wrn28_10")
    banked = 7 * 9 * (160 * 160 + 320 * 320 + 640 * 640)
    bn = sum(2 * o.channels for o in plan.ops if o.kind == "bn")
    plain = plan.accounting.backbone_params - bn - banked
    return plain + 4 * bn + 35 * banked // 7 + 4 * 21 * 5


@pytest.mark.parametrize("budget", ["1e12", "1e15"])
def test_absurd_budgets_are_cheap_capped_and_warned(budget):
    start = time.perf_counter()
    plan = mixc.compile("wrn28_10", [f"budget={budget}"])
    assert time.perf_counter() - start < 1.0
    assert plan.accounting.maximum_budget == _max_useful_wrn28_10()
    assert plan.accounting.total_params == plan.accounting.maximum_budget
    assert [g.templates for g in plan.groups] == [35, 35, 35]
    assert len(plan.warnings) == 1 and "largest useful budget" in plan.warnings[0].message
    assert check_plan(plan) == []


def test_capped_budget_warning_is_printed_like_an_error(capsys):
    assert main(["check", "wrn28_10", "--set", "budget=1e15"]) == 0
    err = capsys.readouterr().err
    assert err.startswith(
        "--set #1:1:1: warning: the budget 1,000,000,000,000,000 exceeds the largest useful"
    )
    assert "  hint: " in err and "budget=1e15" in err


def test_budget_a_group_cannot_use_goes_to_the_others():
    # wrn28_5's one-layer groups are at capacity (5 = 1 layer x 5); the rest of the budget is
    # spent on the 7-layer groups, and no template anywhere is unread.
    plan = mixc.compile("wrn28_5")
    assert check_plan(plan) == []
    for g in plan.groups:
        assert g.templates <= g.capacity
    singles = [g for g in plan.groups if len(g.layers) == 1]
    assert singles and all(g.templates <= 5 for g in singles)


def test_inspect_states_the_largest_useful_budget(capsys):
    assert main(["inspect", "wrn28_10", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["maximum_budget"] == _max_useful_wrn28_10()
    assert "raise templates_per_layer" in data["maximum_budget_reason"]
    assert [g["capacity"] for g in data["groups"]] == [35, 35, 35]
    # shared: one selection
    assert [g["distinct_template_sets"] for g in data["groups"]] == [1, 1, 1]
    assert all(g["members_differ"] for g in data["groups"])
    # greedy_disjoint: members read different templates
    assert main(["inspect", "resnet50", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    sets = {
        g["templates"] > g["templates_per_layer"]: g["distinct_template_sets"] > 1
        for g in data["groups"]
    }
    assert sets == {True: True, False: False}  # members differ in selection exactly where n > k


# --- shares on ties
# -----------------------------------------------------------------------------------


def test_flagship_keeps_the_shares():
    plan = mixc.compile("wrn28_10")
    mass = sum(g.templates * g.size for g in plan.groups)
    for g in plan.groups:
        assert abs(g.templates * g.size / mass - g.share) < 0.05, (g.name, g.templates)
    # 160/320/640 templates cost 1:4:16, so 10/10/6 and 6/7/7 spend exactly the same: the
    # share-respecting split must not spend less than the old one did.
    assert mass == 10 * 230_400 + 10 * 921_600 + 6 * 3_686_400
    assert [g.templates for g in plan.groups] == [6, 7, 7]


def test_ties_prefer_shares_in_the_allocator():
    # Sizes 1:4:16, 8 layers each (shares 1/21, 4/21, 16/21), k = 2 (alphas 8 x 2 x 3 = 48 once
    # every n >= 2). 7/7/7 costs 14,700 + 48, one more than the budget. The greedy fill (floor
    # 6/6/6, round up the small groups, then fill) ends at 10/10/6 = 14,600; 6/7/7 costs the same
    # 14,600 and keeps the shares.
    groups = [GroupDraft(f"g{s}", list("abcdefgh"), [s], False, s) for s in (100, 400, 1600)]
    a = allocate_banks(groups, fixed_cost=0, members=1, tpl=2, budget=14_700 + 48 - 1)
    assert a.templates == [6, 7, 7]


def test_a_tie_broken_the_wrong_way_is_caught(monkeypatch):
    def skewed(groups, fixed_cost, members, tpl, budget, policy="shared"):
        a = allocate_banks(groups, fixed_cost, members, tpl, budget, policy=policy)
        n = [10, 10, 6] if a.templates == [6, 7, 7] else a.templates  # the old allocator's answer
        return Allocation(
            n, a.shares, [min(tpl, x) for x in n], a.minimum_budget, a.maximum_budget, a.capacity
        )

    monkeypatch.setattr(mixture_module, "allocate_banks", skewed)
    plan = mixc.compile("wrn28_10")
    assert [g.templates for g in plan.groups] == [10, 10, 6]
    assert [v.invariant for v in check_plan(plan)] == ["shares"]


def test_an_unreadable_template_is_caught_by_verify(monkeypatch):
    def overfilled(groups, fixed_cost, members, tpl, budget, policy="shared"):
        a = allocate_banks(groups, fixed_cost, members, tpl, budget, policy=policy)
        # one past capacity
        n = [c if c < cap else cap + 1 for c, cap in zip(a.templates, a.capacity)]
        return Allocation(
            n, a.shares, [min(tpl, x) for x in n], a.minimum_budget, a.maximum_budget, a.capacity
        )

    monkeypatch.setattr(mixture_module, "allocate_banks", overfilled)
    plan = mixc.compile("wrn28_10", ["budget=1e12"])
    names = {v.invariant for v in check_plan(plan)}
    assert {"full_coverage", "readable_capacity"} <= names
    report = verify(
        "digits",
        Space(groups=("by_shape",), budgets=((1.0, True), (100.0, True))),
        examples=40,
        seed_value=0,
    )
    assert report.failure is not None
    assert report.failure["invariant"] in ("full_coverage", "readable_capacity")


def test_readable_blob_skips_unreadable_sizes():
    # Layers of 100 and 10 entries, two windows each: a blob of 150 would leave entries unread
    # (the 100-layer reads one window of 100, the 10-layer two of 10: 120 entries), 120 is readable.
    assert readable_blob(150, [100, 10], members=1, tpl=2, policy="shared") == 120
    assert readable_blob(220, [100, 10], members=1, tpl=2, policy="shared") == 220
    assert readable_blob(150, [100, 10], members=2, tpl=2, policy="greedy_disjoint") == 150


# --- degenerate ensembles
# -----------------------------------------------------------------------------


def test_degenerate_cnn_is_refused_with_the_budget_that_fixes_it():
    with pytest.raises(SpecError) as err:
        mixc.compile(CNN)
    text = err.value.render()
    assert "members would be identical" in text and "hint: raise the budget to at least" in text
    at = int(
        text.split("smallest budget at which members can differ is ")[1]
        .split()[0]
        .rstrip(";")
        .replace(",", "")
    )
    plan = mixc.compile(CNN, [f"budget={at}"])
    assert check_plan(plan) == [] and max(s.k for s in plan.slots) >= 2
    with pytest.raises(SpecError, match="members would be identical"):
        mixc.compile(CNN, [f"budget={at - 1}"])
    plan = mixc.compile(CNN, ["budget=2.0x"])
    assert check_plan(plan) == [] and not plan.warnings


def test_one_template_per_layer_names_the_setting():
    with pytest.raises(SpecError) as err:
        mixc.compile(CNN, ["budget=2.0x", "templates_per_layer=1"])
    text = err.value.render()
    assert "no budget" in text and "set templates_per_layer 2 and a budget of at least" in text
    plan = mixc.compile(CNN, ["budget=2.0x", "templates_per_layer=1", "assign=greedy_disjoint"])
    assert check_plan(plan) == []  # members read different templates


def test_partly_degenerate_plan_warns_naming_the_groups():
    plan = mixc.compile(
        "wrn28_10",
        ["members=8", "templates_per_layer=8", "bank_singletons=true", "budget=62690179"],
    )
    single = [g.name for g in plan.groups if g.templates == 1]
    assert single, "this allocation has a one-template group"
    assert len(plan.warnings) == 1
    assert all(name in plan.warnings[0].message for name in single)
    assert check_plan(plan) == []


def test_one_member_is_never_degenerate():
    plan = mixc.compile(CNN, ["members=1"])
    assert not plan.warnings and check_plan(plan) == []
    assert math.isclose(plan.accounting.budget, plan.accounting.backbone_params, rel_tol=1e-6)


def test_check_plan_catches_collinear_members():
    plan = mixc.compile(CNN, ["budget=2.0x", "templates_per_layer=1", "assign=greedy_disjoint"])
    assert check_plan(plan) == []
    # all read template 0
    same = [s.model_copy(update={"templates": [[0]] * plan.members}) for s in plan.slots]
    broken = plan.model_copy(update={"slots": same})
    assert "members_differ" in {v.invariant for v in check_plan(broken)}


def test_a_warning_on_a_crlf_line_with_tabs_is_valid_plan_text(tmp_path):
    """Warnings keep their source line in the plan: tabs and CRLF endings must not break its
    validation."""
    (tmp_path / "blocks").mkdir()
    shutil.copy(zoo_dir() / "blocks" / "wide.mix", tmp_path / "blocks" / "wide.mix")
    spec = tmp_path / "crlf.mix"
    spec.write_bytes(
        b'import "blocks/wide.mix"\r\nensemble {\r\n\tbackbone wrn(depth = 16, k = 4, classes ='
        b" 10)\r\n\tmembers 4\r\n\tbudget 1G\r\n\ttemplates_per_layer 4\r\n}\r\n"
    )
    plan = mixc.compile(spec)
    (w,) = plan.warnings
    assert w.line == 5 and w.col == 2 and w.source_line == " budget 1G"
    assert Plan.from_json(plan.to_json()).warnings == plan.warnings
