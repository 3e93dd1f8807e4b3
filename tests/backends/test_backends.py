"""The Backend interface and its registry: a third-party backend through an entry point, the CLI's
choices and errors from the registry, and commands that run on every backend with the capability."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from paths import REPO

FAKE_BACKEND = '''
from pathlib import Path

from mixc.backends.base import Backend, Capabilities


class FakeBackend(Backend):
    """Writes the plan's op names as its "source": enough to see the registry and the CLI use it."""

    name = "fake"
    extra = "fake"
    modules = ()
    capabilities = Capabilities(commands=frozenset({"compile"}))

    def emit_source(self, plan):
        return "\\n".join(op.name for op in plan.ops) + "\\n"

    def write(self, plan, out_dir):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.json").write_text(plan.to_json() + "\\n")
        path = out / f"{plan.name}.ops"
        path.write_text(self.emit_source(plan))
        return path


backend = FakeBackend()
'''


@pytest.fixture(scope="module")
def fake_site(tmp_path_factory) -> Path:
    """A folder on PYTHONPATH holding a module and the dist-info that registers it (what pip install
    leaves)."""
    site = tmp_path_factory.mktemp("site")
    (site / "mixc_fake_backend.py").write_text(FAKE_BACKEND)
    info = site / "mixc_fake_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mixc-fake-backend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mixc.backends]\nfake = mixc_fake_backend:backend\n")
    return site


def _mixc(site: Path | None, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    path = [str(REPO)] + ([str(site)] if site else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run(
        [sys.executable, "-m", "mixc", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_pip_installed_backend_shows_in_the_cli_and_compiles(fake_site, tmp_path):
    done = _mixc(fake_site, "--help")
    assert done.returncode == 0 and "backends: torch, flax, fake" in " ".join(done.stdout.split())
    done = _mixc(fake_site, "compile", "--help")
    assert "{torch,flax,fake}" in done.stdout
    done = _mixc(fake_site, "compile", "digits", "--backend", "fake", "-o", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "digits.ops").read_text().splitlines()[0] == "input"  # the first op
    # a capability it does not have: refused before any work, naming what it serves
    done = _mixc(fake_site, "train", "digits", "--backend", "fake", "--out", str(tmp_path / "run"))
    assert (
        done.returncode == 1 and "the fake backend cannot train (it serves: compile)" in done.stderr
    )
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


def test_without_the_entry_point_there_is_no_fake_backend(tmp_path):
    done = _mixc(None, "compile", "digits", "--backend", "fake", "-o", str(tmp_path / "out"))
    assert done.returncode == 2 and "unknown backend 'fake'" in done.stderr
    assert "installed backends: torch, flax" in done.stderr and "Traceback" not in done.stderr


def test_unknown_backend_says_did_you_mean(capsys):
    from mixc.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "digits", "--backend", "flx"])
    err = capsys.readouterr().err
    assert (
        e.value.code == 2
        and "did you mean 'flax'?" in err
        and "installed backends: torch, flax" in err
    )


def test_registry_falls_back_to_the_built_in_backends(monkeypatch):
    """A source checkout whose installed metadata predates the group still has torch and flax."""
    import mixc.backends as registry

    pytest.importorskip("torch")
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    assert registry.names() == ["torch", "flax"]
    assert registry.get_backend("torch").name == "torch"


def test_a_missing_framework_names_the_pip_extra(monkeypatch):
    from mixc.backends import get_backend
    from mixc.backends.torch.backend import TorchBackend
    from mixc.core.errors import BackendUnavailable

    monkeypatch.setattr(TorchBackend, "modules", ("mixc_no_such_framework",))
    with pytest.raises(BackendUnavailable, match=r"pip install 'mixc\[torch\]'"):
        get_backend("torch")


def test_backend_objects_do_not_import_their_framework():
    code = (
        "import sys, mixc.backends as b; [b.available()[n].load() for n in b.names()]; "
        "import mixc.cli; mixc.cli.build_parser(); "
        "print(sorted(m for m in ('torch', 'jax', 'flax', 'optax') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_both_backends_count_the_plans_parameters():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    import mixc
    from mixc.backends import get_backend

    plan = mixc.compile("digits", ["backbone.width=8", "members=2"])
    for name in ("torch", "flax"):
        assert get_backend(name).count_params(plan) == plan.accounting.total_params, name


def test_sweep_on_flax_resumes_a_torch_sweep_to_torchs_numbers(tmp_path, capsys):
    """`mixc sweep --backend flax` goes on from a torch-trained sweep (shared run folders) and ends
    where torch ends: the same metrics to 1e-3 (no augmentation or dropout here: the same
    arithmetic)."""
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    from synthetic import generated_npz

    from mixc.cli import main

    npz = generated_npz(tmp_path / "gen.npz", n_train=128, n_test=48)
    # cosine: epochs fixed
    base = [
        "sweep",
        "digits",
        "--budgets",
        "1x",
        "--data",
        str(npz),
        "--set",
        "backbone.width=8",
        "--set",
        "members=2",
        "--set",
        "train.schedule=step",
        "--no-progress",
        "--no-plot",
    ]
    assert main([*base, "--epochs", "1", "--out", str(tmp_path / "torch")]) == 0
    shutil.copytree(tmp_path / "torch", tmp_path / "flax")
    assert main([*base, "--epochs", "2", "--out", str(tmp_path / "torch")]) == 0
    assert main([*base, "--epochs", "2", "--out", str(tmp_path / "flax"), "--backend", "flax"]) == 0
    capsys.readouterr()
    rows = {b: json.loads((tmp_path / b / "sweep.json").read_text()) for b in ("torch", "flax")}
    for t, f in zip(rows["torch"], rows["flax"]):
        assert f["status"] == "resumed" and f["epoch"] == t["epoch"] == 2
        for k in ("accuracy", "nll", "ece", "brier"):
            assert f[k] == pytest.approx(t[k], abs=1e-3), k
    config = json.loads((tmp_path / "flax" / "m2-b1x" / "config.json").read_text())
    assert config["options"]["backend"] == "flax"


@pytest.mark.parametrize("name", ["torch", "flax"])
def test_each_backend_implements_the_protocols(name):
    """Trainer and Runner as the driver and the commands use them: arrays named by the plan, both
    ways."""
    pytest.importorskip("torch" if name == "torch" else "jax")
    import numpy as np

    import mixc
    from mixc.backends import get_backend
    from mixc.backends.base import Runner, Trainer
    from mixc.spec.recipe import Recipe

    plan = mixc.compile("digits", ["backbone.width=4", "members=2"])
    backend = get_backend(name)
    trainer = backend.trainer(
        plan, Recipe.model_validate(plan.train), device="cpu", layout="auto", augment="none"
    )
    try:
        assert isinstance(trainer, Trainer) and trainer.rank == 0 and trainer.world == 1
        x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
        trainer.begin(x, np.arange(8) % 10, 4)
        state = trainer.state_arrays()
        assert set(state) == {t.name for t in plan.tensors}
        trainer.begin_epoch(1, 2)
        float(trainer.step(np.arange(4), 0.1, 0))
        assert any(k.startswith("optim.") for k in trainer.optimizer_arrays())
        runner = backend.runner(plan)
        assert isinstance(runner, Runner)
        runner.load_arrays(trainer.state_arrays())
        np.testing.assert_allclose(runner.member_probs(x), trainer.predict(x), atol=1e-5)
        trainer.load_state(state)  # back to the initial weights: the step is undone
        assert all(np.array_equal(state[k], v) for k, v in trainer.state_arrays().items())
    finally:
        trainer.close()


@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_generated_source_and_checkpoints_do_not_depend_on_the_checkout(tmp_path, backend):
    """The same spec in two folders gives byte-identical source and checkpoints (no absolute path
    leaks in, and the checkpoint's header is written in a fixed order)."""
    import shutil

    pytest.importorskip({"torch": "torch", "flax": "flax.nnx"}[backend])
    import mixc
    from mixc.backends import get_backend

    chosen = get_backend(backend)
    outputs = []
    for where in (tmp_path / "a", tmp_path / "b" / "deeper"):
        where.mkdir(parents=True)
        shutil.copy(REPO / "zoo" / "digits.mix", where / "digits.mix")
        plan = mixc.compile(where / "digits.mix", ["backbone.width=8", "members=2"])
        model = chosen.build(plan, **({"seed": 0} if "seed" in chosen.build_options() else {}))
        if "seed" not in chosen.build_options():  # torch draws from the global generator
            import torch

            torch.manual_seed(0)
            model = chosen.build(plan)
        ckpt = chosen.save_checkpoint(where / "c.safetensors", model, plan, 0)
        outputs.append((chosen.emit_source(plan), Path(ckpt).read_bytes()))
    assert outputs[0][0] == outputs[1][0]
    assert outputs[0][1] == outputs[1][1]


# The emitted files stay short enough to read: the spec's tables, blocks and forward, with the layer
# classes imported from the backend's runtime module (limits from the readable-models issue).
LINE_LIMITS = {"digits": 160, "wrn28_10": 400, "resnet50": 450}


@pytest.mark.parametrize("backend", ["torch", "flax"])
@pytest.mark.parametrize("spec", sorted(LINE_LIMITS))
def test_emitted_source_is_short(backend, spec):
    import importlib

    import mixc

    codegen = importlib.import_module(f"mixc.backends.{backend}.codegen")
    lines = codegen.emit_source(mixc.compile(spec)).splitlines()
    assert len(lines) <= LINE_LIMITS[spec], f"{spec} ({backend}): {len(lines)} lines"
    assert not any(line.lstrip().startswith("del ") for line in lines)
