"""Every input safe: writes never follow a link or destroy an input, images
decode by their mode, and the remaining bad inputs are one-paragraph errors (exit 1 or 2), never
a traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_input_safety import _cli

import mixc

PRECIOUS = "precious\n"


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file of the user's outside every run folder, that a planted link points at."""
    path = tmp_path / "victim.txt"
    path.write_text(PRECIOUS)
    return path


def _one_paragraph(err: str) -> None:
    assert "Traceback" not in err and err.count("\n") <= 1, err


# --- writes never follow a link --------------------------------------------------------


@pytest.mark.parametrize(
    "name", [".mixc-train.lock", "metrics.jsonl", "curves.png", "config.json", "metrics.csv"]
)
def test_train_refuses_links_where_it_writes(capsys, run_folder, tmp_path, victim, name):
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    (run / name).symlink_to(victim)
    rc, out, err = _cli(
        capsys,
        "train",
        "digits",
        "--set",
        "backbone.width=8",
        "--set",
        "members=2",
        "--epochs",
        "2",
        "--data",
        str(run_folder.parent / "d.npz"),
        "--out",
        str(run),
        "--no-progress",
    )
    assert rc == 1 and str(run / name) in err and "symbolic link" in err
    _one_paragraph(err)
    assert victim.read_text() == PRECIOUS


def test_the_lock_and_appends_never_follow_a_link(tmp_path, victim):
    from mixc.core.safe_write import WriteError, append_text
    from mixc.run_lock import RunLock

    (tmp_path / ".mixc-train.lock").symlink_to(victim)
    with pytest.raises(WriteError, match="symbolic link"):
        RunLock(tmp_path).acquire()
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(WriteError, match="symbolic link"):
        append_text(tmp_path / "metrics.jsonl", "{}\n")
    assert victim.read_text() == PRECIOUS


def test_the_csv_logger_has_no_fixed_temporary_to_plant(tmp_path, victim):
    from mixc.loggers import CsvLogger

    (tmp_path / ".metrics.csv.tmp").symlink_to(victim)  # the old fixed name, opened with "w"
    CsvLogger(tmp_path).log({"epoch": 1}, [{"epoch": 1, "train_loss": 0.5}])
    assert victim.read_text() == PRECIOUS
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["epoch,train_loss", "1.0,0.5"]


def test_interpolate_refuses_a_linked_output(capsys, run_folder, tmp_path, victim):
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    (run / "interpolation.csv").symlink_to(victim)
    rc, out, err = _cli(
        capsys, "interpolate", str(run), "--data", str(run_folder.parent / "d.npz"), "--points", "2"
    )
    assert rc == 1 and "interpolation.csv is a symbolic link" in err
    _one_paragraph(err)
    assert victim.read_text() == PRECIOUS


def test_whole_file_writes_replace_nothing_through_a_link(tmp_path, victim):
    from mixc.core.safe_write import WriteError, write_text

    (tmp_path / "out.json").symlink_to(victim)
    with pytest.raises(WriteError, match="symbolic link"):
        write_text(tmp_path / "out.json", "{}")
    assert victim.read_text() == PRECIOUS and not list(tmp_path.glob(".*.tmp"))


# --- outputs never destroy an input ------------------------------------------------------


def test_export_never_overwrites_the_runs_checkpoint(capsys, run_folder, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    before = (run / "checkpoint.safetensors").read_bytes()
    for extra in ([], ["--force"]):
        rc, out, err = _cli(
            capsys,
            "export",
            str(run),
            "--format",
            "torch-export",
            "-o",
            str(run / "checkpoint.safetensors"),
            *extra,
        )
        assert rc == 1 and "is an input of this command" in err, err
        _one_paragraph(err)
    assert (run / "checkpoint.safetensors").read_bytes() == before


def test_export_needs_force_to_replace_a_file_it_did_not_write(
    capsys, run_folder, tmp_path, victim
):
    rc, out, err = _cli(
        capsys, "export", str(run_folder), "--format", "torch-export", "-o", str(victim)
    )
    assert rc == 1 and "already exists" in err and "--force" in err
    _one_paragraph(err)
    assert victim.read_text() == PRECIOUS


def test_export_members_refuses_a_linked_folder(capsys, run_folder, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text(PRECIOUS)
    (tmp_path / "link").symlink_to(elsewhere)
    rc, out, err = _cli(
        capsys, "export", str(run_folder), "--format", "members", "-o", str(tmp_path / "link")
    )
    assert rc == 1 and "symbolic link" in err
    _one_paragraph(err)
    assert (elsewhere / "keep.txt").read_text() == PRECIOUS


def test_predict_output_paths(capsys, run_folder, tmp_path):
    npz = str(run_folder.parent / "d.npz")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    rc, out, err = _cli(capsys, "predict", str(run_folder), npz, "-o", str(folder))
    assert rc == 1 and "is a folder" in err
    _one_paragraph(err)
    (tmp_path / "file").write_text("x")
    rc, out, err = _cli(
        capsys, "predict", str(run_folder), npz, "-o", str(tmp_path / "file" / "p.npz")
    )
    assert rc == 1 and "is a file, not a folder" in err
    _one_paragraph(err)
    rc, out, err = _cli(capsys, "predict", str(run_folder), npz, "-o", str(tmp_path / "preds"))
    assert (
        rc == 0 and f"wrote {tmp_path / 'preds.npz'}" in out and (tmp_path / "preds.npz").is_file()
    )
    rc, out, err = _cli(capsys, "predict", str(run_folder), npz, "-o", npz)  # over its own input
    assert rc == 1 and "is an input of this command" in err


def test_report_counts_a_run_once_and_refuses_a_folder_as_csv(capsys, run_folder, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    assert _cli(capsys, "eval", str(run), "--data", str(run_folder.parent / "d.npz"))[0] == 0
    rc, out, err = _cli(capsys, "report", str(run), str(run))
    assert rc == 1 and "is given twice" in err
    _one_paragraph(err)
    rc, out, err = _cli(capsys, "report", str(run), "--csv", str(tmp_path))
    assert rc == 1 and "is a folder" in err
    _one_paragraph(err)


@pytest.mark.parametrize("content", [b"[1, 2]", b"\xff\xfe{}"])
def test_eval_replaces_a_damaged_eval_json(capsys, run_folder, tmp_path, content):
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    (run / "eval.json").write_bytes(content)
    rc, out, err = _cli(capsys, "eval", str(run), "--data", str(run_folder.parent / "d.npz"))
    assert rc == 0, err
    assert isinstance(json.loads((run / "eval.json").read_text()), dict)


# --- images --------------------------------------------------------------------------------


def _png(path: Path, array: np.ndarray, mode: str) -> Path:
    from PIL import Image

    if mode == "I;16":
        Image.frombytes(mode, array.shape[::-1], array.astype("<u2").tobytes()).save(path)
    else:
        Image.fromarray(array, mode).save(path)
    return path


def test_a_16_bit_image_predicts_as_its_8_bit_twin(capsys, run_folder, tmp_path):
    pytest.importorskip("PIL")
    px = np.random.default_rng(0).integers(0, 256, (8, 8)).astype(np.uint8)
    eight = _png(tmp_path / "eight.png", px, "L")
    sixteen = _png(tmp_path / "sixteen.png", px.astype(np.uint16) * 257, "I;16")
    probs = []
    for image in (eight, sixteen):
        rc, out, err = _cli(
            capsys,
            "predict",
            str(run_folder),
            str(image),
            "--data",
            str(run_folder.parent / "d.npz"),
            "--json",
        )
        assert rc == 0, err
        probs.append(json.loads(out)["predictions"][0]["ensemble_probs"])
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-6)


def test_float_palette_and_cmyk_images_by_their_mode(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    from mixc.core.data import DataError
    from mixc.core.imagefolder import open_image

    grey = np.asarray(open_image(_png(tmp_path / "g.png", np.full((4, 4), 51, np.uint8), "L"), 1))
    flt = tmp_path / "f.tiff"
    Image.fromarray(np.full((4, 4), 0.2, np.float32), "F").save(flt)
    np.testing.assert_array_equal(np.asarray(open_image(flt, 1)), grey)
    Image.fromarray(np.full((4, 4), 3.0, np.float32), "F").save(tmp_path / "big.tiff")
    with pytest.raises(DataError, match=r"values outside \[0, 1\]"):
        open_image(tmp_path / "big.tiff", 1)
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert open_image(tmp_path / "c.jpg", 3).mode == "RGB"
    with pytest.raises(DataError, match="is a colour image"):
        open_image(tmp_path / "c.jpg", 1, strict=True)
    Image.new("P", (4, 4)).save(tmp_path / "p.png")
    assert open_image(tmp_path / "p.png", 3).mode == "RGB"


def test_a_decompression_bomb_is_a_data_error_naming_the_file(
    capsys, run_folder, tmp_path, monkeypatch
):
    pytest.importorskip("PIL")
    from PIL import Image

    from mixc.core.data import DataError
    from mixc.core.imagefolder import load_image_folder

    bomb = _png(tmp_path / "bomb.png", np.zeros((64, 64), np.uint8), "L")
    # 4,096 pixels: past twice the limit, an error in Pillow
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    rc, out, err = _cli(
        capsys,
        "predict",
        str(run_folder),
        str(bomb),
        "--data",
        str(run_folder.parent / "d.npz"),
        "--json",
    )
    assert rc == 2 and str(bomb) in err and "decompression-bomb limit" in err
    _one_paragraph(err)
    # past the limit only: Pillow's warning, an error here
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    root = tmp_path / "folder"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        shutil.copy(bomb, root / split / "a" / "x.png")
    with pytest.raises(DataError, match="decompression-bomb limit"):
        load_image_folder(root, [1, 8, 8])


def test_a_corrupt_image_in_a_streamed_folder_is_one_paragraph(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("PIL")
    from mixc.backends.torch.data import folder_loader
    from mixc.core.data import DataError
    from mixc.core.imagefolder import scan

    for split in ("train", "test"):
        (root := tmp_path / "f" / split / "a").mkdir(parents=True)
        _png(root / "ok.png", np.zeros((8, 8), np.uint8), "L")
    bad = tmp_path / "f" / "train" / "a" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    loader = folder_loader(scan(tmp_path / "f").train, [1, 8, 8], train=False, batch=2, workers=1)
    with pytest.raises(DataError) as info:
        list(loader)
    assert str(bad) in str(info.value) and "Original Traceback" not in str(info.value)
    assert "\n" not in str(info.value)


# --- options and API arguments in range -------------------------------------------------------


def test_verify_refuses_members_beyond_the_limit_as_an_option(capsys):
    rc, out, err = _cli(capsys, "verify", "digits", "--members", "1..2000", "--examples", "1")
    assert rc == 2 and "--members 1..2000" in err and "at most 1,024 members" in err
    assert "FAILED invariant" not in out + err


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.optimizer.lr=inf", "finite number"),
        ("train.optimizer.lr=nan", "finite number"),
        ("train.weight_decay=inf", "finite number"),
        ("train.seed=-1", "greater than or equal to 0"),
        ("train.seed=2**40", "less than or equal to 4294967295"),
    ],
)
def test_recipe_numbers_are_finite_and_seeds_in_range(capsys, override, message):
    rc, out, err = _cli(capsys, "check", "digits", "--set", override)
    assert rc == 1 and message in err and "Traceback" not in err


def test_train_and_sweep_seeds_out_of_range(capsys, tmp_path):
    rc, out, err = _cli(
        capsys, "train", "digits", "--seed", str(2**70), "--out", str(tmp_path / "r")
    )
    assert rc == 1 and "4294967295" in err and not (tmp_path / "r").exists()
    _one_paragraph(err)
    rc, out, err = _cli(
        capsys, "sweep", "digits", "--seeds=-1", "--members", "2", "--out", str(tmp_path / "s")
    )
    assert rc == 1 and "a seed is a whole number from 0" in err
    _one_paragraph(err)
    assert not list(tmp_path.rglob("seed--1"))


def test_api_arguments_are_checked_like_the_cli():
    with pytest.raises(TypeError, match="import_paths must be a list of folders"):
        mixc.load("digits", import_paths="/some/dir")
    with pytest.raises(TypeError, match="import_paths must be a list of folders"):
        mixc.compile("digits", import_paths="/some/dir")
    with pytest.raises(TypeError, match="takes the spec's text as a str"):
        mixc.compile_text(None)
    pytest.importorskip("torch")
    from mixc.core.errors import BackendError

    with pytest.raises(BackendError, match="unknown device 'bogus'"):
        mixc.build("digits", device="bogus")


def test_compile_never_writes_over_its_spec(capsys, tmp_path):
    spec = tmp_path / "mine.mix"
    text = (Path(mixc.__file__).parent.parent / "zoo" / "digits.mix").read_text()
    spec.write_text(
        text.replace(
            'import "blocks/', f'import "{Path(mixc.__file__).parent.parent / "zoo"}/blocks/'
        )
    )
    rc, out, err = _cli(
        capsys,
        "compile",
        str(spec),
        "--import-path",
        str(Path(mixc.__file__).parent.parent / "zoo"),
        "-o",
        str(spec),
    )
    assert rc == 1 and "is an input of this command" in err
    assert "import" in spec.read_text()


@pytest.mark.parametrize(
    "override,message",
    [
        ("method=packed(alpha = 1e9)", "more than 16,777,216 channels"),
        ("method=mimo(batch_repetitions = 1e9)", "at most 1,024 repetitions"),
        ("method=naive", "more than numbers in mixc go (1e18)"),  # with backbone.width=100M
    ],
)
def test_method_options_and_counts_stay_within_the_limits(capsys, override, message):
    rc, out, err = _cli(
        capsys,
        "inspect",
        "digits",
        "--set",
        "backbone.width=100M" if "naive" in override else "members=2",
        "--set",
        override,
    )
    assert rc == 1 and message in err and "Traceback" not in err


def test_a_model_larger_than_memory_is_refused_before_allocation(monkeypatch):
    pytest.importorskip("torch")
    import os

    from mixc.core.errors import BackendError

    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name == "SC_PHYS_PAGES" else 4096)  # 4 KiB
    with pytest.raises(BackendError, match="more than this machine's"):
        mixc.build("digits", members=2, backbone__width=8)
