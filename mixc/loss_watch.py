"""Divergence caught inside the epoch: the training loss of every step, checked every few steps.

A run that diverges should stop at the step where its loss stopped being a number, not at the end of
an epoch that may be an hour long, and a loss that blows up without becoming NaN (a first-epoch
spike that leaves every member at chance) deserves a line saying so while the user can still stop
the run.

Steps return their loss on the device; reading it each step would wait for the device every step. So
the losses are kept for ``every`` steps, then copied to the host together (the trainer's
``fetch_losses``), and that copy is read ``every`` steps later, when its steps are long finished:
no step waits for the device, and a NaN stops the run at most ``2 * every`` steps after it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from mixc.core.errors import TrainError

__all__ = ["LossWatch", "CHECK_EVERY", "HIGH_FACTOR", "HIGH_STEPS"]

#: steps between two reads of the losses
CHECK_EVERY = 10
#: a loss above this multiple of the run's starting loss is "far above" it...
HIGH_FACTOR = 1.5
#: ...and one that stays there this many steps in a row gets the warning (once per run)
HIGH_STEPS = 50


class LossWatch:
    """Per-step mean member losses of one training process: a non-finite one raises
    :class:`TrainError` naming its step; one that stays above ``HIGH_FACTOR`` x the starting loss
    for ``HIGH_STEPS`` steps calls ``warn`` once. The starting loss is the mean of this process's
    first ``CHECK_EVERY`` steps (a resumed run starts from where it is)."""

    def __init__(
        self,
        members: int,
        steps_per_epoch: int,
        warn: Callable[[str], None],
        hint: str = "",
        every: int = CHECK_EVERY,
        fetch: Callable[[list[Any]], Callable[[], list[float]]] | None = None,
    ) -> None:
        self.members, self.steps_per_epoch, self.warn, self.hint, self.every = (
            members,
            steps_per_epoch,
            warn,
            hint,
            every,
        )
        self.fetch = fetch or _read_now
        self.pending: list[tuple[int, Any]] = []  # (global step, summed member loss on the device)
        self.inflight: list[tuple[list[int], Callable[[], list[float]]]] = []  # copies started
        self.read: list[tuple[int, float]] = []  # (global step, mean member loss) not yet taken
        self.start: float | None = None
        self.high_since: int | None = None  # the first global step of the current high run
        self.warned = False

    def add(self, global_step: int, loss: Any) -> None:
        """Keep one step's summed member loss; every ``every`` steps start copying the kept ones to
        the host and judge the copy started ``every`` steps before."""
        self.pending.append((global_step, loss))
        if len(self.pending) >= self.every:
            self._send()
            while len(self.inflight) > 1:
                self._judge(*self.inflight.pop(0))

    def check(self) -> None:
        """Read every loss kept or in flight (one wait for the device) and judge them in order."""
        self._send()
        while self.inflight:
            self._judge(*self.inflight.pop(0))

    def take(self) -> list[tuple[int, float]]:
        """The (global step, mean member loss) pairs read since the last take, in step order."""
        out, self.read = self.read, []
        return out

    def _send(self) -> None:
        if self.pending:
            steps, losses = zip(*self.pending)
            self.inflight.append((list(steps), self.fetch(list(losses))))
            self.pending = []

    def _judge(self, steps: list[int], read: Callable[[], list[float]]) -> None:
        values = [(s, float(v) / self.members) for s, v in zip(steps, read())]
        self.read.extend(values)
        for step, value in values:
            if not math.isfinite(value):
                raise TrainError(
                    f"the training loss became {value} at step {self._where(step)}; the run folder"
                    " keeps the last finished epoch; hint: lower the learning rate (--set"
                    " train.optimizer.lr=...), add warm-up (--set train.warmup=...) or clip"
                    " gradients (--grad-clip 1)" + self.hint
                )
        if self.start is None:
            self.start = sum(v for _, v in values) / max(len(values), 1)
            return
        for step, value in values:
            if value <= HIGH_FACTOR * self.start:
                self.high_since = None
                continue
            self.high_since = step if self.high_since is None else self.high_since
            if not self.warned and step - self.high_since + 1 >= HIGH_STEPS:
                self.warned = True
                self.warn(
                    f"warning: the training loss has stayed above {HIGH_FACTOR:g}x its starting"
                    f" value ({self.start:.3g}) since step {self._where(self.high_since)}"
                    f" ({value:.3g} at step {step + 1:,}); the run may be diverging; hint: lower"
                    " the learning rate or add warm-up" + self.hint
                )

    def _where(self, step: int) -> str:
        """Global step ``step`` (0-based) as the user counts it: "1,234 (epoch 3, step 12 of
        156)"."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return f"{step + 1:,} (epoch {epoch + 1}, step {within + 1} of {self.steps_per_epoch})"


def _read_now(losses: list[Any]) -> Callable[[], list[float]]:
    """The fetch of plain numbers (tests, a trainer without one): nothing to wait for."""
    return lambda: [float(v) for v in losses]
