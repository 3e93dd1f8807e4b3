"""The zoo reproduces the reference backbones exactly and every spec compiles soundly."""

import json
import subprocess
import sys

import pytest

import mixc
from mixc.compiler.invariants import check_plan
from mixc.spec.loader import zoo_specs

PLAIN = ["members=1", "groups=none"]

# docs/allocation.md, "Reference numbers": plain backbones whose counts are known from the
# literature.
REFERENCE = [
    ("wrn28_10", ["backbone.classes=10"], 36_479_194),
    ("wrn28_10", [], 36_536_884),
    ("wrn28_5", [], 9_161_524),
    ("wrn16_4", [], 2_748_890),
    ("resnet18", [], 11_689_512),
    ("resnet50", [], 25_557_032),
]


@pytest.mark.parametrize("name,extra,expected", REFERENCE)
def test_plain_backbone_counts_are_exact(name, extra, expected):
    plan = mixc.compile(name, PLAIN + extra)
    assert plan.accounting.total_params == expected
    assert plan.accounting.backbone_params == expected


@pytest.mark.parametrize("path", zoo_specs(), ids=lambda p: p.stem)
def test_every_zoo_spec_compiles_and_keeps_the_invariants(path):
    plan = mixc.compile(path)
    assert check_plan(plan) == []
    assert plan.accounting.total_params <= plan.accounting.budget
    assert mixc.compile(path.stem).spec_hash == plan.spec_hash  # zoo names resolve to the same file


def test_paper_configurations():
    p = mixc.compile("wrn28_10")
    assert p.members == 4 and p.accounting.budget == 36_500_000
    # the paper's "105 linear combination weights"
    assert p.accounting.alpha_params // p.members == 105
    assert len(p.groups) == 3 and all(len(g.layers) == 7 for g in p.groups)
    big = mixc.compile("wrn28_10_120m")
    assert big.accounting.budget == 120_000_000 and big.accounting.total_params > 119_000_000
    thin = mixc.compile("wrn28_5")
    assert thin.bank_singletons and not thin.plain_layers  # every layer banked
    r50 = mixc.compile("resnet50")
    assert r50.assign == "greedy_disjoint" and r50.accounting.budget == 25_600_000
    assert mixc.compile("resnet50_51m").accounting.budget == 51_200_000
    seven = mixc.compile("wrn28_10_7m")
    assert (
        seven.grouping == "single"
        and seven.blob is not None
        and seven.accounting.total_params == 7_000_000
    )
    assert mixc.compile("wrn28_10_15m").accounting.budget == 15_000_000


def test_digits_is_small():
    p = mixc.compile("digits")
    assert p.input_shape == [1, 8, 8] and p.classes == 10
    assert p.accounting.total_params < 250_000


def test_inspect_does_not_import_frameworks():
    code = (
        "import sys; from mixc.cli import main; rc = main(['inspect', 'wrn28_10.mix',"
        " '--json']);assert 'torch' not in sys.modules and 'jax' not in sys.modules, 'framework"
        " imported'; sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    for key in ("backbone_params", "total_params", "budget", "members", "groups"):
        assert key in data
    assert data["total_params"] <= data["budget"]


METHODS = ["mixture", "naive", "batch_ensemble", "mimo", "packed(alpha = 2, gamma = 2)"]


@pytest.mark.parametrize("path", zoo_specs(), ids=lambda p: p.stem)
def test_generated_source_fits_in_100_columns(path):
    """Every line of every zoo spec's source, under every method, both backends, is at most 100
    characters; a standalone file is too, but for the lines it copies from the backend's runtime.py.
    """
    from mixc.backends.emit import runtime_source
    from mixc.backends.flax.codegen import FlaxEmitter
    from mixc.backends.flax.codegen import emit_source as flax_source
    from mixc.backends.torch.codegen import TorchEmitter
    from mixc.backends.torch.codegen import emit_source as torch_source

    for method in METHODS:
        plan = mixc.compile(path, [] if method == "mixture" else [f"method={method}"])
        for emit, emitter in ((torch_source, TorchEmitter), (flax_source, FlaxEmitter)):
            copied = {line for part in runtime_source(emitter.RUNTIME) for line in part}
            for standalone in (False, True):
                long = [
                    line
                    for line in emit(plan, standalone=standalone).splitlines()
                    if len(line) > 100 and not (standalone and line in copied)
                ]
                assert not long, f"{emitter.BACKEND} {method} standalone={standalone}: {long[0]!r}"
