"""Per-epoch logs beside metrics.jsonl: ``--logger csv`` (metrics.csv) or ``--logger tensorboard``
(events files).

metrics.jsonl stays the run's record (validated, resumable); a logger is a view of the same
numbers for other tools. TensorBoard goes through the ``tensorboard`` package's own writer
(``tensorboard.summary.Writer``; ``pip install 'mixc[log]'``), not through a framework, so it
works the same under every backend.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Protocol

from mixc.core.errors import MixcError

__all__ = ["Logger", "LoggerError", "make_logger", "LOGGERS"]

LOGGERS = ("none", "csv", "tensorboard")


class LoggerError(MixcError):
    """An unknown logger, or tensorboard missing."""


class Logger(Protocol):
    def log(self, rec: dict[str, Any], lines: list[dict[str, Any]]) -> None:
        """Record epoch ``rec``; ``lines`` is every epoch so far (resumed runs included)."""

    def close(self) -> None: ...


def _scalars(rec: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in rec.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class _Null:
    def log(self, rec: dict[str, Any], lines: list[dict[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass


class CsvLogger:
    """``metrics.csv``: one row per epoch, a column per scalar; rewritten whole each epoch (columns
    can grow when the test set is first scored), so it always equals metrics.jsonl."""

    def __init__(self, out: Path) -> None:
        self.path = out / "metrics.csv"

    def log(self, rec: dict[str, Any], lines: list[dict[str, Any]]) -> None:
        rows = [_scalars(m) for m in lines]
        cols = list(dict.fromkeys(k for r in rows for k in r))
        from mixc.core.safe_write import write_with

        def fill(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=cols)
                w.writeheader()
                w.writerows(rows)

        write_with(self.path, fill)

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Scalars under ``train/``, ``val/`` and ``test/`` at step = epoch, in
    ``<run>/tensorboard``."""

    def __init__(self, out: Path) -> None:
        try:
            from tensorboard.summary import Writer
        except ImportError as e:
            raise LoggerError(
                "--logger tensorboard needs the tensorboard package, which is not importable here "
                f"({e}); hint: pip install 'mixc[log]'"
            ) from None
        self.writer = Writer(str(out / "tensorboard"))

    def log(self, rec: dict[str, Any], lines: list[dict[str, Any]]) -> None:
        epoch = int(rec["epoch"])
        for key, value in _scalars(rec).items():
            if key == "epoch":
                continue
            group = (
                "val"
                if key.startswith("val_")
                else "train"
                if key in ("train_loss", "lr", "epoch_time", "train_time", "images_per_s")
                else "test"
            )
            self.writer.add_scalar(f"{group}/{key.removeprefix('val_')}", value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_logger(kind: str, out: Path) -> Logger:
    """The logger named ``kind`` writing into run folder ``out``."""
    if kind == "csv":
        return CsvLogger(out)
    if kind == "tensorboard":
        return TensorBoardLogger(out)
    if kind == "none":
        return _Null()
    raise LoggerError(f"--logger must be one of {', '.join(LOGGERS)}, not {kind!r}")
