"""Evaluating a trained run, independently of the framework that runs it.

A run folder (``mixc train --out``) holds ``plan.json``, ``config.json``,
``metrics.jsonl`` and ``checkpoint.safetensors``. Checkpoints name tensors by
the plan, so any backend can read any run: evaluation only needs, from the
chosen backend, member probabilities ``[N, M, classes]`` for numpy inputs,
which :func:`load_predictor` asks of it through the Backend interface
(``mixc.backends.base``).

Everything after the probabilities (metrics, corruptions, tables, plots) is
numpy and shared.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mixc.compiler.plan import Plan, PlanFileError, read_plan
from mixc.core.data import DataError, Dataset, check_compatible, load_dataset
from mixc.core.errors import MixcError, RunFolderError
from mixc.core.run_read import last_metrics as _last_metrics
from mixc.core.run_read import parse_header, read_config, read_header, read_metrics, read_raw_header
from mixc.metrics import (
    accuracy,
    adaptive_ece,
    brier,
    classwise_ece,
    ece,
    evaluate,
    member_summary,
    nll,
)

__all__ = [
    "EvalError",
    "Run",
    "open_run",
    "last_metrics",
    "Predictor",
    "load_predictor",
    "summarise",
    "calibration_summary",
    "evaluate_corruptions",
    "evaluate_cifar_c",
    "resolve_data",
    "checkpoint_header",
    "EVAL_FILE",
    "CHECKPOINT",
    "UNCERTAINTY_COLUMNS",
    "uncertainty_columns",
]

CHECKPOINT = "checkpoint.safetensors"
EVAL_FILE = "eval.json"

#: member probabilities [N, M, classes] for model inputs [N, ...] (float32, already normalised)
Predictor = Callable[[np.ndarray], np.ndarray]


class EvalError(MixcError, RuntimeError):
    """A user-facing problem: no such run, no checkpoint, a plan that does not match, a missing
    backend."""


# ---------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class Run:
    """A trained run: where it lives, its plan, and what trained it."""

    checkpoint: Path
    plan: Plan
    folder: Path  # the run folder, or the checkpoint's folder
    config: dict[str, Any] = field(default_factory=dict)  # config.json, {} if absent
    epoch: int = 0

    @property
    def baseline(self) -> str | None:
        return (self.config.get("options") or {}).get("baseline")

    @property
    def label(self) -> str:
        return str(self.folder if self.checkpoint.name == CHECKPOINT else self.checkpoint)

    def spec_and_overrides(self) -> tuple[str, list[str]]:
        """The spec it was compiled from and the --set overrides, to recompile a variant (e.g. one
        member)."""
        opts = self.config.get("options") or {}
        overrides = list(opts.get("overrides") or [])
        for cand in (opts.get("spec"), opts.get("file"), self.plan.source):
            if cand and Path(cand).is_file():
                return str(cand), overrides
        # a zoo name, or an error from compile
        return (str(opts.get("file") or self.plan.source), overrides)


def open_run(target: str | os.PathLike, plan_file: str | os.PathLike | None = None) -> Run:
    """Open a run folder, or a checkpoint file with ``plan.json`` beside it (or ``plan_file``).

    The checkpoint's header, ``config.json`` and ``metrics.jsonl`` are parsed
    through ``mixc.core.run_models``: a damaged or edited file is an
    ``EvalError`` naming the file, line and field.
    """
    path = Path(target)
    if path.is_dir():
        folder, ckpt = path, path / CHECKPOINT
        if not ckpt.is_file():
            found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise EvalError(
                f"{path} holds no {CHECKPOINT} (it holds {found}); hint: name a run folder written"
                " by `mixc train --out DIR`, or the checkpoint file itself"
            )
    elif path.is_file():
        folder, ckpt = path.parent, path
    else:
        raise EvalError(
            f"no run folder or checkpoint {path}; hint: `mixc train FILE --out DIR` writes one"
        )
    head = _parsed(lambda: read_header(ckpt))
    plan_path = Path(plan_file) if plan_file is not None else folder / "plan.json"
    if not plan_path.is_file():
        raise EvalError(
            f"no plan for {ckpt}: {plan_path} does not exist; hint: pass --plan PLAN.json "
            "(`mixc compile SPEC -o plan.json` with the overrides it was trained with)"
        )
    try:
        # validated and checked against its hash before anything lowers it
        plan = read_plan(plan_path)
    except PlanFileError as e:
        raise EvalError(str(e)) from None
    want = plan.spec_hash
    if head.spec_hash != want:
        raise EvalError(
            f"{ckpt} was written for spec {head.spec_name!r} (hash {head.spec_hash}), but"
            f" {plan_path} is {plan.name!r} (hash {want}); hint: pass the plan it was trained with"
            " (--plan)"
        )
    config: dict[str, Any] = {}
    try:
        cfg = read_config(folder / "config.json")
    except RunFolderError as e:
        # the run's own file; beside a loose checkpoint it may be anyone's
        if ckpt.name == CHECKPOINT:
            raise EvalError(str(e)) from None
        cfg = None
    if cfg is not None and cfg.options.spec_hash in (None, want):  # else another run's settings
        config = cfg.model_dump(mode="json", exclude_none=True)
    if ckpt.name == CHECKPOINT:
        _parsed(lambda: read_metrics(folder))  # the whole run folder is valid, or named at fault
    return Run(ckpt, plan, folder, config, head.epoch)


def _parsed(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except RunFolderError as e:
        raise EvalError(str(e)) from None


def checkpoint_header(path: Path) -> dict[str, str]:
    """A mixc checkpoint's header, validated, read without any framework (EvalError naming each bad
    field)."""
    raw = _parsed(lambda: read_raw_header(path))
    _parsed(lambda: parse_header(raw, path))
    return raw


def last_metrics(folder: Path) -> dict[str, Any] | None:
    """The last line of ``metrics.jsonl`` (the test metrics after the last finished epoch), or None.

    Every line is validated: a bad one is an EvalError naming ``metrics.jsonl:<line>``.
    """
    return _parsed(lambda: _last_metrics(folder))


def resolve_data(run: Run, data: str | None, data_dir: str | None) -> tuple[str, str | None]:
    """The dataset to evaluate on: ``--data``, else what the run trained on, else the spec's train
    section."""
    recipe = run.config.get("recipe") or run.plan.train or {}
    name = data or recipe.get("data")
    if not name:
        raise EvalError(
            f"{run.label}: no dataset recorded for this run; hint: pass --data (digits, cifar10,"
            " ...)"
        )
    return str(name), data_dir if data_dir is not None else recipe.get("data_dir")


def load_test_set(name: str, data_dir: str | None, plan: Plan) -> Dataset:
    """``load_dataset`` plus the check that its samples and labels fit ``plan`` (DataError
    otherwise)."""
    ds = load_dataset(name, data_dir, plan.input_shape)
    check_compatible(ds, plan.input_shape, plan.classes)
    return ds


# ---------------------------------------------------------------------------
# The backend interface


def load_predictor(
    backend: str,
    plan: Plan,
    checkpoint: str | os.PathLike,
    device: str = "cpu",
    batch_size: int = 500,
) -> Predictor:
    """A function from model inputs ``[N, ...]`` to member probabilities ``[N, M, classes]``.

    The named backend's :meth:`~mixc.backends.base.Backend.load_predictor`; its
    problems (missing framework, bad checkpoint, unknown device) are ``MixcError``s.
    """
    from mixc.backends import get_backend

    return get_backend(backend, "eval").load_predictor(
        plan, Path(checkpoint), device=device, batch_size=batch_size
    )


# ---------------------------------------------------------------------------
# Metrics


def summarise(member_probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """``mixc.metrics.evaluate`` plus the ensemble's adaptive and classwise ECE, the mean member
    accuracy and the best member."""
    ens = np.asarray(member_probs, dtype=np.float64).mean(axis=1)
    calib = {"adaptive_ece": adaptive_ece(ens, labels), "classwise_ece": classwise_ece(ens, labels)}
    return {**evaluate(member_probs, labels), **calib, **member_summary(member_probs, labels)}


def calibration_summary(member_probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The ensemble's accuracy, NLL, the three ECEs and Brier: the before/after columns of a
    temperature."""
    ens = np.asarray(member_probs, dtype=np.float64).mean(axis=1)
    return {
        "accuracy": accuracy(ens, labels),
        "nll": nll(ens, labels),
        "ece": ece(ens, labels),
        "adaptive_ece": adaptive_ece(ens, labels),
        "classwise_ece": classwise_ece(ens, labels),
        "brier": brier(ens, labels),
    }


def _short(member_probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The ensemble's accuracy, NLL, ECE and Brier, and the mean member accuracy (for corrupted
    sets)."""
    ens = np.asarray(member_probs, dtype=np.float64).mean(axis=1)
    return {
        "accuracy": accuracy(ens, labels),
        "nll": nll(ens, labels),
        "ece": ece(ens, labels),
        "brier": brier(ens, labels),
        "mean_member_accuracy": member_summary(member_probs, labels)["mean_member_accuracy"],
    }


_KEYS = ("accuracy", "nll", "ece", "brier", "mean_member_accuracy")


def _aggregate(
    per: dict[str, dict[int, dict[str, float]]], source: str, extra: dict[str, Any]
) -> dict[str, Any]:
    """Means over severities per corruption, over everything overall, and per severity across
    corruptions."""
    out: dict[str, Any] = {"source": source, **extra, "corruptions": {}}
    for name, sev in per.items():
        out["corruptions"][name] = {
            **{k: float(np.mean([m[k] for m in sev.values()])) for k in _KEYS},
            "severities": {str(s): m for s, m in sev.items()},
        }
    flat = [m for sev in per.values() for m in sev.values()]
    out["overall"] = {k: float(np.mean([m[k] for m in flat])) for k in _KEYS} if flat else {}
    sevs = sorted({s for sev in per.values() for s in sev})
    out["by_severity"] = {
        str(s): {k: float(np.mean([sev[s][k] for sev in per.values() if s in sev])) for k in _KEYS}
        for s in sevs
    }
    return out


def evaluate_corruptions(
    predict: Predictor,
    dataset: Dataset,
    names: list[str],
    severities: tuple[int, ...] = (1, 2, 3, 4, 5),
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Corrupt ``dataset``'s test images in pixel space (``mixc.corruptions``) and score each
    set."""
    from mixc.corruptions import corrupt, pixel_scale

    scale = pixel_scale(dataset)
    pixels = scale.to_pixels(dataset.x_test)
    labels = dataset.y_test
    per: dict[str, dict[int, dict[str, float]]] = {}
    for name in names:
        if on_step:
            on_step(name)
        xs = [scale.from_pixels(corrupt(pixels, name, s, seed)) for s in severities]
        probs = predict(np.concatenate(xs))  # one call per corruption: every severity stacked
        n = len(labels)
        per[name] = {
            s: _short(probs[i * n : (i + 1) * n], labels) for i, s in enumerate(severities)
        }
    return _aggregate(
        per, f"mixc.corruptions on {dataset.name}", {"seed": seed, "pixel_scale": scale.how}
    )


def evaluate_cifar_c(
    predict: Predictor,
    name: str,
    data_dir: str | None,
    plan: Plan,
    names: list[str] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], Dataset | None]:
    """Score the published CIFAR-10-C/100-C files; returns the result and the clean dataset if it
    loaded.

    The files hold pixels; they are normalised like the clean set ``mixc.core.data``
    loads (its train split's per-channel mean/std). Without the clean archives
    the published CIFAR statistics are used instead, and the result says so.
    """
    from mixc.corruptions import PixelScale, load_cifar_c, pixel_scale

    cc = load_cifar_c(name, data_dir)
    if plan.input_shape != [3, 32, 32]:
        raise DataError(
            f"{name} holds 3x32x32 images, but {plan.name}'s input is {plan.input_shape}"
        )
    if int(cc.labels.max()) >= plan.classes:
        raise DataError(
            f"{name} holds label {int(cc.labels.max())}, outside {plan.name}'s {plan.classes}"
            " classes"
        )
    clean: Dataset | None
    try:
        clean = load_test_set(cc.clean, data_dir, plan)
        scale = pixel_scale(clean)
    except DataError:
        clean = None
        stats = {
            "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
            "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        }[cc.clean]
        scale = PixelScale(
            np.array(stats[0]),
            np.array(stats[1]),
            f"published {cc.clean} train statistics "
            f"(the {cc.clean} archive was not found to compute them)",
        )
    chosen = names if names is not None else cc.corruptions
    files = {"jpeg": "jpeg_compression"}
    per: dict[str, dict[int, dict[str, float]]] = {}
    for c in chosen:
        fname = files.get(c, c)
        if fname not in cc.corruptions:
            raise DataError(f"{cc.folder} has no {fname}.npy (it has {', '.join(cc.corruptions)})")
        if on_step:
            on_step(fname)
        per[fname] = {}
        for s, px, y in cc.severities(fname):
            per[fname][s] = _short(predict(scale.from_pixels(px)), y)
    return _aggregate(per, f"{cc.folder}", {"pixel_scale": scale.how}), clean


def save_eval(folder: Path, result: dict[str, Any]) -> Path:
    """Keep ``result`` in ``folder/eval.json`` for ``mixc report``; corruption results of the same
    checkpoint and data survive a later clean-only evaluation."""
    from mixc.core.safe_write import write_json

    path = Path(folder) / EVAL_FILE
    if "corruptions" not in result and path.is_file() and not path.is_symlink():
        try:
            old = json.loads(path.read_bytes().decode("utf-8"))
        except (ValueError, OSError):  # not UTF-8, not JSON: replaced by this evaluation
            old = {}
        if not isinstance(old, dict):
            old = {}
        if (
            old.get("corruptions")
            and old.get("epoch") == result.get("epoch")
            and old.get("data") == result.get("data")
        ):
            result = {**result, "corruptions": old["corruptions"]}
    return write_json(path, result)


# ---------------------------------------------------------------------------
# The uncertainty columns of `mixc report` and `mixc sweep`, from eval.json


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class _Selective(_Section):
    aurc: float = Field(ge=0, le=1)
    augrc: float = Field(ge=0, le=1)
    risk_at_80: float = Field(ge=0, le=1)
    coverage_at_5: float = Field(ge=0, le=1)


class _Detection(_Section):
    auroc: float = Field(ge=0, le=1)
    fpr95: float = Field(ge=0, le=1)


class _OodSet(_Section):
    scores: dict[str, _Detection]


class _Ood(_Section):
    sets: dict[str, _OodSet]


class _Calibrated(_Section):
    nll: float
    ece: float = Field(ge=0, le=1)


class _CalibrationResult(_Section):
    temperature: float = Field(gt=0)
    after: _Calibrated


class _Clean(_Section):
    adaptive_ece: float | None = Field(None, ge=0, le=1)
    classwise_ece: float | None = Field(None, ge=0, le=1)


class EvalUncertainty(_Section):
    """The parts of ``eval.json`` that report and sweep carry (validated; a bad file contributes
    nothing)."""

    epoch: int | None = None
    spec_hash: str | None = None
    clean: _Clean | None = None
    selective: _Selective | None = None
    ood: _Ood | None = None
    calibration: _CalibrationResult | None = None


#: the columns, in order; None where `mixc eval` did not compute them
UNCERTAINTY_COLUMNS = [
    "adaptive_ece",
    "classwise_ece",
    "aurc",
    "augrc",
    "risk_at_80",
    "coverage_at_5",
    "ood_auroc",
    "ood_fpr95",
    "ood_sets",
    "temperature",
    "calibrated_nll",
    "calibrated_ece",
]


def uncertainty_columns(folder: Path, epoch: int, spec_hash: str) -> dict[str, Any]:
    """The uncertainty columns of ``folder/eval.json`` when it is of this checkpoint (epoch and spec
    hash), else all None. OOD: the MSP score's AUROC and FPR95, means over the sets evaluated
    (named in ``ood_sets``).
    """
    out: dict[str, Any] = {c: None for c in UNCERTAINTY_COLUMNS}
    path = Path(folder) / EVAL_FILE
    if not path.is_file() or path.is_symlink():
        return out
    try:
        ev = EvalUncertainty.model_validate_json(path.read_bytes())
    except (OSError, ValueError):  # a damaged cache: the metrics lines stay the record
        return out
    if ev.epoch != epoch or ev.spec_hash != spec_hash:
        return out
    if ev.clean is not None:
        out.update(adaptive_ece=ev.clean.adaptive_ece, classwise_ece=ev.clean.classwise_ece)
    if ev.selective is not None:
        out.update(
            aurc=ev.selective.aurc,
            augrc=ev.selective.augrc,
            risk_at_80=ev.selective.risk_at_80,
            coverage_at_5=ev.selective.coverage_at_5,
        )
    msp = {
        name: s.scores["msp"]
        for name, s in (ev.ood.sets.items() if ev.ood else [])
        if "msp" in s.scores
    }
    if msp:
        out.update(
            ood_auroc=float(np.mean([d.auroc for d in msp.values()])),
            ood_fpr95=float(np.mean([d.fpr95 for d in msp.values()])),
            ood_sets=", ".join(msp),
        )
    if ev.calibration is not None:
        out.update(
            temperature=ev.calibration.temperature,
            calibrated_nll=ev.calibration.after.nll,
            calibrated_ece=ev.calibration.after.ece,
        )
    return out
