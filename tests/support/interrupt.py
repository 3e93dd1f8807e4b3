"""Interrupting a training run right after its first checkpoint, for the resume tests of every
backend."""

from __future__ import annotations

from collections.abc import Callable

import pytest


def interrupt_after_first_epoch(monkeypatch: pytest.MonkeyPatch, run: Callable[[], object]) -> None:
    """Call ``run`` (a training run) and stop it with KeyboardInterrupt once epoch 1 is
    checkpointed.

    The shared driver (``mixc.training``) prints each epoch's line after saving it; the interruption
    comes from there, as Ctrl-C would.
    """
    from mixc import training

    real = training.epoch_line

    def interrupt(rec, epochs):
        if rec["epoch"] == 1:
            raise KeyboardInterrupt
        return real(rec, epochs)

    monkeypatch.setattr(training, "epoch_line", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(training, "epoch_line", real)
