"""The run folder and console output of `mixc train`, framework-free.

The same files and lines as the torch backend's loop (``plan.json``,
``config.json``, ``metrics.jsonl``, one line per epoch, a rich bar on a
terminal), so a run reads the same whichever backend trained it. Nothing here
imports a framework; the torch loop keeps its own copy for now.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mixc.checkpoint_format import spec_hash
from mixc.compiler.plan import Plan, PlanFileError, read_plan

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"


class TrainError(RuntimeError):
    """A user-facing problem with a training run (its folder, its options); printed without a traceback."""


def seed_of(*parts: int) -> int:
    """A 63-bit seed derived from integers, well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class Reporter:
    """Prints: a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, enabled: bool, bar: bool) -> None:
        self.enabled = enabled
        self.progress = None
        if enabled and bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeRemainingColumn(),
                transient=True,
            )

    def __enter__(self) -> "Reporter":
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(text, highlight=False, markup=False)
        else:
            print(text, flush=True)

    def epoch_task(self, epoch: int, epochs: int, steps: int) -> Callable[[int, float | None], None]:
        if self.progress is None:
            return lambda done, loss: None
        task = self.progress.add_task(f"epoch {epoch}/{epochs}", total=steps, loss="-")

        def update(done: int, loss: float | None) -> None:
            self.progress.update(task, completed=done, loss="-" if loss is None else f"{loss:.4f}")
            if done >= steps:
                self.progress.remove_task(task)

        return update


def epoch_line(rec: dict[str, Any], epochs: int) -> str:
    members = " ".join(f"{a * 100:.1f}" for a in rec["member_accuracy"])
    return (
        f"epoch {rec['epoch']}/{epochs}  loss {rec['train_loss']:.4f}  lr {rec['lr']:.4g}  "
        f"acc {rec['accuracy'] * 100:.2f}%  nll {rec['nll']:.4f}  ece {rec['ece'] * 100:.2f}%  "
        f"members {members}  {rec['epoch_time']:.1f}s"
    )


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def keep_metrics_until(path: Path, epoch: int) -> None:
    """Drop metric lines past ``epoch`` (a crash between a line and its checkpoint), so resumes stay clean."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("epoch", 0) <= epoch:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)


def check_run_folder(out: Path, plan: Plan) -> None:
    """Refuse a folder that is a file or holds another spec's run, naming both."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a folder; hint: pass a folder for the run's files")
    old_path = out / "plan.json"
    if not old_path.exists():
        return
    try:
        old = read_plan(old_path)  # validated and matching its hash, or the folder is not resumed
    except PlanFileError as e:
        raise TrainError(f"{e}; the run in {out} cannot be resumed from it: pass another --out folder, "
                         "or delete that one to start over") from None
    if spec_hash(old) != spec_hash(plan):
        raise TrainError(
            f"the run folder {out} belongs to {old.name} (from {old.source}, spec hash {spec_hash(old)}), "
            f"not to {plan.name} (from {plan.source}, spec hash {spec_hash(plan)}); the members, budget or "
            "architecture differ, so its checkpoint cannot be resumed; hint: pass another --out folder, "
            "or delete that one to start over"
        )
