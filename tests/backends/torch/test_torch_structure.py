"""The emitted torch model reads like the spec: blocks as modules, stages as module lists,
layers hookable, hierarchical state_dict keys, copyable and exportable."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

import mixc
from mixc.backends.torch import build, emit_source, named_plan_tensors
from mixc.backends.torch.codegen import CodegenError


@pytest.fixture(scope="module")
def wrn():
    torch.manual_seed(0)
    return build(mixc.compile("wrn16_4", ["members=2"]))


def test_one_module_per_block_and_layer(wrn):
    assert isinstance(wrn.s1, torch.nn.ModuleList) and len(wrn.s1) == 2
    block = wrn.s1[0]
    assert type(block).__name__.startswith("WideBasic")
    assert {"bn0", "conv1", "bn1", "conv2"} <= dict(block.named_children()).keys()
    assert type(block.conv1).__name__ == "Conv" and block.conv1.name == "s1.b0.conv1"
    assert "WideBasic" in repr(wrn) and "(conv1): Conv(s1.b0.conv1" in repr(wrn)


@pytest.mark.parametrize("layout", ["grouped", "loop"])
def test_forward_hook_fires_once_per_forward(wrn, layout):
    wrn.layout = layout
    seen = []
    handle = wrn.s1[0].conv1.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        x = torch.randn(2, 3, 32, 32)
        wrn.eval()(x)
        wrn(x)
    finally:
        handle.remove()
        wrn.layout = "auto"
    assert len(seen) == 2
    if layout == "grouped":  # the members side by side on the channel axis
        assert seen[0].shape[1] == wrn.members * 64
    else:  # one tensor per member
        assert len(seen[0]) == wrn.members and seen[0][0].shape[1] == 64


def test_state_dict_keys_are_hierarchical_and_map_to_plan_names(wrn):
    keys = set(wrn.state_dict())
    assert "s1.0.bn0.running_mean" in keys and "s2.1.conv2.alpha" in keys and "fc.weight" in keys
    assert not any("__" in k for k in keys)
    named = named_plan_tensors(wrn)
    assert named["bn.s1.b0.bn0.running_mean"] is wrn.s1[0].bn0.running_mean
    assert named["alpha.s2.b1.conv2"] is wrn.s2[1].conv2.alpha


def test_deepcopy_gives_the_same_model(wrn):
    x = torch.randn(2, 3, 32, 32)
    twin = copy.deepcopy(wrn).eval()
    assert torch.equal(twin(x), wrn.eval()(x))
    assert twin.banked and all(m in set(twin.modules()) for ms in twin.banked.values() for m in ms)


def test_torch_export_on_digits():
    torch.manual_seed(0)
    model = build(mixc.compile("digits")).eval()
    x = torch.randn(3, 1, 8, 8)
    exported = torch.export.export(model, (x,))
    assert torch.allclose(exported.module()(x), model(x), atol=1e-5)


def test_blocks_read_like_the_spec():
    src = emit_source(mixc.compile("wrn16_4"))
    assert "class WideBasic(nn.Module):" in src
    assert "        for block in self.s1:\n            x = block(x, w)\n" in src
    assert " del " not in src and "dropout0 = " not in src
    assert "__init__(self, name: str)" in src


def test_codegen_error_is_shared():
    from mixc.backends.flax.codegen import CodegenError as FlaxError

    assert FlaxError is CodegenError
