"""Checkpoints: safetensors under plan names, spec-hash checks, atomic writes."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
import handmade_plans as hp
from safetensors import safe_open
from safetensors.torch import save_file

from mixc.backends.torch import (
    CheckpointError,
    build,
    load_checkpoint,
    named_plan_tensors,
    save_checkpoint,
)


def _model(plan, seed=0, **kw):
    torch.manual_seed(seed)
    return build(plan, **kw)


def test_round_trip(tmp_path):
    plan = hp.rich_convnet()
    a = _model(plan)
    a.train()
    a(torch.randn(4, *plan.input_shape))  # move the running statistics off their init
    extra = {"optim.step": torch.tensor(7.0), "optim.momentum.bank.g_pw": torch.randn(7, 156)}
    path = save_checkpoint(
        tmp_path / "ck.safetensors", a, plan, epoch=3, extra=extra, metadata={"note": "hi"}
    )
    b = _model(plan, seed=1)
    epoch, got_extra, meta = load_checkpoint(path, b, plan)
    assert epoch == 3 and meta == {"note": "hi"}
    assert set(got_extra) == set(extra)
    for k in extra:
        assert torch.equal(got_extra[k], extra[k])
    for name, t in named_plan_tensors(a).items():
        assert torch.equal(named_plan_tensors(b)[name], t), name
    a.eval(), b.eval()
    x = torch.randn(3, *plan.input_shape)
    assert torch.equal(a(x), b(x))


def test_file_holds_plan_tensors_as_float32(tmp_path):
    plan = hp.signal_blob_net()
    model = _model(plan, dtype=torch.float64)
    path = save_checkpoint(tmp_path / "ck.safetensors", model, plan, epoch=0)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {t.name for t in plan.tensors}
        for t in plan.tensors:
            x = f.get_tensor(t.name)
            assert x.dtype == torch.float32 and list(x.shape) == t.shape
        meta = f.metadata()
    assert (
        meta["spec_hash"] == plan.spec_hash
        and meta["spec_name"] == "signal"
        and meta["epoch"] == "0"
    )
    assert json.loads(meta["metadata"]) == {}
    # the bank form: the file's size tracks the plan's tensors, not M backbones
    n = sum(t.numel for t in plan.tensors)
    assert path.stat().st_size < 4 * n + 16_384


def test_other_spec_is_refused_naming_both(tmp_path):
    mine, other = hp.tiny_convnet(), hp.tiny_convnet(members=2, name="other")
    path = save_checkpoint(tmp_path / "ck.safetensors", _model(other), other, epoch=1)
    model = _model(mine)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, model, mine)
    msg = str(e.value)
    assert "'other'" in msg and other.spec_hash in msg and "'tiny'" in msg and mine.spec_hash in msg
    assert "hint" in msg.lower()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_and_misshapen_tensors(tmp_path):
    plan = hp.tiny_convnet()
    model = _model(plan)
    tensors = {k: v.detach().clone() for k, v in named_plan_tensors(model).items()}
    header = {
        "format": "mixc-checkpoint",
        "spec_name": plan.name,
        "spec_hash": plan.spec_hash,
        "epoch": "0",
    }
    del tensors["alpha.b0.conv1"]
    tensors["bank.g0"] = torch.zeros(2, 576)
    save_file(tensors, tmp_path / "bad.safetensors", metadata=header)
    with pytest.raises(CheckpointError, match="alpha.b0.conv1") as e:
        load_checkpoint(tmp_path / "bad.safetensors", model, plan)
    assert "bank.g0 [2, 576]" in str(e.value)


def test_not_a_checkpoint(tmp_path):
    plan = hp.tiny_convnet()
    (tmp_path / "junk").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        load_checkpoint(tmp_path / "junk", _model(plan), plan)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", _model(plan), plan)


def test_atomic_write_leaves_no_temp_files(tmp_path, monkeypatch):
    plan = hp.tiny_convnet()
    model = _model(plan)
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, model, plan, epoch=1)
    save_checkpoint(path, model, plan, epoch=2)  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]

    import mixc.backends.torch.checkpoint as ck
    from mixc.core.safe_write import write_with

    def boom(filename):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "write_bytes", lambda path, data: write_with(path, boom))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, plan, epoch=3)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]
    assert load_checkpoint(path, model, plan)[0] == 2  # the old file is intact


def test_extra_may_not_shadow_plan_tensors(tmp_path):
    plan = hp.tiny_convnet()
    model = _model(plan)
    with pytest.raises(ValueError, match="collides"):
        save_checkpoint(tmp_path / "ck", model, plan, 0, extra={"bank.g0": torch.zeros(1)})


def test_compiled_spec_round_trip_through_the_api(tmp_path):
    import mixc

    plan = mixc.compile("zoo/digits.mix")
    torch.manual_seed(0)
    a = mixc.build(plan, layout="loop")  # the public API reaches this backend
    path = save_checkpoint(tmp_path / "digits.safetensors", a, plan, epoch=30)
    b = _model(plan, seed=5)
    assert load_checkpoint(path, b, plan)[0] == 30
    a.eval(), b.eval()
    x = torch.randn(2, *plan.input_shape)
    assert torch.equal(a(x), b(x))
    other = mixc.compile("zoo/digits.mix", overrides=["members=2"])
    with pytest.raises(CheckpointError, match=other.spec_hash):
        load_checkpoint(path, _model(other), other)
