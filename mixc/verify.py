"""Property-based budget verification of a user's own spec (`mixc verify`).

Hypothesis, used as a library, searches the neighbourhood of the spec as
written (budgets, member counts, templates per layer, policies, grouping
modes; the backbone is fixed) and checks every point with
``mixc.compiler.invariants.check_plan``, the same checks the test suite runs.
A spec whose method is not mixture is searched over what that method reads:
members (and the budget, for packed). Optionally a backend builds the model
for a sampled subset of the points and its parameter count must equal the
plan's accounting; a backend that does not build the spec's method yet is
reported as not checkable. A failure is shrunk to a small counterexample and
returned as a ready-to-run command line.
"""

from __future__ import annotations

import math
import re
import shlex
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

import mixc
from mixc.compiler.invariants import check_plan
from mixc.compiler.methods import get_method
from mixc.compiler.plan import Plan
from mixc.core.errors import MixcError
from mixc.spec.diagnostics import SpecError
from mixc.spec.sections import DEFAULT_METHOD

_SUFFIX = {"K": 1e3, "M": 1e6, "G": 1e9}


class RangeError(MixcError, ValueError):
    """A bad --budgets/--members/... range, with the flag at fault."""


def parse_budget(text: str) -> tuple[float, bool]:
    """``36.5M`` -> (36500000, False); ``0.5x`` -> (0.5, True); ``1200000`` -> (1200000, False)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)([KMGx]?)\s*", text)
    if not m:
        raise RangeError(f"not a budget: {text!r} (write 36.5M, 250K, 1200000 or 0.5x)")
    value, suffix = float(m.group(1)), m.group(2)
    if suffix == "x":
        return value, True
    return value * _SUFFIX.get(suffix, 1.0), False


def parse_range(text: str, flag: str, parse: Callable[[str], Any]) -> tuple[Any, Any]:
    if ".." not in text:
        v = parse(text)
        return v, v
    lo, hi = text.split("..", 1)
    a, b = parse(lo), parse(hi)
    if isinstance(a, tuple):
        if a[1] != b[1]:
            raise RangeError(f"{flag} {text}: both ends must be counts or both multiples (x)")
        if a[0] > b[0] or a[0] <= 0:
            raise RangeError(f"{flag} {text}: expected 0 < LO <= HI")
    elif a > b or a < 1:
        raise RangeError(f"{flag} {text}: expected 1 <= LO <= HI")
    return a, b


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise RangeError(f"not an integer: {text!r}") from None


@dataclass
class Space:
    """The neighbourhood to search."""

    budgets: tuple[tuple[float, bool], tuple[float, bool]] = ((0.25, True), (4.0, True))
    members: tuple[int, int] = (1, 8)
    templates_per_layer: tuple[int, int] = (1, 8)
    policies: tuple[str, ...] = ("shared", "greedy_disjoint")
    groups: tuple[str, ...] = ("by_shape", "single")


@dataclass
class Point:
    budget: str | None  # None: no budget applies (a method other than mixture and packed)
    members: int
    templates_per_layer: int | None  # None (and assign, groups): the method has no template banks
    assign: str | None
    groups: str | None  # None: as written in the spec (explicit groups, or another method)

    def overrides(self) -> list[str]:
        out = [] if self.budget is None else [f"budget={self.budget}"]
        out.append(f"members={self.members}")
        if self.templates_per_layer is not None:
            out.append(f"templates_per_layer={self.templates_per_layer}")
        if self.assign is not None:
            out.append(f"assign={self.assign}")
        if self.groups is not None:
            out.append(f"groups={self.groups}")
        return out


@dataclass
class Report:
    spec: str
    examples: int = 0
    feasible: int = 0
    infeasible: int = 0
    built: int = 0
    checks_passed: int = 0
    seconds: float = 0.0
    dimensions: dict[str, Counter] = field(default_factory=dict)
    infeasible_reasons: Counter = field(default_factory=Counter)
    failure: dict[str, Any] | None = None
    method: str = DEFAULT_METHOD
    # backend -> why its count was not compared
    not_checkable: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "ok": self.failure is None,
            "examples": self.examples,
            "feasible": self.feasible,
            "infeasible": self.infeasible,
            "infeasible_reasons": dict(self.infeasible_reasons),
            "models_built": self.built,
            "checks_passed": self.checks_passed,
            "seconds": round(self.seconds, 2),
            "dimensions": {
                k: {str(v): n for v, n in sorted(c.items(), key=lambda kv: str(kv[0]))}
                for k, c in self.dimensions.items()
            },
            "failure": self.failure,
            "method": self.method,
            "not_checkable": self.not_checkable,
        }


def _points(
    space: Space, backbone_params: int, method: str = DEFAULT_METHOD
) -> st.SearchStrategy[Point]:
    (lo, mult), (hi, _) = space.budgets
    if mult:
        lo, hi = lo * backbone_params, hi * backbone_params
    lo, hi = max(1, int(lo)), max(1, int(hi))
    # Mostly log-uniform (small and large budgets alike), sometimes uniform: integers shrink to LO.
    log_budget = st.floats(math.log(lo), math.log(hi)).map(
        lambda v: min(hi, max(lo, int(math.exp(v))))
    )
    budgets = st.one_of(log_budget, st.integers(lo, hi))
    searched = get_method(method).searched_settings  # only what the method reads

    def varied(setting: str, strategy: st.SearchStrategy) -> st.SearchStrategy:
        return strategy if setting in searched else st.none()

    return st.builds(
        Point,
        budget=varied("budget", budgets.map(str)),
        members=st.integers(*space.members),
        templates_per_layer=varied("templates_per_layer", st.integers(*space.templates_per_layer)),
        assign=varied("assign", st.sampled_from(space.policies)),
        groups=varied("groups", st.sampled_from(space.groups)),
    )


def _start(
    spec: str, method: str, backends: Sequence[str]
) -> tuple[Report, tuple[str, ...], list[str]]:
    """The empty report, the dimensions searched for ``method``, and the backends whose counts can
    be compared."""
    report = Report(spec=spec, method=method)
    dims = get_method(method).searched_settings
    for dim in dims:
        report.dimensions[dim] = Counter()
    for b in backends:
        why = _builds(b, method)
        if why is not None:
            report.not_checkable[b] = why
    return report, dims, [b for b in backends if b not in report.not_checkable]


def spec_method(spec: str) -> str:
    """The method the spec itself chooses: searched as written, so the neighbourhood stays that
    method's."""
    return mixc.load(spec).ensemble.method.name


def _builds(backend: str, method: str) -> str | None:
    """None if ``backend`` builds ``method``, else why its parameter count cannot be compared."""
    from mixc.backends import get_backend

    methods = get_backend(backend, "verify").capabilities.methods
    if method in methods:
        return None
    return (
        f"method '{method}' is not built by the {backend} backend yet (it builds:"
        f" {', '.join(sorted(methods))})"
    )


def _param_count(plan: Plan, backend: str) -> int:
    """Parameters of the model the backend builds, counted without allocating them
    (Backend.count_params)."""
    from mixc.backends import get_backend

    return int(get_backend(backend, "verify").count_params(plan))


def verify(
    spec: str,
    space: Space,
    examples: int = 100,
    seed_value: int = 0,
    backends: Sequence[str] = (),
    build_every: int = 10,
    on_example: Callable[[Report], None] | None = None,
) -> Report:
    """Search ``space`` around ``spec``; the first failure is shrunk and reported."""
    base = mixc.compile(spec)
    method = spec_method(spec)
    report, dims, backends = _start(spec, method, backends)
    started = time.perf_counter()
    last_failure: dict[str, Any] = {}

    def check(point: Point) -> None:
        _count(report, point, dims, base.accounting.backbone_params)
        try:
            plan = mixc.compile(spec, point.overrides())
        except SpecError as err:
            _infeasible(err.render(), point, report, spec, last_failure)
            return
        report.feasible += 1
        _check_plan(plan, point, last_failure)
        if backends and (report.feasible - 1) % build_every == 0:
            _check_backends(plan, point, backends, report, last_failure)
        report.checks_passed += 1
        if on_example:
            on_example(report)

    test = settings(
        max_examples=examples,
        database=None,
        deadline=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.generate, Phase.shrink),
        report_multiple_bugs=False,
    )(seed(seed_value)(given(_points(space, base.accounting.backbone_params, method))(check)))
    try:
        test()
    except AssertionError:
        report.failure = dict(last_failure)  # hypothesis re-runs the shrunk example last
        report.failure["command"] = (
            "mixc inspect "
            + shlex.quote(spec)
            + "".join(f" --set {o}" for o in report.failure["overrides"])
        )
    report.seconds = time.perf_counter() - started
    return report


def _count(report: Report, point: Point, dims: Sequence[str], backbone: int) -> None:
    """One more example, tallied under each dimension's value (budgets in bands of the
    backbone)."""
    report.examples += 1
    for dim in dims[1:]:
        report.dimensions[dim][getattr(point, dim)] += 1
    if point.budget is not None:
        report.dimensions["budget"][_bucket(int(point.budget), backbone)] += 1


def _infeasible(text: str, point: Point, report: Report, spec: str, last_failure: dict) -> None:
    """Count a point that does not compile for a stated reason; any other error is a failure."""
    if _method_infeasible(text, point, report, spec, last_failure):
        return
    if _below_minimum(text, point, report, spec, last_failure):
        return
    if _degenerate(text, point, report, spec, last_failure):
        return
    if "no layer is factorised" in text:
        report.infeasible += 1
        report.infeasible_reasons["no layer is factorised"] += 1
        return
    _fail(last_failure, point, "compiles", text.splitlines()[0])


def _below_minimum(text: str, point: Point, report: Report, spec: str, last_failure: dict) -> bool:
    """Count a budget below the minimum; the minimum the error states must itself be feasible.
    False: not such an error."""
    if "below the minimum" not in text:
        return False
    report.infeasible += 1
    report.infeasible_reasons["below the minimum budget"] += 1
    m = re.search(r"below the minimum ([\d,]+)", text)
    minimum = int(m.group(1).replace(",", ""))
    at_min = Point(
        str(minimum), point.members, point.templates_per_layer, point.assign, point.groups
    )
    try:  # the stated minimum must itself be feasible
        _check_plan(mixc.compile(spec, at_min.overrides()), at_min, last_failure)
    except SpecError:
        _fail(
            last_failure,
            at_min,
            "minimum_budget",
            f"the stated minimum {minimum:,} does not compile",
        )
    return True


def _degenerate(text: str, point: Point, report: Report, spec: str, last_failure: dict) -> bool:
    """Count a point whose members would be identical; the fix the error states must itself
    compile. False: not such an error."""
    fix = degenerate_fix(text)
    if fix is None:
        return False
    report.infeasible += 1
    report.infeasible_reasons["members would be identical"] += 1
    budget, tpl = fix
    at = Point(
        str(budget), point.members, tpl or point.templates_per_layer, point.assign, point.groups
    )
    try:  # the stated fix must itself compile
        _check_plan(mixc.compile(spec, at.overrides()), at, last_failure)
    except SpecError as e2:
        _fail(
            last_failure,
            at,
            "minimum_budget",
            f"the stated fix does not compile: {e2.render().splitlines()[0]}",
        )
    return True


def _check_backends(
    plan: Plan, point: Point, backends: Sequence[str], report: Report, last_failure: dict
) -> None:
    """Build the plan on every backend: its parameter count must be the plan's."""
    for b in backends:
        n = _param_count(plan, b)
        if n != plan.accounting.total_params:
            _fail(
                last_failure,
                point,
                f"backend_param_count[{b}]",
                f"the {b} model has {n:,} parameters, the plan says"
                f" {plan.accounting.total_params:,}",
            )
        report.built += 1


_PACKED_MINIMUM = re.compile(
    r"below the smallest Packed-Ensemble.*?raise the budget to at least ([\d,]+)", re.S
)


def _method_infeasible(
    text: str, point: Point, report: Report, spec: str, last_failure: dict
) -> bool:
    """Count a packed point that cannot compile (a budget below the smallest, widths that do not
    divide); the smallest budget the error states must itself compile. False: not such an error."""
    if m := _PACKED_MINIMUM.search(text):
        report.infeasible += 1
        report.infeasible_reasons["below the smallest Packed-Ensemble"] += 1
        at = Point(m.group(1).replace(",", ""), point.members, None, None, None)
        try:
            _check_plan(mixc.compile(spec, at.overrides()), at, last_failure)
        except SpecError:
            _fail(
                last_failure,
                at,
                "minimum_budget",
                f"the stated smallest budget {m.group(1)} does not compile",
            )
        return True
    if "which do not split into" in text or "not a whole number" in text:
        report.infeasible += 1
        report.infeasible_reasons["packed widths do not divide"] += 1
        return True
    return False


_DIFFER = re.compile(r"smallest budget at which members can differ is ([\d,]+)")
_DIFFER_TPL = re.compile(r"set templates_per_layer (\d+) and a budget of at least ([\d,]+)")


def degenerate_fix(text: str) -> tuple[int, int | None] | None:
    """(budget, templates_per_layer or None) that a degenerate-ensemble error states, or None.

    The error either names the smallest budget at which members differ, or a setting
    plus a budget; a refusal that names neither (no budget helps) gives (0, None).
    """
    if "members would be identical" not in text:
        return None
    if m := _DIFFER.search(text):
        return int(m.group(1).replace(",", "")), None
    if m := _DIFFER_TPL.search(text):
        return int(m.group(2).replace(",", "")), int(m.group(1))
    return None


def _bucket(budget: int, backbone: int) -> str:
    r = budget / backbone
    lo = 0.0
    for edge in (0.25, 0.5, 1.0, 2.0, 4.0):
        if r <= edge:
            return f"{lo:g}-{edge:g}x"
        lo = edge
    return ">4x"


def _check_plan(plan: Plan, point: Point, last_failure: dict) -> None:
    problems = check_plan(plan)
    if problems:
        _fail(last_failure, point, problems[0].invariant, "; ".join(map(str, problems[:3])))


def _fail(last_failure: dict, point: Point, invariant: str, detail: str) -> None:
    last_failure.clear()
    last_failure.update({"invariant": invariant, "detail": detail, "overrides": point.overrides()})
    raise AssertionError(f"{invariant}: {detail}")
