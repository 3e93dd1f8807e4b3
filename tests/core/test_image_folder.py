"""Image folders: the scan, the transforms, training from PNGs on both backends, a spec's relative
data path."""

import json
from pathlib import Path

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402
from spec_texts import tiny_cnn  # noqa: E402

from mixc.core.data import DataError, load_dataset  # noqa: E402
from mixc.core.imagefolder import FolderReader, random_resized_crop, resize_center_crop, scan  # noqa: E402

SPEC = tiny_cnn(
    "image(1, 8, 8)",
    2,
    train=(
        '    data "imgs"\n    epochs 2\n    batch 16\n'
        "    optimizer sgd(lr = 0.05, momentum = 0.9)\n    schedule constant\n"
    ),
)


def make_folder(root: Path, splits=("train", "val"), n=12, size=8, mode="L") -> Path:
    """Two classes of PNGs: bright-left vs bright-right squares with noise (learnable, tiny)."""
    rng = np.random.default_rng(0)
    for split in splits:
        for k, name in enumerate(["left", "right"]):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 60, (size, size), dtype=np.uint8)
                if k == 0:
                    a[:, : size // 2] += 180
                else:
                    a[:, size // 2 :] += 180
                img = Image.fromarray(a, "L").convert(mode)
                img.save(d / f"{i}.png")
    return root


def test_scan_layout_and_errors(tmp_path):
    f = scan(make_folder(tmp_path / "a", ("train", "val", "test"), n=3))
    assert f.classes == ("left", "right") and len(f.train.paths) == 6 and f.val is not None
    assert list(f.test.labels) == [0, 0, 0, 1, 1, 1]
    only_val = scan(make_folder(tmp_path / "b", ("train", "val"), n=2))
    # ImageNet layout: val/ is the reported set
    assert only_val.val is None and len(only_val.test.paths) == 4
    make_folder(tmp_path / "c", ("train",), n=1)
    with pytest.raises(DataError, match="neither val/ nor test/"):
        scan(tmp_path / "c")
    (tmp_path / "b" / "val" / "cat").mkdir()
    (tmp_path / "b" / "val" / "cat" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="not in"):
        scan(tmp_path / "b")


def test_transforms_shapes():
    img = Image.fromarray(np.zeros((300, 400, 3), np.uint8))
    assert resize_center_crop(img, (224, 224)).size == (224, 224)
    rng = np.random.default_rng(0)
    assert all(random_resized_crop(img, (224, 224), rng).size == (224, 224) for _ in range(5))


def test_reader_normalises_rgb(tmp_path):
    f = scan(make_folder(tmp_path / "rgb", n=1, size=80, mode="RGB"))
    x, y = FolderReader(f.train, [3, 72, 72], train=True).get(0, np.random.default_rng(1))
    assert x.shape == (3, 72, 72) and x.dtype == np.float32 and y == 0
    assert -2.2 < x.min() and x.max() < 2.7  # ImageNet mean/std


def test_in_memory_load(tmp_path):
    ds = load_dataset(str(make_folder(tmp_path / "f", n=4)), input_shape=[1, 8, 8])
    assert ds.x_train.shape == (8, 1, 8, 8) and ds.x_test.shape == (8, 1, 8, 8) and ds.classes == 2
    with pytest.raises(DataError, match="image folder"):
        load_dataset(str(tmp_path / "f"))


@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_image_folder_trains_two_epochs_from_another_folder(tmp_path, monkeypatch, backend):
    """The spec says data "imgs": it resolves from the spec's folder, not the current one; the run
    records it."""
    pytest.importorskip("torch" if backend == "torch" else "jax")
    from mixc.cli import main
    from mixc.core.run_read import read_metrics

    proj = tmp_path / "proj"
    make_folder(proj / "imgs")
    (proj / "tiny.mix").write_text(SPEC)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code = main(
        [
            "train",
            str(proj / "tiny.mix"),
            "--backend",
            backend,
            "--threads",
            "1",
            "--no-progress",
            "--out",
            "run",
        ]
    )
    assert code == 0
    lines = read_metrics(elsewhere / "run")
    assert [m.epoch for m in lines] == [1, 2] and lines[-1].accuracy is not None
    recipe = json.loads((elsewhere / "run" / "config.json").read_text())["recipe"]
    assert recipe["data"] == str((proj / "imgs").resolve())
    # evaluated from a third folder: the recorded absolute path is found
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(elsewhere / "run"), "--json", "--no-save", "--threads", "1"]) == 0


@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_streamed_folder_trains_and_resumes_exactly(tmp_path, backend):
    """--stream: batches come from the loader (torch: DataLoader workers); two epochs, then a
    resumed third equals an uninterrupted three-epoch run (per-sample seeds, the same permutation
    rule)."""
    pytest.importorskip("torch" if backend == "torch" else "jax")
    from mixc.cli import main
    from mixc.core.run_read import read_metrics

    data = make_folder(tmp_path / "imgs", ("train", "val", "test"), n=10)
    (tmp_path / "tiny.mix").write_text(SPEC.replace("epochs 2", "epochs 3"))
    common = [
        str(tmp_path / "tiny.mix"),
        "--backend",
        backend,
        "--threads",
        "1",
        "--no-progress",
        "--stream",
        "--workers",
        "1" if backend == "torch" else "0",
        "--data",
        str(data),
        "--no-curves",
    ]
    assert main(["train", *common, "--out", str(tmp_path / "full")]) == 0
    assert main(["train", *common, "--epochs", "2", "--out", str(tmp_path / "part")]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "part")]) == 0
    full, part = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert all(m.val_nll is not None for m in full) and full[-1].accuracy is not None
    assert [m.train_loss for m in full] == [m.train_loss for m in part]
    assert full[-1].val_nll == part[-1].val_nll


def test_streamed_val_fraction_holds_out_the_in_memory_split(tmp_path):
    """--val-fraction on a streamed folder splits its file list by the in-memory rule: the same
    images held out, read with the evaluation transform; a folder with its own val/ still refuses
    it."""
    from mixc.core.data import split_validation
    from mixc.core.imagefolder import iter_batches

    root = make_folder(tmp_path / "imgs", ("train", "test"), n=10)
    memory = split_validation(load_dataset(str(root), input_shape=[1, 8, 8]), 0.3, seed=4)
    streamed = split_validation(
        load_dataset(str(root), input_shape=[1, 8, 8], stream=True), 0.3, seed=4
    )
    assert len(streamed.folder.val.paths) == 6 and len(streamed.folder.train.paths) == 14
    assert not set(streamed.folder.val.paths) & set(streamed.folder.train.paths)
    np.testing.assert_array_equal(streamed.y_val, memory.y_val)
    np.testing.assert_array_equal(streamed.y_train, memory.y_train)
    x_val = np.concatenate(
        [x for x, _ in iter_batches(streamed.folder.val, [1, 8, 8], train=False, batch=4)]
    )
    np.testing.assert_array_equal(x_val, memory.x_val)  # the evaluation transform, as in memory
    assert "6 of the train images held out" in streamed.description
    other = split_validation(
        load_dataset(str(root), input_shape=[1, 8, 8], stream=True), 0.3, seed=5
    )
    assert set(other.folder.val.paths) != set(streamed.folder.val.paths)  # seeded
    own_val = make_folder(tmp_path / "withval", ("train", "val", "test"), n=2)
    with pytest.raises(DataError, match="own validation split"):
        split_validation(
            load_dataset(str(own_val), input_shape=[1, 8, 8], stream=True), 0.3, seed=0
        )


def test_streamed_training_with_val_fraction(tmp_path):
    """A streamed folder without val/ trains with --val-fraction: validation metrics each epoch, a
    best checkpoint."""
    pytest.importorskip("torch")
    from mixc.cli import main
    from mixc.core.run_read import read_metrics

    data = make_folder(tmp_path / "imgs", ("train", "test"), n=16)
    (tmp_path / "tiny.mix").write_text(SPEC)
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(tmp_path / "tiny.mix"),
                "--threads",
                "1",
                "--no-progress",
                "--no-curves",
                "--stream",
                "--workers",
                "0",
                "--data",
                str(data),
                "--val-fraction",
                "0.25",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    lines = read_metrics(out)
    assert all(m.val_nll is not None and m.val_accuracy is not None for m in lines)
    assert lines[0].accuracy is None and lines[-1].accuracy is not None
    assert (out / "best.safetensors").is_file()
