"""Corruptions: deterministic in the seed, inside [0, 1], each doing what it says; pixel scale round
trip."""

import numpy as np
import pytest

from mixc.core.data import DataError, Dataset
from mixc.corruptions import (
    CORRUPTIONS,
    PixelScale,
    _box_matrix,
    _disk_kernel,
    corrupt,
    load_cifar_c,
    parse_corruptions,
    pixel_scale,
)


def _images(n=6, c=3, h=16, w=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, c, h, w))
    x[0] = 0.0  # a black image
    x[1] = 1.0  # a white one
    return x.astype(np.float32)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_corruption_is_deterministic_and_in_range(name):
    if name == "jpeg":
        pytest.importorskip("PIL")
    x = _images()
    for s in (1, 3, 5):
        a = corrupt(x, name, s, seed=7)
        b = corrupt(x, name, s, seed=7)
        assert a.shape == x.shape and a.dtype == np.float32
        assert np.array_equal(a, b)
        assert a.min() >= 0.0 and a.max() <= 1.0
        assert np.isfinite(a).all()
    # Stronger severity moves the images further (on average), for every corruption.
    d1 = np.abs(corrupt(x, name, 1, 0) - x).mean()
    d5 = np.abs(corrupt(x, name, 5, 0) - x).mean()
    assert d5 >= d1


def test_noise_depends_on_the_seed_and_not_on_the_selection():
    x = _images()
    assert not np.array_equal(
        corrupt(x, "gaussian_noise", 3, 0), corrupt(x, "gaussian_noise", 3, 1)
    )
    assert not np.array_equal(
        corrupt(x, "gaussian_noise", 2, 0), corrupt(x, "gaussian_noise", 3, 0)[:0].sum() + x
    )


def test_one_channel_and_odd_sizes_work():
    pytest.importorskip("PIL")  # jpeg is among the corruptions
    x = _images(n=3, c=1, h=8, w=8)
    for name in CORRUPTIONS:
        y = corrupt(x, name, 5, 0)
        assert y.shape == x.shape and 0.0 <= y.min() and y.max() <= 1.0
    x5 = _images(n=2, c=5, h=7, w=9)  # five channels: jpeg goes channel by channel
    assert corrupt(x5, "jpeg", 3).shape == x5.shape
    assert corrupt(x5, "pixelate", 5).shape == x5.shape


def test_what_each_corruption_does():
    x = _images()
    # contrast keeps each image's per-channel mean (nothing clips at c < 1 around the mean)
    y = corrupt(x, "contrast", 5).astype(np.float64)
    np.testing.assert_allclose(y.mean(axis=(2, 3)), x.mean(axis=(2, 3)), atol=1e-5)
    assert y.std() < x.std()
    # brightness: black becomes grey v = 0.3 at severity 5; white stays white; hue ratios kept
    y = corrupt(x, "brightness", 5)
    np.testing.assert_allclose(y[0], 0.3, atol=1e-6)
    np.testing.assert_allclose(y[1], 1.0)
    r = x[2:] / x[2:].max(axis=1, keepdims=True)
    np.testing.assert_allclose(y[2:] / y[2:].max(axis=1, keepdims=True), r, rtol=1e-4)
    # blurs preserve constant images and averages; impulse sets values to exactly 0 or 1
    for name in ("gaussian_blur", "defocus_blur", "pixelate"):
        np.testing.assert_allclose(corrupt(x, name, 5)[1], 1.0, atol=1e-6)
        assert np.abs(corrupt(x, name, 5) - x)[2:].mean() > 0.01
    y = corrupt(x, "impulse_noise", 5)
    changed = y != x
    assert set(np.unique(y[changed])) <= {0.0, 1.0}
    # about 7% of values hit (half of them to their own extreme)
    assert 0.02 < changed[2:].mean() < 0.12
    # shot noise keeps black black
    assert corrupt(x, "shot_noise", 5)[0].max() == 0.0


def test_disk_kernel_matches_hendrycks():
    # radius 0.3: the disk is one pixel; smoothing spreads it over 3x3 as a Gaussian of sigma 0.4
    k = _disk_kernel(0.3, 0.4)
    assert k.shape == (3, 3) and k.sum() == pytest.approx(1.0)
    g = np.exp(-0.5 / 0.16)
    g1 = np.array([g, 1.0, g]) / (1 + 2 * g)
    np.testing.assert_allclose(k, np.outer(g1, g1))
    # radius 1.5 covers the 3x3 square (2 <= 2.25), then spreads to 5x5
    assert _disk_kernel(1.5, 0.1).shape == (5, 5)


def test_box_matrix_matches_pillow():
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for a, b in ((32, 30), (32, 20), (8, 7), (8, 5), (7, 8), (20, 32)):
        img = rng.random((3, a)).astype(np.float32)
        want = np.asarray(Image.fromarray(img, mode="F").resize((b, 3), Image.BOX))
        np.testing.assert_allclose(img @ _box_matrix(a, b).T, want, atol=1e-6)


def test_parse_corruptions():
    assert parse_corruptions(None) == list(CORRUPTIONS)
    assert parse_corruptions("all") == list(CORRUPTIONS)
    assert parse_corruptions("contrast, jpeg_compression,contrast") == ["contrast", "jpeg"]
    with pytest.raises(DataError, match="unknown corruption"):
        parse_corruptions("fog")
    with pytest.raises(DataError, match="severity"):
        corrupt(_images(), "contrast", 6)
    with pytest.raises(DataError, match="images"):
        corrupt(np.zeros((4, 10)), "contrast", 1)


def _normalised(name, x):
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    std = x.std(axis=(0, 2, 3), keepdims=True)
    return (
        Dataset(
            name,
            ((x - mean) / std).astype(np.float32),
            np.zeros(len(x), np.int64),
            ((x[:3] - mean) / std).astype(np.float32),
            np.zeros(3, np.int64),
            2,
            "test",
        ),
        mean,
        std,
    )


def test_pixel_scale_recovers_the_normalisation():
    x = _images(n=8)
    ds, mean, std = _normalised("cifar10", x)
    s = pixel_scale(ds)
    np.testing.assert_allclose(s.mean, mean.ravel(), rtol=1e-5)
    np.testing.assert_allclose(s.std, std.ravel(), rtol=1e-5)
    np.testing.assert_allclose(s.to_pixels(ds.x_test), x[:3], atol=1e-5)
    np.testing.assert_allclose(s.from_pixels(s.to_pixels(ds.x_test)), ds.x_test, atol=1e-5)


def test_pixel_scale_of_npz_data():
    x = _images(n=4)
    raw = Dataset("mine", x, np.zeros(4, np.int64), x, np.zeros(4, np.int64), 2, "")
    assert pixel_scale(raw).std.tolist() == [1.0, 1.0, 1.0]
    bytes_ = Dataset("mine", x * 255, np.zeros(4, np.int64), x * 255, np.zeros(4, np.int64), 2, "")
    np.testing.assert_allclose(pixel_scale(bytes_).to_pixels(bytes_.x_test), x, atol=1e-6)
    ds, _, _ = _normalised("mine", x)
    with pytest.raises(DataError, match="neither in \\[0, 1\\] nor in \\[0, 255\\]"):
        pixel_scale(ds)
    vec = Dataset(
        "v",
        np.zeros((4, 5), np.float32),
        np.zeros(4, np.int64),
        np.zeros((2, 5), np.float32),
        np.zeros(2, np.int64),
        2,
        "",
    )
    with pytest.raises(DataError, match="image"):
        pixel_scale(vec)
    assert isinstance(PixelScale(np.zeros(1), np.ones(1), "x"), PixelScale)


def test_cifar_c_files(tmp_path):
    with pytest.raises(DataError, match="CIFAR-10-C"):
        load_cifar_c("cifar10c", tmp_path)
    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    labels = np.tile(np.arange(4) % 10, 5)
    np.save(folder / "labels.npy", labels)
    px = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    np.save(folder / "fog.npy", px)
    cc = load_cifar_c("cifar10c", tmp_path)
    assert cc.corruptions == ["fog"]
    parts = list(cc.severities("fog"))
    assert [s for s, _, _ in parts] == [1, 2, 3, 4, 5]
    s, x, y = parts[2]
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x, px[8:12].transpose(0, 3, 1, 2) / 255.0)
    np.save(folder / "snow.npy", px[:10])
    with pytest.raises(DataError, match="shape"):
        list(load_cifar_c("cifar10c", folder).severities("snow"))
