"""A run's temperature (`mixc calibrate`): fitting it, storing it, and finding it again, valid or
not.

The temperature lives in ``RUN/calibration.json`` (``mixc.core.run_models.Calibration``,
validated when read) with the sha256 of the checkpoint it was fitted on. A
temperature applies only to that checkpoint: after a resume or a retraining
the checkpoint's bytes differ, and `mixc eval` ignores the file with a note,
while `mixc export` and `mixc predict` refuse it (deploying a temperature
fitted on other weights would be silently wrong) unless ``--no-temperature``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mixc.core.errors import MixcError, RunFolderError
from mixc.core.run_files import CALIBRATION
from mixc.core.run_models import Calibration
from mixc.core.run_read import file_sha256, read_calibration
from mixc.temperature import T_MAX, T_MIN, apply_temperature, fit_temperature, tempered_nll

__all__ = ["CalibrationError", "fit", "save", "lookup", "for_deployment", "tempered"]


class CalibrationError(MixcError):
    """A calibration.json that does not belong to the checkpoint in use (exit 1)."""


def fit(run: Any, member_probs: np.ndarray, labels: np.ndarray, fitted_on: str) -> Calibration:
    """The ensemble's temperature and each member's, fitted by NLL on held-out ``(member_probs,
    labels)``."""
    p = np.asarray(member_probs, dtype=np.float64)
    t = fit_temperature(p, labels)
    members = (
        [fit_temperature(p[:, m : m + 1], labels) for m in range(p.shape[1])]
        if p.shape[1] > 1
        else [t]
    )
    return Calibration(
        warning=_warning(p, labels, [t, *members]),
        temperature=t,
        member_temperatures=members,
        checkpoint=run.checkpoint.name,
        checkpoint_sha256=file_sha256(run.checkpoint),
        epoch=run.epoch,
        spec_hash=run.plan.spec_hash,
        fitted_on=fitted_on,
        samples=len(labels),
        nll_before=tempered_nll(p, labels, 1.0),
        nll_after=tempered_nll(p, labels, t),
    )


def _warning(p: np.ndarray, labels: np.ndarray, temps: list[float]) -> str | None:
    """Why a fitted temperature may mislead: no errors to calibrate on, or the search stopped at its
    bound."""
    wrong = int(np.sum(p.mean(axis=1).argmax(axis=1) != np.asarray(labels)))
    if wrong == 0:
        return (
            f"the ensemble makes no error on the {len(labels)} held-out samples, so their NLL keeps"
            " falling as T shrinks and the fit only sharpens the predictions; the temperature is"
            " not reliable: hold out more data (a larger --val-fraction when training, or --data"
            " VAL)"
        )
    at_bound = [t for t in temps if t <= T_MIN * 1.01 or t >= T_MAX * 0.99]
    if at_bound:
        return (
            f"a fitted temperature reached the search bound ({T_MIN:g} or {T_MAX:g}): the held-out"
            f" data ({len(labels)} samples, {wrong} errors) hardly constrains it; hold out more"
            " data"
        )
    return None


def save(run: Any, cal: Calibration) -> Any:
    """Write ``cal`` to the run's ``calibration.json`` through the one write rule (atomic, no
    links)."""
    from mixc.core.safe_write import write_json

    return write_json(run.folder / CALIBRATION, cal.model_dump(mode="json"))


def lookup(run: Any) -> tuple[Calibration | None, str | None]:
    """The run's calibration if it belongs to its checkpoint, else None and why (None, None: there
    is none)."""
    try:
        cal = read_calibration(run.folder)
    except RunFolderError as e:
        return None, str(e)
    if cal is None:
        return None, None
    if cal.checkpoint != run.checkpoint.name or cal.spec_hash != run.plan.spec_hash:
        return (
            None,
            (
                f"{run.folder / CALIBRATION} was fitted on {cal.checkpoint} (epoch {cal.epoch}),"
                f" not on {run.checkpoint.name}; hint: run `mixc calibrate {run.checkpoint}` for"
                " this checkpoint"
            ),
        )
    if cal.checkpoint_sha256 != file_sha256(run.checkpoint):
        return (
            None,
            (
                f"{run.folder / CALIBRATION} was fitted on an earlier {cal.checkpoint} (epoch"
                f" {cal.epoch}; the checkpoint changed since, now epoch {run.epoch}); hint: run"
                f" `mixc calibrate {run.label}` again"
            ),
        )
    return cal, None


def for_deployment(run: Any, skip: bool) -> Calibration | None:
    """The temperature export and predict apply: none with ``skip``; a stale or damaged file is an
    error."""
    if skip:
        return None
    cal, why = lookup(run)
    if why is not None:
        raise CalibrationError(
            f"{why}; it is not applied to predictions it was not fitted for (or pass "
            "--no-temperature to use the uncalibrated model)"
        )
    return cal


def tempered(member_probs: np.ndarray, cal: Calibration | None) -> np.ndarray:
    """``member_probs`` with the ensemble temperature applied (unchanged without a calibration)."""
    return (
        np.asarray(member_probs)
        if cal is None
        else apply_temperature(member_probs, cal.temperature)
    )
