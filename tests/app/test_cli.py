"""The command line: exit codes, --set overrides, outputs, zoo resolution."""

import json

import pytest

from mixc.cli import main
from mixc.compiler.plan import Plan


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_check_ok_and_library_file(capsys, tmp_path):
    rc, out, _ = run(capsys, "check", "digits")
    assert rc == 0 and "ok" in out
    lib = tmp_path / "lib.mix"
    lib.write_text('import "blocks/wide.mix"\n')
    rc, out, _ = run(capsys, "check", str(lib))
    assert rc == 0 and "no ensemble section" in out


def test_inspect_json_and_set_overrides(capsys):
    rc, out, _ = run(
        capsys,
        "inspect",
        "wrn28_10.mix",
        "--json",
        "--set",
        "members=1",
        "--set",
        "budget=20M",
        "--set",
        "backbone.classes=10",
    )
    assert rc == 0
    data = json.loads(out)
    assert data["members"] == 1 and data["budget"] == 20_000_000
    assert data["backbone_params"] == 36_479_194
    assert data["total_params"] <= 20_000_000
    assert {"name", "layers", "templates", "templates_per_layer"} <= set(data["groups"][0])


def test_inspect_tables(capsys):
    rc, out, _ = run(capsys, "inspect", "wrn28_10")
    assert rc == 0
    for text in (
        "36,536,884",
        "conv_640x640x3x3",
        "s3.b0.conv1",
        "105 per member",
        "naive ensemble",
    ):
        assert text in out


@pytest.mark.parametrize(
    "override,message",
    [
        ("members=x", "'members' must be an integer"),
        ("budgt=3M", "did you mean 'budget'?"),
        ("members", "key=value"),
        ("backbone.depht=10", "has no parameter 'depht'"),
        ("assign=greedy", "unknown assignment policy 'greedy'"),
        ("train.optimizer.lr=-1", "bad value for 'optimizer.lr'"),
        ("budget=1K", "below the minimum"),
    ],
)
def test_bad_overrides_are_reported_with_their_origin(capsys, override, message):
    rc, out, err = run(capsys, "check", "wrn16_4", "--set", override)
    assert rc == 1
    assert message in err
    assert "Traceback" not in err


def test_compile_plan_round_trips(capsys, tmp_path):
    target = tmp_path / "plan.json"
    rc, out, _ = run(capsys, "compile", "digits", "--emit", "plan", "-o", str(target))
    assert rc == 0
    plan = Plan.from_json(target.read_text())
    assert plan.name == "digits" and plan.spec_hash == plan.content_hash()
    assert Plan.from_json(plan.to_json()) == plan


def test_missing_file_is_a_clear_error(capsys):
    rc, _, err = run(capsys, "check", "no/such/file.mix")
    assert rc == 1 and "no such spec file" in err
    rc, _, err = run(capsys, "inspect", "wrn28_1O")
    assert rc == 1 and "did you mean 'wrn28_10'" in err


def test_zoo_lists_specs(capsys):
    rc, out, _ = run(capsys, "zoo")
    assert rc == 0 and "wrn28_10" in out and "digits" in out
