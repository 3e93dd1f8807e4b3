"""Hostile or careless input: every case is a clear positioned error, fast, and never a traceback.

Expression bombs and crashes in ``--set`` values and ``let``s, imports outside the
allowed folders, plans that try to inject code into the generated model, and
output pipes closed early (issue 10).
"""

from __future__ import annotations

import time

import pytest

import mixc
from mixc.cli import main
from mixc.spec import SpecError


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --- expression bombs and crashes -------------------------------------------------

BOMBS = [
    ("members=9**9**9", "number too large"),
    ("members=10**10**10", "number too large"),
    ("members=3**36.5M", "number too large"),
    ("members=0**-1", "0 cannot be raised to a negative power"),
    ("members=1e17//1e-300", "number too large"),
    ("members=1e17/1e-300", "number too large"),
    ("members=(-8)**0.5", "is not real"),
    ("members=1e19", "number too large"),
    ("members=" + "9" * 5000, "number too large"),  # past int()'s 4300-digit limit
    ("members=0.5**-1e18", "number too large"),
    ("train.optimizer.lr=sgd()", "'sgd(...)' is a call, not a value"),
    ("train.epochs=2**99", "number too large"),
    ("budget=-1", "a budget must be a positive parameter count, got -1"),
    ("budget=0.0x", "a budget must be positive"),
    ("members=2\ntrain { epochs 1", "control character"),
]


@pytest.mark.parametrize("override,message", BOMBS)
def test_set_bombs_are_fast_positioned_errors(capsys, override, message):
    start = time.perf_counter()
    rc, out, err = _cli(capsys, "check", "digits", "--set", override)
    elapsed = time.perf_counter() - start
    assert rc == 1, err
    assert message in err
    assert err.startswith("--set #1:1:"), err  # positioned in the override itself
    assert "Traceback" not in err and "no budget is given" not in err
    assert "bad value for" not in err  # no echo of the same mistake from the recipe's validation
    assert elapsed < 1.0, f"{override!r} took {elapsed:.2f}s"


@pytest.mark.parametrize("expr", ["9**9**9", "3**36.5M", "0**-1", "1e17//1e-300", "10**10**10"])
def test_let_bombs_are_fast_positioned_errors(expr):
    text = f"let n = {expr}\n"
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        mixc.compile_text(text, name="bomb.mix")
    assert time.perf_counter() - start < 1.0
    d = info.value.diagnostics[0]
    assert (d.pos.file, d.pos.line, d.pos.col) == ("bomb.mix", 1, 9)
    assert "Traceback" not in info.value.render()


def test_doubling_strings_and_lists_are_bounded():
    strings = "let s0 = \"xxxxxxxxxx\"\n" + "".join(f"let s{i + 1} = s{i} + s{i}\n" for i in range(40))
    with pytest.raises(SpecError, match="string too long"):
        mixc.compile_text(strings, name="s.mix")
    lists = "let l0 = [1, 2]\n" + "".join(f"let l{i + 1} = [l{i}, l{i}]\n" for i in range(60))
    start = time.perf_counter()
    with pytest.raises(SpecError, match="list too large"):
        mixc.compile_text(lists, name="l.mix")
    assert time.perf_counter() - start < 1.0


def test_ordinary_powers_and_divisions_still_work():
    plan = mixc.compile("digits", ["members=2**2", "budget=2**17 + 10**5", "train.optimizer.lr=10**-2",
                                   "backbone.width=2**5", "templates_per_layer=9//2"])
    assert plan.members == 4 and plan.accounting.budget == 2**17 + 10**5 and plan.train["optimizer"]["lr"] == 0.01


# --- imports stay inside the allowed folders ------------------------------------------

SECRET = "TOP_SECRET_VALUE_42"


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """project/spec.mix beside project/lib/, a secret outside it, and a shared folder outside it."""
    monkeypatch.delenv("MIXC_IMPORT_PATH", raising=False)
    project = tmp_path / "project"
    (project / "lib").mkdir(parents=True)
    (project / "lib" / "ok.mix").write_text("block unit(w) {\n    conv(w)\n}\n")
    (tmp_path / "secret.txt").write_text(f"{SECRET}=1\n")
    (tmp_path / "secret.mix").write_text(f"{SECRET} = 1\n")
    (project / "notes.txt").write_text(f"{SECRET} is here\n")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "common.mix").write_text("block common(w) {\n    conv(w)\n}\n")
    (project / "link.mix").symlink_to(tmp_path / "secret.mix")
    return project


def _check(capsys, spec, *extra: str) -> tuple[int, str]:
    rc, out, err = _cli(capsys, "check", str(spec), *extra)
    assert "Traceback" not in out + err
    return rc, out + err


@pytest.mark.parametrize("target", [
    "/etc/passwd", "../../../../etc/passwd", "/proc/self/environ", "../secret.txt", "../secret.mix",
    "link.mix",  # a symlink inside the folder that points outside it
    "../shared/common.mix",  # outside until named with --import-path
])
def test_imports_outside_the_allowed_folders_are_refused(capsys, tree, target):
    spec = tree / "spec.mix"
    spec.write_text(f'import "{target}"\n')
    rc, text = _check(capsys, spec)
    assert rc == 1
    assert f'{spec}:1:1: error: import "{target}" is outside the folders imports may read' in text
    assert SECRET not in text and "root:" not in text and "PATH=" not in text


def test_imports_inside_the_tree_the_zoo_and_named_folders_resolve(capsys, tree, monkeypatch):
    spec = tree / "spec.mix"
    spec.write_text('import "lib/ok.mix"\nimport "blocks/wide.mix"\n')
    assert _check(capsys, spec)[0] == 0
    spec.write_text('import "common.mix"\n')
    assert _check(capsys, spec)[0] == 1
    assert _check(capsys, spec, "--import-path", str(tree.parent / "shared"))[0] == 0
    monkeypatch.setenv("MIXC_IMPORT_PATH", str(tree.parent / "shared"))
    assert _check(capsys, spec)[0] == 0
    assert mixc.load(spec).definitions.keys() == {"common"}


def test_a_file_that_is_not_a_spec_is_never_shown(capsys, tree):
    spec = tree / "spec.mix"
    spec.write_text('import "notes.txt"\n')
    rc, text = _check(capsys, spec)
    assert rc == 1 and 'does not name a .mix file' in text and SECRET not in text
    rc, text = _check(capsys, tree / "notes.txt")  # named on the command line: still not echoed
    assert rc == 1 and "is not a mixc spec" in text and SECRET not in text
    rc, text = _check(capsys, "/etc/passwd")
    assert rc == 1 and "is not a mixc spec" in text and "root" not in text
