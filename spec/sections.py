"""Check the ``ensemble`` and ``train`` sections: known keys, value types, ranges.

Every error points at the setting (or the argument) at fault, with a "did you
mean" hint for misspelt keys. The ensemble's values stay tied to their source
positions so later stages (a budget below the minimum, a glob that matches
nothing) can point at the right line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from mixc.spec import ast as A
from mixc.spec.diagnostics import Diagnostics, Pos, choices_hint
from mixc.spec.expr import ExprError, Multiple, evaluate, render, type_name


@dataclass
class GroupSpec:
    """An explicit group: ``group NAME("glob", ..., share = f | templates = n)``."""

    name: str
    patterns: list[str]
    share: float | None
    templates: int | None
    templates_per_layer: int | None
    pos: Pos
    pattern_pos: list[Pos]


#: the method a spec without a ``method`` line compiles with
DEFAULT_METHOD = "mixture"


@dataclass
class MethodSpec:
    """``method NAME`` or ``method NAME(option = value, ...)``: the options given, checked and
    typed."""

    name: str = DEFAULT_METHOD
    options: dict[str, Any] = field(default_factory=dict)  # only those written
    pos: Pos | None = None  # the setting (None: not written, the default)
    option_pos: dict[str, Pos] = field(default_factory=dict)


@dataclass
class EnsembleSpec:
    backbone: str
    backbone_args: tuple[A.Arg, ...]
    method: MethodSpec = field(default_factory=MethodSpec)
    members: int = 4
    budget: int | Multiple | None = None
    groups: str = "by_shape"  # by_shape | single | none | explicit
    explicit: list[GroupSpec] = field(default_factory=list)
    templates_per_layer: int = 4
    assign: str = "shared"
    bank_singletons: bool = False
    # "alphas"/"classifier" -> {"law": ..., "std": ...}
    init: dict[str, dict] = field(default_factory=dict)
    pos: dict[str, Pos] = field(default_factory=dict)  # setting -> where it was written
    # Settings written in the file that a method chosen later (with --set) does not use: (setting,
    # where).
    ignored: list[tuple[str, Pos]] = field(default_factory=list)


GROUP_MODES = ("by_shape", "single", "none")
MAX_MEMBERS = 1024  # every member has its own alphas, BatchNorm and template table in the plan
# What `init { ... }` may set, and the laws each accepts (the first is the default).
INIT_LAWS = {"alphas": ("orthonormal", "normal"), "classifier": ("uniform", "normal")}
ASSIGN = ("shared", "greedy_disjoint")
ENSEMBLE_SETTINGS = (
    "backbone",
    "method",
    "members",
    "budget",
    "groups",
    "templates_per_layer",
    "assign",
    "bank_singletons",
    "init",
)

# The ensemble methods and their options: option -> (kind, default). Kinds: "positive" (a number >
# 0), "count" (an integer >= 1), "fraction" (a number in [0, 1]), or a tuple of the words it takes.
METHODS: dict[str, dict[str, tuple[Any, Any]]] = {
    "mixture": {},
    "batch_ensemble": {
        "fast_init": (("normal", "signs"), "normal"),
        "fast_std": ("positive", 0.5),
        "fast_lr": ("positive", 0.5),
    },
    "mimo": {"batch_repetitions": ("count", 4), "input_sharing": ("fraction", 0.0)},
    "packed": {"alpha": ("positive", 2.0), "gamma": ("count", 1)},
    "naive": {},
}
# Settings that configure MixtureEnsembles' template banks, and the methods that use each.
MIXTURE_SETTINGS: dict[str, tuple[str, ...]] = {
    "budget": ("mixture", "packed"),
    "groups": ("mixture",),
    "templates_per_layer": ("mixture",),
    "assign": ("mixture",),
    "bank_singletons": ("mixture",),
    "init.alphas": ("mixture",),
}
_WHY = {
    "budget": (
        "its size follows from the backbone and the members (a budget sizes mixture's template"
        " banks, or solves packed's alpha)"
    ),
    "init.alphas": "it has no alphas (they mix mixture's templates)",
}


def _eval(e, consts, diags: Diagnostics, symbols: bool = True) -> Any:
    try:
        return evaluate(e, consts, symbols=symbols)
    except ExprError as err:
        diags.error(err.message, err.pos, err.hint)
        return None


def _int(v: Any, pos: Pos, key: str, diags: Diagnostics, lo: int = 1) -> int | None:
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or (isinstance(v, float) and not v.is_integer())
    ):
        diags.error(f"'{key}' must be an integer, got {type_name(v)} ({render(v)})", pos)
        return None
    if v < lo:
        diags.error(f"'{key}' must be at least {lo}, got {render(v)}", pos)
        return None
    return int(v)


def read_ensemble(
    section: A.Section, consts: dict, definitions: dict[str, A.Definition], diags: Diagnostics
) -> EnsembleSpec:
    spec = EnsembleSpec(backbone="", backbone_args=())
    seen: dict[str, A.Setting] = {}
    for s in section.settings:
        if s.key in seen:
            diags.error(
                f"'{s.key}' is set twice", s.key_pos, f"the first is on line {seen[s.key].pos.line}"
            )
            continue
        seen[s.key] = s
        spec.pos[s.key] = s.pos
        _read_ensemble_setting(spec, s, consts, definitions, diags)
    if "backbone" not in seen:
        diags.error(
            "the ensemble section does not name its backbone",
            section.pos,
            "add a line such as: backbone wrn(depth = 28, k = 10)",
        )
    _check_method_settings(spec, seen, diags)
    return spec  # possibly partial: the caller goes on to find more errors, then reports them all


def _read_ensemble_setting(
    spec: EnsembleSpec,
    s: A.Setting,
    consts: dict,
    definitions: dict[str, A.Definition],
    diags: Diagnostics,
) -> None:
    """One setting of the ensemble section into ``spec`` (or an error)."""
    vpos = getattr(s.value, "pos", s.pos)
    if s.key == "backbone":
        cv = _read_backbone(s, vpos, definitions, diags)
        if cv is not None:
            spec.backbone, spec.backbone_args = cv.name, cv.args
    elif s.key == "method":
        m = _read_method(s, consts, diags)
        if m is not None:
            spec.method = m
    elif s.key == "groups":
        _read_grouping(spec, s, vpos, consts, diags)
    elif s.key in ("members", "templates_per_layer"):
        _read_count(spec, s, vpos, consts, diags)
    elif s.key == "budget":
        _read_budget(s, vpos, consts, diags, spec)
    elif s.key == "assign":
        _read_assign(spec, s, vpos, consts, diags)
    elif s.key == "bank_singletons":
        _read_bank_singletons(spec, s, vpos, consts, diags)
    elif s.key == "init":
        if not isinstance(s.value, A.BodyValue):
            diags.error(
                "'init' takes a body: init { alphas orthonormal | normal(std = 0.5); "
                "classifier uniform | normal(std = 0.01) }",
                vpos,
            )
        else:
            spec.init = _read_init(s.value, consts, diags)
    else:
        diags.error(
            f"unknown ensemble setting '{s.key}'", s.key_pos, choices_hint(s.key, ENSEMBLE_SETTINGS)
        )


def _read_grouping(
    spec: EnsembleSpec, s: A.Setting, vpos: Pos, consts: dict, diags: Diagnostics
) -> None:
    """``groups MODE`` or an explicit ``groups { group NAME(...) ... }`` body."""
    if isinstance(s.value, A.BodyValue):
        spec.groups = "explicit"
        spec.explicit = _read_groups(s.value, consts, diags)
        return
    v = _eval(s.value, consts, diags)
    if v is None:
        return
    if v not in GROUP_MODES:
        diags.error(
            f"unknown grouping '{v}'",
            vpos,
            choices_hint(str(v), GROUP_MODES) + '; or { group NAME("glob", share = f) ... }',
        )
        return
    spec.groups = v


def _read_count(
    spec: EnsembleSpec, s: A.Setting, vpos: Pos, consts: dict, diags: Diagnostics
) -> None:
    """``members`` or ``templates_per_layer``: an integer."""
    v = (
        _int(_eval(s.value, consts, diags), vpos, s.key, diags)
        if not isinstance(s.value, (A.CallValue, A.BodyValue))
        else None
    )
    # plans and tables grow with members
    if v is not None and s.key == "members" and v > MAX_MEMBERS:
        diags.error(
            f"'members' is at most {MAX_MEMBERS:,}, got {v:,}",
            vpos,
            "an ensemble has a handful of members (the paper uses 4 to 16)",
        )
    elif v is not None:
        setattr(spec, s.key, v)


def _read_assign(
    spec: EnsembleSpec, s: A.Setting, vpos: Pos, consts: dict, diags: Diagnostics
) -> None:
    v = (
        _eval(s.value, consts, diags)
        if not isinstance(s.value, (A.CallValue, A.BodyValue))
        else None
    )
    if v not in ASSIGN:
        diags.error(
            f"unknown assignment policy '{v if v is not None else '?'}'",
            vpos,
            choices_hint(str(v), ASSIGN),
        )
    else:
        spec.assign = v


def _read_bank_singletons(
    spec: EnsembleSpec, s: A.Setting, vpos: Pos, consts: dict, diags: Diagnostics
) -> None:
    v = (
        _eval(s.value, consts, diags)
        if not isinstance(s.value, (A.CallValue, A.BodyValue))
        else None
    )
    if not isinstance(v, bool):
        diags.error(
            f"'bank_singletons' is true or false, got {render(v) if v is not None else '?'}", vpos
        )
    else:
        spec.bank_singletons = v


def _read_backbone(
    s: A.Setting, vpos: Pos, definitions: dict[str, A.Definition], diags: Diagnostics
) -> A.CallValue | None:
    """``backbone wrn(depth = 28)`` (or a bare name): the call of a defined backbone, else None."""
    cv = s.value
    if not isinstance(cv, A.CallValue):
        name = cv.id if isinstance(cv, A.Name) else None
        if name is None:
            diags.error("'backbone' names a backbone, e.g. backbone wrn(depth = 28)", vpos)
            return None
        cv = A.CallValue(name, (), vpos)
    d = definitions.get(cv.name)
    if d is None or d.kind != "backbone":
        names = [n for n, x in definitions.items() if x.kind == "backbone"]
        what = "is a block, not a backbone" if d is not None else "is not defined"
        diags.error(
            f"backbone '{cv.name}' {what}",
            cv.pos,
            (
                choices_hint(cv.name, names)
                if names
                else "define it with `backbone NAME(params) { ... }` or import a file that does"
            ),
        )
        return None
    return cv


def _read_budget(
    s: A.Setting, vpos: Pos, consts: dict, diags: Diagnostics, spec: EnsembleSpec
) -> None:
    """``budget 36.5M`` or ``budget 1.0x``: set on ``spec`` when valid, else an error."""
    v = (
        _eval(s.value, consts, diags)
        if not isinstance(s.value, (A.CallValue, A.BodyValue))
        else None
    )
    if isinstance(v, Multiple):
        if v.factor <= 0:
            diags.error(f"a budget must be positive, got {v}", vpos)
        else:
            spec.budget = v
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        if v <= 0 or (isinstance(v, float) and not v.is_integer() and v < 1):
            diags.error(f"a budget must be a positive parameter count, got {render(v)}", vpos)
        else:
            spec.budget = int(v)
    elif v is not None or isinstance(s.value, (A.CallValue, A.BodyValue)):
        diags.error(
            "a budget is a parameter count (36.5M, 250K, 1200000) or a multiple of one plain "
            f"backbone (1.0x), got {render(v) if v is not None else 'a call'}",
            vpos,
        )


def _read_method(s: A.Setting, consts: dict, diags: Diagnostics) -> MethodSpec | None:
    """``method packed(alpha = 2, gamma = 1)``: a known method, known options, values of the right
    kind."""
    v = s.value
    if isinstance(v, A.Name):
        name, args, npos = v.id, (), v.pos
    elif isinstance(v, A.CallValue):
        name, args, npos = v.name, v.args, v.pos
    else:
        diags.error(
            "'method' names an ensemble method, e.g. method batch_ensemble or method packed(alpha"
            " = 2)",
            getattr(v, "pos", s.pos),
            "methods: " + ", ".join(METHODS),
        )
        return None
    if name not in METHODS:
        diags.error(f"unknown ensemble method '{name}'", npos, choices_hint(name, METHODS))
        return None
    table = METHODS[name]
    m = MethodSpec(name, {}, s.pos, {})
    for a in args:
        if a.name is None:
            diags.error(f"options of method {name} are named, e.g. {_example(name)}", a.pos)
            continue
        if a.name not in table:
            if a.name == "members":
                hint = "members is a setting of its own: members 3"
            elif table:
                hint = choices_hint(a.name, table)
            else:
                hint = f"method {name} takes no options"
            diags.error(f"method {name} has no option '{a.name}'", a.pos, hint)
            continue
        if a.name in m.options:
            diags.error(f"option '{a.name}' is given twice", a.pos)
            continue
        value = _method_option(name, a, table[a.name][0], consts, diags)
        if value is not None:
            m.options[a.name] = value
            m.option_pos[a.name] = a.pos
    return m


def _example(name: str) -> str:
    opts = ", ".join(f"{k} = {render(d)}" for k, (_, d) in METHODS[name].items())
    return f"{name}({opts})" if opts else name


def _method_option(method: str, a: A.Arg, kind: Any, consts: dict, diags: Diagnostics) -> Any:
    v = _eval(a.value, consts, diags, symbols=isinstance(kind, tuple))
    if v is None:
        return None
    if isinstance(kind, tuple):
        if v in kind:
            return v
        diags.error(
            f"unknown value {render(v)} for option '{a.name}' of {method}",
            a.pos,
            choices_hint(str(v), kind),
        )
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        diags.error(
            f"option '{a.name}' of {method} is a number, got {type_name(v)} ({render(v)})", a.pos
        )
        return None
    if kind == "count":
        return _int(v, a.pos, a.name, diags)
    if kind == "positive" and v <= 0:
        diags.error(f"option '{a.name}' of {method} must be positive, got {render(v)}", a.pos)
        return None
    if kind == "fraction" and not 0 <= v <= 1:
        diags.error(
            f"option '{a.name}' of {method} is a fraction in [0, 1], got {render(v)}", a.pos
        )
        return None
    return float(v)


def override_level(pos: Pos | None) -> int:
    """Where a setting was written: -1 nowhere (a default), 0 the spec file, 1 a ``--set``
    override."""
    if pos is None:
        return -1
    return 1 if pos.file.startswith("--set #") else 0


def _check_method_settings(
    spec: EnsembleSpec, seen: dict[str, A.Setting], diags: Diagnostics
) -> None:
    """Settings the method does not use: an error where they are written beside (or after) the
    method choice; ignored (and listed in ``spec.ignored`` for a warning) where the file wrote
    them and a ``--set`` chose the method. Packed-Ensembles: alpha or a budget, the later one
    wins."""
    m = spec.method
    level = override_level(m.pos)
    written: dict[str, Pos] = {k: seen[k].key_pos for k in MIXTURE_SETTINGS if k in seen}
    if "alphas" in spec.init:
        written["init.alphas"] = next(
            (
                st.pos
                for st in seen["init"].value.body
                if isinstance(st, A.Layer) and st.kind == "alphas"
            ),
            seen["init"].key_pos,
        )
    for key, pos in written.items():
        if m.name in MIXTURE_SETTINGS[key] or (
            key == "groups" and m.name == "naive" and spec.groups == "none"
        ):
            continue
        if override_level(pos) < level:
            spec.ignored.append((key, pos))
            continue
        why = _WHY.get(key, "it configures mixture's template banks")
        hint = (
            f"remove '{key}', or choose method mixture"
            if key != "groups" or spec.groups != "none"
            else "groups none is the naive ensemble: use method naive"
        )
        diags.error(f"'{key}' does not apply to method {m.name}: {why}", pos, hint)
    for key, _ in spec.ignored:  # back to the defaults: a later stage must not use them
        if key == "init.alphas":
            spec.init.pop("alphas", None)
        else:
            setattr(spec, key, EnsembleSpec.__dataclass_fields__[key].default)
            if key == "groups":
                spec.explicit = []
    if (
        m.name == "packed"
        and "alpha" in m.options
        and "budget" in written
        and spec.budget is not None
    ):
        a_level, b_level = override_level(m.option_pos["alpha"]), override_level(written["budget"])
        if a_level == b_level:
            diags.error(
                "packed takes alpha or a budget, not both: a budget solves alpha",
                m.option_pos["alpha"],
                "drop alpha to size the ensemble by the budget, or drop the budget",
            )
        elif a_level > b_level:  # the later choice wins
            spec.ignored.append(("budget", written["budget"]))
            spec.budget = None
        else:
            spec.ignored.append(("method.alpha", m.option_pos["alpha"]))
            del m.options["alpha"]


def _read_groups(body: A.BodyValue, consts: dict, diags: Diagnostics) -> list[GroupSpec]:
    groups: list[GroupSpec] = []
    names: set[str] = set()
    for st in body.body:
        if not isinstance(st, A.Layer) or st.kind != "group" or st.name is None:
            pos = getattr(st, "pos", body.pos)
            diags.error(
                'inside groups { ... } each line is: group NAME("glob", ..., share = f | templates'
                " = n)",
                pos,
                'for example: group convs3("s3.*.conv*", share = 0.5)',
            )
            continue
        if st.name in names:
            diags.error(f"group '{st.name}' is defined twice", st.name_pos or st.pos)
            continue
        names.add(st.name)
        g = GroupSpec(st.name, [], None, None, None, st.pos, [])
        for a in st.args:
            v = _eval(a.value, consts, diags)
            if v is None:
                continue
            if a.name is None:
                if not isinstance(v, str):
                    diags.error(
                        "a group's positional arguments are layer-name globs (strings), got"
                        f" {type_name(v)}",
                        a.pos,
                        'quote the pattern: "s1.*.conv2"',
                    )
                    continue
                g.patterns.append(v)
                g.pattern_pos.append(a.pos)
            elif a.name == "share":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                    diags.error(f"'share' is a positive number, got {render(v)}", a.pos)
                else:
                    g.share = float(v)
            elif a.name in ("templates", "templates_per_layer"):
                n = _int(v, a.pos, a.name, diags)
                if n is not None:
                    setattr(g, a.name, n)
            else:
                diags.error(
                    f"unknown group argument '{a.name}'",
                    a.pos,
                    choices_hint(a.name, ("share", "templates", "templates_per_layer")),
                )
        if not g.patterns:
            diags.error(
                f"group '{g.name}' names no layers",
                st.pos,
                'give one or more globs: group g("s1.*")',
            )
        if g.share is not None and g.templates is not None:
            diags.error(
                f"group '{g.name}' gives both a share and a template count",
                st.pos,
                "keep one of them",
            )
        groups.append(g)
    return groups


def _read_init(body: A.BodyValue, consts: dict, diags: Diagnostics) -> dict[str, dict]:
    """``init { alphas normal(std = 0.5); classifier uniform }``: each line is WHAT LAW[(std =
    s)]."""
    rules: dict[str, dict] = {}
    for st in body.body:
        if not isinstance(st, A.Layer) or st.name is None:
            pos = getattr(st, "pos", body.pos)
            diags.error(
                "inside init { ... } each line is: WHAT LAW, e.g. alphas normal(std = 0.5)",
                pos,
                "what: " + ", ".join(INIT_LAWS) + "; laws: orthonormal, uniform, normal(std = s)",
            )
            continue
        if st.kind not in INIT_LAWS:
            diags.error(
                f"unknown init target '{st.kind}'", st.kind_pos, choices_hint(st.kind, INIT_LAWS)
            )
            continue
        if st.kind in rules:
            diags.error(f"'{st.kind}' is initialised twice", st.kind_pos)
            continue
        laws = INIT_LAWS[st.kind]
        if st.name not in laws:
            diags.error(
                f"unknown law '{st.name}' for {st.kind}",
                st.name_pos or st.pos,
                choices_hint(st.name, laws),
            )
            continue
        rule: dict = {"law": st.name}
        for a in st.args:
            if a.name not in (None, "std") or st.name != "normal":
                what = f"'{a.name}'" if a.name else "a positional argument"
                diags.error(
                    (
                        f"{st.name} takes no argument {what}"
                        if st.name != "normal"
                        else f"unknown argument {what} of normal"
                    ),
                    a.pos,
                    "normal takes std: normal(std = 0.5)" if st.name == "normal" else None,
                )
                continue
            v = _eval(a.value, consts, diags)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                if v is not None:
                    diags.error(f"'std' is a positive number, got {render(v)}", a.pos)
                continue
            rule["std"] = float(v)
        if st.name == "normal" and "std" not in rule:
            if not st.args:
                diags.error(
                    "normal needs its standard deviation",
                    st.name_pos or st.pos,
                    f"write {st.kind} normal(std = 0.5)",
                )
            continue
        rules[st.kind] = rule
    return rules


# --- train -------------------------------------------------------------------


#: train settings left out of a Plan at these (default) values: see read_train
IMPLIED_TRAIN = {"shared_gradient": "mean_output"}


def read_train(section: A.Section, consts: dict, diags: Diagnostics) -> dict | None:
    """Validate the train section against ``Recipe``; errors point at the setting."""
    from mixc.spec.recipe import Recipe

    raw, where, ok = _collect_train(section, consts, diags)
    if not ok:
        return None
    # Shorthands users write: optimizer sgd / schedule cosine without arguments.
    for key in ("optimizer", "schedule"):
        if isinstance(raw.get(key), str):
            raw[key] = {"name": raw[key]}
    try:
        recipe = Recipe.model_validate(raw).model_dump()
    except ValidationError as err:
        _report_recipe_errors(err, where, section, diags)
        return None
    # Settings added after plans were pinned stay out of the Plan at their defaults, so its bytes
    # and hash do not move (Recipe fills them back in when the Plan's train section is read).
    for key, default in IMPLIED_TRAIN.items():
        if recipe.get(key) == default:
            del recipe[key]
    return recipe


def _collect_train(
    section: A.Section, consts: dict, diags: Diagnostics
) -> tuple[dict[str, Any], dict[tuple, Pos], bool]:
    """The train settings' values, where each was written, and whether all of them evaluated."""
    raw: dict[str, Any] = {}
    where: dict[tuple, Pos] = {}
    ok = True
    for s in section.settings:
        if s.key in raw:
            diags.error(f"'{s.key}' is set twice", s.key_pos)
            ok = False
            continue
        where[(s.key,)] = s.key_pos
        if isinstance(s.value, A.CallValue):
            args, args_ok = _train_call_args(s, s.value, consts, diags, where)
            ok = ok and args_ok
            raw[s.key] = args
        elif isinstance(s.value, A.BodyValue):
            diags.error(f"'{s.key}' takes a value, not a {{ ... }} body", s.value.pos)
            ok = False
        else:
            raw[s.key] = _eval(s.value, consts, diags)
            ok = ok and raw[s.key] is not None
            where[(s.key, "value")] = getattr(s.value, "pos", s.pos)
    return raw, where, ok


def _train_call_args(
    s: A.Setting, call: A.CallValue, consts: dict, diags: Diagnostics, where: dict[tuple, Pos]
) -> tuple[dict[str, Any], bool]:
    """A call-valued train setting (``optimizer sgd(lr = 0.1)``) as a dict with its name."""
    ok = True
    args: dict[str, Any] = {"name": call.name}
    where[(s.key, "name")] = call.pos
    for a in call.args:
        if a.name is None:
            diags.error(f"arguments of '{call.name}' are named, e.g. {call.name}(lr = 0.1)", a.pos)
            ok = False
            continue
        args[a.name] = _eval(a.value, consts, diags)
        # None: the value's own error is reported, no echo below
        ok = ok and args[a.name] is not None
        where[(s.key, a.name)] = a.pos
    return args, ok


def _report_recipe_errors(
    err: ValidationError, where: dict[tuple, Pos], section: A.Section, diags: Diagnostics
) -> None:
    """Each of Recipe's validation errors as a diagnostic at the setting or argument it names."""
    from mixc.spec.recipe import Recipe

    fields = {
        k: tuple(v.model_fields)
        for k, v in (("optimizer", _sub("Optimizer")), ("schedule", _sub("Schedule")))
    }
    for e in err.errors():
        loc = tuple(str(x) for x in e["loc"])
        pos = where.get(loc[:2]) or where.get(loc[:1]) or section.pos
        if e["type"] == "extra_forbidden":
            if len(loc) == 1:
                diags.error(
                    f"unknown train setting '{loc[0]}'",
                    pos,
                    choices_hint(loc[0], Recipe.model_fields),
                )
            else:
                diags.error(
                    f"unknown argument '{loc[1]}' of '{loc[0]}'",
                    pos,
                    choices_hint(loc[1], fields.get(loc[0], ())),
                )
        else:
            what = ".".join(loc)
            got = e.get("input")
            msg = e["msg"].removeprefix("Value error, ")
            msg = msg[:1].lower() + msg[1:]
            hint = (
                f"got {render(got)}"
                if not isinstance(got, dict)
                else "see the train section in README.md"
            )
            diags.error(f"bad value for '{what}': {msg}", pos, hint)


def _sub(name: str):
    from mixc.spec import recipe

    return getattr(recipe, name)
