"""Thread count: the default respects OMP_NUM_THREADS and the CPU affinity; --threads is applied and
recorded."""

import json
import os

import pytest

from mixc.core.threads import ThreadsError, default_threads, resolve_threads


def test_default_respects_omp_and_affinity(monkeypatch):
    monkeypatch.setattr("mixc.core.threads._affinity", lambda: 6)
    monkeypatch.setattr("mixc.core.threads._busy_cores", lambda: 0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads() == 6
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert default_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "16")
    assert default_threads() == 6  # never more than the cores we may run on
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(ThreadsError, match="OMP_NUM_THREADS"):
        default_threads()


def test_resolve_checks_the_option():
    assert resolve_threads(3) == 3
    with pytest.raises(ThreadsError, match="--threads must be 1 or more"):
        resolve_threads(0)


def test_threads_recorded_and_applied(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from mixc.cli import main

    out = tmp_path / "run"
    before = torch.get_num_threads()
    try:
        code = main(
            [
                "train",
                "digits",
                "--set",
                "backbone.width=4",
                "--set",
                "members=2",
                "--epochs",
                "1",
                "--set",
                "train.batch=512",
                "--threads",
                "1",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        assert code == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    options = json.loads((out / "config.json").read_text())["options"]
    assert options["threads"] == 1
    assert "cpu, 1 thread," in capsys.readouterr().out


def test_default_leaves_the_cores_other_processes_keep_busy(monkeypatch):
    """On a shared machine OpenMP threads that wait on a busy core slow every step: use the free
    ones."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("mixc.core.threads._affinity", lambda: 2)
    monkeypatch.setattr("mixc.core.threads._busy_cores", lambda: 0)
    assert default_threads() == 2
    monkeypatch.setattr("mixc.core.threads._busy_cores", lambda: 1)
    assert default_threads() == 1
    monkeypatch.setattr("mixc.core.threads._busy_cores", lambda: 7)
    assert default_threads() == 1  # never below one
    monkeypatch.setattr("mixc.core.threads._affinity", lambda: 16)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.setattr("mixc.core.threads._busy_cores", lambda: 3)
    assert default_threads() == 4  # 13 free, capped by the user's OMP_NUM_THREADS


def test_flax_threads_size_xlas_pool_and_give_the_cores_back():
    """--threads 1 on flax: jax's CPU client starts while the thread may run on one core (its pool
    keeps that mask), then the thread gets every core back (data workers started later are not
    squeezed).
    """
    pytest.importorskip("jax")
    import subprocess
    import sys

    code = (
        "import json, os\nbefore = sorted(os.sched_getaffinity(0))\nfrom mixc.backends.flax.threads"
        " import set_threads\ninfo = set_threads(1)\nprint(json.dumps({'info': info, 'same':"
        " sorted(os.sched_getaffinity(0)) == before, 'cores': len(before)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = json.loads(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    assert out["same"]
    if out["cores"] > 1:
        assert out["info"]["xla_threads"] == f"XLA's pool on 1 of {out['cores']} cores"
    else:
        assert out["info"]["xla_threads"] == "XLA's pool on every allowed core (1)"
