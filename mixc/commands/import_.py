"""`mixc import MODULE:FACTORY --input C,H,W [-o net.mix] [--args JSON] [--force]`.

Calls the user's factory (the one command that runs the user's code: docs/security.md), traces
the model through the backend, writes the ``.mix`` spec (``mixc/importing.py``) and checks it
before writing: one plain member compiled from the text, the original's weights copied in, the
parameter counts equal and the logits within 1e-5. A mismatch writes nothing (exit 1) unless
``--force``. ``--weights`` also writes the original's weights under the plain member's tensor
names, a checkpoint ``mixc train --init-from`` starts an ensemble from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mixc.commands import add_backend_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `mixc import`."""
    p.add_argument(
        "target",
        metavar="MODULE:FACTORY",
        help="a module importable from here, or a file (path/to/model.py:make_net); the factory"
        " is called with --args and returns the model",
    )
    p.add_argument("--args", metavar="JSON", help="keyword arguments of the factory, a JSON object")
    p.add_argument(
        "--input",
        required=True,
        metavar="SHAPE",
        help="one sample's shape: C,H,W (image), C,L (signal) or D (vector)",
    )
    p.add_argument("-o", "--output", metavar="FILE", help="the .mix to write (default: stdout)")
    p.add_argument(
        "--weights",
        metavar="FILE",
        help="also write the model's weights under the plain member's tensor names (.safetensors)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write even when the check fails, and over an existing file",
    )
    add_backend_argument(p, "trace the model with")


def run(args: argparse.Namespace) -> int:
    """Run `mixc import`; errors are MixcErrors for cli.main."""
    import sys

    from mixc.core.module_graph import ModuleImportError
    from mixc.core.safe_write import WriteError, check_output, write_text
    from mixc.importing import (
        check,
        faithful,
        import_graph,
        load_factory,
        mismatch_message,
        parse_args_json,
        parse_input,
    )

    shape = parse_input(args.input)
    kwargs = parse_args_json(args.args)
    source = args.target.rpartition(":")[0]
    if args.output:
        check_output(args.output, inputs=[source], force=args.force)
    if args.weights:
        if args.output and Path(args.weights).resolve() == Path(args.output).resolve():
            raise WriteError(
                f"--weights {args.weights} is also -o: the weights would replace the spec; hint:"
                " name the weights file net.safetensors"
            )
        check_output(args.weights, inputs=[source], force=args.force, option="--weights")
    module = load_factory(args.target, kwargs)
    imported, plan = import_graph(module, shape, args.target, args.backend)
    names, result = check(module, imported, plan, shape, args.backend)
    ok = faithful(result)
    print(
        f"parameters: module {result.original_params:,}, spec (one plain member)"
        f" {result.compiled_params:,}; max |logit difference| {result.max_abs_diff:.3g}"
        f" ({result.dtype}, weights copied); blocks: {', '.join(imported.blocks) or 'none'};"
        f" stages: {', '.join(imported.stages) or 'none'}",
        file=sys.stderr,
    )
    if imported.note:
        print(f"note: {imported.note}", file=sys.stderr)
    if not ok and not args.force:
        raise ModuleImportError(mismatch_message(result))
    if args.output:
        write_text(args.output, imported.text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(imported.text)
    if args.weights:
        _write_weights(Path(args.weights), module, names, plan, args.backend)
        print(f"wrote {args.weights}", file=sys.stderr)
    return 0


def _write_weights(path: Path, module, names: dict, plan, backend: str) -> None:
    """The original's weights as a safetensors file of plan names (the plain member's)."""
    from mixc.backends import get_backend
    from mixc.core.safe_write import write_bytes

    arrays = get_backend(backend).imported_arrays(module, names, plan)
    from safetensors.numpy import save

    write_bytes(path, save(arrays, metadata={"mixc_import": "plain member", "plan": plan.name}))
