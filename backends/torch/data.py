"""Image folders through ``torch.utils.data.DataLoader``: worker processes decode and augment,
pinned memory.

The scan, class mapping, decoding and transforms are ``mixc.core.imagefolder``'s (numpy/Pillow,
shared with the flax backend); this module only puts them behind a DataLoader. Randomness: each
sample's augmentation draws from ``default_rng([seed, epoch, index])``, so a batch is the same
whatever the number of workers, and an epoch replays exactly on resume.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mixc.core.data import DataError
from mixc.core.imagefolder import FolderReader, FolderSplit

__all__ = ["FolderDataset", "folder_loader"]


class FolderDataset(Dataset):
    """Sample ``i`` of an image-folder split as (float32 tensor ``[C, H, W]``, label)."""

    def __init__(
        self,
        split: FolderSplit,
        input_shape: list[int],
        train: bool,
        seed: int = 0,
        epoch: int = 0,
        random_crop: bool | None = None,
    ) -> None:
        self.reader, self.seed, self.epoch = (
            FolderReader(split, input_shape, train, random_crop),
            seed,
            epoch,
        )

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.reader.get(i, np.random.default_rng([self.seed, self.epoch, i]))
        return torch.from_numpy(x), y


class _Loader(DataLoader):
    """A DataLoader whose workers' DataErrors reach the user as the one paragraph they were, naming
    the file."""

    def __iter__(self):  # noqa: ANN204 - a generator over the batches
        return _plain_errors(super().__iter__())


def _plain_errors(batches: Any) -> Iterator[Any]:
    """Re-raise a worker's DataError without torch's "Caught ... Original Traceback" wrapping."""
    try:
        yield from batches
    except DataError as e:
        text = str(e)
        if "Original Traceback" not in text:
            raise
        # the traceback's last entry: "mixc.core.dataset.DataError: <the message>"
        raise DataError(text.rsplit("DataError: ", 1)[-1].strip()) from None


def folder_loader(
    split: FolderSplit,
    input_shape: list[int],
    *,
    train: bool,
    batch: int,
    workers: int,
    seed: int = 0,
    epoch: int = 0,
    pin_memory: bool | None = None,
    random_crop: bool | None = None,
) -> DataLoader:
    """A DataLoader over ``split``: shuffled by ``default_rng([seed, epoch])`` when ``train`` (the
    driver's own permutation rule), ``workers`` processes (0: in this process), memory pinned
    when CUDA is there; ``random_crop`` as in :class:`mixc.core.imagefolder.FolderReader`."""
    ds = FolderDataset(split, input_shape, train, seed, epoch, random_crop)
    # fork() after jax has started its threads can deadlock the child (jax warns): spawn workers
    # then
    context = "spawn" if workers and "jax" in sys.modules else None
    order = (
        np.random.default_rng([seed, epoch]).permutation(len(ds)) if train else np.arange(len(ds))
    )
    return _Loader(
        ds,
        batch_size=batch,
        sampler=order.tolist(),
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=train,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
        multiprocessing_context=context,
    )
