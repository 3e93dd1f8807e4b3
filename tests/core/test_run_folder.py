"""Run folders as a careless or hostile user leaves them: tampered headers and files, flipped bytes,
NaN weights, another recipe on resume, two writers, divergence, crashes between writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from paths import REPO
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from synthetic import generated_npz  # noqa: E402

from mixc.compiler.plan import Plan  # noqa: E402
from mixc.core.checkpoint_format import CheckpointError, read_tensors, tensor_checksum  # noqa: E402
from mixc.core.errors import TrainError  # noqa: E402
from mixc.core.run_files import LOCK
from mixc.run_lock import RunLock

ROOT = REPO
TINY = [
    "--set",
    "backbone.width=8",
    "--set",
    "members=2",
    "--set",
    "train.batch=32",
    "--no-progress",
]


def _cli(capsys, *argv):
    from mixc.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _train(capsys, out, npz, *extra):
    return _cli(capsys, "train", "digits", "--data", npz, "--out", out, *TINY, *extra)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 2-epoch run trained with a constant rate (more epochs resume without a recipe change)."""
    from mixc.cli import main

    root = tmp_path_factory.mktemp("runfolder")
    npz = generated_npz(root / "gen.npz")
    run = root / "run"
    assert (
        main(
            [
                "train",
                "digits",
                "--data",
                str(npz),
                "--out",
                str(run),
                "--epochs",
                "2",
                "--set",
                "train.schedule=constant",
                *TINY,
            ]
        )
        == 0
    )
    return run, npz


@pytest.fixture
def run(base, tmp_path):
    """A fresh copy of the base run to damage."""
    src, npz = base
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst, npz


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n])


def _set_header(path: Path, **values) -> None:
    """Rewrite entries of a checkpoint's safetensors metadata, keeping the tensors (as a hand edit
    would)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8 : 8 + n])
    for k, v in values.items():
        if v is None:
            head["__metadata__"].pop(k, None)
        else:
            head["__metadata__"][k] = v
    blob = json.dumps(head).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])


def _metadata_with(path: Path, **values) -> str:
    meta = json.loads(_header(path)["__metadata__"]["metadata"])
    meta.update(values)
    return json.dumps(meta)


def _readers(run: Path, npz: Path) -> list[list]:
    """Every command that reads a run folder: eval, report, interpolate, and train resuming it."""
    return [
        ["eval", run],
        ["report", run],
        ["interpolate", run, "--points", "2"],
        [
            "train",
            "digits",
            "--data",
            npz,
            "--out",
            run,
            "--epochs",
            "3",
            "--set",
            "train.schedule=constant",
            *TINY,
        ],
    ]


# ---------------------------------------------------------------------------
# Tampered run folders: one clear error, exit 1, in every reader


TAMPERED = {
    "epoch abc": (lambda ck: {"epoch": "abc"}, "epoch: input should be a valid integer"),
    "epoch -5": (lambda ck: {"epoch": "-5"}, "epoch: input should be greater than or equal to 0"),
    "metadata not JSON": (lambda ck: {"metadata": "{seed: 0"}, "metadata: not JSON"),
    "seed x": (
        lambda ck: {"metadata": _metadata_with(ck, seed="x")},
        "metadata.seed: input should be a valid integer",
    ),
    "format_version 99": (
        lambda ck: {"format_version": "99"},
        "format version '99' is not one this mixc reads",
    ),
    "epoch 1000000": (
        lambda ck: {"epoch": "1000000"},
        "epoch 1000000 is beyond the 2 epochs of the recipe",
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_checkpoint_header_is_one_clear_error_everywhere(run, capsys, case):
    folder, npz = run
    ck = folder / "checkpoint.safetensors"
    edit, message = TAMPERED[case]
    _set_header(ck, **edit(ck))
    before = ck.read_bytes()
    for argv in _readers(folder, npz):
        rc, out, err = _cli(capsys, *argv)
        assert rc == 1, (argv[0], out, err)
        assert message in err and str(ck) in err and "hint:" in err, (argv[0], err)
        assert "Traceback" not in err
    assert ck.read_bytes() == before  # the resume refused before writing anything


def test_config_holding_a_list_and_a_list_line_in_metrics(run, capsys):
    folder, npz = run
    config = folder / "config.json"
    good = config.read_text()
    config.write_text("[1, 2]\n")
    for argv in _readers(folder, npz):
        rc, _, err = _cli(capsys, *argv)
        assert rc == 1 and f"{config}: expected an object, got a list" in err, (argv[0], err)
    config.write_text(good)
    metrics = folder / "metrics.jsonl"
    metrics.write_text(
        metrics.read_text().splitlines()[0] + "\n[1]\n" + metrics.read_text().splitlines()[1] + "\n"
    )
    for argv in _readers(folder, npz):
        rc, _, err = _cli(capsys, *argv)
        assert rc == 1 and f"{metrics}:2: expected an object, got a list" in err, (argv[0], err)


def test_metrics_line_with_a_bad_field_is_named(run, capsys):
    folder, _ = run
    metrics = folder / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["accuracy"] = "lots"
    metrics.write_text(lines[0] + "\n" + json.dumps(rec) + "\n")
    rc, _, err = _cli(capsys, "report", folder)
    assert (
        rc == 1
        and f"{metrics}:2: accuracy: input should be a valid number" in err
        and "'lots'" in err
    )


# ---------------------------------------------------------------------------
# Integrity: checksum and finite weights


def _loaders(run: Path, npz: Path) -> list[list]:
    """The readers that load the weights (report reads only the recorded metrics)."""
    readers = _readers(run, npz)
    return [readers[0], readers[2], readers[3]]


def test_flipped_byte_fails_the_checksum(run, capsys):
    folder, npz = run
    ck = folder / "checkpoint.safetensors"
    data = bytearray(ck.read_bytes())
    data[-100] ^= 0x01  # inside the last tensor's bytes
    ck.write_bytes(bytes(data))
    for argv in _loaders(folder, npz):
        rc, _, err = _cli(capsys, *argv)
        assert rc == 1 and "does not match the checksum recorded when it was saved" in err, (
            argv[0],
            err,
        )
    plan = Plan.from_json((folder / "plan.json").read_text())
    with pytest.raises(CheckpointError, match="checksum"):  # the loader every backend uses
        read_tensors(ck, plan)


def test_nan_weights_are_refused_naming_the_tensor(run, capsys):
    folder, npz = run
    ck = folder / "checkpoint.safetensors"
    with safe_open(str(ck), "numpy") as f:
        meta = f.metadata()
    tensors = load_file(str(ck))
    name = sorted(k for k in tensors if k.endswith("running_var"))[0]
    tensors[name][0, 0] = np.nan
    meta["checksum"] = tensor_checksum(tensors)  # a consistent file: only the values are wrong
    save_file(tensors, str(ck), metadata=meta)
    for argv in _loaders(folder, npz):
        rc, _, err = _cli(capsys, *argv)
        assert rc == 1 and f"non-finite tensor(s): {name} (1 of" in err, (argv[0], err)


def test_checkpoint_without_checksum_loads_with_a_note(run, capsys):
    folder, _ = run
    _set_header(folder / "checkpoint.safetensors", checksum=None)
    rc, out, err = _cli(capsys, "eval", folder, "--json", "--no-save")
    assert rc == 0 and json.loads(out)["epoch"] == 2
    assert "has no checksum" in err


# ---------------------------------------------------------------------------
# Resume with another recipe


@pytest.mark.parametrize(
    "change,field",
    [
        (["--set", "train.optimizer.lr=0.5"], "optimizer.lr: 0.05 -> 0.5"),
        (["--batch-size", "16"], "batch: 32 -> 16"),
        (["--set", "train.schedule=cosine"], "schedule.name: constant -> cosine"),
        (["--set", "train.weight_decay=0.01"], "weight_decay: 0.0005 -> 0.01"),
        (["--set", "train.label_smoothing=0.1"], "label_smoothing: 0.0 -> 0.1"),
        (["--data", "OTHER"], "data: "),
    ],
)
def test_resume_with_another_recipe_is_refused_naming_the_field(
    run, capsys, tmp_path, change, field
):
    folder, npz = run
    if change[0] == "--data":
        change = ["--data", generated_npz(tmp_path / "other.npz", seed=1)]
    config = (folder / "config.json").read_text()
    ck = (folder / "checkpoint.safetensors").read_bytes()
    rc, _, err = _cli(
        capsys,
        "train",
        "digits",
        "--data",
        npz,
        "--out",
        folder,
        "--epochs",
        "3",
        "--set",
        "train.schedule=constant",
        *TINY,
        *change,
    )
    assert (
        rc == 1 and "another recipe" in err and field in err and "--allow-recipe-change" in err
    ), err
    assert (folder / "config.json").read_text() == config  # still describes the epochs trained
    assert (folder / "checkpoint.safetensors").read_bytes() == ck


def test_allowed_recipe_change_is_recorded_in_the_history(run, capsys):
    folder, npz = run
    rc, _, err = _cli(
        capsys,
        "train",
        "digits",
        "--data",
        npz,
        "--out",
        folder,
        "--epochs",
        "3",
        "--set",
        "train.schedule=constant",
        "--set",
        "train.optimizer.lr=0.02",
        *TINY,
        "--allow-recipe-change",
    )
    assert rc == 0, err
    config = json.loads((folder / "config.json").read_text())
    assert config["recipe"]["optimizer"]["lr"] == 0.02
    events = {h["event"]: h for h in config["history"]}
    assert events["recipe_changed"]["after_epoch"] == 2
    assert events["recipe_changed"]["changes"] == {"optimizer.lr": [0.05, 0.02]}
    assert events["recipe_changed"]["previous_recipe"]["optimizer"]["lr"] == 0.05
    # constant rate: recorded, not refused
    assert events["epochs_changed"]["changes"] == {"epochs": [2, 3]}
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["lr"]) for m in lines] == [(1, 0.05), (2, 0.05), (3, 0.02)]


def test_more_epochs_under_cosine_is_a_recipe_change(run, capsys):
    folder, npz = run
    rc, _, err = _cli(
        capsys, "train", "digits", "--data", npz, "--out", folder, "--epochs", "3", *TINY
    )
    assert rc == 1 and "schedule.name: constant -> cosine" in err and "epochs: 2 -> 3" in err


# ---------------------------------------------------------------------------
# Two writers


def test_second_writer_is_refused_and_a_dead_writers_lock_taken_over(run, capsys):
    folder, npz = run
    holder = RunLock(folder).acquire()  # another `mixc train`, still running
    try:
        rc, _, err = _cli(capsys, *_readers(folder, npz)[3])
        assert (
            rc == 1
            and "is being written by another `mixc train`" in err
            and f"pid {os.getpid()}" in err
        )
    finally:
        holder.release()
    assert not (folder / LOCK).exists()
    # a writer killed while holding the lock: the kernel released it, the file still names it
    code = (
        "from mixc.run_lock import RunLock; import os;"
        f" RunLock(__import__('pathlib').Path({str(folder)!r})).acquire(); os._exit(0)"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    assert (folder / LOCK).exists()
    rc, _, err = _cli(capsys, *_readers(folder, npz)[3])
    assert rc == 0 and "took over the lock" in err and "no longer running" in err
    assert not (folder / LOCK).exists()


def test_lock_is_refused_within_one_process_too(tmp_path):
    a = RunLock(tmp_path).acquire()
    with pytest.raises(TrainError, match="being written by another"):
        RunLock(tmp_path).acquire()
    a.release()
    RunLock(tmp_path).acquire().release()


# ---------------------------------------------------------------------------
# Divergence that is not a NaN loss


def test_divergence_keeps_the_last_good_checkpoint(run, capsys):
    folder, npz = run
    ck = folder / "checkpoint.safetensors"
    before, lines = ck.read_bytes(), (folder / "metrics.jsonl").read_text()
    rc, _, err = _cli(
        capsys,
        "train",
        "digits",
        "--data",
        npz,
        "--out",
        folder,
        "--epochs",
        "3",
        "--set",
        "train.schedule=constant",
        "--set",
        "train.optimizer.lr=1e3",
        *TINY,
        "--allow-recipe-change",
    )
    assert rc == 1 and "training diverged in epoch 3" in err, err
    assert "running_var" in err or "nll = nan" in err or "non-finite" in err
    assert f"the last good checkpoint (epoch 2) is kept in {ck}" in err and "Traceback" not in err
    assert ck.read_bytes() == before and (folder / "metrics.jsonl").read_text() == lines
    rc, out, _ = _cli(capsys, "eval", folder, "--json", "--no-save")
    assert rc == 0 and json.loads(out)["epoch"] == 2


def test_divergence_of_a_fresh_run_names_the_tensors(tmp_path, capsys, base):
    _, npz = base
    rc, _, err = _train(
        capsys, tmp_path / "r", npz, "--epochs", "1", "--set", "train.optimizer.lr=1e3"
    )
    assert (
        rc == 1 and "training diverged in epoch 1" in err and "no checkpoint was written" in err
    ), err
    assert not (tmp_path / "r" / "checkpoint.safetensors").exists()


# ---------------------------------------------------------------------------
# Crash windows


def test_lost_metrics_append_and_stale_temporaries_are_repaired(run, capsys):
    """The state a kill leaves between the checkpoint's rename and the append, or mid-write."""
    folder, npz = run
    metrics = folder / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0] + "\n")  # epoch 2's checkpoint is there, its line is not
    stale = [
        folder / ".checkpoint.safetensors.k3j2l1.tmp",
        folder / "config.json.tmp",
        folder / ".metrics.jsonl.x.tmp",
    ]
    for p in stale:
        p.write_text("half")
    rc, out, err = _cli(capsys, *_readers(folder, npz)[3])  # resume for a third epoch
    assert rc == 0, err
    assert "restored the line of epoch 2" in err and "removed" in err
    got = metrics.read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in got] == [1, 2, 3]
    assert json.loads(got[1])["accuracy"] == json.loads(lines[1])["accuracy"]
    assert json.loads(got[1])["nll"] == json.loads(lines[1])["nll"]
    assert not any(p.exists() for p in stale)


def test_truncated_last_line_is_dropped_on_resume_and_named_by_readers(run, capsys):
    folder, npz = run
    metrics = folder / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0] + "\n" + lines[1][:25])  # killed mid-append
    rc, _, err = _cli(capsys, "report", folder)
    assert rc == 1 and f"{metrics}:2: not JSON" in err
    rc, _, err = _cli(capsys, *_readers(folder, npz)[3])
    assert (
        rc == 0 and "dropped a truncated last line" in err and "restored the line of epoch 2" in err
    )
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2, 3]


def test_kill_between_checkpoint_and_append_then_resume(tmp_path, base, monkeypatch):
    """The literal crash: epoch 1's checkpoint is renamed into place, the process dies before the
    append."""
    import mixc
    from mixc import run_writer
    from mixc.core.data import load_dataset
    from mixc.spec.recipe import Recipe
    from mixc.training import train

    _, npz = base
    data = load_dataset(str(npz))
    plan = mixc.compile("digits", ["backbone.width=8", "members=2"])
    recipe = Recipe.model_validate({**plan.train, "epochs": 2, "batch": 32})
    out = tmp_path / "r"

    def dies_on_append(path, text):
        raise KeyboardInterrupt  # SIGINT/SIGKILL right after the checkpoint's rename

    monkeypatch.setattr(run_writer, "append_text", dies_on_append)
    with pytest.raises(KeyboardInterrupt):
        train("torch", plan, recipe, out_dir=out, data=data, progress=False)
    monkeypatch.undo()
    assert json.loads(_header(out / "checkpoint.safetensors")["__metadata__"]["epoch"]) == 1
    assert not (out / "metrics.jsonl").exists() or (out / "metrics.jsonl").read_text() == ""
    # and a kill mid-write
    (out / ".checkpoint.safetensors.abc123.tmp").write_bytes(b"half a checkpoint")
    m = train("torch", plan, recipe, out_dir=out, data=data, progress=False)
    assert m["epoch"] == 2
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
