"""The names of a run folder's files and the checkpoint format's name: constants every floor shares.

The backends save ``CHECKPOINT`` and read ``METRICS``; the readers (``mixc.core.run_read``) and the
application's writer (``mixc.run_writer``) name the same files. Kept apart from both so that a
backend can name a file without importing a reader or the writer.
"""

from __future__ import annotations

__all__ = [
    "CHECKPOINT",
    "METRICS",
    "CONFIG",
    "BEST",
    "BEST_METRICS",
    "PLAN",
    "CALIBRATION",
    "LOCK",
    "FORMAT",
    "SUPPORTED_FORMAT_VERSIONS",
    "WRITTEN",
]

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
BEST = "best.safetensors"
#: what ``--best-metric`` may name, and whether larger is better
BEST_METRICS = {"nll": False, "accuracy": True, "ece": False}
PLAN = "plan.json"
CALIBRATION = "calibration.json"
LOCK = ".mixc-train.lock"
#: the ``format`` entry of every mixc checkpoint header (the one spelling: the checkpoint format and
#: the header model read it from here)
FORMAT = "mixc-checkpoint"
#: Checkpoint format versions this mixc reads (the checksum is an optional header entry of version
#: 1).
SUPPORTED_FORMAT_VERSIONS = ("1",)

#: the names `mixc train` and `mixc eval` write in a run folder (besides epoch-NNNN.safetensors)
WRITTEN = (
    PLAN,
    CONFIG,
    METRICS,
    CHECKPOINT,
    BEST,
    LOCK,
    "eval.json",
    "calibration.json",
    "metrics.csv",
    "curves.png",
    "curves.pdf",
    "tensorboard",
)
