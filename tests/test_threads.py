"""Thread count: the default respects OMP_NUM_THREADS and the CPU affinity; --threads is applied and recorded."""

import json
import os

import pytest

from mixc.threads import ThreadsError, default_threads, resolve_threads


def test_default_respects_omp_and_affinity(monkeypatch):
    monkeypatch.setattr("mixc.threads._affinity", lambda: 6)
    monkeypatch.setattr("mixc.threads._busy_cores", lambda: 0)
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
        code = main(["train", "digits", "--set", "backbone.width=4", "--set", "members=2", "--epochs", "1",
                     "--set", "train.batch=512", "--threads", "1", "--no-progress", "--out", str(out)])
        assert code == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    options = json.loads((out / "config.json").read_text())["options"]
    assert options["threads"] == 1
    assert "cpu, 1 thread;" in capsys.readouterr().out


def test_default_leaves_the_cores_other_processes_keep_busy(monkeypatch):
    """On a shared machine OpenMP threads that wait on a busy core slow every step: use the free ones."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("mixc.threads._affinity", lambda: 2)
    monkeypatch.setattr("mixc.threads._busy_cores", lambda: 0)
    assert default_threads() == 2
    monkeypatch.setattr("mixc.threads._busy_cores", lambda: 1)
    assert default_threads() == 1
    monkeypatch.setattr("mixc.threads._busy_cores", lambda: 7)
    assert default_threads() == 1  # never below one
    monkeypatch.setattr("mixc.threads._affinity", lambda: 16)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.setattr("mixc.threads._busy_cores", lambda: 3)
    assert default_threads() == 4  # 13 free, capped by the user's OMP_NUM_THREADS
