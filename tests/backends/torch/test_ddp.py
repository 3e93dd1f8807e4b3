"""Data-parallel training: two gloo processes on the CPU end with identical weights, and free their
process group before the interpreter shuts down."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from paths import REPO

pytest.importorskip("torch")

ROOT = REPO


@pytest.mark.slow
def test_two_gloo_ranks_agree(tmp_path):
    env = dict(os.environ)
    env.update(
        MIXC_WEIGHTS_HASH_DIR=str(tmp_path / "hashes"),
        MIXC_THREADS_DIR=str(tmp_path / "threads"),
        OMP_NUM_THREADS="1",  # two ranks on two cores
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(ROOT / "tests" / "support" / "ddp_rank.py"),
        "train",
        "digits",
        "--set",
        "backbone.width=8",
        "--set",
        "members=2",
        "--epochs",
        "2",
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    hashes = [(tmp_path / "hashes" / f"rank{r}.sha256").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1]
    # only rank 0 prints and writes
    assert p.stdout.count("epoch 2/2") == 1
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["options"]["world_size"] == 2
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()
    # destroy_process_group freed the group: no gloo thread outlives `mixc train` (one that does can
    # abort the rank at interpreter shutdown, as it did in the full suite: SIGABRT in rank 1)
    if Path("/proc/self/task").is_dir():
        for r in (0, 1):
            threads = (tmp_path / "threads" / f"rank{r}.threads").read_text().split()
            assert not [t for t in threads if "gloo" in t], (r, threads)
