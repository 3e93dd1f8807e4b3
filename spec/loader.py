"""Load a spec: resolve the file (or zoo name), follow imports, apply ``--set``.

Imports resolve relative to the importing file, then in the folders named with
``--import-path`` (or ``MIXC_IMPORT_PATH``), then in the zoo; a cycle is an
error naming the chain. An import may only read a ``.mix`` file inside the main
spec's folder tree, the zoo, or a named import folder (after symlinks are
resolved): a spec someone hands you cannot make mixc read ``/etc/passwd`` or
``/proc/self/environ`` into an error message. The content of a file that is not
a spec (its name does not end in ``.mix``) is never shown. Definitions from
every file share one namespace (a name defined twice is an error naming both
places). Only the main file's ``ensemble`` and ``train`` sections count;
imported files supply definitions.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mixc.spec import ast as A
from mixc.spec.diagnostics import (
    Diagnostic,
    Diagnostics,
    Pos,
    SpecError,
    choices_hint,
    did_you_mean,
)
from mixc.spec.expr import ExprError, evaluate
from mixc.spec.parser import parse, parse_value
from mixc.spec.sections import ENSEMBLE_SETTINGS, METHODS, EnsembleSpec, read_ensemble, read_train

IMPORT_PATH_ENV = "MIXC_IMPORT_PATH"  # os.pathsep-separated folders imports may also read
MAX_SPEC_BYTES = 4_000_000  # far above any real spec; a bigger file is refused before it is read


def zoo_dir() -> Path:
    return Path(str(resources.files("mixc.zoo")))


def import_roots(main_file: Path, import_paths: Sequence[str | Path] = ()) -> tuple[Path, ...]:
    """The folders imports may read: the main spec's folder, ``import_paths``, ``MIXC_IMPORT_PATH``,
    the zoo."""
    extra = [
        *import_paths,
        *(p for p in os.environ.get(IMPORT_PATH_ENV, "").split(os.pathsep) if p),
    ]
    roots = [main_file.resolve().parent]
    for p in (*extra, zoo_dir()):
        try:
            roots.append(Path(p).resolve())
        except (OSError, ValueError):  # a name the OS cannot take: no folder to allow
            continue
    return tuple(dict.fromkeys(roots))


def zoo_specs() -> list[Path]:
    """The zoo's top-level specs (block libraries in zoo/blocks/ excluded)."""
    return sorted(zoo_dir().glob("*.mix"))


def describe(path: Path) -> str:
    """A spec's one-line description: its first comment line."""
    try:
        for line in path.read_text().splitlines():
            s = line.strip()
            if s.startswith("#"):
                text = s.lstrip("#").strip()
                if ":" in text and text.split(":", 1)[0].endswith(".mix"):
                    text = text.split(":", 1)[1].strip()
                return text
            if s:
                break
    except OSError:
        pass
    return ""


def resolve_spec_path(spec: str | Path) -> Path:
    """An existing path, else a zoo spec by name (``wrn28_10`` or ``wrn28_10.mix``)."""
    p = Path(spec)
    try:
        if p.is_file():
            return p
    except (OSError, ValueError):
        raise SpecError(
            [Diagnostic(f"not a usable file name: {str(spec)!r}", None, None)]
        ) from None
    name = p.name if p.suffix == ".mix" else p.name + ".mix"
    if p.parent in (Path("."), Path("zoo")):
        z = zoo_dir() / name
        if z.is_file():
            return z
    names = [q.stem for q in zoo_specs()]
    hint = did_you_mean(p.stem, names)
    if p.exists():
        msg = f"{spec} is not a file"
    else:
        msg = f"no such spec file: {spec}"
    raise SpecError(
        [Diagnostic(msg, None, hint or ("zoo specs: " + ", ".join(names) if names else None))]
    )


@dataclass
class Program:
    """A loaded, checked spec: what the compiler elaborates."""

    main_file: str
    name: str  # the main file's stem, e.g. "wrn28_10"
    sources: dict[str, str]
    definitions: dict[str, A.Definition]
    consts: dict[str, Any]
    ensemble: EnsembleSpec | None
    recipe: dict | None  # validated Recipe as a dict
    overrides: list[str] = field(default_factory=list)
    # Errors in the sections, kept so the compiler can add its own and report all at once.
    pending: list = field(default_factory=list)


def load_program(
    spec: str | Path,
    overrides: Sequence[str] = (),
    defer: bool = False,
    text: str | None = None,
    import_paths: Sequence[str | Path] = (),
) -> Program:
    """Load and check ``spec``. With ``defer``, errors in the sections are returned
    in ``Program.pending`` instead of raised (syntax and import errors always raise).
    With ``text``, that is the main file's source and ``spec`` only names it
    (imports then resolve from the current folder, then the zoo). ``import_paths``:
    further folders imports may read (see the module docstring)."""
    path = Path(spec) if text is not None else resolve_spec_path(spec)
    if any(ord(ch) < 32 or 127 <= ord(ch) < 160 or ch in "\u2028\u2029" for ch in str(path)):
        # The name travels into plans, messages and generated source: it must be one line of text.
        raise SpecError(
            [
                Diagnostic(
                    f"the spec's file name {str(path)!r} contains a control character",
                    None,
                    "rename the file",
                )
            ]
        )
    diags = Diagnostics()
    modules: dict[str, A.Module] = {}
    display = str(spec) if text is not None or Path(spec).is_file() else str(path)
    roots = import_roots(path, import_paths)
    _load_file(path.resolve(), modules, diags, chain=(), display=display, text=text, roots=roots)
    diags.raise_if_any()
    main = next(iter(modules.values()))

    definitions: dict[str, A.Definition] = {}
    for m in modules.values():
        for d in m.definitions:
            if d.name in definitions:
                other = definitions[d.name]
                diags.error(
                    f"'{d.name}' is defined twice",
                    d.name_pos,
                    f"the other definition is at {other.name_pos.file}:{other.name_pos.line};"
                    " rename one of them",
                )
            else:
                definitions[d.name] = d
    consts: dict[str, Any] = {}
    for let in main.lets:
        try:
            consts[let.name] = evaluate(let.value, consts)
        except ExprError as e:
            diags.error(e.message, e.pos, e.hint)

    sections = {s.kind: s for s in main.sections}
    for s in main.sections:
        if sections[s.kind] is not s:
            diags.error(f"a second '{s.kind}' section", s.pos, "merge it into the first one")
    ens_section = sections.get("ensemble")
    train_section = sections.get("train")
    ens_section, train_section = _apply_overrides(
        list(overrides), ens_section, train_section, main.file, diags
    )

    ensemble = read_ensemble(ens_section, consts, definitions, diags) if ens_section else None
    recipe = read_train(train_section, consts, diags) if train_section else None
    if not defer:
        diags.raise_if_any()
    return Program(
        main_file=main.file,
        name=path.stem,
        sources=diags.sources,
        definitions=definitions,
        consts=consts,
        ensemble=ensemble,
        recipe=recipe,
        overrides=list(overrides),
        pending=list(diags.items),
    )


def _load_file(
    path: Path,
    modules: dict[str, A.Module],
    diags: Diagnostics,
    chain: tuple[Path, ...],
    display: str,
    import_pos: Pos | None = None,
    text: str | None = None,
    roots: tuple[Path, ...] = (),
) -> None:
    key = str(path)
    if key in modules:
        return
    from_disk = text is None
    if text is None:
        text = _read_spec(path, display, import_pos, diags)
        if text is None:
            return
    is_spec = not from_disk or path.suffix == ".mix"
    if is_spec:
        diags.sources[display] = text
    try:
        module = parse(text, display)
    except SpecError as err:
        if is_spec:
            diags.extend(err)
        else:  # never show a line (or a token) of a file that is not a spec: it may hold secrets
            first = err.diagnostics[0].pos if err.diagnostics else None
            diags.error(
                f"{display} is not a mixc spec: it does not parse (its content is not shown, as"
                f" {path} is not a .mix file)",
                first,
                "name a .mix file",
            )
        return
    modules[key] = module
    for imp in module.imports:
        target, refused = _resolve_import(path, imp.path, roots)
        if target is None:
            where = ", ".join(str(r) for r in roots)
            if refused:
                diags.error(
                    f'import "{imp.path}" is outside the folders imports may read',
                    imp.pos,
                    f"imports resolve inside {where}; name another folder with --import-path DIR "
                    f"(or {IMPORT_PATH_ENV})",
                )
            else:
                diags.error(
                    f'cannot find imported file "{imp.path}"',
                    imp.pos,
                    f"imports are looked up next to {display}, then in --import-path folders, then"
                    f" in the zoo ({zoo_dir()})",
                )
            continue
        if target.suffix != ".mix":
            diags.error(
                f'import "{imp.path}" does not name a .mix file',
                imp.pos,
                "only spec files (.mix) can be imported",
            )
            continue
        if target in chain or target == path:
            cycle = " -> ".join(p.name for p in (*chain, path, target))
            diags.error(
                f"import cycle: {cycle}",
                imp.pos,
                "a file cannot import itself, directly or through others",
            )
            continue
        _load_file(target, modules, diags, (*chain, path), _display(target), imp.pos, roots=roots)


def _read_spec(path: Path, display: str, pos: Pos | None, diags: Diagnostics) -> str | None:
    """The text of a spec file, or None with an error that names the file but shows none of it."""
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            diags.error(f"{display} is too large to be a spec (over {MAX_SPEC_BYTES:,} bytes)", pos)
            return None
        with open(path, encoding="utf-8") as f:
            return f.read(MAX_SPEC_BYTES + 1)[:MAX_SPEC_BYTES]
    except UnicodeDecodeError:
        diags.error(
            f"cannot read {display}: it is not UTF-8 text", pos, "a spec is a UTF-8 text file"
        )
    except OSError as e:
        diags.error(
            f"cannot read {display}: {e.strerror or type(e).__name__}", pos, "check the path"
        )
    return None


def _display(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _resolve_import(importer: Path, name: str, roots: tuple[Path, ...]) -> tuple[Path | None, bool]:
    """(the file ``name`` names, or None; whether a candidate was refused for lying outside
    ``roots``).

    Candidates outside the roots are refused before the file system is asked about
    them, so an error does not even tell whether such a file exists.
    """
    refused = False
    for base in (importer.parent, *roots[1:]):
        try:
            cand = (base / name).resolve()
            if not any(cand.is_relative_to(r) for r in roots):
                refused = True
                continue
            if cand.is_file():
                return cand, False
        except (OSError, ValueError):  # a name the OS cannot take (NUL byte, too long)
            return None, refused
    return None, refused


# --- --set overrides -----------------------------------------------------------

ENSEMBLE_KEYS = ENSEMBLE_SETTINGS


def _apply_overrides(
    overrides: list[str],
    ens: A.Section | None,
    train: A.Section | None,
    main_file: str,
    diags: Diagnostics,
) -> tuple[A.Section | None, A.Section | None]:
    from mixc.spec.recipe import Recipe

    train_keys = tuple(Recipe.model_fields)
    for i, item in enumerate(overrides):
        origin = f"--set #{i + 1}"
        diags.sources[origin] = item
        if "=" not in item:
            diags.error(
                f"an override must look like key=value, got {item!r}",
                Pos(origin, 1, 1),
                "for example --set members=2 or --set backbone.classes=10",
            )
            continue
        key, text = item.split("=", 1)
        key = key.strip()
        path = key.split(".")
        if path[0] == "ensemble":
            path = path[1:]
        section_kind = "train" if path and path[0] == "train" else "ensemble"
        if section_kind == "train":
            path = path[1:]
        valid = train_keys if section_kind == "train" else ENSEMBLE_KEYS
        if not path or path[0] not in valid:
            all_keys = list(ENSEMBLE_KEYS) + [f"train.{k}" for k in train_keys]
            bad = key or "(empty)"
            diags.error(
                f"unknown setting '{bad}' in --set {item}",
                Pos(origin, 1, 1, 1, len(key) + 1),
                choices_hint(bad, all_keys),
            )
            continue
        vpos = len(key) + 2  # column where the value starts in the override text
        bad_char = next(
            (i for i, ch in enumerate(text) if (ord(ch) < 32 and ch != "\t") or ord(ch) == 127),
            None,
        )
        # a newline would smuggle further statements into the wrapped value
        if bad_char is not None:
            diags.error(
                f"a --set value is one line of text; found control character {text[bad_char]!r}",
                Pos(origin, 1, vpos + bad_char),
                "remove line breaks and control characters from the value",
            )
            continue
        try:
            value = parse_value(text, origin)
        except SpecError as err:
            for d in err.diagnostics:
                p = d.pos
                diags.error(d.message, Pos(origin, 1, (p.col if p else 1) + vpos - 1), d.hint)
            continue
        value = A.relocate(value, origin, 1, vpos - 1)
        opos = Pos(origin, 1, 1, 1, len(item) + 1)
        section = train if section_kind == "train" else ens
        if section is None:
            section = A.Section(section_kind, (), Pos(main_file, 1, 1))
        section = _override(section, path, value, opos, diags)
        if section_kind == "train":
            train = section
        else:
            ens = section
    return ens, train


def _override_init(
    section: A.Section, settings: list, idx: int | None, what: str, value, pos: Pos
) -> A.Section:
    """``--set init.alphas=normal(std=0.5)``: replace (or add) one line of the init body."""
    law = value.name if isinstance(value, A.CallValue) else getattr(value, "id", None)
    args = value.args if isinstance(value, A.CallValue) else ()
    line = A.Layer(
        what, law if law is not None else "?", args, pos, pos, getattr(value, "pos", pos)
    )
    old = (
        settings[idx].value
        if idx is not None and isinstance(settings[idx].value, A.BodyValue)
        else None
    )
    body = tuple(st for st in (old.body if old else ()) if getattr(st, "kind", None) != what) + (
        line,
    )
    return _put(section, settings, idx, "init", A.BodyValue(body, old.pos if old else pos), pos)


def _put(
    section: A.Section, settings: list, idx: int | None, key: str, value, pos: Pos
) -> A.Section:
    """The section with setting ``key`` (at ``idx``, or appended) holding ``value``; a replaced
    setting keeps its own position, so errors still point into the file."""
    new = A.Setting(
        key,
        value,
        settings[idx].pos if idx is not None else pos,
        settings[idx].key_pos if idx is not None else pos,
    )
    if idx is None:
        settings.append(new)
    else:
        settings[idx] = new
    return dataclasses.replace(section, settings=tuple(settings))


def _override(
    section: A.Section, path: list[str], value, pos: Pos, diags: Diagnostics
) -> A.Section:
    settings = list(section.settings)
    idx = next((i for i, s in enumerate(settings) if s.key == path[0]), None)
    if path[0] == "init" and len(path) == 2:
        return _override_init(section, settings, idx, path[1], value, pos)
    if len(path) == 1:
        new = A.Setting(path[0], value, pos, pos)
        if idx is None:
            settings.append(new)
        else:
            settings[idx] = new
        return dataclasses.replace(section, settings=tuple(settings))
    # key.arg=value: set one argument of a call value (backbone.classes, optimizer.lr)
    if len(path) > 2:
        diags.error(
            f"cannot override '{'.'.join(path)}': paths go at most one level into a call", pos
        )
        return section
    if idx is not None and path[0] == "method" and isinstance(settings[idx].value, A.Name):
        name = settings[idx].value  # method packed, then --set method.alpha=3: packed(alpha = 3)
        base = A.CallValue(name.id, (), name.pos)
    elif idx is None or not isinstance(settings[idx].value, A.CallValue):
        if path[0] in ("optimizer", "schedule") and idx is None:
            base = A.CallValue({"optimizer": "sgd", "schedule": "step"}[path[0]], (), pos)
        else:
            owner = next((m for m, options in METHODS.items() if path[1] in options), "packed")
            hint = (
                f"set the whole value instead, e.g. --set {path[0]}=..."
                if path[0] != "method"
                else f"choose the method first: --set method={owner} --set method.{path[1]}=..."
            )
            diags.error(
                f"cannot set '{'.'.join(path)}': '{path[0]}' is not a call with arguments in this"
                " spec",
                pos,
                hint,
            )
            return section
    else:
        base = settings[idx].value
    args = [a for a in base.args if a.name != path[1]]
    args.append(A.Arg(path[1], value, pos))
    return _put(section, settings, idx, path[0], dataclasses.replace(base, args=tuple(args)), pos)
