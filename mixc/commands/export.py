"""`mixc export RUN --format onnx|torch-export|members -o OUT`: a trained ensemble, ready to deploy.

- ``onnx``: one ONNX graph (with the torch backend: torch.onnx's dynamo exporter, opset 18) taking
  the
  input batch ``x [B, *input_shape]`` and returning ``member_probs [B, M,
  classes]`` and ``ensemble_probs [B, classes]``; every member's weights are
  composed once and stored as constants, so inference never re-composes them.
- ``torch-export``: the same module as a ``torch.export`` program (``.pt2``,
  ``torch.export.load(path).module()(x)``), batch axis dynamic.
- ``members``: a folder with one checkpoint per member of the plain backbone
  (the spec compiled with ``members=1 groups=none``; its ``plain_plan.json``
  beside), so each member loads into an ordinary single network.

Every export is checked before it is kept: it is run on the run's test set (or ``--data``) and
compared with the run's own model loaded from the checkpoint by ``--backend`` (any backend reads any
run: the checkpoint format is shared). If the member probabilities differ by more than 1e-4
anywhere, the temporary file is deleted and nothing is written. A manifest (``OUT.json``, or
``OUT/export.json`` for members) records the check.

Inputs are model inputs, normalised as in training (``mixc predict`` does that
for images). Exit codes: 0 done; 1 a run, checkpoint, spec or export problem;
2 a data problem.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mixc.commands import add_backend_argument
from mixc.core.data import DataError

FORMATS = ("onnx", "torch-export", "members")
_SUFFIX = {"onnx": ".onnx", "torch-export": ".pt2"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `mixc export`."""
    p.add_argument(
        "target",
        metavar="RUN_DIR|CHECKPOINT",
        help="a run folder (mixc train --out) or a checkpoint file",
    )
    p.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help=(
            "onnx (.onnx), torch-export (.pt2) or members "
            "(a folder of plain single-network checkpoints)"
        ),
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="the file (onnx, torch-export) or folder (members) to write",
    )
    p.add_argument("--plan", help="the plan of a checkpoint without plan.json beside it")
    p.add_argument(
        "--force",
        action="store_true",
        help=(
            "replace an existing OUT that an earlier export did not "
            "write (never one of the run's own files)"
        ),
    )
    p.add_argument(
        "--data", help="the data the export is checked on (default: the run's own test set)"
    )
    p.add_argument("--data-dir", help="folder holding the cifar archives")
    p.add_argument(
        "--check-samples",
        type=int,
        default=1000,
        metavar="N",
        help="check on the first N test samples (default 1000; 0: all)",
    )
    p.add_argument("--batch-size", type=int, default=250, help="batch for the check (default 250)")
    p.add_argument(
        "--no-temperature",
        action="store_true",
        help="export the uncalibrated model even when `mixc calibrate` fitted a temperature",
    )
    add_backend_argument(p, "run the model with for the check and write graph formats through")


def run(args: argparse.Namespace) -> int:
    """Run `mixc export` with parsed ``args``; returns the exit code (errors are ``MixcError``s for
    cli.main)."""
    return _run(args)


# ---------------------------------------------------------------------------
# Shared with `mixc predict` and bench/eval_forward.py


def load_run(target: str, plan_file: str | None) -> tuple[Any, dict[str, np.ndarray]]:
    """The run (``mixc.evaluation.Run``) and its checkpoint's plan tensors as numpy,
    checksum-verified."""
    from mixc.core.checkpoint_format import check_spec, read_info, read_tensors
    from mixc.evaluation import open_run

    run_ = open_run(target, plan_file)
    meta = read_info(run_.checkpoint)
    check_spec(meta, run_.plan, run_.checkpoint)
    arrays, _, _ = read_tensors(run_.checkpoint, run_.plan, framework="numpy")
    return run_, arrays


def check_inputs(
    run_: Any, data: str | None, data_dir: str | None, limit: int
) -> tuple[np.ndarray, str, Any]:
    """The test inputs an export is compared on, their name for messages, and the dataset's pixel
    scale.

    The pixel scale (``mixc.corruptions.PixelScale``, or None for non-image data or an unknown
    scale) goes into the manifest: whoever runs the exported graph must prepare inputs the same way.
    """
    from mixc.corruptions import pixel_scale
    from mixc.evaluation import load_test_set, resolve_data

    name, ddir = resolve_data(run_, data, data_dir)
    ds = load_test_set(name, ddir, run_.plan)
    x = ds.x_test if limit <= 0 else ds.x_test[:limit]
    try:
        scale = pixel_scale(ds)
    except DataError:
        scale = None
    return x, f"{len(x)} {ds.name} test samples", scale


def _quiet_exporters() -> None:
    """torch.onnx logs a warning per missing torchvision op: noise for a user who exports no
    torchvision op."""
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def _need_onnx() -> None:
    from mixc.export import ExportError

    missing = []
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ExportError(
            f"the onnx export needs {', '.join(missing)}, which"
            f" {'is' if len(missing) == 1 else 'are'} not installed here (onnxscript drives"
            " torch.onnx's exporter, onnxruntime checks the result); hint: pip install"
            " 'mixc[export]', or export with --format torch-export or members"
        )


def _compare(what: str, got: np.ndarray, want: np.ndarray, ens: np.ndarray | None) -> float:
    from mixc.export import TOLERANCE, ExportError

    if got.shape != want.shape:
        raise ExportError(
            f"{what} gives member probabilities of shape {list(got.shape)}, the run's model "
            f"{list(want.shape)}; nothing was written. This is a bug in mixc export."
        )
    diff = float(np.max(np.abs(got.astype(np.float64) - want)))
    if ens is not None:
        diff = max(diff, float(np.max(np.abs(ens.astype(np.float64) - want.mean(axis=1)))))
    if not diff <= TOLERANCE:
        raise ExportError(
            f"{what} disagrees with the run's own model by {diff:.3g} (more than {TOLERANCE:g}) in"
            " member probabilities on the check data, so nothing was written (the temporary file"
            " is deleted); this is a bug in mixc export or in the exporter: please report it with"
            " the run's plan.json"
        )
    return diff


# ---------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    from mixc.backends import get_backend, names
    from mixc.evaluation import load_predictor
    from mixc.export import ExportError

    if args.batch_size < 1:
        raise DataError("--batch-size must be at least 1")
    if args.format == "onnx":
        _need_onnx()
    out = Path(args.output)
    # before the (slow) load
    check_output(args.format, out, _run_files(args.target, args.plan), args.force)
    backend = get_backend(args.backend, "eval")
    if args.format != "members" and args.format not in backend.capabilities.export_formats:
        able = [n for n in names() if args.format in get_backend(n).capabilities.export_formats]
        raise ExportError(
            f"the {backend.name} backend cannot write --format {args.format}; hint: "
            + (f"use --backend {' or '.join(able)}" if able else "use --format members")
        )
    run_, arrays = load_run(args.target, args.plan)
    x, described, scale = check_inputs(run_, args.data, args.data_dir, args.check_samples)
    from mixc.calibration import for_deployment, tempered

    # a temperature of another checkpoint is refused
    cal = for_deployment(run_, args.no_temperature)
    t = None if cal is None else cal.temperature
    reference = load_predictor(args.backend, run_.plan, run_.checkpoint, batch_size=args.batch_size)
    want = np.asarray(tempered(reference(x), cal), dtype=np.float64)
    if args.format == "members":
        diff, files, exporter = _export_members(
            args.backend, run_, arrays, out, x, want, args.batch_size, t
        )
        manifest_path = out / "export.json"
        opset = None
    else:
        diff, exporter, opset = _export_graph(
            backend, args.format, run_, arrays, out, x, want, args.batch_size, t
        )
        files = [out.name]
        manifest_path = out.with_name(out.name + ".json")
    _write_manifest(
        manifest_path,
        args.format,
        run_,
        exporter,
        opset,
        described,
        len(x),
        diff,
        files,
        scale,
        cal,
    )
    print(
        f"checked on {described}: max |difference| in member and ensemble probabilities ="
        f" {diff:.3g} (limit 1e-4)"
        + (f"; temperature {t:.4f} folded into the classifier (logits / T)" if t else "")
    )
    print(f"wrote {out} ({exporter}{f', opset {opset}' if opset else ''}) and {manifest_path}")
    return 0


def _run_files(target: str, plan: str | None) -> list[Path]:
    """The files of the run being exported (its checkpoint, plan and every file mixc train or eval
    writes)."""
    from mixc.core.run_files import WRITTEN

    path = Path(target)
    folder = path if path.is_dir() else path.parent
    files = [folder / n for n in WRITTEN] + sorted(
        folder.glob("epoch-[0-9][0-9][0-9][0-9].safetensors")
    )
    return files + [path] + ([Path(plan)] if plan else [])


def _exported_before(out: Path) -> bool:
    """Whether ``out`` is a file an earlier `mixc export` wrote: its manifest beside it lists it."""
    from mixc.export import ExportManifest

    manifest = out.with_name(out.name + ".json")
    try:
        return out.name in ExportManifest.model_validate_json(manifest.read_bytes()).files
    except (OSError, ValueError):
        return False


def check_output(fmt: str, out: Path, inputs: list[Path] = (), force: bool = False) -> None:
    """A file for onnx/torch-export (new, an earlier export's, or any with ``force``); for members a
    new folder, an empty one, or a previous members export. Never a link, nor one of the run's
    files."""
    from mixc.core.safe_write import check_output as check
    from mixc.export import ExportError

    if fmt != "members":
        if out.is_dir() and not out.is_symlink():
            raise ExportError(
                f"-o {out} is a folder; --format {fmt} writes one file; hint: -o "
                f"{out / ('model' + _SUFFIX[fmt])}"
            )
        for path in (out, out.with_name(out.name + ".json")):  # the file and its manifest
            check(path, inputs=inputs, force=force or _exported_before(out))
        return
    check(out, inputs=inputs, force=True, folder_ok=True)
    if out.exists() and not out.is_dir():
        raise ExportError(
            f"-o {out} is a file; --format members writes a folder; hint: -o {out.with_suffix('')}"
        )
    check(out / "export.json", inputs=inputs, force=True)
    if out.is_dir() and any(out.iterdir()) and not (out / "export.json").is_file():
        raise ExportError(
            f"-o {out} is a folder that holds other files; --format members replaces its folder "
            "whole; hint: name a new or empty folder (or one a previous members export wrote)"
        )


def _export_graph(
    backend: Any,
    fmt: str,
    run_: Any,
    arrays: dict[str, np.ndarray],
    out: Path,
    x: np.ndarray,
    want: np.ndarray,
    batch: int,
    temperature: float | None = None,
) -> tuple[float, str, int | None]:
    """Export to a temporary file beside ``out`` through ``backend``, check it, then move it into
    place."""
    from mixc.export import ExportError, compose_all, with_temperature

    _quiet_exporters()
    from mixc.core.safe_write import write_with

    composed = with_temperature(run_.plan, compose_all(run_.plan, arrays), temperature)
    what = "the ONNX export (run by onnxruntime)" if fmt == "onnx" else f"the {fmt} program"
    result: list[Any] = []

    def fill(tmp_name: str) -> None:
        tmp = Path(tmp_name)
        try:
            exporter, opset = backend.export_graph(run_.plan, composed, fmt, tmp)
            runner = backend.graph_runner(fmt, tmp)
        except ExportError:
            raise
        except (
            Exception
        ) as e:  # the exporter's own failure: name it, keep the traceback's last line
            raise ExportError(
                f"{fmt} export failed inside the exporter ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); nothing was "
                "written; hint: try another --format"
            ) from e
        got, ens = _run_both(runner, x, batch)
        result.extend([_compare(what, got, want, ens), exporter, opset])

    # the temporary keeps the format's suffix: torch.export.save/load warn about any other
    write_with(out, fill, suffix=f".tmp{_SUFFIX[fmt]}")
    return result[0], result[1], result[2]


def _run_both(
    runner: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], x: np.ndarray, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    ps, es = [], []
    for i in range(0, len(x), batch):
        p, e = runner(x[i : i + batch])
        ps.append(p)
        es.append(e)
    return np.concatenate(ps), np.concatenate(es)


def _export_members(
    backend_name: str,
    run_: Any,
    arrays: dict[str, np.ndarray],
    out: Path,
    x: np.ndarray,
    want: np.ndarray,
    batch: int,
    temperature: float | None = None,
) -> tuple[float, list[str], str]:
    """One plain-backbone checkpoint per member, each checked by loading it into the plain
    network."""
    import mixc
    from mixc.core.checkpoint_format import save_arrays
    from mixc.core.safe_write import replace_folder, write_text
    from mixc.evaluation import load_predictor
    from mixc.export import (
        ExportError,
        check_member_method,
        check_plain_plan,
        compose_member,
        member_tensors,
        plain_plan_overrides,
        with_temperature,
    )

    check_member_method(run_.plan, "export --format members", ExportError)
    spec, overrides = run_.spec_and_overrides()
    plain = mixc.compile(spec, plain_plan_overrides(overrides, run_.plan.method.name))
    check_plain_plan(run_.plan, plain)
    files = ["plain_plan.json"]
    diffs = [0.0]

    def fill(tmp: Path) -> None:
        write_text(tmp / "plain_plan.json", plain.to_json() + "\n")
        for m in range(run_.plan.members):
            name = f"member_{m}.safetensors"
            member = with_temperature(
                run_.plan, [compose_member(run_.plan, arrays, m)], temperature
            )[0]
            tensors = member_tensors(plain, member)
            meta = {
                "exported_from": str(run_.label),
                "member": str(m),
                "of_spec_hash": run_.plan.spec_hash,
            }
            save_arrays(tmp / name, tensors, plain, run_.epoch, metadata=meta)
            predict = load_predictor(backend_name, plain, tmp / name, batch_size=batch)
            diffs.append(
                _compare(f"member {m}'s plain checkpoint", predict(x), want[:, m : m + 1], None)
            )
            files.append(name)

    # refuses a link at OUT: the old folder is removed only when it is a real one
    replace_folder(out, fill)
    return max(diffs), files, "numpy composition (mixc.export) into the plain backbone's tensors"


def _write_manifest(
    path: Path,
    fmt: str,
    run_: Any,
    exporter: str,
    opset: int | None,
    described: str,
    n: int,
    diff: float,
    files: list[str],
    scale: Any,
    cal: Any = None,
) -> None:
    from mixc.core.safe_write import write_text
    from mixc.export import ExportManifest

    outputs = (
        ["member_probs [B, M, classes]", "ensemble_probs [B, classes]"]
        if fmt != "members"
        else ["member_i.safetensors: logits [B, 1, classes] of the plain backbone"]
    )
    m = ExportManifest(
        format=fmt,
        run=str(run_.label),
        spec=run_.plan.name,
        spec_hash=run_.plan.spec_hash,
        epoch=run_.epoch,
        members=run_.plan.members,
        classes=run_.plan.classes,
        input_shape=list(run_.plan.input_shape),
        outputs=outputs,
        exporter=exporter,
        opset=opset,
        checked_on=described,
        checked_samples=n,
        max_abs_diff=diff,
        files=files,
        preprocessing=(
            "inputs normalised as the run's training data (mixc.core.data): (pixels in [0, 1] -"
            f" pixel_mean) / pixel_std per channel ({scale.how})"
            if scale is not None
            else (
                "inputs prepared as the run's training data (mixc.core.data); the pixel scale is"
                " unknown"
            )
        ),
        pixel_mean=None if scale is None else [float(v) for v in scale.mean],
        pixel_std=None if scale is None else [float(v) for v in scale.std],
        temperature=None if cal is None else cal.temperature,
        calibration_checkpoint_sha256=None if cal is None else cal.checkpoint_sha256,
    )
    write_text(path, m.model_dump_json(indent=1) + "\n")
