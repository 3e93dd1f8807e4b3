"""`mixc verify`: passes on the zoo, catches a deliberately broken allocator with a shrunk
counterexample."""

import json

import pytest

# where mixture calls the allocator and the assigner
import mixc.compiler.methods.mixture as mixture_module
from mixc.cli import main
from mixc.compiler.allocate import Allocation, allocate_banks
from mixc.compiler.assign import assign_bank
from mixc.spec.loader import zoo_specs
from mixc.verify import Space, verify


@pytest.mark.parametrize("name", [p.stem for p in zoo_specs()])
def test_zoo_specs_verify(name):
    report = verify(name, Space(), examples=12, seed_value=1)
    assert report.failure is None, report.failure
    assert report.examples == 12
    assert report.feasible + report.infeasible == 12


def test_over_budget_allocator_is_caught(monkeypatch):
    def greedy(groups, fixed_cost, members, tpl, budget, policy="shared"):
        a = allocate_banks(groups, fixed_cost, members, tpl, budget, policy=policy)
        n = list(a.templates)
        n[0] += 1  # one template more than fits
        return Allocation(n, a.shares, [min(tpl, x) for x in n], a.minimum_budget)

    monkeypatch.setattr(mixture_module, "allocate_banks", greedy)
    report = verify("digits", Space(groups=("by_shape",)), examples=40, seed_value=0)
    assert report.failure is not None
    assert report.failure["invariant"] == "within_budget"
    assert report.failure["command"].startswith("mixc inspect digits --set budget=")


def test_skipped_template_is_caught_and_shrunk(monkeypatch):
    def skipping(n_layers, n, k, members, policy):
        # never hands out the last template of a bank
        return (
            assign_bank(n_layers, max(1, n - 1), min(k, max(1, n - 1)), members, policy)[0],
            [0] * n,
        )

    def patched(n_layers, n, k, members, policy):
        table, _ = skipping(n_layers, n, k, members, policy)
        usage = [0] * n
        for layer in table:
            for m, idx in enumerate(layer):
                if policy == "shared" and m > 0:
                    continue
                for t in idx:
                    usage[t] += 1
        return table, usage

    monkeypatch.setattr(mixture_module, "assign_bank", patched)
    report = verify("digits", Space(groups=("by_shape",)), examples=60, seed_value=0)
    assert report.failure is not None
    assert report.failure["invariant"] in ("full_coverage", "distinct_templates", "balanced_usage")
    # shrinking drives the search dimensions towards their simplest values
    overrides = dict(o.split("=") for o in report.failure["overrides"])
    assert int(overrides["members"]) <= 2


def test_cli_json_and_exit_codes(capsys):
    rc = main(["verify", "wrn16_4", "--examples", "10", "--json", "--members", "1..4"])
    out = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out)
    assert data["ok"] and data["examples"] == 10
    assert set(data["dimensions"]["members"]) <= {"1", "2", "3", "4"}
    rc = main(["verify", "wrn16_4", "--budgets", "4x..1x"])
    assert rc != 0


def test_torch_param_count_is_checked():
    pytest.importorskip("torch")
    report = verify(
        "digits",
        Space(budgets=((1.0, True), (3.0, True))),
        examples=8,
        seed_value=0,
        backends=["torch"],
        build_every=2,
    )
    assert report.failure is None and report.built >= 2
