"""What a dataset is (:class:`Dataset`), its error, and the augmentation rule that depends only on
its shape.

Apart from ``mixc.core.data`` (the loaders) so that the image-folder reader
(``mixc.core.imagefolder``), which the loaders call, can build a Dataset without importing them
back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mixc.core.errors import MixcError

__all__ = ["DataError", "Dataset", "default_augment"]


class DataError(MixcError, ValueError):
    """A user-facing data problem: bad path, bad arrays, data that do not fit the plan."""

    exit_code = 2  # documented: data problems exit 2 in every command


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # float32, [N, *input_shape]
    y_train: np.ndarray  # int64, [N]
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    description: str
    x_val: np.ndarray | None = (
        None  # a validation split, when the dataset has one (or one was held out)
    )
    y_val: np.ndarray | None = None
    #: an image folder (``mixc.core.imagefolder.ImageFolder``) streamed from disk: the x arrays are
    #: then empty ``[0, C, H, W]`` and the y arrays hold the labels; batches come from
    #: ``Backend.batches``
    folder: Any = None

    @property
    def input_shape(self) -> list[int]:
        return list(self.x_train.shape[1:])


def default_augment(input_shape: list[int] | tuple[int, ...], layout: str = "image") -> str:
    """What ``augment auto`` does to training samples of ``input_shape``, one rule for arrays in
    memory and streamed image folders: ``crop_flip`` (pad 4, random crop, flip) at 32x32, CIFAR's
    recipe; ``random_resized_crop`` (a random area share of 8-100% and aspect of 3/4-4/3, resized
    back, and a flip) when both sides exceed 32 pixels, ImageNet's; ``none`` for anything else
    (digits' 8x8, signals, vectors), where neither recipe is known to help."""
    if layout != "image" or len(input_shape) != 3:
        return "none"
    h, w = input_shape[1:]
    if (h, w) == (32, 32):
        return "crop_flip"
    return "random_resized_crop" if min(h, w) > 32 else "none"
