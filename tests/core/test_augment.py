"""Training augmentation: one rule (crop_flip at 32x32, random-resized crop above 32 pixels a side,
none else) for arrays in memory and streamed folders; the in-memory random-resized crop of both
backends."""

import numpy as np
import pytest
from spec_texts import tiny_cnn

from mixc.core.data import default_augment


def test_one_rule_for_memory_and_folders():
    assert default_augment([3, 32, 32]) == "crop_flip"
    assert default_augment([3, 224, 224]) == default_augment([1, 40, 33]) == "random_resized_crop"
    assert (
        default_augment([1, 8, 8])
        == default_augment([3, 32, 64])
        == default_augment([3, 16, 64])
        == "none"
    )
    assert default_augment([3, 100]) == default_augment([64], "vector") == "none"
    pytest.importorskip("PIL")
    from mixc.core.imagefolder import FolderReader, FolderSplit

    split = FolderSplit(None, (), np.zeros(0, np.int64))
    assert FolderReader(split, [3, 40, 40], train=True).random  # the loader follows the same rule
    assert not FolderReader(split, [3, 32, 32], train=True).random
    assert not FolderReader(split, [3, 40, 40], train=False).random
    assert not FolderReader(
        split, [3, 40, 40], train=True, random_crop=False
    ).random  # augment none/crop_flip


def _crop(backend: str):
    """(x, seed, **kw) -> numpy: the backend's in-memory random-resized crop."""
    if backend == "torch":
        torch = pytest.importorskip("torch")
        from mixc.backends.torch.train import random_resized_crop

        return lambda x, seed, **kw: random_resized_crop(
            torch.from_numpy(x), torch.Generator().manual_seed(seed), **kw
        ).numpy()
    jax = pytest.importorskip("jax")
    from mixc.backends.flax.train import random_resized_crop

    # as in the train step; op by op is slow
    jitted = jax.jit(random_resized_crop, static_argnames=("scale", "ratio"))
    return lambda x, seed, **kw: np.asarray(
        jitted(jax.random.key(seed), jax.numpy.asarray(x), **kw)
    )


@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_in_memory_random_resized_crop(backend):
    """Shapes kept, a function of the seed, a resampled window of the image (a full-image crop is
    the image or its mirror), and the crops vary in size and position."""
    crop = _crop(backend)
    x = np.random.default_rng(0).standard_normal((6, 3, 48, 40)).astype(np.float32)
    y = crop(x, 1)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_array_equal(crop(x, 1), y)
    assert not np.allclose(crop(x, 2), y)
    whole = crop(x, 1, scale=(1.0, 1.0), ratio=(40 / 48, 40 / 48))
    for i in range(len(x)):
        assert min(np.abs(whole[i] - x[i]).max(), np.abs(whole[i] - x[i, :, :, ::-1]).max()) < 1e-4
    # on a horizontal ramp (pixel value = its column) bilinear resampling returns each output
    # pixel's source column, clamped to the image: evenly spaced (one zoom per image, at most 1
    # column per pixel: crops of the image upsampled), reversed when flipped
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32), (64, 1, 48, 40)).copy()
    slopes, starts = [], []
    for r in crop(ramp, 3)[:, 0, 0, :]:
        assert r.min() >= 0 and r.max() <= 39
        inside = np.flatnonzero((r > 1e-3) & (r < 39 - 1e-3))  # the clamped columns sit at the ends
        d = np.diff(r[inside])
        assert np.allclose(d, d[0], atol=1e-3) and 0 < abs(d[0]) <= 1 + 1e-5
        slopes.append(round(float(d[0]), 3))
        starts.append(float(r.min()))
    assert len(set(slopes)) > 10 and np.ptp(starts) > 10  # sizes and places vary
    assert min(slopes) < 0 < max(slopes)  # some flipped


def test_folder_crop_falls_back_to_a_window_inside_the_image():
    """After 10 draws that do not fit, the loader takes the central crop clamped to the aspect range
    (a wide image: its full height, 4/3 of it wide), not a box reaching outside the image."""
    pytest.importorskip("PIL")
    from PIL import Image

    from mixc.core.imagefolder import random_resized_crop

    a = np.random.default_rng(0).integers(0, 255, (100, 400), dtype=np.uint8)
    img = Image.fromarray(a)
    out = random_resized_crop(img, (16, 16), np.random.default_rng(0), scale=(1.0, 1.0))
    want = img.resize((16, 16), Image.BILINEAR, box=(133, 0, 266, 100))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


@pytest.mark.parametrize("backend", ["torch", "flax"])
def test_in_memory_images_above_32_train_with_the_random_resized_crop(tmp_path, backend, capsys):
    """A .npz of 40x40 images trains with augment auto = random_resized_crop (recorded in
    config.json)."""
    pytest.importorskip("torch" if backend == "torch" else "jax")
    import json

    from mixc.cli import main

    rng = np.random.default_rng(0)
    y = np.arange(32) % 2
    x = rng.standard_normal((32, 1, 40, 40)).astype(np.float32) + y[:, None, None, None]
    np.savez(tmp_path / "d.npz", x_train=x[:24], y_train=y[:24], x_test=x[24:], y_test=y[24:])
    (tmp_path / "s.mix").write_text(
        tiny_cnn(
            "image(1, 40, 40)",
            2,
            train='    data "d.npz"\n    epochs 1\n    batch 8\n    schedule constant\n',
        )
    )
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(tmp_path / "s.mix"),
                "--backend",
                backend,
                "--threads",
                "1",
                "--no-progress",
                "--no-curves",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (
        json.loads((out / "config.json").read_text())["options"]["augment"] == "random_resized_crop"
    )
