"""Datasets for `mixc train` and `mixc eval`: numpy in, numpy out, no framework.

Both backends read data through this module, so a dataset means the same
arrays everywhere: images float32 channels-first ``[N, C, H, W]`` (signals
``[N, C, L]``, vectors ``[N, D]``), labels int64 ``[N]``.

Sources:
- ``digits``: scikit-learn's bundled 8x8 digits (no download), the offline
  default. A fixed, stratified 80/20 split (360 test images) drawn with
  ``numpy.random.RandomState(0)``, whose stream numpy keeps stable across
  versions. Not the file's last 20%: the file is ordered in blocks of writers,
  so its tail is a different population and a tail split measures writer
  shift, not the model (an RBF SVM, C=10, scores 95.8% on the tail, 98.1% here).
  Pixels are scaled to [0, 1], then normalised by the train set's mean/std.
- ``cifar10`` / ``cifar100``: the standard python-pickle archives unpacked in a
  data folder, normalised per channel by the train set's mean/std.
- a path to a ``.npz`` holding ``x_train, y_train, x_test, y_test``, used as
  stored (only cast to float32/int64): store what the model should see; with
  ``x_val, y_val`` too, a validation split (as ``--val-fraction`` holds out). Arrays
  that ``np.savez`` stored uncompressed are memory-mapped, not read: a float32
  dataset larger than the host's memory trains from the page cache
  (``np.savez_compressed`` members, and other dtypes, are read into memory).

Every bad input raises ``DataError`` with one paragraph naming the file or
value at fault and a hint; the CLI prints it without a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import numpy as np

from mixc.core.dataset import DataError, Dataset, default_augment
from mixc.core.imagefolder import FolderSplit, load_image_folder

__all__ = [
    "DataError",
    "Dataset",
    "load_dataset",
    "check_compatible",
    "shard",
    "default_augment",
    "DEFAULT_DATA_DIR",
]

#: Where cifar archives are looked for when neither --data-dir nor the recipe names a folder.
DEFAULT_DATA_DIR = "data"
_DEFAULT_DATA_NOTE = ", the default; set it with --data-dir or MIXC_DATA_DIR"
_CIFAR_URL_HINT = "download the python version from https://www.cs.toronto.edu/~kriz/cifar.html"

DIGITS_TEST = 360  # ~20% of scikit-learn's 1797 digits


# ---------------------------------------------------------------------------
# Public entry points


def load_dataset(
    name_or_path: str,
    data_dir: str | os.PathLike | None = None,
    input_shape: list[int] | None = None,
    stream: bool = False,
) -> Dataset:
    """Load ``digits``, ``cifar10``, ``cifar100``, ``imagenet`` (the image folder ``<data
    dir>/imagenet``), an image folder (``mixc.core.imagefolder``; needs the model's
    ``input_shape``) or a ``.npz`` by name or path.
    """
    key = str(name_or_path).strip()
    low = key.lower()
    if low == "digits":
        return _load_digits()
    if low in ("cifar10", "cifar100"):
        return _load_cifar(low, data_dir)
    if low == "imagenet":
        key = str(
            Path(
                data_dir
                if data_dir is not None
                else os.environ.get("MIXC_DATA_DIR", DEFAULT_DATA_DIR)
            )
            / "imagenet"
        )
    if Path(key).expanduser().is_dir() or low == "imagenet":
        if input_shape is None:
            raise DataError(
                f"{key} is an image folder: it is decoded to the model's input size, which this "
                "command does not know; hint: evaluate a run folder (it holds the plan)"
            )
        return load_image_folder(key, input_shape, stream=stream)
    if low.endswith(".npz") or os.sep in key or "/" in key:
        return _load_npz(Path(key))
    raise DataError(
        f"unknown dataset {key!r}; hint: use digits, cifar10, cifar100, or a path to a .npz file "
        "holding x_train, y_train, x_test and y_test"
    )


def split_validation(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """Hold out ``fraction`` of the training set for validation, drawn with ``default_rng([seed,
    7919])``.

    Why seeded by the recipe's seed: a resumed run (and the same command run again) must
    train on exactly the same samples; the split is a pure function of (data, fraction, seed).
    A dataset that already has a validation split keeps it when ``fraction`` is 0. A streamed image
    folder splits its list of training files by the same rule (so it holds out the same images as
    the folder decoded into memory); its validation images get the evaluation transform.
    """
    if fraction <= 0:
        return dataset
    if dataset.x_val is not None:
        raise DataError(
            f"{dataset.name} has its own validation split (an image folder's val/, a .npz's x_val);"
            " hint: drop --val-fraction (train.val_fraction), or remove that split"
        )
    n = len(dataset.y_train)
    n_val = int(round(n * fraction))
    if n_val < 1 or n - n_val < 1:
        raise DataError(
            f"--val-fraction {fraction} of {n} training samples leaves {n_val} for validation and "
            f"{n - n_val} for training; hint: choose a fraction that leaves both sets non-empty"
        )
    perm = np.random.default_rng([seed, 7919]).permutation(n)
    val, keep = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    # streamed: split the file list, the same files an in-memory split takes
    if dataset.folder is not None:
        return _split_folder(dataset, keep, val)
    return dataclasses.replace(
        dataset,
        x_train=dataset.x_train[keep],
        y_train=dataset.y_train[keep],
        x_val=dataset.x_train[val],
        y_val=dataset.y_train[val],
        description=f"{dataset.description}; {n_val} of the train samples held out for validation",
    )


def _split_folder(dataset: Dataset, keep: np.ndarray, val: np.ndarray) -> Dataset:
    """A streamed image folder with the training files ``val`` held out as its validation split
    (read with the evaluation transform, resize + center crop, like a val/ folder) and ``keep``
    left to train on.
    """
    folder = dataset.folder
    train = folder.train

    def part(rows: np.ndarray) -> FolderSplit:
        return dataclasses.replace(
            train, paths=tuple(train.paths[i] for i in rows), labels=train.labels[rows]
        )

    return dataclasses.replace(
        dataset,
        y_train=train.labels[keep],
        x_val=dataset.x_train[:0],
        y_val=train.labels[val],
        folder=dataclasses.replace(folder, train=part(keep), val=part(val)),
        description=(
            f"{dataset.description}; {len(val)} of the train images held out for validation"
        ),
    )


KNOWN = ("digits", "cifar10", "cifar100", "imagenet")


def resolve_data_path(value: str, base: str | os.PathLike | None) -> str:
    """A dataset name as is; a relative path made absolute from ``base`` (the spec's folder for a
    spec's ``data``, like its imports; the current folder for ``--data``), so a run records where
    its data was and can be evaluated or resumed from anywhere."""
    if value.strip().lower() in KNOWN:
        return value
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = Path(base or ".") / p
    return str(p.resolve())


def check_compatible(
    dataset: Dataset, input_shape: list[int] | tuple[int, ...], classes: int
) -> None:
    """Raise DataError unless the dataset's samples and labels fit a model with this input and
    output."""
    want = list(input_shape)
    for split, x in (
        ("x_train", dataset.x_train),
        ("x_test", dataset.x_test),
        ("x_val", dataset.x_val),
    ):
        if x is None:
            continue
        got = list(x.shape[1:])
        if got != want:
            raise DataError(
                f"dataset {dataset.name!r}: {split} samples have shape {got} but the spec's input"
                f" is {want} ({x.shape[0]} samples of shape {got}); hint: reshape the arrays to [N,"
                f" {', '.join(map(str, want))}] (channels first), or change the spec's `input` line"
                " to match the data"
            )
    for split, y in (
        ("y_train", dataset.y_train),
        ("y_test", dataset.y_test),
        ("y_val", dataset.y_val),
    ):
        if y is not None and y.size and (y.min() < 0 or y.max() >= classes):
            i = int(np.argmax((y < 0) | (y >= classes)))
            bad = int(y[i])
            raise DataError(
                f"dataset {dataset.name!r}: {split}[{i}] holds label {bad}, outside"
                f" 0..{classes - 1} for the spec's {classes} classes; hint: set the backbone's"
                f" number of classes to at least {int(y.max()) + 1}, or relabel the data to"
                " 0..classes-1"
            )


def shard(n: int, rank: int, world: int) -> slice:
    """The contiguous part of ``range(n)`` that data-parallel rank ``rank`` of ``world`` reads.

    Parts differ in length by at most one and tile ``range(n)`` exactly.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad rank {rank} of world {world}")
    return slice(n * rank // world, n * (rank + 1) // world)


# ---------------------------------------------------------------------------
# digits


def _load_digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError(
            f"the digits dataset comes with scikit-learn, which is not importable here ({e}); "
            "hint: pip install scikit-learn"
        ) from e
    d = load_digits()
    x = (np.asarray(d.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(d.target, dtype=np.int64)
    test = _stratified_test_indices(y, DIGITS_TEST, seed=0)
    mask = np.zeros(len(y), dtype=bool)
    mask[test] = True
    x_train, y_train, x_test, y_test = x[~mask], y[~mask], x[mask], y[mask]
    x_train, x_test = _normalise(x_train, x_test)
    return Dataset(
        "digits",
        x_train,
        y_train,
        x_test,
        y_test,
        10,
        f"scikit-learn digits, 8x8 grey images, {len(y_train)} train / {len(y_test)} test (fixed"
        " stratified split)",
    )


def _stratified_test_indices(y: np.ndarray, n_test: int, seed: int) -> np.ndarray:
    """About ``n_test`` indices, each class in proportion, reproducible across numpy versions."""
    rng = np.random.RandomState(seed)
    out = []
    frac = n_test / len(y)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        out.append(idx[: int(np.floor(len(idx) * frac + 0.5))])
    return np.sort(np.concatenate(out))


# ---------------------------------------------------------------------------
# CIFAR


_CIFAR = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def _load_cifar(name: str, data_dir: str | os.PathLike | None) -> Dataset:
    folder_name, train_files, test_files, label_key, classes = _CIFAR[name]
    root = Path(
        data_dir if data_dir is not None else os.environ.get("MIXC_DATA_DIR", DEFAULT_DATA_DIR)
    )
    # Accept both the parent folder and the unpacked archive folder itself.
    folder = root if (root / train_files[0]).is_file() else root / folder_name
    expected = ", ".join(train_files + test_files)
    if not folder.is_dir():
        raise DataError(
            f"{name}: no folder {folder} (looked in the data folder"
            f" {root}{'' if data_dir is not None else _DEFAULT_DATA_NOTE});"
            f" expected {folder_name}/ holding {expected}; hint: {_CIFAR_URL_HINT} and unpack it"
            f" into {root}"
        )
    missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"{name}: {folder} lacks {', '.join(missing)}; expected {expected} (the python-pickle"
            f" archive); hint: {_CIFAR_URL_HINT} and unpack it again into {root}"
        )
    xs, ys = [], []
    for files in (train_files, test_files):
        parts = [_read_cifar_file(folder / f, label_key) for f in files]
        xs.append(np.concatenate([p[0] for p in parts]))
        ys.append(np.concatenate([p[1] for p in parts]))
    for split, y in zip(("train", "test"), ys):
        if y.size and (y.min() < 0 or y.max() >= classes):
            raise DataError(
                f"{name}: the {split} files in {folder} hold label {int(y.max())}, outside"
                f" 0..{classes - 1}; hint: the archive is corrupt or of another dataset"
            )
    x_train, x_test = _normalise(xs[0].astype(np.float32) / 255.0, xs[1].astype(np.float32) / 255.0)
    return Dataset(
        name,
        x_train,
        ys[0],
        x_test,
        ys[1],
        classes,
        f"{name.upper()}, 32x32 colour images, {len(ys[0])} train / {len(ys[1])} test, from"
        f" {folder}",
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR file can run no code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_file(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    hint = f"hint: {_CIFAR_URL_HINT} and unpack it again"
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # any failure to read is the file's fault
        raise DataError(f"cannot read {path} as a CIFAR python-pickle batch ({e}); {hint}") from e
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        keys = (
            sorted(k.decode(errors="replace") if isinstance(k, bytes) else str(k) for k in d)
            if isinstance(d, dict)
            else []
        )
        raise DataError(
            f"{path} is not a CIFAR batch: expected keys 'data' and '{label_key.decode()}', found"
            f" {keys or type(d).__name__}; {hint}"
        )
    x = np.asarray(d[b"data"])
    y = np.asarray(d[label_key], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or x.shape[0] != y.shape[0]:
        raise DataError(
            f"{path}: 'data' has shape {list(x.shape)} and there are {y.shape[0]} labels; expected"
            f" [N, 3072] with N labels; {hint}"
        )
    return x.reshape(-1, 3, 32, 32), y


# ---------------------------------------------------------------------------
# .npz


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_NPZ_VAL_KEYS = ("x_val", "y_val")  # optional: a validation split of the file's own


def _load_npz(path: Path) -> Dataset:
    if not path.is_file():
        where = (
            "" if path.parent.is_dir() else f" (and its folder {path.parent} does not exist either)"
        )
        raise DataError(
            f"no dataset file {path}{where}; hint: pass digits, cifar10, cifar100, or the path of a"
            f" .npz file holding {', '.join(_NPZ_KEYS)}"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            found = list(z.files)
            missing = [k for k in _NPZ_KEYS if k not in found]
            if missing:
                raise DataError(
                    f"{path} lacks the arrays {', '.join(missing)} (it holds"
                    f" {', '.join(found) or 'none'}); hint: save it with np.savez(path,"
                    " x_train=..., y_train=..., x_test=..., y_test=...)"
                )
            val = [k for k in _NPZ_VAL_KEYS if k in found]
            if len(val) == 1:
                raise DataError(
                    f"{path} holds {val[0]} but not {({*_NPZ_VAL_KEYS} - {val[0]}).pop()}; hint: a"
                    " validation split needs both x_val and y_val (or neither: --val-fraction"
                    " holds one out)"
                )
            arrays = {k: _npz_member(path, k) for k in (*_NPZ_KEYS, *val)}
            arrays = {k: z[k] if a is None else a for k, a in arrays.items()}
    except DataError:
        raise
    except Exception as e:  # not a zip, pickled objects, truncated...
        raise DataError(
            f"cannot read {path} as a .npz of plain arrays ({e}); hint: write it with numpy.savez"
            " from numeric arrays (object arrays are refused)"
        ) from e
    splits = [s for s in ("train", "val", "test") if f"x_{s}" in arrays]
    for split in splits:
        _check_split(path, split, arrays[f"x_{split}"], arrays[f"y_{split}"])
        if list(arrays["x_train"].shape[1:]) != list(arrays[f"x_{split}"].shape[1:]):
            raise DataError(
                f"{path}: x_train samples have shape {list(arrays['x_train'].shape[1:])} but"
                f" x_{split} samples {list(arrays[f'x_{split}'].shape[1:])}; all splits must share"
                " one sample shape"
            )
    x = {s: np.ascontiguousarray(arrays[f"x_{s}"], dtype=np.float32) for s in splits}
    y = {s: arrays[f"y_{s}"].astype(np.int64) for s in splits}
    classes = int(max(v.max(initial=0) for v in y.values())) + 1
    return Dataset(
        path.stem,
        x["train"],
        y["train"],
        x["test"],
        y["test"],
        classes,
        f"{path}, samples {list(x['train'].shape[1:])}, {len(y['train'])} train"
        + (f" / {len(y['val'])} val" if "val" in y else "")
        + f" / {len(y['test'])} test",
        x_val=x.get("val"),
        y_val=y.get("val"),
    )


def _npz_member(path: Path, key: str) -> np.ndarray | None:
    """``key`` of the .npz at ``path`` as a read-only memory map, when the zip stores it
    uncompressed (what ``np.savez`` writes) as a .npy of plain numbers; None when it must be read
    instead (compressed, empty, an unusual header): ``np.load`` then reads it, with its own
    checks. Why: a dataset read whole must fit in the host's memory twice over (the file's copy,
    then the float32 one); mapped, pages come from the file as batches touch them, and the kernel
    can drop them again."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # compressed or encrypted
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the zip local file header: its name and extra field lengths end it
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return None
        f.seek(
            info.header_offset
            + 30
            + int.from_bytes(local[26:28], "little")
            + int.from_bytes(local[28:30], "little")
        )
        start = f.tell()
        try:
            version = np.lib.format.read_magic(f)
            read = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }
            if version not in read:
                return None
            shape, fortran, dtype = read[version](f)
        except ValueError:
            return None
        offset = f.tell()
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if dtype.hasobject or size == 0 or offset - start + size != info.file_size:
        return None
    return np.memmap(
        path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
    )


#: Inputs beyond this magnitude overflow float32 arithmetic in a network (squares in BatchNorm, sums
#: in convolutions) and almost always mean unnormalised or corrupted data.
MAX_INPUT = 1e6
#: Labels are class indices; anything this large is not one (and would not fit the cast to int64).
MAX_LABEL = 1_000_000


def _at(a: np.ndarray, flat: int) -> str:
    """``[i, j, ...]`` of the ``flat``-th element of ``a``."""
    return "[" + ", ".join(str(int(i)) for i in np.unravel_index(flat, a.shape)) + "]"


def _check_split(path: Path, split: str, x: np.ndarray, y: np.ndarray) -> None:
    """One split of a .npz: samples present, numeric and of sane magnitude, one integer class per
    sample."""
    xs, ys = f"x_{split}", f"y_{split}"
    if x.ndim < 2:
        raise DataError(
            f"{path}: {xs} has shape {list(x.shape)}; expected [N, ...] with one sample per row; "
            "hint: a vector dataset is [N, D], images [N, C, H, W]"
        )
    if x.shape[0] == 0:
        raise DataError(
            f"{path}: {xs} holds no samples (shape {list(x.shape)}); training and evaluation need"
            " at least one; hint: fill both splits (x_train/y_train and x_test/y_test)"
        )
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DataError(f"{path}: {xs} has dtype {x.dtype}; expected numbers")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(
            f"{path}: {ys} has shape {list(y.shape)} but {xs} has {x.shape[0]} samples; "
            f"expected {ys} of shape [{x.shape[0]}] (one integer class per sample, not one-hot)"
        )
    _check_labels(path, ys, y)
    _check_inputs(path, xs, x)


def _check_labels(path: Path, name: str, y: np.ndarray) -> None:
    hint = "hint: labels are class indices 0..classes-1, one integer per sample"
    if not (
        np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating) or y.dtype == bool
    ):
        raise DataError(
            f"{path}: {name} has dtype {y.dtype}; expected integer class labels; {hint}"
        )
    yf = y.astype(np.float64)
    bad = ~np.isfinite(yf) | (yf != np.round(yf)) | (yf < 0) | (yf >= MAX_LABEL)
    if bad.any():
        i = int(np.argmax(bad))
        v = y[i].item()
        why = (
            "negative"
            if np.isfinite(yf[i]) and yf[i] < 0
            else (
                "a non-integer value"
                if not np.isfinite(yf[i]) or yf[i] != np.round(yf[i])
                else f"not below {MAX_LABEL:,}"
            )
        )
        raise DataError(f"{path}: {name}[{i}] = {v!r} is not a class index ({why}); {hint}")


#: rows of an input array checked at a time, so the check's temporaries stay small (mapped arrays
#: included)
_CHECK_BYTES = 64 << 20


def _check_inputs(path: Path, name: str, x: np.ndarray) -> None:
    if x.dtype == bool:
        return
    rows = max(1, _CHECK_BYTES // max(1, x[:1].nbytes))
    for r in range(0, len(x), rows):
        part = x[r : r + rows]
        if np.issubdtype(x.dtype, np.floating):
            # in x's own dtype: no float64 copy
            bad = ~np.isfinite(part) | (np.abs(part) > MAX_INPUT)
        else:
            bad = (part > MAX_INPUT) | (part < -MAX_INPUT)
        if bad.any():
            _bad_input(
                path,
                name,
                x,
                r * int(np.prod(x.shape[1:], dtype=np.int64)) + int(np.argmax(bad.reshape(-1))),
                bad,
                r + len(part) < len(x),
            )


def _bad_input(path: Path, name: str, x: np.ndarray, i: int, bad: np.ndarray, more: bool) -> None:
    """The DataError for input value ``i`` (flat C-order index) of ``x``; ``bad`` marks the bad
    values of the chunk it is in, ``more`` says rows after that chunk were not checked."""
    v = x[
        np.unravel_index(i, x.shape)
    ].item()  # not x.reshape(-1): a Fortran-ordered map would be copied
    why = (
        "not a finite number"
        if not np.isfinite(v)
        else f"beyond +-{MAX_INPUT:g}, which overflows float32 arithmetic"
    )
    count = f"{int(bad.sum())}{' or more' if more else ''}"
    raise DataError(
        f"{path}: {name}{_at(x, i)} = {v!r} is {why} ({count} such value(s) in {name}); hint: store"
        " normalised inputs (e.g. per channel: subtract the mean, divide by the standard"
        " deviation) and replace missing values"
    )


# ---------------------------------------------------------------------------


def _normalise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zero-mean, unit-variance per channel (axis 1), with the train split's statistics."""
    axes = (0,) + tuple(range(2, x_train.ndim))
    mean = x_train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x_train.std(axis=axes, keepdims=True, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    f = lambda x: ((x - mean) / std).astype(np.float32)  # noqa: E731
    return f(x_train), f(x_test)
