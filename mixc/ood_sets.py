"""The inputs of `mixc eval --ood VALUE`: one out-of-distribution set, as model inputs.

``VALUE`` is, in this order:

- an existing ``.npz`` holding ``x`` (or ``x_test``) ``[N, *input_shape]``,
  used as stored (model inputs, normalised like the training data), as
  ``mixc predict`` reads it;
- an existing image file or folder of images, normalised like the run's
  training data (``mixc predict``'s rule);
- ``noise``, ``inverted`` or ``flipped``: made offline from the run's own test
  set in pixel space (``mixc.corruptions.PixelScale``), so every image run
  has an OOD check without a download: uniform noise pixels (seeded, as many
  as the test set), the test images with pixels ``1 - p``, or the test images
  turned upside down and mirrored (rotated 180 degrees);
- a dataset name or path ``mixc.core.data`` loads (``digits``, ``cifar10``,
  ``cifar100``, a dataset ``.npz``...): its test set, which must fit the
  model's input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixc.core.data import DataError, Dataset

__all__ = ["OodSet", "SYNTHETIC", "load_ood_set"]

SYNTHETIC = {
    "noise": "uniform noise pixels in [0, 1]",
    "inverted": "the test images with inverted pixels (1 - p)",
    "flipped": "the test images rotated 180 degrees",
}


@dataclass(frozen=True)
class OodSet:
    name: str
    x: np.ndarray  # model inputs [N, *input_shape], float32
    how: str


def _synthetic(kind: str, test: Dataset, seed: int) -> OodSet:
    from mixc.corruptions import pixel_scale

    try:
        scale = pixel_scale(test)
    except DataError as e:
        raise DataError(
            f"--ood {kind} is made from the test set's pixels, but {test.name} has none that mixc"
            f" can recover ({e}); hint: pass a .npz holding x as model inputs"
        ) from None
    px = scale.to_pixels(test.x_test)
    if kind == "noise":
        px = np.random.default_rng([seed, 4099]).random(px.shape)
    elif kind == "inverted":
        px = 1.0 - px
    else:
        px = px[..., ::-1, ::-1] if px.ndim >= 4 else px[..., ::-1]
    x = np.ascontiguousarray(scale.from_pixels(px), dtype=np.float32)
    return OodSet(
        kind,
        x,
        f"{SYNTHETIC[kind]}, from {test.name}'s test set ({len(x)} inputs), normalised as "
        f"training ({scale.how})",
    )


def load_ood_set(
    run: Any, value: str, test: Dataset, data: str | None, data_dir: str | None, seed: int = 0
) -> OodSet:
    """``value`` (module doc) as model inputs fitting ``run``'s plan; a DataError naming it
    otherwise."""
    from mixc.commands.predict import read_inputs
    from mixc.evaluation import load_test_set

    path = Path(value)
    if path.exists():
        # .npz as stored, images normalised like training
        inputs = read_inputs(run, value, data, data_dir)
        return OodSet(path.name, inputs.x, f"{value}: {inputs.preprocessing}")
    if value.lower() in SYNTHETIC:
        return _synthetic(value.lower(), test, seed)
    try:
        ds = load_test_set(value, data_dir, run.plan)
    except DataError as e:
        raise DataError(
            f"--ood {value}: {e}; hint: --ood takes a .npz holding x, an image file or folder, "
            f"{', '.join(SYNTHETIC)} (made from the test set), or a dataset mixc loads (digits, "
            "cifar10, ...) whose inputs fit the model"
        ) from None
    return OodSet(
        ds.name, np.ascontiguousarray(ds.x_test, dtype=np.float32), f"the {ds.name} test set"
    )
