"""Image folders (the ImageNet layout), framework-free: the scan, the class mapping, Pillow
decoding, transforms.

Layout (detected automatically: a folder holding ``train/`` whose subfolders hold images)::

    DIR/train/<class>/*.{png,jpg,jpeg,bmp,webp}
    DIR/val/<class>/...     (optional) the validation set
    DIR/test/<class>/...    (optional) the test set

Classes are the ``train/`` subfolder names, sorted (label i = the i-th name); ``val/`` and ``test/``
may hold a subset of them. With ``val/`` but no ``test/`` (ImageNet's own layout: its labelled "val"
is the set everybody reports), ``val/`` is the test set and a validation set can still be held out
with ``--val-fraction``; with both, ``val/`` validates and ``test/`` tests.

Transforms (numpy/Pillow, so both backends see the same pixels): training images get a
random-resized crop (scale 0.08-1, aspect 3/4-4/3) and a horizontal flip when both sides of the
input exceed 32 pixels, or pad-4 crop and flip at 32x32 (applied by the backend's ``crop_flip``),
the rule of ``mixc.core.data.default_augment`` that arrays in memory follow too; evaluation images
are resized (shorter side to size * 256/224) and center-cropped. Pixels are scaled to [0, 1] and
normalised per channel with ImageNet's mean/std (RGB) or 0.5/0.25 (grey), fixed constants so a
streamed batch and an in-memory one are the same numbers.

A torch ``DataLoader`` (worker processes, pinned memory) wraps :class:`FolderReader` in
``backends/torch/data.py``; small folders are decoded once into memory (:func:`load_image_folder`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixc.core.dataset import DataError, Dataset, default_augment

__all__ = [
    "is_image_folder",
    "scan",
    "ImageFolder",
    "FolderSplit",
    "FolderReader",
    "load_image_folder",
    "random_resized_crop",
    "resize_center_crop",
    "EXTENSIONS",
]

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = (0.5,), (0.25,)
#: decoded arrays above this many bytes are refused for the in-memory path (MIXC_IMAGE_MEMORY
#: overrides)
MEMORY_LIMIT = 4 << 30


@dataclass(frozen=True)
class FolderSplit:
    """One split of an image folder: image paths and their labels."""

    root: Path
    paths: tuple[Path, ...]
    labels: np.ndarray  # int64 [N]


@dataclass(frozen=True)
class ImageFolder:
    """A scanned image folder: class names (label order) and its splits."""

    root: Path
    classes: tuple[str, ...]
    train: FolderSplit
    val: FolderSplit | None
    test: FolderSplit | None


def _class_dirs(split: Path) -> list[Path]:
    return sorted(p for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))


def is_image_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding ``train/`` with class subfolders (the ImageNet
    layout)."""
    train = Path(path) / "train"
    return train.is_dir() and bool(_class_dirs(train))


def _split(root: Path, classes: tuple[str, ...]) -> FolderSplit:
    """Every image under ``root/<class>/``; a class folder the training set lacks is an error."""
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for d in _class_dirs(root):
        if d.name not in index:
            raise DataError(
                f"{d}: class folder {d.name!r} is not in {root.parent / 'train'}; hint: every class"
                " of val/ and test/ must also be a folder of train/ (labels follow train/'s names)"
            )
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())
        paths += files
        labels += [index[d.name]] * len(files)
    if not paths:
        raise DataError(
            f"{root}: no images ({', '.join(EXTENSIONS)}) in its class folders; hint: put each "
            "class's images in root/<class>/"
        )
    return FolderSplit(root, tuple(paths), np.asarray(labels, dtype=np.int64))


def scan(path: str | os.PathLike) -> ImageFolder:
    """Scan ``path`` (see the module doc for the layout); DataError naming what is missing."""
    root = Path(path).expanduser()
    if not is_image_folder(root):
        raise DataError(
            f"{root} is not an image folder: expected {root}/train/<class>/<images> and "
            f"{root}/val/ or {root}/test/ laid out the same (the ImageNet layout)"
        )
    classes = tuple(d.name for d in _class_dirs(root / "train"))
    val = _split(root / "val", classes) if (root / "val").is_dir() else None
    test = _split(root / "test", classes) if (root / "test").is_dir() else None
    if val is None and test is None:
        raise DataError(
            f"{root} has train/ but neither val/ nor test/; hint: add a val/ or test/ folder of "
            "the same class folders (a model must be scored on images it did not train on)"
        )
    if test is None:  # ImageNet's layout: its val/ is the reported set
        val, test = None, val
    return ImageFolder(root, classes, _split(root / "train", classes), val, test)


# ---------------------------------------------------------------------------
# Decoding and transforms (Pillow images in, float32 CHW out)


#: modes converted as Pillow does (alpha dropped, palette expanded, CMYK and YCbCr to RGB)
_AS_GREY = {"1": "L", "L": "L", "LA": "L", "La": "L"}
_AS_COLOUR = {
    "RGB": "RGB",
    "RGBA": "RGB",
    "RGBX": "RGB",
    "RGBa": "RGB",
    "CMYK": "RGB",
    "YCbCr": "RGB",
}


def _wide_grey(img, path: Path):  # -> PIL.Image.Image in mode L
    """A 16-bit, 32-bit integer or float greyscale image as 8 bits, scaled by its format's range
    (Pillow's own ``convert("L")`` clips such values at 255, so a 16-bit image came out nearly
    white)."""
    from PIL import Image

    a = np.asarray(img)
    if img.mode.startswith("I;16") or img.mode == "I":
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DataError(
                f"{path}: a 32-bit integer image with values outside 0..65535 (mode {img.mode}), "
                "whose scale mixc cannot tell; hint: save it as an 8- or 16-bit PNG"
            )
        a = a.astype(np.float64) / 65535.0
    else:  # "F": 32-bit float
        if a.size and not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
            raise DataError(
                f"{path}: a floating-point image (mode F) with values outside [0, 1] (or not"
                " finite); mixc reads float images as intensities in [0, 1]; hint: rescale it, or"
                " save it as an 8- or 16-bit PNG"
            )
    return Image.fromarray(np.round(a * 255.0).astype(np.uint8), "L")


def open_image(path: Path, channels: int, strict: bool = False):  # -> PIL.Image.Image
    """Open an image as RGB (3 channels) or greyscale (1), every mode handled explicitly: 16-bit and
    float greyscale scaled by their range, palette, alpha, CMYK and YCbCr converted, others
    refused with the reason.

    ``strict``: a colour image for a grey model (or the reverse) is refused instead of converted.
    Images beyond Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) are refused before
    decoding. Every problem is a DataError naming the file.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # a warning below the hard limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                mode = img.mode
                if mode in ("P", "PA"):
                    img = img.convert(
                        "RGBA" if mode == "PA" or "transparency" in img.info else "RGB"
                    )
                if img.mode in ("I", "F") or img.mode.startswith("I;16"):
                    img = _wide_grey(img, path)
                target = _AS_GREY.get(img.mode) or _AS_COLOUR.get(img.mode)
                if target is None:
                    raise DataError(
                        f"{path}: images of mode {img.mode} are not read by mixc (it reads grey,"
                        " RGB, palette, CMYK and YCbCr images, 8 or 16 bits); hint: save it as a"
                        " PNG in RGB or greyscale"
                    )
                img = img.convert(target)
                have = 1 if target == "L" else 3
                if strict and have != channels:
                    kind = "grey" if have == 1 else "colour"
                    want = {1: "grey (one channel)", 3: "colour (three channels)"}.get(
                        channels, f"{channels}-channel"
                    )
                    raise DataError(
                        f"{path} is a {kind} image (mode {mode}), but the model takes {want}"
                        " images; hint: convert it to the model's channels yourself (the model was"
                        " not trained on the other kind), or pass a .npz of prepared inputs"
                    )
                return img.convert("RGB" if channels == 3 else "L")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(
            f"{path}: the image is too large to decode safely (more than {Image.MAX_IMAGE_PIXELS:,}"
            " pixels, Pillow's decompression-bomb limit); hint: downscale it, or remove it"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(
            f"{path}: cannot decode this image ({e}); hint: remove or replace the file"
        ) from None


def decode(path: Path, channels: int):  # -> PIL.Image.Image
    """Open an image with Pillow as RGB (3 channels) or greyscale (1); DataError naming a bad
    file."""
    return open_image(path, channels)


def resize_center_crop(img, size: tuple[int, int]):
    """Evaluation transform: shorter side to ``size * 256/224`` (to ``size`` itself at 64 pixels and
    below, where small images are stored at their size), then the central ``size``."""
    from PIL import Image

    h, w = size
    scale = 256 / 224 if min(h, w) > 64 else 1.0
    short = round(min(h, w) * scale)
    iw, ih = img.size
    r = short / min(iw, ih)
    img = img.resize((max(w, round(iw * r)), max(h, round(ih * r))), Image.BILINEAR)
    iw, ih = img.size
    left, top = (iw - w) // 2, (ih - h) // 2
    return img.crop((left, top, left + w, top + h))


def random_resized_crop(
    img,
    size: tuple[int, int],
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
):
    """Training transform (Inception/ImageNet): a random area share and aspect, resized to ``size``;
    after 10 failed draws, the central crop of the image clamped to the allowed aspects
    (torchvision's rule).
    """
    from PIL import Image

    iw, ih = img.size
    area = iw * ih
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        cw, ch = round((target * aspect) ** 0.5), round((target / aspect) ** 0.5)
        if 0 < cw <= iw and 0 < ch <= ih:
            x0, y0 = int(rng.integers(0, iw - cw + 1)), int(rng.integers(0, ih - ch + 1))
            return img.resize((size[1], size[0]), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    a = iw / ih
    cw, ch = (
        (round(ih * ratio[1]), ih)
        if a > ratio[1]
        else (iw, round(iw / ratio[0]))
        if a < ratio[0]
        else (iw, ih)
    )
    x0, y0 = (iw - cw) // 2, (ih - ch) // 2
    return img.resize((size[1], size[0]), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))


def to_array(img, channels: int) -> np.ndarray:
    """Pixels to float32 ``[C, H, W]``, scaled to [0, 1] and normalised with the fixed per-channel
    constants."""
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GREY_MEAN, GREY_STD)
    return (a - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[
        :, None, None
    ]


class FolderReader:
    """Sample ``i`` of a split as (float32 ``[C, H, W]``, label): the same in a DataLoader worker
    and in memory.

    ``train`` with ``random_crop`` (None: when :func:`mixc.core.data.default_augment` picks it, both
    sides above 32 pixels) draws a random-resized crop and a flip from the ``rng`` it is handed (a
    worker's, seeded from the run's seed, epoch and index); otherwise resize + center crop (32x32
    training images are then pad-cropped and flipped by the backend's ``crop_flip``).
    """

    def __init__(
        self,
        split: FolderSplit,
        input_shape: list[int],
        train: bool,
        random_crop: bool | None = None,
    ) -> None:
        if len(input_shape) != 3 or input_shape[0] not in (1, 3):
            raise DataError(
                "an image folder feeds image input [1 or 3, H, W], but the spec's input is "
                f"{input_shape}; hint: change the spec's `input image(...)` line"
            )
        self.split, self.channels, self.size = (
            split,
            input_shape[0],
            (input_shape[1], input_shape[2]),
        )
        if random_crop is None:
            random_crop = default_augment(input_shape) == "random_resized_crop"
        self.random = train and random_crop

    def __len__(self) -> int:
        return len(self.split.paths)

    def get(self, i: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, int]:
        img = decode(self.split.paths[i], self.channels)
        if self.random and rng is not None:
            img = random_resized_crop(img, self.size, rng)
            if rng.random() < 0.5:
                img = img.transpose(0)  # PIL.Image.FLIP_LEFT_RIGHT
        else:
            img = resize_center_crop(img, self.size)
        return to_array(img, self.channels), int(self.split.labels[i])


def iter_batches(
    split: FolderSplit,
    input_shape: list[int],
    *,
    train: bool,
    batch: int,
    seed: int = 0,
    epoch: int = 0,
    random_crop: bool | None = None,
):
    """``(x [b, C, H, W] float32, y [b] int64)`` batches decoded in this process; the same samples,
    order and augmentation draws (``default_rng([seed, epoch, i])`` per sample) as the torch
    DataLoader's."""
    reader = FolderReader(split, input_shape, train, random_crop)
    order = (
        np.random.default_rng([seed, epoch]).permutation(len(reader))
        if train
        else np.arange(len(reader))
    )
    stop = len(order) - len(order) % batch if train else len(order)
    for k in range(0, stop, batch):
        items = [
            reader.get(int(i), np.random.default_rng([seed, epoch, int(i)]))
            for i in order[k : k + batch]
        ]
        yield np.stack([x for x, _ in items]), np.asarray([y for _, y in items], np.int64)


def _decode_all(split: FolderSplit, input_shape: list[int]) -> np.ndarray:
    reader = FolderReader(split, input_shape, train=False)
    return np.stack([reader.get(i)[0] for i in range(len(reader))])


def _streamed(folder: ImageFolder, input_shape: list[int]) -> Dataset:
    """The folder as a streamed Dataset: empty x arrays, the labels, and the folder for
    ``Backend.batches``."""
    # checks the input shape now, not in a worker
    FolderReader(folder.train, input_shape, train=True)
    empty = np.zeros((0, *input_shape), np.float32)
    val = folder.val
    return Dataset(
        name=str(folder.root),
        x_train=empty,
        y_train=folder.train.labels,
        x_test=empty,
        y_test=folder.test.labels,
        classes=len(folder.classes),
        folder=folder,
        description=(
            f"image folder {folder.root} (streamed): {len(folder.classes)} classes, "
            f"{len(folder.train.paths)} train"
            + (f" / {len(val.paths)} val" if val else "")
            + f" / {len(folder.test.paths)} test images"
        ),
        x_val=None if val is None else empty,
        y_val=None if val is None else val.labels,
    )


def load_image_folder(
    path: str | os.PathLike, input_shape: list[int], stream: bool = False
) -> Dataset:
    """The folder decoded once into memory (resize + center crop; training-time augmentation is then
    the backend's, on those arrays: crop_flip at 32x32, the random-resized crop above 32 pixels a
    side), or streamed from disk (``stream``, or when it would take more than MEMORY_LIMIT bytes
    decoded), where the loader draws the random-resized crop from the full image."""
    folder = scan(path)
    n = (
        len(folder.train.paths)
        + len(folder.test.paths)
        + (len(folder.val.paths) if folder.val else 0)
    )
    need = n * int(np.prod(input_shape)) * 4
    if stream or need > int(os.environ.get("MIXC_IMAGE_MEMORY", MEMORY_LIMIT)):
        return _streamed(folder, input_shape)
    val = folder.val
    return Dataset(
        name=str(folder.root),
        x_train=_decode_all(folder.train, input_shape),
        y_train=folder.train.labels,
        x_test=_decode_all(folder.test, input_shape),
        y_test=folder.test.labels,
        classes=len(folder.classes),
        description=(
            f"image folder {folder.root}: {len(folder.classes)} classes, {len(folder.train.paths)}"
            " train"
            + (f" / {len(val.paths)} val" if val else "")
            + f" / {len(folder.test.paths)} test images"
        ),
        x_val=None if val is None else _decode_all(val, input_shape),
        y_val=None if val is None else val.labels,
    )
