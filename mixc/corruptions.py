"""Common image corruptions at 5 severities, on batches, in pixel space: the CIFAR-C recipe
without the files, so any image test set can be scored as the paper's "Corrupt" columns are.

Deterministic in the seed whichever corruptions are chosen; datasets are normalised, so
:class:`PixelScale` recovers the pixels first. Each corruption's parameters and the differences
from the published files: docs/evaluation.md.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixc.core.data import DataError, Dataset

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "corrupt",
    "parse_corruptions",
    "PixelScale",
    "pixel_scale",
    "CifarC",
    "load_cifar_c",
    "CIFAR_C",
]

SEVERITIES = (1, 2, 3, 4, 5)


# ---------------------------------------------------------------------------
# Helpers on [N, C, H, W]


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0)


def _correlate2d(x: np.ndarray, kernel: np.ndarray, mode: str) -> np.ndarray:
    """Same-size 2-D correlation of every image plane with ``kernel`` (odd sides), padded by
    ``mode``."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    h, w = x.shape[-2:]
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "symmetric"  # tiny images: numpy's reflect needs pad < size
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), mode=mode)
    out = np.zeros_like(x)
    for a in range(kh):
        for b in range(kw):
            if kernel[a, b] != 0.0:
                out += kernel[a, b] * xp[:, :, a : a + h, b : b + w]
    return out


def _gaussian_1d(sigma: float, radius: int) -> np.ndarray:
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def _box_matrix(n_in: int, n_out: int) -> np.ndarray:
    """PIL's BOX resampling from ``n_in`` to ``n_out`` samples as an ``[n_out, n_in]`` matrix.

    Follows Pillow's ``precompute_coeffs``: output sample ``i`` is centred at
    ``(i + 0.5) * n_in / n_out`` and averages the inputs its box covers (the
    box is one input wide when upsampling), weights normalised to sum 1.
    """
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        for j in range(lo, hi):
            t = (j - center + 0.5) / filterscale
            m[i, j] = 1.0 if -0.5 < t <= 0.5 else 0.0
        total = m[i].sum()
        if total:
            m[i] /= total
    return m


# ---------------------------------------------------------------------------
# The corruptions: f(x in [0,1] float64 [N, C, H, W], severity 1..5, rng) -> same shape


def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    s = (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1]
    return _clip(x + rng.normal(0.0, s, size=x.shape))


def shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    lam = (500, 250, 100, 75, 50)[severity - 1]
    return _clip(rng.poisson(x * lam) / lam)


def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    amount = (0.01, 0.02, 0.03, 0.05, 0.07)[severity - 1]
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    return np.where(hit, salt.astype(x.dtype), x)


def speckle_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    s = (0.06, 0.1, 0.12, 0.16, 0.2)[severity - 1]
    return _clip(x + x * rng.normal(0.0, s, size=x.shape))


def _disk_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """Hendrycks' ``disk``: a normalised disk, smoothed by a 3x3 Gaussian (cv2.GaussianBlur, ksize
    3)."""
    r0 = int(math.floor(radius))
    t = np.arange(-r0, r0 + 1)
    yy, xx = np.meshgrid(t, t, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    g = _gaussian_1d(alias_sigma, 1)
    g2 = np.outer(g, g)
    n = disk.shape[0] + 2
    out = np.zeros((n, n))
    for a in range(3):  # full convolution: the smoothed disk spreads one pixel further
        for b in range(3):
            out[a : a + disk.shape[0], b : b + disk.shape[1]] += g2[a, b] * disk
    return out


def defocus_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, alias = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))[severity - 1]
    return _clip(_correlate2d(x, _disk_kernel(radius, alias), mode="reflect"))


def gaussian_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = (0.4, 0.6, 0.7, 0.8, 1.0)[severity - 1]
    g = _gaussian_1d(sigma, int(4.0 * sigma + 0.5))
    x = _correlate2d(x, g[:, None], mode="edge")
    return _clip(_correlate2d(x, g[None, :], mode="edge"))


def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1]
    m = x.mean(axis=(2, 3), keepdims=True)
    return _clip((x - m) * c + m)


def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """HSV value + c with hue and saturation kept: every channel scales by v'/v (black becomes grey
    v')."""
    c = (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1]
    v = x.max(axis=1, keepdims=True)
    v_new = np.clip(v + c, 0.0, 1.0)
    safe = np.where(v > 0, v, 1.0)
    return _clip(np.where(v > 0, x * (v_new / safe), v_new))


def pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    f = (0.95, 0.9, 0.85, 0.75, 0.65)[severity - 1]
    h, w = x.shape[-2:]
    sh, sw = max(1, int(h * f)), max(1, int(w * f))
    rows = _box_matrix(sh, h) @ _box_matrix(h, sh)  # [h, h]: down then up
    cols = _box_matrix(sw, w) @ _box_matrix(w, sw)
    return _clip(np.einsum("ij,ncjk,lk->ncil", rows, x, cols))


def jpeg(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = (80, 65, 58, 50, 40)[severity - 1]
    try:
        from PIL import Image
    except ImportError as e:
        raise DataError(
            f"the jpeg corruption needs Pillow, which is not importable here ({e}); hint: pip"
            " install pillow (it comes with the plot extra: pip install 'mixc[plot]'), or leave"
            " jpeg out of --corruptions"
        ) from e
    pixels = np.round(_clip(x) * 255.0).astype(np.uint8)  # [N, C, H, W]
    n, c = pixels.shape[:2]
    out = np.empty_like(pixels)

    def roundtrip(img: np.ndarray, mode: str) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(img, mode=mode).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        return np.asarray(Image.open(buf).convert(mode))

    for i in range(n):
        if c == 3:
            out[i] = roundtrip(np.ascontiguousarray(pixels[i].transpose(1, 2, 0)), "RGB").transpose(
                2, 0, 1
            )
        else:
            for ch in range(c):
                out[i, ch] = roundtrip(np.ascontiguousarray(pixels[i, ch]), "L")
    return out.astype(np.float64) / 255.0


CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "defocus_blur": defocus_blur,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
    "jpeg": jpeg,
}


def parse_corruptions(text: str | None) -> list[str]:
    """``all`` (or None) -> every corruption; else a comma-separated list, checked against the
    names."""
    if text is None or text.strip().lower() in ("", "all"):
        return list(CORRUPTIONS)
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    names = ["jpeg" if n == "jpeg_compression" else n for n in names]  # the CIFAR-C file name
    bad = [n for n in names if n not in CORRUPTIONS]
    if bad:
        raise DataError(
            f"unknown corruption(s) {', '.join(bad)}; choose from {', '.join(CORRUPTIONS)} (or all)"
        )
    return list(dict.fromkeys(names))


def corrupt(x: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt a batch of pixels ``x`` ``[N, C, H, W]`` in ``[0, 1]``; float32 in ``[0, 1]``,
    deterministic in ``seed``."""
    if name not in CORRUPTIONS:
        raise DataError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise DataError(f"severity must be one of 1..5, not {severity}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 4:
        raise DataError(
            f"corruptions apply to images [N, C, H, W]; got an array of shape {list(x.shape)}; "
            "hint: --corruptions needs an image dataset"
        )
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode()), int(severity)])
    return CORRUPTIONS[name](x, severity, rng).astype(np.float32)


# ---------------------------------------------------------------------------
# Pixel space <-> the model's input


@dataclass(frozen=True)
class PixelScale:
    """``model input = (pixels - mean) / std`` per channel (axis 1), pixels in ``[0, 1]``."""

    mean: np.ndarray  # [C]
    std: np.ndarray  # [C]
    how: str  # for reports: how the scale was found

    def _shape(self, v: np.ndarray, ndim: int) -> np.ndarray:
        return v.reshape((1, -1) + (1,) * (ndim - 2))

    def to_pixels(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x * self._shape(self.std, x.ndim) + self._shape(self.mean, x.ndim), 0.0, 1.0)

    def from_pixels(self, x: np.ndarray) -> np.ndarray:
        return ((x - self._shape(self.mean, x.ndim)) / self._shape(self.std, x.ndim)).astype(
            np.float32
        )


def pixel_scale(dataset: Dataset) -> PixelScale:
    """How ``dataset``'s images map to pixels in ``[0, 1]``, so corruptions can act on pixels.

    - A dataset carrying ``mean``/``std`` attributes: those.
    - ``digits``, ``cifar10``, ``cifar100``: ``mixc.core.data`` scales pixels to
      ``[0, 1]`` and normalises per channel with the train split's mean/std;
      both extremes 0 and 1 occur in every channel of those train sets, so the
      train split's per-channel minimum and maximum give the scale back exactly
      (``std = 1 / (max - min)``, ``mean = -min * std``).
    - a ``.npz`` (used as stored): pixels already in ``[0, 1]``, or in
      ``[0, 255]`` (then divided by 255); anything else is refused.
    """
    x = dataset.x_train
    if x.ndim != 4:
        raise DataError(
            f"corruptions apply to images [N, C, H, W], but dataset {dataset.name!r} holds samples"
            f" of shape {list(x.shape[1:])}; hint: --corruptions needs an image dataset"
        )
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    if mean is not None and std is not None:
        return PixelScale(
            np.asarray(mean, np.float64).reshape(-1),
            np.asarray(std, np.float64).reshape(-1),
            "stored",
        )
    axes = (0, 2, 3)
    lo = x.min(axis=axes).astype(np.float64)
    hi = x.max(axis=axes).astype(np.float64)
    if dataset.name in ("digits", "cifar10", "cifar100"):
        span = np.where(hi > lo, hi - lo, 1.0)
        std = 1.0 / span
        return PixelScale(-lo * std, std, "recovered from the normalised train split's range")
    if lo.min() >= 0.0 and hi.max() <= 1.0:
        c = x.shape[1]
        return PixelScale(np.zeros(c), np.ones(c), "stored as pixels in [0, 1]")
    if lo.min() >= 0.0 and hi.max() <= 255.0:
        c = x.shape[1]
        return PixelScale(np.zeros(c), np.full(c, 1.0 / 255.0), "stored as pixels in [0, 255]")
    raise DataError(
        f"dataset {dataset.name!r} holds values in [{lo.min():.3g}, {hi.max():.3g}]: corruptions"
        " act on pixels, and these are neither in [0, 1] nor in [0, 255]; hint: store raw pixels"
        " in the .npz (and normalise inside the model), or evaluate on digits/cifar10/cifar100,"
        " whose scale mixc knows"
    )


# ---------------------------------------------------------------------------
# The published CIFAR-10-C / CIFAR-100-C files

#: --data name -> (folder name in the data folder, the clean dataset it corrupts)
CIFAR_C = {"cifar10c": ("CIFAR-10-C", "cifar10"), "cifar100c": ("CIFAR-100-C", "cifar100")}
_CIFAR_C_HINT = (
    "download it from https://zenodo.org/record/2535967 (CIFAR-10-C) or /record/3555552"
    " (CIFAR-100-C)"
)
_CIFAR_C_PER_SEVERITY = 10000


@dataclass(frozen=True)
class CifarC:
    """A folder of ``<corruption>.npy`` ``[50000, 32, 32, 3]`` uint8 (severity 1 first) and
    ``labels.npy``."""

    name: str  # cifar10c / cifar100c
    folder: Path
    corruptions: list[str]
    labels: np.ndarray  # [50000]
    clean: str  # cifar10 / cifar100

    def severities(self, corruption: str) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(severity, pixels float32 [N, 3, 32, 32] in [0, 1], labels) for severities 1..5, read
        lazily."""
        path = self.folder / f"{corruption}.npy"
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:
            raise DataError(
                f"cannot read {path} as a .npy array ({e}); hint: {_CIFAR_C_HINT}"
            ) from e
        if arr.ndim != 4 or arr.shape[1:] != (32, 32, 3) or arr.shape[0] != len(self.labels):
            raise DataError(
                f"{path} has shape {list(arr.shape)}; expected [{len(self.labels)}, 32, 32, 3] like"
                f" labels.npy; hint: {_CIFAR_C_HINT}"
            )
        per = len(self.labels) // len(SEVERITIES)
        for s in SEVERITIES:
            part = np.asarray(arr[(s - 1) * per : s * per], dtype=np.float32) / 255.0
            yield (
                s,
                np.ascontiguousarray(part.transpose(0, 3, 1, 2)),
                self.labels[(s - 1) * per : s * per],
            )


def load_cifar_c(name: str, data_dir: str | Path | None) -> CifarC:
    """Find the published CIFAR-C files for ``name`` (cifar10c/cifar100c) under ``data_dir``."""
    import os

    folder_name, clean = CIFAR_C[name]
    root = Path(data_dir if data_dir is not None else os.environ.get("MIXC_DATA_DIR", "data"))
    folder = root if (root / "labels.npy").is_file() else root / folder_name
    if not (folder / "labels.npy").is_file():
        raise DataError(
            f"{name}: no {folder_name}/labels.npy under {root} (nor labels.npy in it); expected the"
            f" folder of <corruption>.npy files and labels.npy; hint: {_CIFAR_C_HINT}, unpack it"
            f" into {root}, and pass --data-dir"
        )
    try:
        labels = np.load(folder / "labels.npy", allow_pickle=False).astype(np.int64)
    except Exception as e:
        raise DataError(f"cannot read {folder / 'labels.npy'} ({e}); hint: {_CIFAR_C_HINT}") from e
    if labels.ndim != 1 or len(labels) % len(SEVERITIES):
        raise DataError(
            f"{folder / 'labels.npy'} has shape {list(labels.shape)}; expected [5 * N] (N per"
            " severity)"
        )
    found = sorted(p.stem for p in folder.glob("*.npy") if p.stem != "labels")
    if not found:
        raise DataError(
            f"{folder} holds labels.npy but no <corruption>.npy files; hint: {_CIFAR_C_HINT}"
        )
    return CifarC(name, folder, found, labels, clean)
