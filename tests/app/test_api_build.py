"""mixc.build: keyword overrides checked like --set, and models that pickle, copy and load."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from paths import REPO

import mixc
from mixc.spec import SpecError

ROOT = REPO


def test_keywords_split_between_spec_and_backend():
    model = mixc.build("digits", members=2, budget="2x", layout="loop")
    assert model.members == 2 and model.layout == "loop"
    assert len(model.s1) == 2 and model.s1[0].conv1.alpha.shape[0] == 2


def test_overrides_mapping_list_and_dotted_keywords_agree():
    a = mixc.compile("digits", {"train.epochs": 3, "members": 3})
    b = mixc.compile("digits", ["train.epochs=3", "members=3"])
    c = mixc.compile("digits", mixc.api.override_list(None, train__epochs=3, members=3))
    assert a.train["epochs"] == b.train["epochs"] == c.train["epochs"] == 3
    assert a.members == b.members == c.members == 3


def test_a_string_for_overrides_is_a_type_error_not_characters():
    with pytest.raises(TypeError, match="not the string 'members=2'"):
        mixc.build("digits", overrides="members=2")


def test_unknown_keyword_is_checked_like_set():
    with pytest.raises(SpecError, match="did you mean 'members'"):
        mixc.build("digits", memberz=2)


def test_model_pickles_and_loads_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = mixc.build("digits", members=2, budget="2x").eval()
    x = torch.randn(2, 1, 8, 8)
    torch.save({"model": model, "x": x, "y": model(x)}, tmp_path / "m.pt")
    twin = copy.deepcopy(model)
    assert torch.equal(twin(x), model(x))
    code = (
        "import torch; d = torch.load(r'%s', weights_only=False); "
        "assert torch.equal(d['model'](d['x']), d['y']); print(type(d['model']).__module__)"
        % (tmp_path / "m.pt")
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", "import mixc; " + code],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("mixc.backends.compiled.torch_digits_")
