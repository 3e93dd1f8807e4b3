"""Hostile or careless input: every case is a clear positioned error, fast, and never a traceback.

Expression bombs and crashes in ``--set`` values and ``let``s, imports outside the
allowed folders, plans that try to inject code into the generated model, and
output pipes closed early.
"""

from __future__ import annotations

import time

import pytest
from paths import REPO

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
    ("members=" + "-" * 5000 + "1", "nested too deeply"),  # once a RecursionError in the parser
    ("members=" + "+".join(["1"] * 3000), "nested too deeply"),
    ("members=" + "[" * 3000 + "]" * 3000, "nested too deeply"),
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
    assert elapsed < 2.0, f"{override!r} took {elapsed:.2f}s"  # the hangs never ended


@pytest.mark.parametrize("expr", ["9**9**9", "3**36.5M", "0**-1", "1e17//1e-300", "10**10**10"])
def test_let_bombs_are_fast_positioned_errors(expr):
    text = f"let n = {expr}\n"
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        mixc.compile_text(text, name="bomb.mix")
    assert time.perf_counter() - start < 2.0
    d = info.value.diagnostics[0]
    assert (d.pos.file, d.pos.line, d.pos.col) == ("bomb.mix", 1, 9)
    assert "Traceback" not in info.value.render()


def test_doubling_strings_and_lists_are_bounded():
    strings = 'let s0 = "xxxxxxxxxx"\n' + "".join(
        f"let s{i + 1} = s{i} + s{i}\n" for i in range(40)
    )
    with pytest.raises(SpecError, match="string too long"):
        mixc.compile_text(strings, name="s.mix")
    lists = "let l0 = [1, 2]\n" + "".join(f"let l{i + 1} = [l{i}, l{i}]\n" for i in range(60))
    start = time.perf_counter()
    with pytest.raises(SpecError, match="list too large"):
        mixc.compile_text(lists, name="l.mix")
    assert time.perf_counter() - start < 2.0
    deep = "let l0 = [1]\n" + "".join(f"let l{i + 1} = [l{i}]\n" for i in range(2000))
    with pytest.raises(SpecError, match="lists nested too deeply"):  # not a RecursionError
        mixc.compile_text(deep, name="d.mix")


def test_ordinary_powers_and_divisions_still_work():
    plan = mixc.compile(
        "digits",
        [
            "members=2**2",
            "budget=2**17 + 10**5",
            "train.optimizer.lr=10**-2",
            "backbone.width=2**5",
            "templates_per_layer=9//2",
        ],
    )
    assert (
        plan.members == 4
        and plan.accounting.budget == 2**17 + 10**5
        and plan.train["optimizer"]["lr"] == 0.01
    )


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


@pytest.mark.parametrize(
    "target",
    [
        "/etc/passwd",
        "../../../../etc/passwd",
        "/proc/self/environ",
        "../secret.txt",
        "../secret.mix",
        "link.mix",  # a symlink inside the folder that points outside it
        "../shared/common.mix",  # outside until named with --import-path
    ],
)
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
    assert rc == 1 and "does not name a .mix file" in text and SECRET not in text
    rc, text = _check(capsys, tree / "notes.txt")  # named on the command line: still not echoed
    assert rc == 1 and "is not a mixc spec" in text and SECRET not in text
    rc, text = _check(capsys, "/etc/passwd")
    assert rc == 1 and "is not a mixc spec" in text and "root" not in text
    disguised = tree / "disguised.mix"  # the name is judged after symlinks are resolved
    disguised.symlink_to(tree / "notes.txt")
    rc, text = _check(capsys, disguised)
    assert rc == 1 and "is not a mixc spec" in text and SECRET not in text


# --- no code from a plan ---------------------------------------------------------------

PAYLOAD = "x)\nprint('PWNED')\n# ("


def _rename(plan_json: dict, old: str, new: str) -> dict:
    """Every occurrence of name ``old`` (alone or as a dotted prefix/suffix) renamed ``new``."""
    import json
    import re

    text = json.dumps(plan_json)
    body = json.dumps(new)[1:-1]
    text = re.sub(r'(?<=[".])' + re.escape(old) + r'(?=[".])', lambda m: body, text)
    return json.loads(text)


def _tamper(data: dict, field: str) -> dict:
    if field == "source":
        data["source"] = PAYLOAD
    elif field == "name":
        data["name"] = PAYLOAD
    elif field == "spec_hash":
        data["spec_hash"] = "0\nprint('PWNED')\n#"
    elif field == "op":
        data = _rename(data, data["ops"][1]["name"], 'a"]\nprint("PWNED")\n#')
    elif field == "group":
        data = _rename(data, data["groups"][0]["name"], "g\nprint('PWNED')\n#")
    elif field == "tensor":
        data["tensors"][0]["name"] = "bank.x\nprint('PWNED')"
    elif field == "eps":  # a valid plan, edited: only the hash can tell
        bn = next(op for op in data["ops"] if op["kind"] == "bn")
        bn["eps"] = 0.5
    elif field == "no_hash":
        data["spec_hash"] = ""
    return data


def _copy_tampered(run, dest, field):
    import json
    import shutil

    shutil.copytree(run, dest)
    data = json.loads((dest / "plan.json").read_text())
    (dest / "plan.json").write_text(json.dumps(_tamper(data, field)))
    return dest


def test_the_untampered_run_folder_evaluates(capsys, run_folder):
    rc, out, err = _cli(
        capsys,
        "eval",
        str(run_folder),
        "--data",
        str(run_folder.parent / "d.npz"),
        "--no-save",
        "--json",
    )
    assert rc == 0, err


@pytest.mark.parametrize("field", ["source", "name", "spec_hash", "op", "group", "tensor"])
def test_code_in_a_plan_is_refused_before_it_runs(capsys, run_folder, tmp_path, field):
    run = _copy_tampered(run_folder, tmp_path / "run", field)
    rc, out, err = _cli(
        capsys, "eval", str(run), "--data", str(run_folder.parent / "d.npz"), "--no-save"
    )
    assert rc == 1
    assert f"{run / 'plan.json'} is not a valid mixc plan" in err
    assert "PWNED" not in out + err and "Traceback" not in err


@pytest.mark.parametrize(
    "field,message",
    [("eps", "does not match its content hash"), ("no_hash", "it has no spec_hash")],
)
def test_an_edited_plan_is_refused_by_its_hash(capsys, run_folder, tmp_path, field, message):
    run = _copy_tampered(run_folder, tmp_path / "run", field)
    rc, out, err = _cli(
        capsys, "eval", str(run), "--data", str(run_folder.parent / "d.npz"), "--no-save"
    )
    assert rc == 1 and message in err and str(run / "plan.json") in err
    # --plan, report and interpolate open runs the same way
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((run / "checkpoint.safetensors").read_bytes())
    rc, out, err = _cli(capsys, "eval", str(lone), "--plan", str(run / "plan.json"), "--no-save")
    assert rc == 1 and message in err
    rc, out, err = _cli(capsys, "report", str(run))
    assert rc == 1 and message in err


def test_resuming_into_a_folder_with_a_tampered_plan_is_refused(run_folder, tmp_path):
    """Both training loops check the run folder through mixc.run_writer.check_run_folder before
    resuming."""
    from mixc.core.errors import TrainError
    from mixc.run_writer import check_run_folder

    plan = mixc.compile("digits", ["backbone.width=8", "members=2"])
    check_run_folder(run_folder, plan)  # the untouched folder resumes
    run = _copy_tampered(run_folder, tmp_path / "run", "eps")
    with pytest.raises(TrainError, match="does not match its content hash"):
        check_run_folder(run, plan)


HOSTILE_TEXT = [
    'x)\nprint("PWNED")\n# (',
    '"""',
    "'''",
    "\\",
    'a"""+print("PWNED")+"""b',
    "\u2028x",
    "\r",
    "\x00",
    "é\u0085",
    "\\x\\u00",
]


@pytest.mark.parametrize("text", HOSTILE_TEXT)
def test_quoting_helpers_keep_any_string_inert(text):
    import ast

    from mixc.backends.pysource import comment, literal

    assert ast.literal_eval(literal(text)) == text
    tree = ast.parse(f"# {comment(text)}\nX = 1\n")
    assert len(tree.body) == 1
    tree = ast.parse(f'"""Doc {comment(text)}."""\n')
    assert len(tree.body) == 1 and isinstance(tree.body[0].value, ast.Constant)


def test_valid_but_hostile_text_in_a_plan_stays_text(capsys):
    """Names and file names may hold quotes and backslashes (a file can be called that): quoted,
    never code."""
    import ast

    pytest.importorskip("torch")  # the torch text is executed below
    from mixc.backends import generated
    from mixc.backends.flax.codegen import emit_source as flax_source
    from mixc.backends.torch.codegen import emit_source as torch_source

    def calls(tree: ast.Module) -> list[str]:  # statements at module level that run something
        return [
            ast.unparse(n)
            for n in tree.body
            if isinstance(n, ast.Expr) and not isinstance(n.value, ast.Constant)
        ]

    name = 'evil"""+print("PWNED")+"""\\'
    honest = mixc.compile("digits", ["backbone.width=8", "members=2"])
    plan = honest.model_copy(update={"name": name, "source": "dir/" + name + "'''.mix"})
    for emit in (torch_source, flax_source):
        tree = ast.parse(emit(plan))
        spec_name = next(
            n.value
            for n in tree.body
            if isinstance(n, ast.Assign) and n.targets[0].id == "SPEC_NAME"
        )
        assert ast.literal_eval(spec_name) == name
        assert calls(tree) == calls(ast.parse(emit(honest)))  # the text added no statement
    mod = generated.load(plan, "torch", torch_source(plan))
    assert mod.SPEC_NAME == name
    assert "PWNED" not in capsys.readouterr().out


def test_a_plan_that_skipped_validation_is_not_lowered():
    from mixc.backends.flax.codegen import CodegenError as FlaxCodegenError
    from mixc.backends.flax.codegen import emit_source as flax_source
    from mixc.backends.torch.codegen import CodegenError
    from mixc.backends.torch.codegen import emit_source as torch_source

    plan = mixc.compile("digits", ["backbone.width=8", "members=2"])
    op = plan.ops[1].model_copy(update={"name": PAYLOAD})  # model_copy does not validate
    bad = plan.model_copy(update={"ops": [plan.ops[0], op, *plan.ops[2:]], "source": PAYLOAD})
    with pytest.raises(CodegenError, match="the plan is not valid"):
        torch_source(bad)
    with pytest.raises(FlaxCodegenError, match="the plan is not valid"):
        flax_source(bad)


# --- a reader that goes away -------------------------------------------------------------


def _closed_pipe(*argv: str) -> tuple[int, str]:
    """Run ``mixc argv`` with its stdout pipe closed before it writes: (exit code, stderr)."""
    import os
    import subprocess
    import sys

    root = REPO
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mixc", *argv],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # as `| head -0` would: every write now fails with EPIPE
    err = proc.stderr.read().decode()
    proc.stderr.close()
    return proc.wait(timeout=120), err


@pytest.mark.parametrize("argv", [("inspect", "wrn28_10", "--json"), ("compile", "wrn28_10")])
def test_a_closed_pipe_ends_quietly(argv):
    rc, err = _closed_pipe(*argv)
    assert rc == 141, err
    assert err == ""


def test_report_into_a_closed_pipe_ends_quietly(capsys, run_folder, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    rc, out, err = _cli(
        capsys, "eval", str(run), "--data", str(run_folder.parent / "d.npz"), "--json"
    )
    assert rc == 0, err
    rc, err = _closed_pipe("report", str(run), "--json")
    assert rc == 141, err
    assert err == ""


def test_members_are_capped_so_tables_stay_small(capsys):
    start = time.perf_counter()
    rc, out, err = _cli(
        capsys, "check", "digits", "--set", "backbone.width=1G", "--set", "members=36.5M"
    )
    assert rc == 1 and "'members' is at most 1,024, got 36,500,000" in err
    assert time.perf_counter() - start < 2.0
    assert mixc.compile("digits", ["members=1024", "budget=10x"]).members == 1024


def test_a_plan_that_is_not_json_is_refused_without_echo(capsys, run_folder, tmp_path):
    other = tmp_path / "notes.json"
    other.write_text(f"{SECRET}\n")
    keyed = tmp_path / "keyed.json"
    keyed.write_text('{"\\u001b[31m' + SECRET + '": 1}')
    for plan in (other, keyed):
        rc, out, err = _cli(
            capsys,
            "eval",
            str(run_folder / "checkpoint.safetensors"),
            "--plan",
            str(plan),
            "--no-save",
        )
        assert rc == 1 and f"{plan} is not a valid mixc plan" in err
        assert SECRET not in out + err and "\x1b" not in err
