"""The benchmark scripts still run (on tiny settings) and report what their docstrings promise.

No timing is asserted here: speed is measured by running the scripts, not by tests.
"""
import os
import sys

import numpy as np

import minidl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))
import benchmark  # noqa: E402
import benchmark_gpu  # noqa: E402


def test_best_times_reports_seconds_per_call():
    calls = []
    (t,) = benchmark.best_times([lambda: calls.append(1)], repeat=2, min_seconds=0.001)
    assert t > 0 and len(calls) >= 3     # warm-up + at least one call per repeat


def test_best_times_takes_more_rounds_for_a_time_budget_up_to_a_cap():
    calls = []
    benchmark.best_times([lambda: calls.append(1)], repeat=2, min_seconds=0.0)
    assert len(calls) == 1 + 2            # warm-up + one call per round
    calls.clear()
    benchmark.best_times([lambda: calls.append(1)], repeat=2, min_seconds=0.0,
                         min_total_seconds=60.0, max_repeat=7)
    assert len(calls) == 1 + 7            # the budget is not spent: the cap ends it


def test_op_overhead_table_has_every_op():
    out = benchmark.op_overhead(repeat=1)
    assert set(out) == {"add", "mul", "relu", "sum", "matmul"}
    assert all(v["forward_us"] > 0 and v["forward_backward_us"] > 0 for v in out.values())
    assert out["sum"]["chained_us"] is None and out["add"]["chained_us"] is not None


def test_layer_flops_and_gemm_shapes_of_a_recorded_unet():
    options, _, loss = benchmark.MODELS["default"]
    model = benchmark.build_model(dict(options, depth=2))
    x = np.zeros((1, 1, 16, 24), np.float32)
    layers = benchmark.record_layers(model, minidl.tensor(x))
    first = layers[0]                     # 1 -> 8 channels, 3x3, "same"
    assert benchmark_gpu.conv_macs(first) == 1 * 8 * 16 * 24 * 1 * 9
    assert benchmark_gpu.gemm_shapes(first) == (1, 8, 9, 16 * 24)
    benchmark.step_gemms(layers, np.random.default_rng(0))()   # runs every product once


def test_gpu_benchmark_runs_on_the_cpu_path(tmp_path):
    out = tmp_path / "b.json"
    result = benchmark_gpu.main(["--device", "cpu", "--depth", "2", "--features", "4",
                                 "--size", "32", "--batch", "2", "--warmup", "1", "--iters", "1",
                                 "--layer-iters", "1", "--matmul-size", "64", "--json", str(out)])
    assert out.exists()
    assert result["images_per_s"] > 0 and result["conv_layers"] == 8
    assert 0 < result["conv_to_matmul_ratio"]
    assert sum(r["count"] for r in result["layers"]) == result["conv_layers"]
