"""`mixc train`'s console output: the same lines whichever backend trains (a rich bar on a
terminal)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Reporter", "epoch_line"]


class Reporter:
    """Prints (rank 0 only): a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, enabled: bool, bar: bool) -> None:
        self.enabled = enabled
        self.progress = None
        if enabled and bar:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeRemainingColumn(),
                transient=True,
            )

    def __enter__(self) -> Reporter:
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

    def epoch_task(
        self, epoch: int, epochs: int, steps: int
    ) -> Callable[[int, float | None], None]:
        if self.progress is None:
            return lambda done, loss: None
        task = self.progress.add_task(f"epoch {epoch}/{epochs}", total=steps, loss="-")

        def update(done: int, loss: float | None) -> None:
            self.progress.update(task, completed=done, loss="-" if loss is None else f"{loss:.4f}")
            if done >= steps:
                self.progress.remove_task(task)

        return update


def epoch_line(rec: dict[str, Any], epochs: int) -> str:
    """One console line per epoch: loss, lr, then validation and/or test metrics (whichever were
    measured)."""
    parts = [
        f"epoch {rec['epoch']}/{epochs}",
        f"loss {rec['train_loss']:.4f}",
        f"lr {rec['lr']:.4g}",
    ]
    if rec.get("val_accuracy") is not None:
        parts.append(
            f"val acc {rec['val_accuracy'] * 100:.2f}%  val nll {rec['val_nll']:.4f}  "
            f"val ece {rec['val_ece'] * 100:.2f}%" + ("  best" if rec.get("best") else "")
        )
    if rec.get("accuracy") is not None:
        members = " ".join(f"{a * 100:.1f}" for a in rec["member_accuracy"])
        label = "test " if rec.get("val_accuracy") is not None else ""
        parts.append(
            f"{label}acc {rec['accuracy'] * 100:.2f}%  {label}nll {rec['nll']:.4f}  "
            f"{label}ece {rec['ece'] * 100:.2f}%  members {members}"
        )
    speed = [f"{rec['images_per_s']:,.0f} img/s"] if rec.get("images_per_s") else []
    return "  ".join(parts + speed + [f"{rec['epoch_time']:.1f}s"])
