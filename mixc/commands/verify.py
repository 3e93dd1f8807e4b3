"""`mixc verify FILE`: property-based budget verification around a user's spec.

Exit codes: 0 every example passed; 1 an invariant broke (the shrunk
counterexample is printed as a command line); 2 bad arguments or spec.
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from mixc.spec.diagnostics import SpecError
from mixc.spec.sections import DEFAULT_METHOD


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="a .mix spec, or the name of a zoo spec")
    p.add_argument(
        "--budgets",
        default="0.25x..4x",
        metavar="LO..HI",
        help=(
            "budget range: counts (5M..150M) or multiples of one plain backbone (0.25x..4x);"
            " default 0.25x..4x"
        ),
    )
    p.add_argument("--members", default="1..8", metavar="A..B", help="member counts (default 1..8)")
    p.add_argument(
        "--templates-per-layer",
        default="1..8",
        metavar="A..B",
        help="templates per layer (default 1..8)",
    )
    p.add_argument(
        "--policies", default="shared,greedy_disjoint", help="comma-separated assignment policies"
    )
    p.add_argument(
        "--groups",
        default=None,
        help=(
            "comma-separated grouping modes among by_shape, single (default both; a spec with"
            " explicit groups keeps them unless this is given)"
        ),
    )
    from mixc.backends import names

    p.add_argument(
        "--backend",
        choices=[*names(), "all"],
        default=None,
        help=(
            "also build models with this backend (all: every installed one) and compare their"
            " parameter count with the plan (every 10th feasible example: building is slow)"
        ),
    )
    p.add_argument("--examples", type=int, default=100, help="how many points to try (default 100)")
    p.add_argument(
        "--seed", type=int, default=0, help="search seed: the same seed gives the same run"
    )
    p.add_argument("--json", action="store_true", help="print a JSON report (for CI)")


class _Usage(Exception):
    pass


def _space(args: argparse.Namespace, explicit: bool):
    from mixc.verify import RangeError, Space, _int, parse_budget, parse_range

    try:
        budgets = parse_range(args.budgets, "--budgets", parse_budget)
        members = parse_range(args.members, "--members", _int)
        tpl = parse_range(args.templates_per_layer, "--templates-per-layer", _int)
    except RangeError as e:
        raise _Usage(str(e)) from None
    from mixc.spec.sections import MAX_MEMBERS

    if members[1] > MAX_MEMBERS:  # an option out of range, not a broken invariant of the spec
        raise _Usage(
            f"--members {args.members}: a spec has at most {MAX_MEMBERS:,} members; hint: a range "
            f"within 1..{MAX_MEMBERS}, e.g. --members 1..8"
        )
    policies = tuple(x.strip() for x in args.policies.split(",") if x.strip())
    bad = [x for x in policies if x not in ("shared", "greedy_disjoint")]
    if bad or not policies:
        raise _Usage(f"--policies takes shared and/or greedy_disjoint, got {args.policies!r}")
    if args.groups is None:
        groups: tuple = (None,) if explicit else ("by_shape", "single")
    else:
        groups = tuple(x.strip() for x in args.groups.split(",") if x.strip())
        bad = [x for x in groups if x not in ("by_shape", "single")]
        if bad or not groups:
            raise _Usage(f"--groups takes by_shape and/or single, got {args.groups!r}")
    return Space(
        budgets=budgets, members=members, templates_per_layer=tpl, policies=policies, groups=groups
    )


def run(args: argparse.Namespace) -> int:
    import mixc
    from mixc.verify import verify

    err = Console(stderr=True, highlight=False)
    try:
        base = mixc.compile(args.file)
    except SpecError as e:
        sys.stderr.write(e.render() + "\n")
        return 2
    try:
        space = _space(args, explicit=base.grouping == "explicit")
        if args.examples < 1:
            raise _Usage("--examples must be at least 1")
    except _Usage as e:
        err.print(f"mixc verify: error: {e}", markup=False)
        return 2
    from mixc.backends import BackendUnavailable, get_backend, names

    backends = names() if args.backend == "all" else [args.backend] if args.backend else []
    if backends:
        for b in backends:
            try:
                get_backend(b, "verify")
            except BackendUnavailable as e:
                err.print(f"mixc verify: error: {e}", markup=False)
                return 2
    if not args.json:
        err.print(
            f"verifying {args.file}: {args.examples} examples, seed {args.seed}"
            + (
                f", building {'/'.join(backends)} models for every 10th feasible example"
                if backends
                else ""
            )
        )
    report = verify(
        args.file, space, examples=args.examples, seed_value=args.seed, backends=backends
    )
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _print(report, Console(highlight=False))
    return 0 if report.failure is None else 1


def _print(report, out: Console) -> None:
    title = f"mixc verify {report.spec}" + (
        f" (method {report.method})" if report.method != DEFAULT_METHOD else ""
    )
    t = Table(title=title, title_justify="left")
    t.add_column("dimension")
    t.add_column("values tried (examples)")
    for dim, counts in report.dimensions.items():
        t.add_row(
            dim,
            ", ".join(f"{v}: {n}" for v, n in sorted(counts.items(), key=lambda kv: str(kv[0]))),
        )
    out.print(t)
    reasons = ", ".join(f"{r}: {n}" for r, n in report.infeasible_reasons.items()) or "none"
    out.print(
        f"{report.examples} examples in {report.seconds:.1f} s: {report.feasible} feasible, "
        f"{report.infeasible} infeasible ({reasons}); {report.checks_passed} passed every invariant"
        + (f"; {report.built} models built" if report.built else "")
    )
    for why in report.not_checkable.values():
        out.print(f"not checkable: {why}, so its parameter count was not compared", markup=False)
    if report.failure:
        f = report.failure
        out.print(f"[bold red]FAILED[/bold red] invariant {f['invariant']}: {f['detail']}")
        out.print(f"shrunk counterexample: {f['command']}", markup=False)
    else:
        out.print("[bold green]ok[/bold green]: no invariant broke")
