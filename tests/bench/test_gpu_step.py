"""bench/gpu_step.py on the CPU at the tiniest size, both backends: every requested row is there
with a finite positive step time and memory, and its figures agree with the plan (TFLOP/s is 6 x
MACs x images / time, the naive ensemble costs M plain networks) and with each other (each ratio
is the quotient of its rows)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from framework_fixtures import fast_xla_compiles, one_torch_thread  # noqa: F401  (autouse)

import mixc
from mixc.compiler.methods import method_of
from mixc.core.flops import ensemble_macs

REPO = Path(__file__).resolve().parents[2]
TINY = ["--spec", "digits", "--batch", "2", "--steps", "2", "--warmup", "1", "--eval-batch", "4"]
TORCH_ROWS = [
    "single",
    "naive_loop",
    "naive_grouped",
    "mixture_loop",
    "mixture_grouped",
    "batch_ensemble_loop",
    "mimo",
    "packed",
    "trainer",
]
FLAX_ROWS = ["single", "naive_loop"]


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_step", REPO / "bench" / "gpu_step.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_step"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path, backend: str, rows: list[str], *more: str) -> dict:
    out = tmp_path / f"{backend}.json"
    argv = [*TINY, *more, "--device", "cpu", "--backend", backend, "--only", ",".join(rows)]
    assert _bench().main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def torch_result(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("gpu_step"), "torch", TORCH_ROWS)


@pytest.fixture(scope="module")
def flax_result(tmp_path_factory):
    # two members: jit compiles dominate, and they grow with the members
    return _run(tmp_path_factory.mktemp("gpu_step"), "flax", FLAX_ROWS, "--members", "2")


def _check_rows(res: dict, wanted: list[str]) -> None:
    meta, rows = res["meta"], res["rows"]
    assert set(rows) == set(wanted)
    for key, row in rows.items():
        for field in ("step_ms", "memory_gib"):
            assert math.isfinite(row[field]) and row[field] > 0, (key, field, row[field])
        assert row["step_ms_min"] <= row["step_ms"] <= row["step_ms_max"]
        plan = mixc.compile(meta["spec"], row["overrides"])
        macs = ensemble_macs(plan)
        images = meta["batch_per_member"] * (
            plan.method.batch_repetitions if method_of(plan).stacks_inputs else 1
        )
        assert (row["macs_per_image"], row["images"]) == (macs, images), key
        want = 6 * macs * images / (row["step_ms"] / 1000) / 1e12
        assert row["tflops"] == pytest.approx(want, rel=1e-9), key
        assert row["images_per_s"] == pytest.approx(images / (row["step_ms"] / 1000), rel=1e-9)
        assert row["tokens_per_s"] is None  # a convnet
    members = meta["members"]
    assert rows["naive_loop"]["macs_per_image"] == members * rows["single"]["macs_per_image"]


def _check_ratios(res: dict) -> None:
    rows, r, members = res["rows"], res["ratios"], res["meta"]["members"]
    ms = {k: v["step_ms"] for k, v in rows.items()}
    mixtures = [k for k in ("mixture_loop", "mixture_grouped") if k in ms]
    if mixtures:
        best = min(mixtures, key=ms.get)
        assert r["best_mixture"] == best
        assert r["mixture_best_over_members_x_single"] == pytest.approx(
            ms[best] / (members * ms["single"])
        )
        assert r["mixture_best_over_naive_loop"] == pytest.approx(ms[best] / ms["naive_loop"])
        assert r["mixture_grouped_over_loop"] == pytest.approx(
            ms["mixture_grouped"] / ms["mixture_loop"]
        )
        assert r["mixture_best_share_of_matmul"] == pytest.approx(
            rows[best]["tflops"] / res["meta"]["matmul_tflops"]
        )
    if "packed" in ms:
        assert r["packed_over_single"] == pytest.approx(ms["packed"] / ms["single"])
    if "batch_ensemble_loop" in ms:
        assert r["batch_ensemble_over_naive_loop"] == pytest.approx(
            ms["batch_ensemble_loop"] / ms["naive_loop"]
        )
        assert r["batch_ensemble_over_naive_loop_memory"] == pytest.approx(
            rows["batch_ensemble_loop"]["memory_gib"] / rows["naive_loop"]["memory_gib"]
        )
    if "naive_grouped" in ms:
        assert r["naive_grouped_over_loop"] == pytest.approx(ms["naive_grouped"] / ms["naive_loop"])


def test_torch_rows_and_figures(torch_result):
    _check_rows(torch_result, TORCH_ROWS)
    _check_ratios(torch_result)
    meta = torch_result["meta"]
    assert meta["precision"] == "fp32" and "saved" in meta["memory_measure"]
    trainer = torch_result["rows"]["trainer"]
    assert (
        trainer["layout"] == torch_result["rows"][torch_result["ratios"]["best_mixture"]]["layout"]
    )
    assert torch_result["ratios"]["trainer_over_bare"] == pytest.approx(
        trainer["step_ms"] / trainer["bare_step_ms"]
    )


def test_flax_rows_and_figures(flax_result):
    _check_rows(flax_result, FLAX_ROWS)
    _check_ratios(flax_result)
    assert "XLA" in flax_result["meta"]["memory_measure"]
    assert all(row["compile_s"] > 0 for row in flax_result["rows"].values())


def test_tokens_per_image_of_a_vit():
    """tokens/s counts each image's sequence with its class token (a convnet has none)."""
    bench = _bench()
    assert bench.sequence_length(mixc.compile("vit_digits")) == 16 + 1
    assert bench.sequence_length(mixc.compile("vit_ti16", ["members=1"])) == 196 + 1
    assert bench.sequence_length(mixc.compile("digits")) is None
