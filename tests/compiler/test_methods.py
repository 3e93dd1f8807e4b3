"""Ensemble methods beside MixtureEnsembles: the `method` line, each method's
Plan, its counts and FLOPs, inspect, verify, and the backends' refusal of methods they do not
build.

Counts are recomputed here from the plain backbone's layer list (the `members=1 groups=none` plan,
whose counts tests/compiler/test_zoo.py pins to the literature) with each method's formula written
out independently of compiler/methods/.
"""

from __future__ import annotations

import hashlib
import json
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import mixc
from mixc.backends.base import Backend, Capabilities
from mixc.cli import main
from mixc.compiler.invariants import check_plan
from mixc.compiler.plan import Plan, read_plan
from mixc.core.errors import BackendError
from mixc.core.flops import backbone_macs, ensemble_macs
from mixc.spec import SpecError
from mixc.spec.loader import zoo_specs

C10 = ["backbone.classes=10"]


# ---------------------------------------------------------------------------
# Independent formulas


def layer_list(spec: str, overrides=()) -> tuple[list[tuple], list[int]]:
    """(weight layers as (in, out, kernel elements, groups, bias), BatchNorm widths) of the plain
    backbone."""
    plan = mixc.compile(spec, [*overrides, "members=1", "groups=none"])
    layers, bns = [], []
    for o in plan.ops:
        if o.kind == "conv":
            kk = 1
            for k in o.kernel:
                kk *= k
            layers.append((o.in_channels, o.out_channels, kk, o.groups, o.bias))
        elif o.kind == "linear":
            layers.append((o.in_features, o.out_features, 1, 1, o.bias))
        elif o.kind == "bn":
            bns.append(o.channels)
    return layers, bns


def params(cin: int, cout: int, kk: int, g: int, bias: bool) -> int:
    return cout * (cin // g) * kk + (cout if bias else 0)


def batch_ensemble_count(layers, bns, M: int) -> int:
    shared = sum(params(cin, cout, kk, g, False) for cin, cout, kk, g, _ in layers)
    per_member = sum(cin + cout + (cout if b else 0) for cin, cout, _, _, b in layers) + 2 * sum(
        bns
    )
    return shared + M * per_member


def mimo_count(layers, bns, M: int) -> int:
    (fc_in, f_out, fkk, fg, fb), (l_in, l_out, lkk, lg, lb) = layers[0], layers[-1]
    middle = sum(params(*x) for x in layers[1:-1])
    return (
        params(M * fc_in, f_out, fkk, fg, fb)
        + middle
        + params(l_in, M * l_out, lkk, lg, lb)
        + 2 * sum(bns)
    )


def packed_valid(layers, M: int, alpha: Fraction, gamma: int) -> bool:
    """Every widened width whole and divisible by its layer's groups (the zoo's first/last = list
    ends)."""

    def ok(width: Fraction, d: int) -> bool:
        return width.denominator == 1 and width.numerator % d == 0

    for i, (cin, cout, _, g, _) in enumerate(layers):
        if i == 0:
            good = ok(alpha * cout, M * g)
        elif i == len(layers) - 1:
            good = ok(alpha * cin, M * g)
        else:
            good = ok(alpha * cin, gamma * M * g) and ok(alpha * cout, gamma * M * g)
        if not good:
            return False
    return True


def packed_count(layers, bns, M: int, alpha: Fraction, gamma: int) -> int:
    total = 0
    for i, (cin, cout, kk, g, b) in enumerate(layers):
        if i == 0:
            total += params(cin, int(alpha * cout), kk, g, b)
        elif i == len(layers) - 1:
            total += params(int(alpha * cin), M * cout, kk, M * g, b)
        else:
            total += params(int(alpha * cin), int(alpha * cout), kk, gamma * M * g, b)
    return total + 2 * sum(int(alpha * c) for c in bns)


# ---------------------------------------------------------------------------
# The reference numbers


def test_wrn28_10_batch_ensemble_count():
    plan = mixc.compile("wrn28_10", [*C10, "method=batch_ensemble"])
    layers, bns = layer_list("wrn28_10", C10)
    assert plan.accounting.total_params == batch_ensemble_count(layers, bns, 4) == 36_611_404
    assert 36_500_000 <= plan.accounting.total_params <= 36_750_000
    assert check_plan(plan) == []


def test_wrn28_10_mimo_count():
    plan = mixc.compile("wrn28_10", [*C10, "method=mimo", "members=3"])
    layers, bns = layer_list("wrn28_10", C10)
    assert plan.accounting.total_params == mimo_count(layers, bns, 3) == 36_492_878
    assert 36_480_000 <= plan.accounting.total_params <= 36_600_000
    assert check_plan(plan) == []


def test_wrn28_10_packed_count():
    plan = mixc.compile("wrn28_10", [*C10, "method=packed(alpha = 2, gamma = 1)"])
    layers, bns = layer_list("wrn28_10", C10)
    assert (
        plan.accounting.total_params == packed_count(layers, bns, 4, Fraction(2), 1) == 36_504_008
    )
    assert abs(plan.accounting.total_params / 36.5e6 - 1) < 0.05
    assert plan.accounting.per_member_params * 4 == plan.accounting.total_params


def test_resnet50_batch_ensemble_count():
    plan = mixc.compile("resnet50", ["method=batch_ensemble"])
    layers, bns = layer_list("resnet50")
    assert plan.accounting.total_params == batch_ensemble_count(layers, bns, 4) == 25_927_948
    # "about 25.6M": per-member BatchNorm (3 x 53,120 more than one shared BatchNorm) and the fast
    # weights
    assert abs(plan.accounting.total_params / 25.6e6 - 1) < 0.015


# ---------------------------------------------------------------------------
# Counts for random member counts, alphas, gammas and budgets


@settings(max_examples=15, deadline=None)
@given(spec=st.sampled_from(["digits", "wrn16_4"]), members=st.integers(1, 8))
def test_batch_ensemble_and_mimo_counts(spec, members):
    layers, bns = layer_list(spec)
    be = mixc.compile(spec, ["method=batch_ensemble", f"members={members}"])
    assert be.accounting.total_params == batch_ensemble_count(layers, bns, members)
    mimo = mixc.compile(spec, ["method=mimo", f"members={members}"])
    assert mimo.accounting.total_params == mimo_count(layers, bns, members)
    assert check_plan(be) == [] and check_plan(mimo) == []


@settings(max_examples=30, deadline=None)
@given(
    members=st.integers(1, 8),
    gamma=st.integers(1, 3),
    num=st.integers(1, 24),
    den=st.sampled_from([1, 2, 4, 8]),
)
def test_packed_counts_and_width_errors(members, gamma, num, den):
    alpha = Fraction(num, den)
    layers, bns = layer_list("digits")
    overrides = [f"method=packed(alpha = {float(alpha)!r}, gamma = {gamma})", f"members={members}"]
    if packed_valid(layers, members, alpha, gamma):
        plan = mixc.compile("digits", overrides)
        assert plan.accounting.total_params == packed_count(layers, bns, members, alpha, gamma)
        assert check_plan(plan) == []
    else:
        with pytest.raises(
            SpecError, match=r"packed\(alpha = .*layer '[\w.]+' would have .* channels"
        ):
            mixc.compile("digits", overrides)


def _neighbours(layers, members: int, gamma: int, alpha: Fraction) -> list[Fraction]:
    """The valid alphas just below and above ``alpha`` on a fine grid (digits' widths are 32 and
    64)."""
    grid = [Fraction(k, 64) for k in range(1, 64 * 12)]
    valid = [a for a in grid if packed_valid(layers, members, a, gamma)]
    below = [a for a in valid if a < alpha]
    above = [a for a in valid if a > alpha]
    return below[-1:] + above[:1]


@settings(max_examples=20, deadline=None)
@given(members=st.integers(1, 6), gamma=st.integers(1, 2), ratio=st.floats(0.2, 3.0))
def test_packed_alpha_from_a_budget_is_the_closest(members, gamma, ratio):
    layers, bns = layer_list("digits")
    budget = int(ratio * mixc.compile("digits").accounting.backbone_params)
    overrides = [f"method=packed(gamma = {gamma})", f"members={members}", f"budget={budget}"]
    try:
        plan = mixc.compile("digits", overrides)
    except SpecError as e:
        assert "below the smallest Packed-Ensemble" in str(e)
        smallest = min(
            a
            for a in (Fraction(k, 64) for k in range(1, 64 * 4))
            if packed_valid(layers, members, a, gamma)
        )
        assert packed_count(layers, bns, members, smallest, gamma) > budget
        return
    alpha = Fraction(plan.method.alpha).limit_denominator(64)
    assert plan.method.alpha_from_budget and plan.accounting.budget == budget
    total = plan.accounting.total_params
    assert total == packed_count(layers, bns, members, alpha, gamma)
    for other in _neighbours(layers, members, gamma, alpha):
        assert abs(total - budget) <= abs(packed_count(layers, bns, members, other, gamma) - budget)


# ---------------------------------------------------------------------------
# Plans: tensors, execution, shapes


def test_batch_ensemble_tensors():
    plan = mixc.compile(
        "digits", ["method=batch_ensemble(fast_init = signs, fast_std = 0.3)", "members=3"]
    )
    assert plan.execution == "per_member" and plan.grouping == "none"
    assert (
        plan.method.fast_init == "signs"
        and plan.method.fast_std == 0.3
        and plan.method.fast_lr == 0.5
    )
    t = {x.name: x for x in plan.tensors}
    stem = plan.op("stem")
    assert stem.source == "batch_ensemble"
    assert t["plain.stem.weight"].shape == [32, 1, 3, 3] and not t["plain.stem.weight"].per_member
    assert t["fast.stem.r"].shape == [3, 1] and t["fast.stem.r"].role == "fast_in"
    assert t["fast.stem.s"].shape == [3, 32] and t["fast.stem.s"].role == "fast_out"
    assert t["member.fc.bias"].shape == [3, 10] and "member.stem.bias" not in t
    assert t["bn.s1.b0.bn0.weight"].shape == [3, 32]
    assert plan.accounting.fast_params == sum(
        x.numel for x in plan.tensors if x.role.startswith("fast")
    )
    plain = mixc.compile("digits").ops  # the graph keeps the backbone's shapes (one member's view)
    assert [(o.name, o.in_shape, o.out_shape) for o in plan.ops] == [
        (o.name, o.in_shape, o.out_shape) for o in plain
    ]


def test_mimo_plan_shapes():
    plan = mixc.compile("digits", ["method=mimo", "members=3"])
    assert plan.execution == "single_path" and plan.input_shape == [1, 8, 8] and plan.classes == 10
    # member-major stack
    assert plan.ops[0].in_shape == [1, 8, 8] and plan.ops[0].out_shape == [3, 8, 8]
    assert plan.op("stem").in_channels == 3 and plan.op(plan.output).out_shape == [30]
    t = {x.name: x for x in plan.tensors}
    assert t["plain.stem.weight"].shape == [32, 3, 3, 3] and t["plain.fc.weight"].shape == [30, 64]
    assert t["bn.s1.b0.bn0.weight"].shape == [32] and not t["bn.s1.b0.bn0.weight"].per_member
    assert all(o.source == "plain" for o in plan.ops if o.kind in ("conv", "linear"))
    assert plan.accounting.per_member_params == (32 * 3 * 9) // 3 + (30 * 64 + 30) // 3


def test_packed_plan_shapes_and_groups():
    plan = mixc.compile("digits", ["method=packed(alpha = 2, gamma = 2)", "members=2"])
    assert plan.execution == "single_path" and plan.method.alpha == 2.0 and plan.method.gamma == 2
    stem, conv, proj, fc = (plan.op(n) for n in ("stem", "s1.b0.conv1", "s2.b0.proj", "fc"))
    # first layer: not split
    assert (stem.in_channels, stem.out_channels, stem.groups) == (1, 64, 1)
    assert (conv.in_channels, conv.out_channels, conv.groups) == (64, 64, 4)  # gamma x members
    # projections packed alike
    assert (proj.in_channels, proj.out_channels, proj.groups) == (64, 128, 4)
    # last: M groups, M x classes
    assert (fc.in_features, fc.out_features, fc.groups) == (128, 20, 2)
    t = {x.name: x for x in plan.tensors}
    assert t["plain.fc.weight"].shape == [20, 64] and t["plain.s1.b0.conv1.weight"].shape == [
        64,
        16,
        3,
        3,
    ]
    assert t["bn.s1.b0.bn0.weight"].shape == [64]
    assert json.loads(plan.to_json())["ops"][-1]["groups"] == 2


def test_flops_per_method():
    base = mixc.compile("wrn28_10", [*C10, "members=1", "groups=none"])
    one = backbone_macs(base)
    be = mixc.compile("wrn28_10", [*C10, "method=batch_ensemble"])
    assert ensemble_macs(be) == 4 * one and backbone_macs(be) == one
    mimo = mixc.compile("wrn28_10", [*C10, "method=mimo", "members=3"])
    assert (
        backbone_macs(mimo) == one
        and ensemble_macs(mimo) == one + 2 * (32 * 32 * 16 * 3 * 9) + 2 * 640 * 10
    )
    packed = mixc.compile("wrn28_10", [*C10, "method=packed(alpha = 2)"])
    assert backbone_macs(packed) == one and ensemble_macs(packed) / one == pytest.approx(
        1.0, abs=0.001
    )


# ---------------------------------------------------------------------------
# Hashes and plan files: mixture plans unchanged


#: (content hash, sha256 of plan.json without its source path) of zoo plans compiled before methods
#: existed (at 9f785c4): the default must move neither
PINNED = {
    ("digits", ()): ("e488edc6e5058128", "4b4da64da2aae166"),
    ("digits", ("groups=none",)): ("e8dee12c27733df3", "479902fa9403cfa2"),
    ("wrn28_10", ()): ("02620279e4f94e51", "c2d127f6c0075225"),
    ("wrn28_10_7m", ()): ("26bbf6afc4d31002", "d6da628f7eb153df"),
    ("resnet50", ()): ("859af52470a7ae13", "0adf2720b6b21791"),
    ("wrn16_4", ("members=1", "groups=none")): ("45ecdcc8be53142c", "7a0343fb8d873942"),
    ("wrn28_5", ()): ("387232c99c763393", "de820242ac6cd150"),
}


@pytest.mark.parametrize("spec", [p.stem for p in zoo_specs()])
def test_mixture_default_keeps_plans_byte_identical(spec):
    default = mixc.compile(spec)
    explicit = mixc.compile(spec, ["method=mixture"])
    assert default.to_json() == explicit.to_json()
    data = json.loads(default.to_json())
    assert "method" not in data and "execution" not in data
    assert "fast_params" not in data["accounting"] and "backbone_macs" not in data["accounting"]
    assert all("groups" not in o for o in data["ops"] if o["kind"] == "linear")
    assert Plan.from_json(default.to_json()).method.name == "mixture"


@pytest.mark.parametrize("key", list(PINNED), ids=lambda k: " ".join((k[0], *k[1])))
def test_pinned_hashes_and_bytes(key):
    plan = mixc.compile(key[0], list(key[1]))
    want_hash, want_bytes = PINNED[key]
    assert plan.spec_hash == want_hash
    data = json.loads(plan.to_json())
    data.pop("source")  # the spec's path: it differs between checkouts
    assert hashlib.sha256(json.dumps(data, indent=1).encode()).hexdigest()[:16] == want_bytes


def test_naive_is_groups_none():
    a = mixc.compile("wrn16_4", ["method=naive"])
    b = mixc.compile("wrn16_4", ["groups=none"])
    assert a.method.name == b.method.name == "naive"
    assert (
        a.model_dump(exclude={"warnings"}) == b.model_dump(exclude={"warnings"})
        and a.spec_hash == b.spec_hash
    )
    assert "method" not in json.loads(b.to_json())  # implied by grouping none, as in older plans


@pytest.mark.parametrize("method", ["batch_ensemble", "mimo", "packed", "naive"])
def test_plan_files_round_trip(tmp_path, method):
    plan = mixc.compile("digits", [f"method={method}"])
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    again = read_plan(path)
    assert again == plan and again.spec_hash == plan.content_hash()


def test_training_options_are_not_hashed_but_init_is():
    base = mixc.compile("digits", ["method=batch_ensemble"])
    assert (
        mixc.compile("digits", ["method=batch_ensemble(fast_lr = 0.1)"]).spec_hash == base.spec_hash
    )
    assert (
        mixc.compile("digits", ["method=batch_ensemble(fast_std = 0.1)"]).spec_hash
        != base.spec_hash
    )
    mimo = mixc.compile("digits", ["method=mimo"])
    assert (
        mixc.compile(
            "digits", ["method=mimo(batch_repetitions = 2, input_sharing = 0.5)"]
        ).spec_hash
        == mimo.spec_hash
    )


def test_plan_refuses_an_inconsistent_method():
    data = json.loads(mixc.compile("digits", ["method=mimo"]).to_json())
    data["execution"] = "per_member"
    with pytest.raises(ValidationError, match="runs single_path"):
        Plan.model_validate(data)
    data = json.loads(mixc.compile("digits").to_json())
    data["method"] = {"name": "batch_ensemble"}
    with pytest.raises(ValidationError, match="template groups"):
        Plan.model_validate(data)


def test_method_tensors_invariant_catches_a_wrong_shape():
    plan = mixc.compile("digits", ["method=batch_ensemble"])
    tensors = [
        t.model_copy(update={"shape": [4, 2]}) if t.name == "fast.stem.r" else t
        for t in plan.tensors
    ]
    broken = plan.model_copy(update={"tensors": tensors})
    assert "method_tensors" in {v.invariant for v in check_plan(broken)}


# ---------------------------------------------------------------------------
# The language


PACKED = """
import "blocks/wide.mix"
backbone small(width = 16, classes = 10) {
    input image(1, 8, 8)
    conv stem(width, kernel = 3)
    stage s1 = repeat 2 wide_basic(width)
    bn; relu
    global_avgpool
    linear fc(classes)
}
ensemble {
    backbone small
    members 4
    METHOD
}
"""


def _compile(method_lines: str, overrides=()):
    return mixc.compile_text(PACKED.replace("METHOD", method_lines), list(overrides), name="m.mix")


def _error(method_lines: str, overrides=()) -> str:
    with pytest.raises(SpecError) as e:
        _compile(method_lines, overrides)
    return e.value.render()


def test_method_line_and_overrides():
    assert _compile("method packed(alpha = 2, gamma = 1)").method.alpha == 2.0
    # a bare name takes options
    assert _compile("method packed", ["method.alpha=3"]).method.alpha == 3.0
    assert _compile("", ["method=packed", "method.gamma=2"]).method.gamma == 2
    assert _compile("method mimo", ["method=batch_ensemble"]).method.name == "batch_ensemble"
    plan = mixc.compile("wrn16_4", ["method=packed(alpha = 2)"])
    assert plan.method.name == "packed" and plan.method.alpha == 2.0
    with pytest.raises(
        SpecError,
        match="choose the method first: --set method=batch_ensemble --set method.fast_std",
    ):
        mixc.compile("wrn16_4", ["method.fast_std=0.1"])


def test_unknown_methods_and_options_are_positioned():
    text = _error("method batch_ensmble")
    assert (
        "m.mix:14:12: error: unknown ensemble method 'batch_ensmble'" in text
        and "'batch_ensemble'" in text
    )
    text = _error("method packed(alpha = 0, beta = 1)")
    assert "option 'alpha' of packed must be positive, got 0" in text
    assert "method packed has no option 'beta'" in text and "expected one of: alpha, gamma" in text
    assert "members is a setting of its own" in _error("method mimo(members = 3)")
    assert "did you mean 'signs'?" in _error("method batch_ensemble(fast_init = sign)")
    assert "is a fraction in [0, 1]" in _error("method mimo(input_sharing = 2)")
    assert "options of method packed are named" in _error("method packed(2)")
    assert "^" in _error("method naive(x = 1)")


@pytest.mark.parametrize(
    "setting",
    [
        "budget 1.0x",
        "groups by_shape",
        "templates_per_layer 2",
        "assign shared",
        "bank_singletons true",
        "init { alphas normal(std = 0.5) }",
    ],
)
@pytest.mark.parametrize("method", ["batch_ensemble", "mimo", "naive"])
def test_mixture_settings_beside_another_method_are_errors(setting, method):
    text = _error(f"method {method}\n    {setting}")
    key = "init.alphas" if setting.startswith("init") else setting.split()[0]
    assert (
        f"'{key}' does not apply to method {method}" in text
        and "hint:" in text
        and "m.mix:15:" in text
    )


def test_mixture_settings_from_set_are_errors_and_from_the_file_are_ignored():
    text = _error("method batch_ensemble", ["budget=2M"])
    assert "--set #1:1:1: error: 'budget' does not apply to method batch_ensemble" in text
    # digits.mix writes budget, groups, tpl, assign
    plan = mixc.compile("digits", ["method=batch_ensemble"])
    (w,) = plan.warnings
    assert (
        w.message
        == "method batch_ensemble, chosen with --set, does not use the spec's budget, groups, "
        "templates_per_layer, assign (they are ignored)"
        and w.line == 17
    )
    assert plan.accounting.budget is None
    assert "groups none is the naive ensemble: use method naive" in _error(
        "method batch_ensemble", ["groups=none"]
    )
    assert _compile("method naive\n    groups none").method.name == "naive"  # redundant, not wrong


def test_packed_budget_and_alpha_precedence():
    text = _error("method packed(alpha = 2)\n    budget 1.0x")
    assert "packed takes alpha or a budget, not both" in text
    solved = _compile("method packed\n    budget 1.0x")
    assert solved.method.alpha_from_budget and solved.accounting.budget is not None
    later_alpha = _compile("method packed\n    budget 1.0x", ["method.alpha=1"])
    assert later_alpha.method.alpha == 1.0 and later_alpha.accounting.budget is None
    assert (
        "the spec's budget is ignored: packed's alpha is given with --set"
        in later_alpha.warnings[0].message
    )
    later_budget = _compile("method packed(alpha = 1)", ["budget=1.0x"])
    assert later_budget.method.alpha_from_budget
    assert (
        "the spec's alpha is ignored: the budget given with --set solves alpha"
        in later_budget.warnings[0].message
    )
    assert "below the smallest Packed-Ensemble" in _error("method packed\n    budget 100")


def test_packed_width_error_names_the_layer_and_valid_alphas():
    text = _error("method packed(alpha = 1.3)")
    assert (
        "m.mix:5:5: error: packed(alpha = 1.3, gamma = 1) with 4 members: layer 'stem' would have "
        "1.3 x 16 = 20.8 output channels, not a whole number" in text
    )
    assert "multiple of 0.25 (try alpha = 1.25 or 1.5)" in text
    text = _error("method packed(alpha = 1, gamma = 8)")
    assert (
        "layer 's1.b0.conv1' would have 1 x 16 = 16 input channels, which do not split into 32"
        " groups (gamma 8 x 4 members)"
        in text
        and "wide.mix:10:9" in text
    )


def test_a_residual_add_of_the_raw_input_is_refused():
    text = """
    backbone raw(classes = 3) {
        input image(8, 6, 6)
        residual { conv c1(8); bn; relu }
        global_avgpool
        linear head(classes)
    }
    ensemble { backbone raw; members 2; method mimo }
    """
    with pytest.raises(SpecError, match="the residual add 'add0' would add 8 channels to 16"):
        mixc.compile_text(text)
    assert mixc.compile_text(text.replace("mimo", "batch_ensemble")).accounting.total_params > 0


# ---------------------------------------------------------------------------
# inspect, check, verify


def test_inspect_shows_method_total_per_member_and_flops(capsys):
    assert (
        main(
            [
                "inspect",
                "wrn28_10",
                "--set",
                "backbone.classes=10",
                "--set",
                "method=batch_ensemble",
            ]
        )
        == 0
    )
    out = " ".join(capsys.readouterr().out.split())  # the header wraps with the path's length
    for text in (
        "method batch_ensemble",
        "36,611,404",
        "per member",
        "37,543",
        "inference MACs",
        "4.00x",
    ):
        assert text in out, text
    assert (
        main(
            [
                "inspect",
                "wrn28_10",
                "--json",
                "--set",
                "backbone.classes=10",
                "--set",
                "method=mimo",
                "--set",
                "members=3",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert (
        data["method"] == "mimo"
        and data["execution"] == "single_path"
        and data["total_params"] == 36_492_878
    )
    assert data["per_member_params"] == 6_842 and data["relative_flops"] == pytest.approx(
        1.0, abs=0.001
    )
    assert (
        main(["inspect", "wrn28_10", "--set", "backbone.classes=10", "--set", "method=packed"]) == 0
    )
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "alpha 2 solved from the budget 36,500,000: of the alphas at which every width divides, the"
        " one whose total is closest to the budget (+0.01%)" in out
    )


def test_check_names_the_method(capsys):
    assert main(["check", "digits", "--set", "method=mimo"]) == 0
    assert "ok (method mimo, 4 members," in capsys.readouterr().out


def test_verify_a_method_spec(tmp_path):
    from mixc.verify import Space, verify

    spec = tmp_path / "be.mix"
    spec.write_text(PACKED.replace("METHOD", "method batch_ensemble"))
    report = verify(str(spec), Space(), examples=6, seed_value=0)
    assert (
        report.failure is None
        and report.method == "batch_ensemble"
        and set(report.dimensions) == {"members"}
    )
    spec.write_text(PACKED.replace("METHOD", "method packed"))
    report = verify(str(spec), Space(), examples=10, seed_value=0)
    assert report.failure is None and set(report.dimensions) == {"budget", "members"}
    assert report.feasible > 0


def test_verify_builds_the_method_and_reports_an_unbuilt_one_as_not_checkable(
    tmp_path, capsys, monkeypatch
):
    pytest.importorskip("torch")
    import dataclasses

    from mixc.backends import get_backend

    spec = tmp_path / "mimo.mix"
    spec.write_text(PACKED.replace("METHOD", "method mimo"))
    assert main(["verify", str(spec), "--examples", "4", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    # torch builds MIMO: its counts are compared
    assert "models built" in out and "not checkable" not in out
    torch_backend = get_backend("torch", "verify")
    fewer = dataclasses.replace(torch_backend.capabilities, methods=frozenset({"mixture", "naive"}))
    monkeypatch.setattr(type(torch_backend), "capabilities", fewer)
    assert main(["verify", str(spec), "--examples", "4", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "not checkable: method 'mimo' is not built by the torch backend yet" in out


# ---------------------------------------------------------------------------
# Backends: one refusal for methods they do not build


class _Toy(Backend):
    name = "toy"

    def build(self, plan, **options):
        return "built"

    def count_params(self, plan):
        return plan.accounting.total_params


def test_backends_refuse_methods_they_do_not_build():
    assert Capabilities().methods == frozenset({"mixture", "naive"})
    toy = _Toy()
    assert toy.build(mixc.compile("digits")) == "built"
    assert toy.build(mixc.compile("digits", ["method=naive"])) == "built"
    for method in ("batch_ensemble", "mimo", "packed"):
        plan = mixc.compile("digits", [f"method={method}"])
        for call in (
            lambda: toy.build(plan),
            lambda: toy.count_params(plan),
            lambda: toy.emit_source(plan),
            lambda: toy.runner(plan),
            lambda: toy.trainer(plan, None, device="cpu", layout="auto", augment="none"),
        ):
            with pytest.raises(
                BackendError, match=f"method '{method}' is not built by the toy backend yet"
            ):
                call()


def test_a_backend_that_builds_a_method_passes_the_check():
    class Wide(_Toy):
        capabilities = Capabilities(methods=frozenset({"mixture", "naive", "mimo"}))

    plan = mixc.compile("digits", ["method=mimo"])
    assert (
        Wide().build(plan) == "built" and Wide().count_params(plan) == plan.accounting.total_params
    )
