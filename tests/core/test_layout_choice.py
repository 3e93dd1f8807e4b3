"""The layout a run trains in: what auto leaves to choose, and the fastest candidate kept."""

import pytest
from pydantic import ValidationError

from mixc.core.layout_choice import LayoutChoice, candidates, choose_layout, label


def test_auto_on_the_cpu_is_the_runtime_rule_without_timing():
    def never(_):
        raise AssertionError("nothing to time on the CPU")

    choice = choose_layout("auto", "cpu", True, never)
    assert (choice.layout, choice.channels_last, choice.how) == ("auto", False, "rule")
    assert choice.step_ms == {}


def test_a_forced_layout_on_the_cpu_is_forced():
    choice = choose_layout("grouped", "cpu", True, lambda _: [1.0])
    assert (choice.layout, choice.how) == ("grouped", "forced")


@pytest.mark.parametrize(
    "requested, image, expected",
    [
        ("auto", True, ["loop", "loop+channels_last", "grouped", "grouped+channels_last"]),
        ("auto", False, ["loop", "grouped"]),
        ("grouped", True, ["grouped", "grouped+channels_last"]),
        ("loop", False, ["loop"]),
    ],
)
def test_candidates_on_an_accelerator(requested, image, expected):
    assert [label(c) for c in candidates(requested, "cuda", image)] == expected


def test_the_fastest_median_is_kept_and_every_timing_recorded():
    times = {
        ("loop", False): [0.060, 0.061, 0.500],  # one slow outlier: the median ignores it
        ("loop", True): [0.058, 0.059, 0.057],
        ("grouped", False): [0.075, 0.074, 0.076],
        ("grouped", True): [0.070, 0.071, 0.069],
    }
    asked = []
    choice = choose_layout("auto", "cuda", True, lambda c: asked.append(c) or times[c])
    assert sorted(asked) == sorted(times)
    assert (choice.layout, choice.channels_last, choice.how) == ("loop", True, "measured")
    assert choice.step_ms == {
        "loop": 61.0,
        "loop+channels_last": 58.0,
        "grouped": 75.0,
        "grouped+channels_last": 70.0,
    }
    assert "measured a step" in choice.describe() and "loop+channels_last 58.0 ms" in (
        choice.describe()
    )


def test_a_recorded_choice_is_validated():
    with pytest.raises(ValidationError):
        LayoutChoice.model_validate({"layout": "diagonal", "how": "rule"})
    with pytest.raises(ValidationError):
        LayoutChoice.model_validate({"layout": "loop", "how": "rule", "code": "import os"})
