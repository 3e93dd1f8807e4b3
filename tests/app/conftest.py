"""Fixtures the application's tests share."""

import pytest

import mixc


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """An untrained digits run (width 8, 2 members): plan.json + checkpoint, and an npz to score it
    on."""
    pytest.importorskip("torch")
    from synthetic import generated_npz

    from mixc.backends.torch import build
    from mixc.backends.torch.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("runs")
    run = root / "run"
    run.mkdir()
    plan = mixc.compile("digits", ["backbone.width=8", "members=2"])
    save_checkpoint(run / "checkpoint.safetensors", build(plan), plan, 1)
    (run / "plan.json").write_text(plan.to_json())
    generated_npz(root / "d.npz", n_train=16, n_test=16)
    return run
