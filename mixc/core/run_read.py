"""The readers of a run folder: each file parsed into its model (``mixc.core.run_models``),
framework-free.

Everything that reads a run folder (``eval``, ``report``, ``interpolate``, ``sweep``, resume in
either backend, the checkpoint format) parses it here, so a bad file gives one paragraph naming the
file (and line) and each bad field, then a hint, as :class:`~mixc.core.errors.RunFolderError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from mixc.core.errors import RunFolderError
from mixc.core.run_files import CALIBRATION, FORMAT, METRICS
from mixc.core.run_models import Calibration, CheckpointHeader, MetricsLine, RunConfig

__all__ = [
    "file_sha256",
    "read_raw_header",
    "parse_header",
    "read_header",
    "read_config",
    "read_calibration",
    "metric_lines",
    "read_metrics",
    "last_metrics",
]


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (read in 1 MiB chunks), as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    return {
        list: "a list",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "a boolean",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _problems(e: ValidationError) -> str:
    parts = []
    for err in e.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        msg = msg[:1].lower() + msg[1:]
        got = (
            ""
            if err["type"] in ("missing", "value_error")
            else f" (got {_short(err.get('input'))})"
        )
        parts.append(f"{loc}: {msg}{got}" if loc else f"{msg}{got}")
    return "; ".join(parts)


def _validate(model: type[BaseModel], data: Any, where: str, hint: str) -> Any:
    """``model`` from ``data`` (a parsed JSON value), or RunFolderError naming ``where`` and each
    bad field."""
    if not isinstance(data, dict):
        raise RunFolderError(f"{where}: expected an object, got {_kind(data)}; hint: {hint}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RunFolderError(f"{where}: {_problems(e)}; hint: {hint}") from None


_HEADER_HINT = (
    "the header was edited or damaged: use the checkpoint as mixc train wrote it (with a mixc that"
    " reads its format version)"
)


def read_raw_header(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's ``__metadata__`` (8 bytes little-endian length, then JSON), without a
    framework."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100_000_000:
                raise ValueError(f"header length {n}")
            head = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise RunFolderError(
            f"{path} is not a safetensors file ({e}); hint: name a checkpoint written by mixc"
        ) from e
    meta = head.get("__metadata__") if isinstance(head, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RunFolderError(
            f"{path} is a safetensors file but not a mixc checkpoint (no {FORMAT!r} header)"
        )
    bad = [k for k, v in meta.items() if not isinstance(v, str)]
    if bad:
        raise RunFolderError(
            f"{path}: header entries {', '.join(bad)} are not strings; hint: {_HEADER_HINT}"
        )
    return meta


def parse_header(meta: dict[str, str], path: str | os.PathLike) -> CheckpointHeader:
    """Validate a checkpoint header (epoch a whole number >= 0, metadata JSON, known format
    version...)."""
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
    """``calibration.json`` validated, or None when there is none (RunFolderError naming the field
    if bad)."""
    path = Path(folder) / CALIBRATION
    if not path.is_file():
        return None
    hint = "run `mixc calibrate` again to rewrite it, or delete it"
    try:
        data = json.loads(path.read_bytes()[:1_000_000].decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunFolderError(f"{path}: not JSON ({e}); hint: {hint}") from None
    return _validate(Calibration, data, str(path), hint)


def metric_lines(path: Path, repair: bool) -> tuple[list[MetricsLine], bool]:
    """Every line of ``metrics.jsonl``; with ``repair``, a truncated last line (a crash mid-append)
    is dropped."""
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
            raise RunFolderError(
                f"{path}:{i}: not JSON ({e.msg} at column {e.colno}); hint: {hint}"
            ) from None
        out.append(_validate(MetricsLine, data, f"{path}:{i}", hint))
    return out, dropped


def read_metrics(folder: str | os.PathLike) -> list[MetricsLine]:
    """Every line of the run's ``metrics.jsonl`` (``[]`` when there is none), validated."""
    path = Path(folder) / METRICS
    if not path.is_file():
        return []
    return metric_lines(path, repair=False)[0]


def last_metrics(folder: str | os.PathLike) -> dict[str, Any] | None:
    lines = read_metrics(folder)
    return lines[-1].model_dump() if lines else None
