"""The `mixc` command line. Each subcommand is a thin shell over the Python API.

User mistakes (a bad spec, a missing file, a wrong checkpoint) are
``MixcError``s; :func:`run_reporting` prints each as one clear report and exits
with its code (README, "Exit codes"); a Python traceback means a bug in mixc.
The ``--backend`` choices come from the backend registry (``mixc.backends``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from mixc import __version__
from mixc.commands import add_backend_argument
from mixc.spec.sections import DEFAULT_METHOD


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "override a setting, e.g. --set members=2 --set budget=20M --set backbone.classes=10 "
            "--set train.epochs=5 (repeatable; type-checked like the file)"
        ),
    )


def _spec_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "file", metavar="FILE", help="a .mix spec, or the name of a zoo spec (e.g. wrn28_10)"
    )
    p.add_argument(
        "--import-path",
        dest="import_paths",
        action="append",
        default=[],
        metavar="DIR",
        help=(
            "a further folder the spec's imports may read (repeatable; imports otherwise stay"
            " inside the spec's folder and the zoo; MIXC_IMPORT_PATH works for every command)"
        ),
    )


def cmd_check(args: argparse.Namespace, out: Console) -> int:
    from mixc.compiler import compile_program
    from mixc.spec.loader import load_program

    program = load_program(args.file, args.overrides, defer=True, import_paths=args.import_paths)
    if program.ensemble is None and not program.pending:
        n = len(program.definitions)
        out.print(
            f"{program.main_file}: ok ({n} definition{'s' if n != 1 else ''}, no ensemble section"
            " to compile)"
        )
        return 0
    plan = compile_program(program)
    from mixc.inspect_view import print_warnings

    print_warnings(plan)
    a = plan.accounting
    budget = f" of {a.budget:,}" if a.budget else ""
    method = f"method {plan.method.name}, " if plan.method.name != DEFAULT_METHOD else ""
    out.print(
        f"{program.main_file}: ok ({method}{plan.members} members, {a.total_params:,}{budget}"
        " parameters)"
    )
    return 0


def cmd_inspect(args: argparse.Namespace, out: Console) -> int:
    from mixc.api import compile
    from mixc.inspect_view import print_inspect, print_warnings, summary

    plan = compile(args.file, args.overrides, import_paths=args.import_paths)
    print_warnings(plan)
    if args.json:
        print(json.dumps(summary(plan), indent=2))
    else:
        print_inspect(plan, out)
    return 0


def cmd_compile(args: argparse.Namespace, out: Console) -> int:
    from mixc.api import compile
    from mixc.inspect_view import print_warnings

    plan = compile(args.file, args.overrides, import_paths=args.import_paths)
    print_warnings(plan)
    if args.backend is None:
        text = plan.to_json() + "\n"
        if args.output in (None, "-"):
            sys.stdout.write(text)
        else:
            from mixc.core.safe_write import check_output, write_text

            path = Path(args.output)
            if path.is_dir() and not path.is_symlink():
                path = path / "plan.json"
            # never over the spec it read
            check_output(path, inputs=[plan.source, args.file], force=True)
            write_text(path, text)
            out.print(f"wrote {path}", highlight=False)
        return 0
    from mixc.backends import get_backend

    backend = get_backend(args.backend, "compile")
    out_dir = Path(args.output or f"{plan.name}-{args.backend}")
    # standalone only when asked: a backend written before the option need not take it
    written = backend.write(plan, out_dir, **({"standalone": True} if args.standalone else {}))
    out.print(f"wrote {out_dir / 'plan.json'} and {written}", highlight=False)
    return 0


def cmd_zoo(args: argparse.Namespace, out: Console) -> int:
    from rich.table import Table

    from mixc.spec.loader import describe, zoo_specs

    t = Table(title="mixc zoo (use the name as FILE anywhere)", title_justify="left")
    t.add_column("spec")
    t.add_column("description")
    for p in zoo_specs():
        t.add_row(p.stem, describe(p))
    out.print(t)
    return 0


def _optional(name: str) -> tuple[Callable, Callable] | None:
    """Subcommands that live in mixc.commands.<name> (they may need a framework)."""
    import importlib
    import keyword

    try:  # a keyword (import) names its module with a trailing underscore
        mod = importlib.import_module(
            f"mixc.commands.{name}{'_' if keyword.iskeyword(name) else ''}"
        )
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("mixc.commands"):
            return None
        raise
    return mod.add_arguments, mod.run


_OPTIONAL_COMMANDS = (
    ("train", "train an ensemble (or a baseline) from a spec"),
    (
        "eval",
        (
            "evaluate a trained run: accuracy, NLL, ECE, Brier, diversity; --ood, selective"
            " prediction"
        ),
    ),
    (
        "calibrate",
        "fit a temperature for a trained run on held-out data (eval, export, predict use it)",
    ),
    ("verify", "property-based budget verification of a spec's neighbourhood"),
    ("interpolate", "accuracy along the line between two members' weights (paper, Figure 4)"),
    ("sweep", "train a spec at several budgets/member counts, with baselines; table and plot"),
    ("report", "trained runs side by side, shaped like the paper's tables"),
    ("export", "export a trained run for deployment: onnx, torch-export (.pt2) or members"),
    ("predict", "predict new inputs (.npz, an image, a folder of images) with a trained run"),
    ("import", "a model you have (a torch.nn.Module) as a .mix spec, checked against it"),
)


def build_parser() -> argparse.ArgumentParser:
    from mixc.backends import GROUP, names

    parser = argparse.ArgumentParser(
        prog="mixc",
        description=(
            "mixc: compile .mix specs into parameter-efficient ensembles (MixtureEnsembles)"
        ),
        epilog=(
            f"backends: {', '.join(names())} (registered in the {GROUP!r} entry-point group;"
            " --backend picks one)"
        ),
    )
    parser.add_argument("--version", action="version", version=f"mixc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_check_command(sub)
    _add_inspect_command(sub)
    _add_compile_command(sub)
    p = sub.add_parser("zoo", help="list the specs that ship with mixc")
    p.set_defaults(func=cmd_zoo)
    _add_optional_commands(sub)
    return parser


def _add_check_command(sub) -> None:
    p = sub.add_parser("check", help="parse and check a spec; report every error")
    _spec_arg(p)
    _add_set(p)
    p.set_defaults(func=cmd_check)


def _add_inspect_command(sub) -> None:
    p = sub.add_parser(
        "inspect", help="show the allocation: groups, templates, plain layers, accounting"
    )
    _spec_arg(p)
    p.add_argument("--json", action="store_true", help="print a JSON object instead of tables")
    _add_set(p)
    p.set_defaults(func=cmd_inspect)


def _add_compile_command(sub) -> None:
    p = sub.add_parser(
        "compile", help="compile a spec to a plan (JSON) or to a backend's model source"
    )
    _spec_arg(p)
    p.add_argument(
        "--emit",
        choices=["plan"],
        default="plan",
        help="what to write without --backend (the plan)",
    )
    add_backend_argument(p, "write OUT/plan.json and OUT/<name>.py for", default=None)
    p.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="output file (plan) or folder (backend); plan: default stdout",
    )
    p.add_argument(
        "--standalone",
        action="store_true",
        help=(
            "with --backend: write the layer classes into the file (needs the framework alone, not"
            " mixc)"
        ),
    )
    _add_set(p)
    p.set_defaults(func=cmd_compile)


def _add_optional_commands(sub) -> None:
    """The subcommands in mixc.commands.<name>; one whose module is missing is left out."""
    for name, help_ in _OPTIONAL_COMMANDS:
        hooks = _optional(name)
        if hooks is None:
            continue
        add_arguments, run = hooks
        p = sub.add_parser(name, help=help_)
        add_arguments(p)
        p.set_defaults(func=lambda a, out, run=run: run(a))


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the subcommand through :func:`run_reporting`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    out = Console(highlight=False)
    return run_reporting(args.command, lambda: args.func(args, out))


def run_reporting(command: str, fn: Callable[[], int | None]) -> int:
    """Run ``fn`` and turn every user-facing error (``MixcError``) into its one-paragraph report and
    exit code, the one place that does (README, "Exit codes"); anything else is a bug and keeps
    its traceback.
    """
    from mixc.core.errors import MixcError
    from mixc.spec.diagnostics import SpecError

    try:
        rc = int(fn() or 0)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at interpreter exit
        return rc
    except BrokenPipeError:
        return _reader_gone()
    except SpecError as e:
        sys.stdout.flush()
        sys.stderr.write(e.render() + "\n")  # plain text: rich would re-wrap the caret lines
        return e.exit_code
    except MixcError as e:
        sys.stdout.flush()
        sys.stderr.write(f"mixc {command}: error: {e.render()}\n")
        return e.exit_code
    except KeyboardInterrupt:
        Console(stderr=True, highlight=False).print("interrupted")
        return 130


def _reader_gone() -> int:
    """stdout's reader went away (``mixc inspect --json | head -1``): stop quietly, as Unix tools
    do.

    Point stdout at /dev/null so the interpreter's final flush cannot raise again.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (captured, say)
        pass
    return 141  # 128 + SIGPIPE: what a shell reports for a tool killed by the closed pipe


if __name__ == "__main__":
    raise SystemExit(main())
