"""`mixc train`'s hold on its run folder, once for every backend (the direction: one training
driver).

Application floor: the backends never write a run folder themselves; the driver (``mixc.training``)
drives a :class:`RunWriter` and hands the backend's ``save`` to it. What it guarantees:

- one writer per folder (``mixc.run_lock``), and stale temporaries of an interrupted write removed
  on start;
- a folder that holds another spec's run, or links where mixc writes, is refused before anything is
  written;
- a resume compares the recipe it is given with the one the checkpoint records and refuses a
  different one (naming each field, old -> new: ``mixc.recipe_diff``) unless asked explicitly, which
  is then recorded in ``config.json``'s ``history``;
- each epoch's metrics line is stored inside its checkpoint too, so a crash between the checkpoint's
  rename
  and the ``metrics.jsonl`` append is repaired on the next start;
- before a checkpoint replaces the last good one, its metrics must be finite (the backend's save
  refuses
  non-finite tensors).

Every file goes through ``mixc.core.safe_write`` (temporary beside the file, fsync, rename; no links
followed). No torch or jax import here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mixc.compiler.plan import Plan, PlanFileError, read_plan
from mixc.core.checkpoint_format import spec_hash
from mixc.core.errors import RunFolderError, TrainError
from mixc.core.finite import NonFiniteError, non_finite_metrics
from mixc.core.run_files import BEST, BEST_METRICS, CHECKPOINT, CONFIG, METRICS, PLAN, WRITTEN
from mixc.core.run_models import CheckpointHeader, RunConfig
from mixc.core.run_read import metric_lines, read_config, read_header, read_metrics
from mixc.core.safe_write import append_text, copy_file, write_json, write_text
from mixc.recipe_diff import recipe_changes
from mixc.run_lock import RunLock, clean_temporaries, note
from mixc.spec.recipe import Recipe

__all__ = ["RunWriter", "check_run_folder", "linked_files", "seed_of"]


def linked_files(out: Path) -> list[Path]:
    """The files of run folder ``out`` that mixc writes and that are symbolic links (a write would
    follow them)."""
    if not out.is_dir():
        return []
    names = [out / n for n in WRITTEN] + sorted(out.glob("epoch-[0-9][0-9][0-9][0-9].safetensors"))
    return [p for p in names if p.is_symlink()]


def check_run_folder(out: Path, plan: Plan) -> None:
    """Refuse a folder that is a file, holds links where mixc writes, or holds another spec's run,
    naming them."""
    if out.exists() and not out.is_dir():
        raise TrainError(
            f"--out {out} is a file, not a folder; hint: pass a folder for the run's files"
        )
    links = linked_files(out)
    if links:
        raise TrainError(
            f"the run folder {out} holds symbolic links where mixc writes its files"
            f" ({', '.join(map(str, links))}); writing through them would overwrite files outside"
            " the run folder; hint: remove the links (or replace them with the files themselves),"
            " or pass another --out folder"
        )
    old_path = out / PLAN
    if not old_path.exists():
        return
    try:
        old = read_plan(old_path)  # validated and matching its hash, or the folder is not resumed
    except PlanFileError as e:
        raise TrainError(
            f"{e}; the run in {out} cannot be resumed from it: pass another --out folder, "
            "or delete that one to start over"
        ) from None
    if spec_hash(old) != spec_hash(plan):
        raise TrainError(
            f"the run folder {out} belongs to {old.name} (from {old.source}, spec hash"
            f" {spec_hash(old)}), not to {plan.name} (from {plan.source}, spec hash"
            f" {spec_hash(plan)}); the members, budget or architecture differ, so its checkpoint"
            " cannot be resumed; hint: pass another --out folder, or delete that one to start over"
        )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _fmt(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


class RunWriter:
    """`mixc train`'s hold on its run folder, the same for every backend.

    Use as a context manager around the training loop. ``main`` is False on
    data-parallel ranks other than 0: they read the resume point but take no
    lock and write nothing. Errors are :class:`TrainError`; nothing is
    written before every check passed.
    """

    def __init__(
        self,
        out: Path,
        plan: Plan,
        recipe: Recipe,
        *,
        main: bool = True,
        allow_recipe_change: bool = False,
        log: Callable[[str], None] = note,
    ) -> None:
        self.out, self.plan, self.recipe, self.main = Path(out), plan, recipe, main
        self.allow_recipe_change, self.log = allow_recipe_change, log
        self.ckpt = self.out / CHECKPOINT
        self.metrics_path = self.out / METRICS
        self.header: CheckpointHeader | None = None
        self.config: RunConfig | None = None
        self.history: list[dict[str, Any]] = []
        self.saved_epoch = 0
        self._lock: RunLock | None = None

    def __enter__(self) -> RunWriter:
        check_run_folder(self.out, self.plan)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._lock = RunLock(self.out, self.log).acquire()
        try:
            if self.main:
                clean_temporaries(self.out, self.log)
            if self.ckpt.exists():
                self._read_resume()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def start_epoch(self) -> int:
        return self.header.epoch if self.header is not None else 0

    def _read_resume(self) -> None:
        """Validate the checkpoint's header and config.json, and compare the recipes."""
        try:
            head = read_header(self.ckpt)
            self.config = read_config(self.out / CONFIG)
        except RunFolderError as e:
            raise TrainError(f"cannot resume {self.out}: {e}") from None
        if head.spec_hash != spec_hash(self.plan):
            raise TrainError(
                f"cannot resume from {self.ckpt}: it was written for spec {head.spec_name!r} (hash"
                f" {head.spec_hash}), not {self.plan.name!r} (hash {spec_hash(self.plan)}); hint:"
                f" pass another --out folder for {self.plan.name}, or delete that one to start over"
            )
        meta, seed = head.metadata, self.recipe.seed
        if meta.seed is not None and meta.seed != seed:
            raise TrainError(
                f"the run in {self.out} was trained with seed {meta.seed}, not {seed}; resuming"
                f" with another seed would not reproduce either run; hint: pass --seed {meta.seed},"
                " or another --out folder"
            )
        if meta.optimizer is not None and meta.optimizer != self.recipe.optimizer.name:
            raise TrainError(
                f"the run in {self.out} used the {meta.optimizer} optimiser, not"
                f" {self.recipe.optimizer.name}; its saved optimiser state cannot drive another"
                " optimiser; hint: pass another --out folder"
            )
        old = meta.recipe or (self.config.recipe if self.config else None)
        if old is not None:
            self._compare_recipes(old, head.epoch)
        self.header = head
        self.saved_epoch = head.epoch

    def _compare_recipes(self, old: Recipe, epoch: int) -> None:
        """Refuse a changed recipe unless allowed; record allowed changes for config.json's history.

        ``epochs`` counts only under a cosine schedule (whose rate depends on
        it): elsewhere more epochs train on with the same steps, and that is
        recorded without asking.
        """
        changes = recipe_changes(old, self.recipe)
        cosine = "cosine" in (old.schedule.name, self.recipe.schedule.name)
        if not cosine and "epochs" in changes:
            self.history.append(
                {
                    "event": "epochs_changed",
                    "after_epoch": epoch,
                    "changes": {"epochs": list(changes.pop("epochs"))},
                    "time": _now(),
                }
            )
        if not changes:
            return
        listed = "; ".join(f"{k}: {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in changes.items())
        if not self.allow_recipe_change:
            raise TrainError(
                f"the run in {self.out} trained {epoch} epoch(s) with another recipe ({listed});"
                " resuming it would mix two recipes in one run, and its config.json would no"
                " longer describe the epochs already trained; hint: resume with the settings it"
                " was started with, pass another --out folder, or pass --allow-recipe-change to go"
                " on with the new recipe (recorded in config.json's history)"
            )
        self.log(
            f"{self.out}: going on after epoch {epoch} with a changed recipe ({listed}); recorded"
            f" in {CONFIG}'s history"
        )
        self.history.append(
            {
                "event": "recipe_changed",
                "after_epoch": epoch,
                "changes": {k: list(v) for k, v in changes.items()},
                "previous_recipe": old.model_dump(mode="json"),
                "allowed_by": "--allow-recipe-change",
                "time": _now(),
            }
        )

    def begin(self, options: dict[str, Any]) -> None:
        """Repair metrics.jsonl, then write plan.json and config.json (history kept); main rank
        only.

        When the checkpoint already has every epoch, nothing is trained and the
        files that describe it are left as they are.
        """
        if not self.main:
            return
        self._repair_metrics()
        if self.header is not None and self.start_epoch >= self.recipe.epochs:
            return
        write_text(self.out / PLAN, self.plan.to_json())
        history = [h.model_dump(mode="json") for h in self.config.history] if self.config else []
        write_json(
            self.out / CONFIG,
            {
                "recipe": self.recipe.model_dump(mode="json"),
                "options": options,
                "history": history + self.history,
            },
        )

    def _repair_metrics(self) -> None:
        """Keep lines up to the checkpoint's epoch; restore the checkpoint's own line if the append
        was lost."""
        path = self.metrics_path
        try:
            lines, truncated = metric_lines(path, repair=True) if path.is_file() else ([], False)
        except RunFolderError as e:
            raise TrainError(f"cannot resume {self.out}: {e}") from None
        keep = [line for line in lines if line.epoch <= self.start_epoch]
        own = self.header.metadata.metrics if self.header is not None else None
        restored = own is not None and (not keep or keep[-1].epoch < own.epoch)
        if restored:
            keep.append(own)
            self.log(
                f"{path}: restored the line of epoch {own.epoch} from the checkpoint (the run"
                " stopped between saving the checkpoint and appending it)"
            )
        if truncated:
            self.log(f"{path}: dropped a truncated last line (the run stopped while appending it)")
        if restored or truncated or len(keep) != len(lines):
            write_text(path, "".join(json.dumps(line.model_dump()) + "\n" for line in keep))

    def save_epoch(
        self,
        rec: dict[str, Any],
        save: Callable[[dict[str, Any]], None],
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Check ``rec``; have ``save(metadata)`` write the checkpoint (``rec`` inside); then append
        the line.

        ``save`` must refuse non-finite tensors (the checkpoint format's savers
        do, with :class:`NonFiniteError`); the last good checkpoint stays then.
        """
        epoch = int(rec["epoch"])
        kept = (
            f"the last good checkpoint (epoch {self.saved_epoch}) is kept in {self.ckpt}"
            if self.saved_epoch
            else "no checkpoint was written"
        )
        hint = (
            "hint: lower the learning rate (--set train.optimizer.lr=...), add warm-up (--set"
            " train.warmup=...) or clip the inputs' range"
        )
        bad = non_finite_metrics(rec)
        if bad:
            raise TrainError(
                f"training diverged in epoch {epoch}: {', '.join(bad[:6])}; {kept}; {hint}"
            )
        meta = {
            "seed": str(self.recipe.seed),
            "optimizer": self.recipe.optimizer.name,
            "recipe": self.recipe.model_dump_json(),
            "metrics": rec,
            **(extra or {}),
        }
        try:
            save(meta)
        except NonFiniteError as e:
            raise TrainError(f"training diverged in epoch {epoch}: {e}; {kept}; {hint}") from None
        self.saved_epoch = epoch
        append_text(self.metrics_path, json.dumps(rec) + "\n")

    def keep_best(self, rec: dict[str, Any], metric: str) -> bool:
        """Copy this epoch's checkpoint to ``best.safetensors`` if its ``val_<metric>`` beats every
        earlier epoch's (read back from metrics.jsonl, so a resumed run keeps comparing with the
        whole run). Call after :meth:`save_epoch`. Returns whether it was copied."""
        key, higher = f"val_{metric}", BEST_METRICS[metric]
        value = rec.get(key)
        if value is None:
            return False
        earlier = [
            getattr(m, key, None) for m in read_metrics(self.out) if m.epoch < int(rec["epoch"])
        ]
        earlier = [v for v in earlier if v is not None]
        if earlier and not (value > max(earlier) if higher else value < min(earlier)):
            return False
        copy_file(self.ckpt, self.out / BEST)
        return True

    def keep_last(self, epoch: int, keep: int) -> list[Path]:
        """With ``keep`` > 1, copy this epoch's checkpoint to ``epoch-NNNN.safetensors`` and delete
        such copies older than the last ``keep`` epochs (``checkpoint.safetensors`` is always the
        last). Returns the kept copies.
        """
        if keep <= 1:
            return []
        copy_file(self.ckpt, self.out / f"epoch-{epoch:04d}.safetensors")
        copies = sorted(self.out.glob("epoch-[0-9][0-9][0-9][0-9].safetensors"))
        for old in copies[:-keep]:
            old.unlink()
        return copies[-keep:]


def seed_of(*parts: int) -> int:
    """A 63-bit seed derived from integers, well mixed (numpy's SeedSequence)."""
    return int(
        np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)
    )
