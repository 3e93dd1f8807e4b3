"""Compare initialisation rules on a starved bank: mean ± sd over seeds.

    OMP_NUM_THREADS=1 python bench/init_compare.py [--seeds 10] [--epochs 20] [--out
    /tmp/init-compare]

Trains zoo/digits.mix at width 8 (4 members, budget 1.0x: 6 templates for the four 8-wide
convs, 2 for the three 16-wide ones) with `mixc train` once per rule and seed, then prints the
final epoch's ensemble accuracy and NLL, the mean member accuracy and the diversity, and the
paired (same seed) differences against the default rules. About 10 s per run on one core.
"""

from __future__ import annotations

import argparse
import json
import statistics as st
import subprocess
import sys
from pathlib import Path

RULES = {
    "default (orthonormal alphas, uniform classifier)": [],
    "alphas normal(std=0.5)": ["--set", "init.alphas=normal(std=0.5)"],
    "classifier normal(std=0.01)": ["--set", "init.classifier=normal(std=0.01)"],
}
BASE = ["digits", "--set", "backbone.width=8", "--no-progress"]


def run(out: Path, rule: int, extra: list[str], seed: int, epochs: int) -> dict:
    """Train one point (resumes if it is already there) and return its last metrics line."""
    folder = out / f"rule{rule}-s{seed}"
    cmd = [
        sys.executable,
        "-m",
        "mixc",
        "train",
        *BASE,
        *extra,
        "--epochs",
        str(epochs),
        "--seed",
        str(seed),
        "--out",
        str(folder),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((folder / "metrics.jsonl").read_text().strip().splitlines()[-1])


def fmt(xs: list[float], scale: float = 1.0, digits: int = 2) -> str:
    return f"{st.mean(xs) * scale:.{digits}f} ± {st.stdev(xs) * scale:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--out", default="/tmp/init-compare")
    args = ap.parse_args()
    out = Path(args.out)
    res = {
        name: [run(out, i, extra, s, args.epochs) for s in range(args.seeds)]
        for i, (name, extra) in enumerate(RULES.items())
    }
    print("| rule | accuracy (%) | NLL | mean member acc (%) | diversity |")
    print("|---|---|---|---|---|")
    for name, rows in res.items():
        print(
            f"| {name} | {fmt([r['accuracy'] for r in rows], 100)} |"
            f" {fmt([r['nll'] for r in rows], 1, 4)} |"
            f" {fmt([st.mean(r['member_accuracy']) for r in rows], 100)} |"
            f" {fmt([r['diversity'] for r in rows])} |"
        )
    base = res[next(iter(RULES))]
    for name, rows in list(res.items())[1:]:
        acc = [100 * (r["accuracy"] - b["accuracy"]) for r, b in zip(rows, base)]
        nll = [r["nll"] - b["nll"] for r, b in zip(rows, base)]
        print(f"paired vs default, {name}: accuracy {fmt(acc)} points, NLL {fmt(nll, 1, 4)}")


if __name__ == "__main__":
    main()
