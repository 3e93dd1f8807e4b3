"""How a training run executes its members: the layout (and memory format) chosen for it.

Which layout is faster depends on the model, the batch and the device: on one H200 the loop layout
beat the grouped one by 1.25x for WRN-28-10 x4 at batch 128, while WRN-16-4 at batch 64 went the
other way. So ``auto`` times the candidates for a few steps on the run's own model, batch and
device, and the run keeps the fastest; on the CPU it keeps the runtimes' own rule for it (members
one after another, Packed-Ensembles' groups in one grouped convolution: faster there throughout,
docs/execution.md) instead of spending steps on timing. The choice and its
timings go into ``config.json``; a resumed run takes the recorded choice. Details:
docs/training.md ("Layout").
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "LayoutChoice",
    "Candidate",
    "MEASURED_DEVICES",
    "WARMUP_STEPS",
    "TIMED_STEPS",
    "candidates",
    "choose_layout",
    "label",
]

#: device kinds (torch's ``device.type``, jax's ``platform``) where ``auto`` measures
MEASURED_DEVICES = {"cuda", "gpu", "tpu", "rocm"}
#: steps run before timing a candidate (kernel selection, caches, compilation)...
WARMUP_STEPS = 2
#: ...and the steps timed (the median is kept)
TIMED_STEPS = 5

Candidate = tuple[str, bool]  # (layout, channels_last)


class LayoutChoice(BaseModel):
    """The layout a run trains in, and why: recorded in ``config.json`` (``options.layout_choice``).

    ``how``: ``forced`` (``--layout``), ``rule`` (no accelerator, or nothing to choose),
    ``measured`` (``step_ms`` holds each candidate's median step), ``resumed`` (taken from the run
    folder).
    """

    model_config = ConfigDict(extra="forbid")

    layout: Literal["auto", "grouped", "loop"]  # auto: the runtime's rule for the device
    channels_last: bool = False
    how: Literal["forced", "rule", "measured", "resumed"]
    step_ms: dict[str, float] = Field(default_factory=dict)

    def describe(self) -> str:
        """For the run's header line: "layout loop (measured: loop 60.3 ms, grouped 75.3 ms)"."""
        name = self.layout + (", channels_last" if self.channels_last else "")
        if not self.step_ms:
            return f"layout {name} ({self.how})"
        times = ", ".join(f"{k} {v:.1f} ms" for k, v in self.step_ms.items())
        return f"layout {name} (measured a step: {times})"


def label(candidate: Candidate) -> str:
    """A candidate's name in ``step_ms``: "loop", "grouped+channels_last"."""
    layout, channels_last = candidate
    return layout + ("+channels_last" if channels_last else "")


def candidates(requested: str, device_kind: str, image_input: bool) -> list[Candidate]:
    """What ``requested`` (auto, grouped or loop) leaves to choose on ``device_kind``: both layouts
    under auto on an accelerator (elsewhere auto stays the runtime's rule for the device), each
    also in channels_last there when the input is an image (the memory format tensor cores
    prefer). One candidate means there is nothing to time."""
    accelerator = device_kind in MEASURED_DEVICES
    if requested == "auto":
        layouts = ["loop", "grouped"] if accelerator else ["auto"]
    else:
        layouts = [requested]
    formats = [False, True] if accelerator and image_input else [False]
    return [(layout, cl) for layout in layouts for cl in formats]


def choose_layout(
    requested: str,
    device_kind: str,
    image_input: bool,
    time_steps: Callable[[Candidate], list[float]],
) -> LayoutChoice:
    """The layout to train in: the only candidate, or the one whose median step ``time_steps``
    measured fastest (``time_steps(candidate)`` runs ``WARMUP_STEPS + TIMED_STEPS`` steps on a
    throwaway copy of the model and returns the timed ones' seconds)."""
    options = candidates(requested, device_kind, image_input)
    if len(options) == 1:
        layout, channels_last = options[0]
        how = "forced" if requested != "auto" else "rule"
        return LayoutChoice(layout=layout, channels_last=channels_last, how=how)
    medians = {c: statistics.median(time_steps(c)) for c in options}
    best = min(options, key=lambda c: medians[c])
    return LayoutChoice(
        layout=best[0],
        channels_last=best[1],
        how="measured",
        step_ms={label(c): round(medians[c] * 1e3, 3) for c in options},
    )
