"""`mixc predict RUN INPUT -o OUT.npz`: a trained ensemble's predictions for new inputs.

INPUT is one of:

- a ``.npz`` holding ``x`` (or ``x_test``) ``[N, *input_shape]``: model inputs,
  used as stored, exactly as `mixc eval` uses a dataset's arrays (so they must
  be normalised like the training data);
- an image file (anything Pillow reads), or a folder of them (sorted by name):
  pixels are scaled to ``[0, 1]`` and normalised with the statistics of the
  run's training set, the way ``mixc.core.data`` prepared it (digits and CIFAR:
  per-channel mean/std of the train split, recovered from the dataset; a
  ``.npz`` dataset: its stored pixel scale, [0, 1] or [0, 255]). An image is
  resized to the plan's height and width, but its channels must match the
  plan's (grey for one channel, colour for three): a colour photo is not
  silently turned into a digit.

OUT.npz holds ``member_probs [N, M, classes]``, ``ensemble_probs [N,
classes]`` (the mean of the members' softmaxes), ``predicted [N]``,
``confidence [N]`` (the ensemble's top probability), ``disagreement [N]`` (the
fraction of member pairs whose top classes differ), ``names [N]`` and
``temperature`` (the run's, from `mixc calibrate`, applied to every member's
logits before the softmax; 1.0 when there is none or with ``--no-temperature``).
``--json`` prints the first few inputs' results.

Exit codes: 0 done; 1 a run or checkpoint problem; 2 an input problem.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixc.commands import add_backend_argument
from mixc.core.data import MAX_INPUT, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `mixc predict`."""
    p.add_argument(
        "target",
        metavar="RUN_DIR|CHECKPOINT",
        help="a run folder (mixc train --out) or a checkpoint file",
    )
    p.add_argument(
        "input",
        metavar="INPUT",
        help="a .npz holding x (or x_test), an image file, or a folder of images",
    )
    p.add_argument("-o", "--output", metavar="OUT.npz", help="where to write the predictions")
    p.add_argument(
        "--json", action="store_true", help="print the first --show inputs' results as JSON"
    )
    p.add_argument(
        "--show", type=int, default=5, metavar="N", help="how many inputs --json prints (default 5)"
    )
    p.add_argument("--plan", help="the plan of a checkpoint without plan.json beside it")
    p.add_argument(
        "--data",
        help="the dataset whose normalisation images get (default: what the run trained on)",
    )
    p.add_argument(
        "--data-dir", help="folder holding the cifar archives (for their normalisation statistics)"
    )
    p.add_argument("--batch-size", type=int, default=500, help="batch (default 500)")
    p.add_argument("--device", default="cpu", help="device (cpu, cuda, cuda:1)")
    add_backend_argument(p, "predict with (checkpoints are shared: any backend reads any run)")
    p.add_argument(
        "--no-temperature",
        action="store_true",
        help="the uncalibrated probabilities even when `mixc calibrate` fitted a temperature",
    )


def run(args: argparse.Namespace) -> int:
    """Run `mixc predict` with parsed ``args``; returns the exit code (errors are ``MixcError``s for
    cli.main)."""
    return _run(args)


@dataclass(frozen=True)
class Inputs:
    x: np.ndarray  # model inputs [N, *input_shape], float32
    names: list[str]
    preprocessing: str


# ---------------------------------------------------------------------------
# Reading inputs


def read_npz(path: Path, input_shape: list[int]) -> Inputs:
    """``x`` (or ``x_test``) of a .npz, checked against the plan's input shape; used as stored."""
    try:
        with np.load(path, allow_pickle=False) as z:
            key = next((k for k in ("x", "x_test") if k in z.files), None)
            if key is None:
                raise DataError(
                    f"{path} holds no array x (nor x_test); it holds"
                    f" {', '.join(z.files) or 'nothing'}; hint: np.savez(path, x=inputs) with"
                    " inputs [N, " + ", ".join(map(str, input_shape)) + "]"
                )
            x = z[key]
    except DataError:
        raise
    except Exception as e:  # not a zip, pickled objects, truncated...
        raise DataError(
            f"cannot read {path} as a .npz of plain arrays ({e}); hint: write it with numpy.savez"
        ) from e
    if list(x.shape[1:]) != list(input_shape) or x.ndim < 2:
        raise DataError(
            f"{path}: {key} has shape {list(x.shape)}, but the model takes [N,"
            f" {', '.join(map(str, input_shape))}]; hint: reshape it (channels first, one sample"
            " per row)"
        )
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) or len(x) == 0:
        raise DataError(
            f"{path}: {key} must hold at least one numeric sample (dtype {x.dtype}, {len(x)}"
            " samples)"
        )
    xf = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(xf) | (np.abs(xf) > MAX_INPUT)
    if bad.any():
        raise DataError(
            f"{path}: {key} holds {int(bad.sum())} non-finite or huge value(s) (beyond"
            f" +-{MAX_INPUT:g}); hint: store normalised inputs, as the model was trained on"
        )
    return Inputs(
        xf, [f"{path.name}[{i}]" for i in range(len(xf))], f"{key} used as stored (model inputs)"
    )


def _image_pixels(path: Path, input_shape: list[int]) -> np.ndarray:
    """One image as pixels in [0, 1], [C, H, W], resized to the plan's size; its channels must
    match."""
    try:
        from PIL import Image
    except ImportError as e:
        raise DataError(
            f"reading images needs Pillow, which is not importable here ({e}); hint: pip install"
            " pillow, or pass a .npz of inputs"
        ) from e
    from mixc.core.imagefolder import open_image

    c, h, w = input_shape
    if c not in (1, 3):
        raise DataError(
            f"{path}: the model takes {c}-channel images, which no image file holds; hint: pass a"
            " .npz of prepared inputs"
        )
    # every mode explicitly, 16-bit scaled; DataError naming the file
    im = open_image(path, c, strict=True)
    if im.size != (w, h):
        im = im.resize((w, h), Image.Resampling.BILINEAR)
    a = np.asarray(im, dtype=np.float32) / 255.0
    return a[None] if c == 1 else a.transpose(2, 0, 1)


def read_images(paths: list[Path], input_shape: list[int], scale: Any, how: str) -> Inputs:
    px = np.stack([_image_pixels(p, input_shape) for p in paths])
    return Inputs(
        scale.from_pixels(px), [p.name for p in paths], f"pixels / 255, then normalised: {how}"
    )


def _image_scale(run_: Any, data: str | None, data_dir: str | None) -> tuple[Any, str]:
    """The training data's pixel -> input mapping (``mixc.corruptions.PixelScale``), recovered from
    the dataset."""
    from mixc.corruptions import pixel_scale
    from mixc.evaluation import load_test_set, resolve_data

    name, ddir = resolve_data(run_, data, data_dir)
    try:
        ds = load_test_set(name, ddir, run_.plan)
    except DataError as e:
        raise DataError(
            f"images are normalised with the training set's statistics, and {name} could not be "
            f"loaded to recover them: {e}"
        ) from None
    scale = pixel_scale(ds)
    return scale, f"{ds.name}, {scale.how}"


def read_inputs(run_: Any, source: str, data: str | None, data_dir: str | None) -> Inputs:
    """INPUT as model inputs: a .npz as stored, images (a file or a folder of them) normalised like
    training."""
    path = Path(source)
    shape = list(run_.plan.input_shape)
    if not path.exists():
        raise DataError(
            f"no input {path}; hint: pass a .npz holding x, an image file, or a folder of images"
        )
    if path.is_file() and path.suffix.lower() == ".npz":
        return read_npz(path, shape)
    if run_.plan.input_layout != "image" or len(shape) != 3:
        raise DataError(
            f"{path}: images need a model of image input, but {run_.plan.name} takes "
            f"{run_.plan.input_layout} inputs of shape {shape}; hint: pass a .npz holding x"
        )
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DataError(
                f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)}); hint: pass a folder of"
                " images, an image file or a .npz"
            )
    else:
        files = [path]
    scale, how = _image_scale(run_, data, data_dir)
    return read_images(files, shape, scale, how)


# ---------------------------------------------------------------------------
# Summaries


def summarise_predictions(member_probs: np.ndarray) -> dict[str, np.ndarray]:
    """Per input: the ensemble's probabilities, predicted class, confidence, and member
    disagreement.

    Disagreement is the fraction of member pairs whose top classes differ
    (the per-input form of the pairwise disagreement `mixc eval` reports).
    """
    ens = member_probs.astype(np.float64).mean(axis=1)
    top = member_probs.argmax(axis=-1)  # [N, M]
    m = top.shape[1]
    if m > 1:
        differ = (top[:, :, None] != top[:, None, :]).sum(axis=(1, 2)) / 2
        disagreement = differ / (m * (m - 1) / 2)
    else:
        disagreement = np.zeros(len(top))
    return {
        "member_probs": member_probs.astype(np.float32),
        "ensemble_probs": ens.astype(np.float32),
        "predicted": ens.argmax(axis=-1).astype(np.int64),
        "confidence": ens.max(axis=-1).astype(np.float32),
        "disagreement": disagreement.astype(np.float32),
        "member_predicted": top.astype(np.int64),
    }


def _run(args: argparse.Namespace) -> int:
    from mixc.evaluation import load_predictor, open_run

    if args.batch_size < 1:
        raise DataError("--batch-size must be at least 1")
    if not args.output and not args.json:
        raise DataError(
            "nothing to do: pass -o OUT.npz to write the predictions, or --json to print them"
        )
    run_ = open_run(args.target, args.plan)
    out = None
    if args.output:
        from mixc.commands.export import _run_files
        from mixc.core.safe_write import check_output

        out = Path(args.output)
        check_output(out, force=True)  # a folder, a link, or below a file: refused as named
        # numpy's rule, said up front
        out = out if out.suffix == ".npz" else out.with_name(out.name + ".npz")
        given = Path(args.input)
        check_output(out, inputs=[*_run_files(args.target, args.plan), given], force=True)
    from mixc.calibration import for_deployment, tempered

    # a temperature of another checkpoint is refused
    cal = for_deployment(run_, args.no_temperature)
    # the inputs before the (slow) model load
    inputs = read_inputs(run_, args.input, args.data, args.data_dir)
    predict = load_predictor(
        args.backend, run_.plan, run_.checkpoint, device=args.device, batch_size=args.batch_size
    )
    res = summarise_predictions(np.asarray(tempered(predict(inputs.x), cal)))
    res["temperature"] = np.float32(1.0 if cal is None else cal.temperature)
    if out is not None:
        from mixc.core.safe_write import write_with

        def fill(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: numpy adds no suffix to it
                np.savez_compressed(f, **res, names=np.array(inputs.names))

        write_with(out, fill)
    if args.json:
        shown = [
            {
                "input": inputs.names[i],
                "predicted": int(res["predicted"][i]),
                "confidence": round(float(res["confidence"][i]), 6),
                "disagreement": round(float(res["disagreement"][i]), 6),
                "member_predicted": res["member_predicted"][i].tolist(),
                "ensemble_probs": [round(float(p), 6) for p in res["ensemble_probs"][i]],
            }
            for i in range(min(max(args.show, 0), len(inputs.names)))
        ]
        print(
            json.dumps(
                {
                    "run": run_.label,
                    "inputs": len(inputs.names),
                    "preprocessing": inputs.preprocessing,
                    "temperature": None if cal is None else cal.temperature,
                    "written": None if out is None else str(out),
                    "predictions": shown,
                },
                indent=1,
            )
        )
    else:
        print(
            f"{len(inputs.names)} input(s) ({inputs.preprocessing}); mean confidence"
            f" {float(res['confidence'].mean()):.3f}, mean disagreement"
            f" {float(res['disagreement'].mean()):.3f}; "
            + (
                f"temperature {cal.temperature:.4f} applied (mixc calibrate); "
                if cal is not None
                else ""
            )
            + (f"wrote {out}" if out is not None else "nothing written")
        )
    return 0
