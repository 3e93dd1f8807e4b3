"""Write MNIST-1D (Greydanus 2020) as an .npz that ``mixc train --data`` reads, generated offline.

    pip install mnist1d
    python bench/mnist1d_npz.py data/mnist1d.npz [--seed 42]

The ``mnist1d`` package draws the dataset from its ten templates with its default arguments
(4,000 training and 1,000 test signals of 40 samples); this script only reshapes the signals to
[N, 1, 40] float32 (one channel, what ``input signal(1, 40)`` in ``zoo/mnist1d.mix`` reads) and
stores them with integer labels. mnist1d is not a mixc dependency: install it to make the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the .npz to write")
    ap.add_argument(
        "--seed", type=int, default=None, help="the generator's seed (default: mnist1d's own)"
    )
    args = ap.parse_args()
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise SystemExit(
            "bench/mnist1d_npz.py needs the mnist1d package: pip install mnist1d"
        ) from None
    spec = get_dataset_args()
    if args.seed is not None:
        spec.seed = args.seed
    data = make_dataset(spec)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        args.out,
        x_train=np.asarray(data["x"], np.float32)[:, None, :],
        y_train=np.asarray(data["y"], np.int64),
        x_test=np.asarray(data["x_test"], np.float32)[:, None, :],
        y_test=np.asarray(data["y_test"], np.int64),
    )
    print(
        f"wrote {args.out}: {len(data['y'])} training and {len(data['y_test'])} test signals of 40"
        " samples"
    )


if __name__ == "__main__":
    main()
