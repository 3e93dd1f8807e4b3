"""The run folder of `mixc train`: one validated model for every reader and writer, framework-free.

A run folder holds ``plan.json``, ``config.json``, ``metrics.jsonl`` (one JSON
object per finished epoch) and ``checkpoint.safetensors`` (and ``eval.json``
after `mixc eval`). Users share run folders the way they share model files, so
everything that reads one (``eval``, ``report``, ``interpolate``, ``sweep``,
resume in either backend) parses it here: a tampered or truncated file gives
one clear error naming the file (and line) and the field, never a traceback
and never a silently wrong number.

The writing side lives here once for both backends (the direction: one
training driver), in :class:`RunWriter`:

- one writer per folder: a lock file holding pid, host and start time, held
  with ``fcntl.flock`` (released by the kernel when the process dies, so a
  crashed run's lock is taken over, with a note);
- stale temporaries of an interrupted write are removed on start;
- a resume compares the recipe it is given with the one the checkpoint
  records and refuses a different one (naming each field, old -> new) unless
  asked explicitly, which is then recorded in ``config.json``'s ``history``;
- each epoch's metrics line is stored inside its checkpoint too, so a crash
  between the checkpoint's rename and the ``metrics.jsonl`` append is repaired
  on the next start;
- before a checkpoint replaces the last good one, its metrics must be finite
  (the backend's save refuses non-finite tensors).

No torch or jax import here.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mixc.compiler.plan import Plan, PlanFileError, read_plan
from mixc.spec.recipe import Recipe
from mixc.errors import MixcError
from mixc.safe_write import append_text, copy_file, open_nofollow, write_json, write_text

__all__ = [
    "CHECKPOINT", "METRICS", "CONFIG", "PLAN", "LOCK", "FORMAT", "SUPPORTED_FORMAT_VERSIONS",
    "RunFolderError", "TrainError", "MetricsLine", "RunConfig", "TrainMetadata", "CheckpointHeader",
    "read_raw_header", "parse_header", "read_header", "read_config", "read_metrics", "last_metrics",
    "recipe_changes", "RunLock", "clean_temporaries", "RunWriter", "Reporter", "epoch_line", "seed_of",
    "write_json", "write_text_atomic", "spec_hash", "NonFiniteError", "non_finite_tensors", "non_finite_metrics",
    "check_run_folder", "CALIBRATION", "Calibration", "read_calibration", "file_sha256",
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
FORMAT = "mixc-checkpoint"
#: Checkpoint format versions this mixc reads (the checksum is an optional header entry of version 1).
SUPPORTED_FORMAT_VERSIONS = ("1",)


class RunFolderError(MixcError, ValueError):
    """A run folder file that is not what mixc wrote: one paragraph naming the file, line and field."""


class TrainError(MixcError, RuntimeError):
    """A user-facing problem with a training run (its folder, its options); printed without a traceback."""


def spec_hash(plan: Plan) -> str:
    return plan.spec_hash or plan.content_hash()


def _note(text: str) -> None:
    print(f"mixc: note: {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# The models


class _Lenient(BaseModel):
    """Unknown keys are kept (newer mixc versions may add some); known keys are checked."""

    model_config = ConfigDict(extra="allow")


class MetricsLine(_Lenient):
    """One line of ``metrics.jsonl``: the metrics after an epoch (NaN is allowed: it is what was measured).

    Test metrics (``accuracy``, ``nll``, ``ece``...) are on every line of a run without a validation set;
    with one, they are on the last epoch's line (and every line under ``--eval-test-every-epoch``), and
    every line has the validation metrics under ``val_*``.
    """

    epoch: int = Field(ge=1)
    train_loss: float | None = None
    lr: float | None = None
    accuracy: float | None = Field(None, ge=0, le=1)
    nll: float | None = None
    ece: float | None = None
    val_accuracy: float | None = Field(None, ge=0, le=1)
    val_nll: float | None = None
    val_ece: float | None = None
    member_accuracy: list[float] = Field(default_factory=list)
    member_nll: list[float] = Field(default_factory=list)
    diversity: float | None = None


class RunOptions(_Lenient):
    spec: str | None = None
    file: str | None = None
    spec_hash: str | None = None
    baseline: Literal["single", "naive"] | None = None
    overrides: list[str] = Field(default_factory=list)
    world_size: int = Field(1, ge=1)
    threads: int | None = Field(None, ge=1)  # CPU threads of the framework (mixc/threads.py)


class HistoryEntry(_Lenient):
    """A change to a run after it started (recipe changed on resume, epochs extended)."""

    event: str
    after_epoch: int = Field(ge=0)
    changes: dict[str, list[Any]] = Field(default_factory=dict)


def _json_object(value: Any) -> Any:
    """Header values are strings; some hold JSON objects (the recipe, the caller's metadata)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None
    return value


def _recorded_recipe(value: Any) -> Any:
    """A recipe as a run recorded it. Runs recorded before ``shared_gradient`` existed trained with the summed
    gradient: read them so, or resuming one would silently change its recipe to today's default."""
    value = _json_object(value)
    if isinstance(value, dict) and "shared_gradient" not in value:
        value = {**value, "shared_gradient": "sum"}
    return value


class RunConfig(_Lenient):
    """``config.json``: the recipe in force for the latest epochs, the options, and the history of changes."""

    recipe: Recipe | None = None
    options: RunOptions = Field(default_factory=RunOptions)
    history: list[HistoryEntry] = Field(default_factory=list)

    _parse_recipe = field_validator("recipe", mode="before")(_recorded_recipe)


class TrainMetadata(_Lenient):
    """The caller's metadata in a checkpoint written by `mixc train` (every key optional: files written by hand)."""

    seed: int | None = None
    optimizer: Literal["sgd", "adamw"] | None = None
    global_step: int | None = Field(None, ge=0)
    recipe: Recipe | None = None
    backend: str | None = None
    metrics: MetricsLine | None = None

    _parse_recipe = field_validator("recipe", mode="before")(_recorded_recipe)


class CheckpointHeader(_Lenient):
    """The safetensors header of a mixc checkpoint (every value a string in the file)."""

    format: Literal["mixc-checkpoint"]
    format_version: str
    spec_name: str
    spec_hash: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    plan_version: str | None = None
    epoch: int = Field(ge=0)
    checksum: str | None = Field(None, pattern=r"^sha256:[0-9a-f]{64}$")
    metadata: TrainMetadata = Field(default_factory=TrainMetadata)

    _parse_metadata = field_validator("metadata", mode="before")(_json_object)

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: str) -> str:
        if v not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(
                f"format version {v!r} is not one this mixc reads ({', '.join(SUPPORTED_FORMAT_VERSIONS)}); "
                "a newer mixc wrote it, or the header was edited"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "CheckpointHeader":
        r, m = self.metadata.recipe, self.metadata.metrics
        if r is not None and self.epoch > r.epochs:
            raise ValueError(f"epoch {self.epoch} is beyond the {r.epochs} epochs of the recipe it records")
        if m is not None and m.epoch != self.epoch:
            raise ValueError(f"its metrics are of epoch {m.epoch}, but the header says epoch {self.epoch}")
        return self


class Calibration(BaseModel):
    """``calibration.json``, written by `mixc calibrate`: the fitted temperatures and the checkpoint they fit.

    ``temperature`` divides every member's logits before the softmax-mean (``mixc.temperature``);
    ``member_temperatures[m]`` is member m's own. The checkpoint's sha256 is recorded so that a
    temperature is never applied to weights it was not fitted on (a resumed or retrained run).
    """

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    format: Literal["mixc-calibration"] = "mixc-calibration"
    method: Literal["temperature"] = "temperature"
    temperature: float = Field(ge=0.05, le=20.0)
    member_temperatures: list[float] = Field(default_factory=list)
    checkpoint: str = Field(min_length=1, max_length=255)
    checkpoint_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    epoch: int = Field(ge=0)
    spec_hash: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    fitted_on: str = Field(max_length=10_000)
    samples: int = Field(ge=1)
    nll_before: float
    nll_after: float
    #: why the temperature may not be trustworthy (held-out data without errors, a search bound reached)
    warning: str | None = Field(None, max_length=10_000)

    @field_validator("member_temperatures")
    @classmethod
    def _in_range(cls, v: list[float]) -> list[float]:
        if len(v) > 1024 or any(not 0.05 <= t <= 20.0 for t in v):
            raise ValueError("member temperatures must be at most 1,024 numbers in [0.05, 20]")
        return v


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (read in 1 MiB chunks), as hex."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Parsing, with one message per bad field


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _problems(e: ValidationError) -> str:
    parts = []
    for err in e.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        msg = msg[:1].lower() + msg[1:]
        got = "" if err["type"] in ("missing", "value_error") else f" (got {_short(err.get('input'))})"
        parts.append(f"{loc}: {msg}{got}" if loc else f"{msg}{got}")
    return "; ".join(parts)


def _validate(model: type[BaseModel], data: Any, where: str, hint: str) -> Any:
    """``model`` from ``data`` (a parsed JSON value), or RunFolderError naming ``where`` and each bad field."""
    if not isinstance(data, dict):
        raise RunFolderError(f"{where}: expected an object, got {_kind(data)}; hint: {hint}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RunFolderError(f"{where}: {_problems(e)}; hint: {hint}") from None


_HEADER_HINT = "the header was edited or damaged: use the checkpoint as mixc train wrote it (with a mixc that reads its format version)"


def read_raw_header(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's ``__metadata__`` (8 bytes little-endian length, then JSON), without a framework."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100_000_000:
                raise ValueError(f"header length {n}")
            head = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{path} is not a safetensors file ({e}); hint: name a checkpoint written by mixc") from e
    meta = head.get("__metadata__") if isinstance(head, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RunFolderError(f"{path} is a safetensors file but not a mixc checkpoint (no {FORMAT!r} header)")
    bad = [k for k, v in meta.items() if not isinstance(v, str)]
    if bad:
        raise RunFolderError(f"{path}: header entries {', '.join(bad)} are not strings; hint: {_HEADER_HINT}")
    return meta


def parse_header(meta: dict[str, str], path: str | os.PathLike) -> CheckpointHeader:
    """Validate a checkpoint header (epoch a whole number >= 0, metadata JSON, known format version...)."""
    return _validate(CheckpointHeader, meta, f"checkpoint {path}", _HEADER_HINT)


def read_header(path: str | os.PathLike) -> CheckpointHeader:
    return parse_header(read_raw_header(path), path)


def read_config(path: str | os.PathLike) -> RunConfig | None:
    """``config.json`` validated, or None when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    hint = "restore the file, or delete it (the checkpoint records the recipe it was trained with)"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{path}: not JSON ({e}); hint: {hint}") from None
    return _validate(RunConfig, data, str(path), hint)


def read_calibration(folder: str | os.PathLike) -> Calibration | None:
    """``calibration.json`` validated, or None when there is none (RunFolderError naming the field if bad)."""
    path = Path(folder) / CALIBRATION
    if not path.is_file():
        return None
    hint = "run `mixc calibrate` again to rewrite it, or delete it"
    try:
        data = json.loads(path.read_bytes()[:1_000_000].decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{path}: not JSON ({e}); hint: {hint}") from None
    return _validate(Calibration, data, str(path), hint)


def _metric_lines(path: Path, repair: bool) -> tuple[list[MetricsLine], bool]:
    """Every line of ``metrics.jsonl``; with ``repair``, a truncated last line (a crash mid-append) is dropped."""
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    out: list[MetricsLine] = []
    dropped = False
    hint = "restore the file, or delete the bad line (each line is one epoch's JSON object)"
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            if repair and i == len(lines) and not text.endswith("\n"):
                dropped = True
                break
            raise RunFolderError(f"{path}:{i}: not JSON ({e.msg} at column {e.colno}); hint: {hint}") from None
        out.append(_validate(MetricsLine, data, f"{path}:{i}", hint))
    return out, dropped


def read_metrics(folder: str | os.PathLike) -> list[MetricsLine]:
    """Every line of the run's ``metrics.jsonl`` (``[]`` when there is none), validated."""
    path = Path(folder) / METRICS
    if not path.is_file():
        return []
    return _metric_lines(path, repair=False)[0]


def last_metrics(folder: str | os.PathLike) -> dict[str, Any] | None:
    lines = read_metrics(folder)
    return lines[-1].model_dump() if lines else None


# ---------------------------------------------------------------------------
# Finite numbers


class NonFiniteError(ValueError):
    """Tensors or metrics that are NaN or infinite: a diverged run, or a damaged file."""


def non_finite_tensors(arrays: dict[str, Any]) -> list[str]:
    """A description of every floating-point array in ``arrays`` holding NaN or infinity (``[]`` if none)."""
    bad = []
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        if not np.issubdtype(a.dtype, np.floating):
            continue
        mask = ~np.isfinite(a)
        n = int(mask.sum())
        if n:
            first = a.reshape(-1)[int(np.argmax(mask.reshape(-1)))]
            bad.append(f"{name} ({n} of {a.size} values non-finite, e.g. {first})")
    return bad


def non_finite_metrics(rec: dict[str, Any]) -> list[str]:
    """``name = value`` for every NaN or infinite number in an epoch's record (lists item by item)."""
    bad = []
    for key, value in rec.items():
        items = value if isinstance(value, list) else [value]
        for i, x in enumerate(items):
            if isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isfinite(x):
                bad.append(f"{key}[{i}] = {x}" if isinstance(value, list) else f"{key} = {x}")
    return bad


# ---------------------------------------------------------------------------
# Writing files


# Every write goes through mixc/safe_write.py (temporary beside the file, fsync, rename; no links followed).
write_text_atomic = write_text


_TEMPORARY = re.compile(
    r"^(\.(checkpoint\.safetensors|best\.safetensors|epoch-\d{4}\.safetensors|config\.json|metrics\.jsonl|plan\.json)"
    r"\..+\.tmp|(config\.json|metrics\.jsonl)\.tmp)$"
)


def clean_temporaries(folder: Path, log: Callable[[str], None] = _note) -> list[Path]:
    """Remove temporaries of an interrupted write (call it holding the folder's lock: nobody else writes)."""
    folder = Path(folder)
    removed = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if _TEMPORARY.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
            log(f"removed {p}, a temporary file left by an interrupted run")
    return removed


# ---------------------------------------------------------------------------
# One writer per run folder


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "an unknown process"


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace").strip()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


class RunLock:
    """One writer per run folder: ``fcntl.flock`` on a file naming its holder (pid, host, start time).

    The kernel drops a flock when its process dies, so the lock of a killed run
    is taken over (with a note naming it); a live holder makes the second
    writer stop with an error. Released by removing the file while still
    holding it (a writer that opened the old file notices and retries).
    """

    def __init__(self, folder: Path, log: Callable[[str], None] = _note) -> None:
        self.path = Path(folder) / LOCK
        self.fd: int | None = None
        self.log = log

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX
            self.log(f"no fcntl here: {self.path.parent} is not locked against a second writer")
            return self
        for _ in range(10):
            fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(_read_fd(fd))
                os.close(fd)
                raise TrainError(
                    f"the run folder {self.path.parent} is being written by another `mixc train` ({holder}); two "
                    "writers would interleave their epochs in one checkpoint and metrics.jsonl; hint: wait for it to "
                    f"finish (or stop it), or pass another --out folder. The lock is {self.path}."
                ) from None
            if not _same_file(fd, self.path):  # its holder removed it between our open and flock
                os.close(fd)
                continue
            previous = _read_fd(fd)
            if previous:
                self.log(f"took over the lock of {self.path.parent} from {_holder(previous)}: that run is no "
                         "longer running (interrupted or killed)")
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(me) + "\n").encode())
            os.fsync(fd)
            self.fd = fd
            return self
        raise TrainError(f"could not lock {self.path}: it keeps being replaced; hint: is another mixc train starting?")

    def release(self) -> None:
        if self.fd is None:
            return
        if _same_file(self.fd, self.path):
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


# ---------------------------------------------------------------------------
# The recipe on resume


_NOT_COMPARED = {"data_dir", "seed"}  # where the files live; the seed has its own check and message


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_changes(old: Recipe, new: Recipe) -> dict[str, tuple[Any, Any]]:
    """Every recipe field (dotted) whose value differs, old and new; not data_dir nor seed."""
    a, b = _flat(old.model_dump(mode="json")), _flat(new.model_dump(mode="json"))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in _NOT_COMPARED and a.get(k) != b.get(k)}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


#: the names `mixc train` and `mixc eval` write in a run folder (besides epoch-NNNN.safetensors)
WRITTEN = (PLAN, CONFIG, METRICS, CHECKPOINT, BEST, LOCK, "eval.json", "calibration.json", "metrics.csv", "curves.png",
           "curves.pdf", "tensorboard")


def linked_files(out: Path) -> list[Path]:
    """The files of run folder ``out`` that mixc writes and that are symbolic links (a write would follow them)."""
    if not out.is_dir():
        return []
    names = [out / n for n in WRITTEN] + sorted(out.glob("epoch-[0-9][0-9][0-9][0-9].safetensors"))
    return [p for p in names if p.is_symlink()]


def check_run_folder(out: Path, plan: Plan) -> None:
    """Refuse a folder that is a file, holds links where mixc writes, or holds another spec's run, naming them."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a folder; hint: pass a folder for the run's files")
    links = linked_files(out)
    if links:
        raise TrainError(
            f"the run folder {out} holds symbolic links where mixc writes its files ({', '.join(map(str, links))}); "
            "writing through them would overwrite files outside the run folder; hint: remove the links (or "
            "replace them with the files themselves), or pass another --out folder"
        )
    old_path = out / PLAN
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


# ---------------------------------------------------------------------------
# The writer


def _fmt(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


class RunWriter:
    """`mixc train`'s hold on its run folder, the same for every backend.

    Use as a context manager around the training loop. ``main`` is False on
    data-parallel ranks other than 0: they read the resume point but take no
    lock and write nothing. Errors are :class:`TrainError`; nothing is
    written before every check passed.
    """

    def __init__(self, out: Path, plan: Plan, recipe: Recipe, *, main: bool = True,
                 allow_recipe_change: bool = False, log: Callable[[str], None] = _note) -> None:
        self.out, self.plan, self.recipe, self.main = Path(out), plan, recipe, main
        self.allow_recipe_change, self.log = allow_recipe_change, log
        self.ckpt = self.out / CHECKPOINT
        self.metrics_path = self.out / METRICS
        self.header: CheckpointHeader | None = None
        self.config: RunConfig | None = None
        self.history: list[dict[str, Any]] = []
        self.saved_epoch = 0
        self._lock: RunLock | None = None

    def __enter__(self) -> "RunWriter":
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
                f"cannot resume from {self.ckpt}: it was written for spec {head.spec_name!r} (hash {head.spec_hash}), "
                f"not {self.plan.name!r} (hash {spec_hash(self.plan)}); hint: pass another --out folder for "
                f"{self.plan.name}, or delete that one to start over"
            )
        meta, seed = head.metadata, self.recipe.seed
        if meta.seed is not None and meta.seed != seed:
            raise TrainError(
                f"the run in {self.out} was trained with seed {meta.seed}, not {seed}; resuming with another seed "
                f"would not reproduce either run; hint: pass --seed {meta.seed}, or another --out folder"
            )
        if meta.optimizer is not None and meta.optimizer != self.recipe.optimizer.name:
            raise TrainError(
                f"the run in {self.out} used the {meta.optimizer} optimiser, not {self.recipe.optimizer.name}; its "
                "saved optimiser state cannot drive another optimiser; hint: pass another --out folder"
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
            self.history.append({"event": "epochs_changed", "after_epoch": epoch,
                                 "changes": {"epochs": list(changes.pop("epochs"))}, "time": _now()})
        if not changes:
            return
        listed = "; ".join(f"{k}: {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in changes.items())
        if not self.allow_recipe_change:
            raise TrainError(
                f"the run in {self.out} trained {epoch} epoch(s) with another recipe ({listed}); resuming it "
                "would mix two recipes in one run, and its config.json would no longer describe the epochs "
                "already trained; hint: resume with the settings it was started with, pass another --out folder, "
                "or pass --allow-recipe-change to go on with the new recipe (recorded in config.json's history)"
            )
        self.log(f"{self.out}: going on after epoch {epoch} with a changed recipe ({listed}); recorded in "
                 f"{CONFIG}'s history")
        self.history.append({"event": "recipe_changed", "after_epoch": epoch,
                             "changes": {k: list(v) for k, v in changes.items()},
                             "previous_recipe": old.model_dump(mode="json"), "allowed_by": "--allow-recipe-change",
                             "time": _now()})

    def begin(self, options: dict[str, Any]) -> None:
        """Repair metrics.jsonl, then write plan.json and config.json (history kept); main rank only.

        When the checkpoint already has every epoch, nothing is trained and the
        files that describe it are left as they are.
        """
        if not self.main:
            return
        self._repair_metrics()
        if self.header is not None and self.start_epoch >= self.recipe.epochs:
            return
        write_text_atomic(self.out / PLAN, self.plan.to_json())
        history = [h.model_dump(mode="json") for h in self.config.history] if self.config else []
        write_json(self.out / CONFIG, {"recipe": self.recipe.model_dump(mode="json"), "options": options,
                                       "history": history + self.history})

    def _repair_metrics(self) -> None:
        """Keep lines up to the checkpoint's epoch; restore the checkpoint's own line if the append was lost."""
        path = self.metrics_path
        try:
            lines, truncated = _metric_lines(path, repair=True) if path.is_file() else ([], False)
        except RunFolderError as e:
            raise TrainError(f"cannot resume {self.out}: {e}") from None
        keep = [line for line in lines if line.epoch <= self.start_epoch]
        own = self.header.metadata.metrics if self.header is not None else None
        restored = own is not None and (not keep or keep[-1].epoch < own.epoch)
        if restored:
            keep.append(own)
            self.log(f"{path}: restored the line of epoch {own.epoch} from the checkpoint (the run stopped "
                     "between saving the checkpoint and appending it)")
        if truncated:
            self.log(f"{path}: dropped a truncated last line (the run stopped while appending it)")
        if restored or truncated or len(keep) != len(lines):
            write_text_atomic(path, "".join(json.dumps(line.model_dump()) + "\n" for line in keep))

    def save_epoch(self, rec: dict[str, Any], save: Callable[[dict[str, Any]], None],
                   extra: dict[str, Any] | None = None) -> None:
        """Check ``rec``; have ``save(metadata)`` write the checkpoint (``rec`` inside); then append the line.

        ``save`` must refuse non-finite tensors (the checkpoint format's savers
        do, with :class:`NonFiniteError`); the last good checkpoint stays then.
        """
        epoch = int(rec["epoch"])
        kept = (f"the last good checkpoint (epoch {self.saved_epoch}) is kept in {self.ckpt}" if self.saved_epoch
                else "no checkpoint was written")
        hint = ("hint: lower the learning rate (--set train.optimizer.lr=...), add warm-up (--set train.warmup=...) "
                "or clip the inputs' range")
        bad = non_finite_metrics(rec)
        if bad:
            raise TrainError(f"training diverged in epoch {epoch}: {', '.join(bad[:6])}; {kept}; {hint}")
        meta = {"seed": str(self.recipe.seed), "optimizer": self.recipe.optimizer.name,
                "recipe": self.recipe.model_dump_json(), "metrics": rec, **(extra or {})}
        try:
            save(meta)
        except NonFiniteError as e:
            raise TrainError(f"training diverged in epoch {epoch}: {e}; {kept}; {hint}") from None
        self.saved_epoch = epoch
        append_text(self.metrics_path, json.dumps(rec) + "\n")

    def keep_best(self, rec: dict[str, Any], metric: str) -> bool:
        """Copy this epoch's checkpoint to ``best.safetensors`` if its ``val_<metric>`` beats every earlier
        epoch's (read back from metrics.jsonl, so a resumed run keeps comparing with the whole run).
        Call after :meth:`save_epoch`. Returns whether it was copied."""
        key, higher = f"val_{metric}", BEST_METRICS[metric]
        value = rec.get(key)
        if value is None:
            return False
        earlier = [getattr(m, key, None) for m in read_metrics(self.out) if m.epoch < int(rec["epoch"])]
        earlier = [v for v in earlier if v is not None]
        if earlier and not (value > max(earlier) if higher else value < min(earlier)):
            return False
        copy_file(self.ckpt, self.out / BEST)
        return True

    def keep_last(self, epoch: int, keep: int) -> list[Path]:
        """With ``keep`` > 1, copy this epoch's checkpoint to ``epoch-NNNN.safetensors`` and delete such copies
        older than the last ``keep`` epochs (``checkpoint.safetensors`` is always the last). Returns the kept copies."""
        if keep <= 1:
            return []
        copy_file(self.ckpt, self.out / f"epoch-{epoch:04d}.safetensors")
        copies = sorted(self.out.glob("epoch-[0-9][0-9][0-9][0-9].safetensors"))
        for old in copies[:-keep]:
            old.unlink()
        return copies[-keep:]


# ---------------------------------------------------------------------------
# Console output and seeds (the same lines whichever backend trains)


def seed_of(*parts: int) -> int:
    """A 63-bit seed derived from integers, well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class Reporter:
    """Prints (rank 0 only): a rich bar on a terminal, plain lines otherwise."""

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
    """One console line per epoch: loss, lr, then validation and/or test metrics (whichever were measured)."""
    parts = [f"epoch {rec['epoch']}/{epochs}", f"loss {rec['train_loss']:.4f}", f"lr {rec['lr']:.4g}"]
    if rec.get("val_accuracy") is not None:
        parts.append(f"val acc {rec['val_accuracy'] * 100:.2f}%  val nll {rec['val_nll']:.4f}  "
                     f"val ece {rec['val_ece'] * 100:.2f}%" + ("  best" if rec.get("best") else ""))
    if rec.get("accuracy") is not None:
        members = " ".join(f"{a * 100:.1f}" for a in rec["member_accuracy"])
        label = "test " if rec.get("val_accuracy") is not None else ""
        parts.append(f"{label}acc {rec['accuracy'] * 100:.2f}%  {label}nll {rec['nll']:.4f}  "
                     f"{label}ece {rec['ece'] * 100:.2f}%  members {members}")
    return "  ".join(parts + [f"{rec['epoch_time']:.1f}s"])
