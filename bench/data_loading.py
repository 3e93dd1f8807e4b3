"""Benchmark the image-folder loader: images/s at 1, 2 and 4 workers, and step time with real
loading vs in memory.

    python bench/data_loading.py [--images 256] [--batch 32] [--threads 1] [--spec resnet18]
    [--steps 4]

Generates a folder of 224x224 JPEGs (random smooth images, 4 classes) in a temporary folder; then
  (a) decodes + augments (random-resized crop, flip) every image through
  ``backends/torch/data.py``'s
      DataLoader at 0 (in-process), 1, 2 and 4 workers: images per second over one epoch;
  (b) trains ``--steps`` steps of ``--spec`` (default the zoo's resnet18, 1 member, width as in the
  zoo)
      at ``--batch`` from in-memory tensors, and the same steps fed by the loader at 4 workers:
      the ratio of step times (1.0 = loading costs nothing, it is hidden behind the step).
States the torch threads and the CPU count; on a CPU-only machine the ratio is the CPU's, not a
GPU's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mixc  # noqa: E402
from mixc.backends.torch.data import folder_loader  # noqa: E402
from mixc.core.imagefolder import scan  # noqa: E402


def make_folder(root: Path, n: int, classes: int = 4, size: int = 224) -> Path:
    """``n`` JPEGs of smooth random images (quality 90), like photos in size on disk."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "train" / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (14, 14, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size + 32, size), Image.BICUBIC).save(
            d / f"{i}.jpg", quality=90
        )
    for c in range(classes):  # a val/ of one image per class, so the folder is complete
        (root / "val" / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(root / "val" / f"c{c}" / "0.jpg")
    return root


def images_per_second(split, shape, batch: int, workers: int) -> float:
    loader = folder_loader(split, shape, train=True, batch=batch, workers=workers, seed=0, epoch=0)
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in loader)
    return n / (time.perf_counter() - t0)


def step_times(plan, split, shape, batch: int, steps: int, workers: int) -> tuple[float, float]:
    """Median seconds per step: from memory, and fed by the loader (``workers`` processes)."""
    from mixc.backends import get_backend
    from mixc.spec.recipe import Recipe

    recipe = Recipe.model_validate({**plan.train, "batch": batch})
    trainer = get_backend("torch").trainer(
        plan, recipe, device="cpu", layout="auto", augment="none"
    )
    xs = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    trainer.begin(xs, np.zeros(batch, np.int64), batch)
    trainer.begin_epoch(1, 2)
    idx = np.arange(batch)
    trainer.step(idx, 0.01, 0)  # warm-up
    mem = []
    for s in range(steps):
        t0 = time.perf_counter()
        trainer.step(idx, 0.01, s)
        mem.append(time.perf_counter() - t0)
    loader = iter(
        folder_loader(split, shape, train=True, batch=batch, workers=workers, seed=0, epoch=1)
    )
    fed = []
    for s in range(steps):
        t0 = time.perf_counter()
        xb, yb = next(loader)
        # the step reads rows 0..batch-1 of these
        trainer.x_train, trainer.y_train = (xb, yb.to(torch.int64))
        trainer.step(idx, 0.01, s)
        fed.append(time.perf_counter() - t0)
    trainer.close()
    return float(np.median(mem)), float(np.median(fed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads of the training process"
    )
    ap.add_argument("--workers", default="0,1,2,4")
    ap.add_argument("--spec", default="resnet18")
    ap.add_argument("--members", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = [3, 224, 224]
    print(
        f"cpus {os.cpu_count()} (affinity {len(os.sched_getaffinity(0))}), torch"
        f" {torch.__version__}, {torch.get_num_threads()} intra-op threads in the main process,"
        f" batch {args.batch}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        split = scan(make_folder(Path(tmp) / "imgs", args.images)).train
        print(f"generated {args.images} 224x224 JPEGs in {time.perf_counter() - t0:.1f}s")
        print("| workers | images/s |\n|---:|---:|")
        for w in (int(x) for x in args.workers.split(",")):
            print(f"| {w} | {images_per_second(split, shape, args.batch, w):.0f} |", flush=True)
        plan = mixc.compile(
            args.spec,
            (
                [f"members={args.members}", "groups=none"]
                if args.members == 1
                else [f"members={args.members}"]
            ),
        )
        mem, fed = step_times(plan, split, shape, args.batch, args.steps, 4)
        print(
            f"\n{plan.name} ({args.members} member(s)), batch {args.batch}: step {mem:.3f}s from"
            f" memory, {fed:.3f}s fed by the loader at 4 workers; ratio {fed / mem:.2f}"
        )


if __name__ == "__main__":
    main()
