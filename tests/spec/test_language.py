"""Language features: expressions, blocks, repeat, stages, 1-D nets, MLPs, explicit groups,
imports."""

import pytest

import mixc
from mixc.compiler.invariants import check_plan
from mixc.spec import SpecError

MLP = """
backbone mlp(width = 16, classes = 3) {
    input vector(10)
    repeat 3 { linear(width); relu }
    dropout(0.1)
    linear head(classes)
}
ensemble {
    backbone mlp(width = 8)
    members 3
    budget 2.0x
    templates_per_layer 2
    assign greedy_disjoint
}
"""


def test_mlp_and_repeat_body_names():
    plan = mixc.compile_text(MLP)
    names = [o.name for o in plan.ops if o.kind == "linear"]
    assert names == ["b0.linear0", "b1.linear0", "b2.linear0", "head"]
    assert plan.groups and plan.groups[0].layers == ["b1.linear0", "b2.linear0"]
    assert check_plan(plan) == []


def test_signal_net_with_expressions():
    text = """
    backbone tcn(classes = 5, depth = 3) {
        input signal(2, 64)
        let w = 2 ** 3
        conv(w, kernel = 5, stride = 2)
        repeat depth as i {
            conv(w * (1 if i < 2 else 2), kernel = 3, dilation = i + 1)
            bn; relu
        }
        maxpool(2)
        global_maxpool
        linear(classes)
    }
    ensemble { backbone tcn; budget 2.0x; members 2 }
    """
    plan = mixc.compile_text(text)
    convs = [o for o in plan.ops if o.kind == "conv"]
    assert all(c.dim == 1 for c in convs)
    assert convs[0].out_shape == [8, 32]
    assert [c.dilation for c in convs[1:]] == [[1], [2], [3]]
    assert convs[-1].out_channels == 16


def test_explicit_groups_shares_fixed_counts_and_first_match_wins():
    text = """
    import "blocks/wide.mix"
    ensemble {
        backbone wrn(depth = 16, k = 2)
        budget 1.0x
        groups {
            group big("s3.b0.conv2", "s3.b1.*", share = 0.7)
            group again("s3.b1.conv1")
            group mid("s2.b1.*", templates = 3)
        }
    }
    """
    with pytest.raises(SpecError, match="already in group 'big'"):
        mixc.compile_text(text)
    plan = mixc.compile_text(text.replace('group again("s3.b1.conv1")', ""))
    by = {g.name: g for g in plan.groups}
    assert by["mid"].templates == 3 and by["mid"].fixed
    assert by["big"].layers == ["s3.b0.conv2", "s3.b1.conv1", "s3.b1.conv2"]
    # the only group with a share gets the whole template budget
    assert by["big"].share == pytest.approx(1.0)
    # named by no group
    assert "s3.b0.conv1" in plan.plain_layers and "s1.b0.conv2" in plan.plain_layers
    assert check_plan(plan) == []


def test_explicit_group_of_mixed_shapes_is_an_error():
    text = """
    import "blocks/wide.mix"
    ensemble {
        backbone wrn(depth = 16, k = 2)
        budget 1.0x
        groups { group big("s3.*.conv*") }
    }
    """
    with pytest.raises(SpecError, match="mixes layers of different shapes"):
        mixc.compile_text(text)


def test_glob_that_matches_nothing_names_the_layers():
    text = """
    import "blocks/wide.mix"
    ensemble {
        backbone wrn(depth = 16, k = 2)
        budget 1.0x
        groups { group g("s4.*") }
    }
    """
    with pytest.raises(SpecError, match="matches no conv or linear layer"):
        mixc.compile_text(text)


def test_integer_division_and_type_errors():
    text = """
    backbone net(classes = 10, width = 7) {
        input image(1, 8, 8)
        conv(width / 2)
        global_avgpool
        linear(classes)
    }
    ensemble { backbone net; budget 2.0x; bank_singletons true }
    """
    with pytest.raises(SpecError, match="must be an integer, got a number") as e:
        mixc.compile_text(text)
    assert "use // for integer division" in e.value.render()
    assert mixc.compile_text(text.replace("width / 2", "width // 2")).op("conv0").out_channels == 3


def test_recursion_and_undefined_names():
    text = """
    block loop(w) { loop(w) }
    backbone net(classes = 2) {
        input vector(4)
        loop(3)
        linear(classes + missing)
    }
    ensemble { backbone net; budget 1.0x }
    """
    with pytest.raises(SpecError) as e:
        mixc.compile_text(text)
    msg = e.value.render()
    assert "nest too deeply" in msg


def test_duplicate_definitions_and_names():
    text = """
    block b(w) { conv c(w); conv c(w) }
    block b(w) { relu }
    backbone net(classes = 2) { input image(1, 4, 4); b(4); global_avgpool; linear(classes) }
    ensemble { backbone net; budget 1.0x }
    """
    with pytest.raises(SpecError) as e:
        mixc.compile_text(text)
    msg = e.value.render()
    assert "'b' is defined twice" in msg


def test_naive_mode_has_per_member_weights():
    plan = mixc.compile("digits", ["groups=none"])
    assert plan.accounting.total_params == 4 * plan.accounting.backbone_params
    assert all(t.role not in ("bank", "alpha", "plain_weight") for t in plan.tensors)
    assert plan.accounting.budget is None
