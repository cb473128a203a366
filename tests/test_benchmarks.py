"""The benchmark scripts still run (on tiny settings) and report what their docstrings promise.

No timing is asserted here: speed is measured by running the scripts, not by tests.
"""
import os
import sys
import time

import numpy as np
import pytest

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


# ---------------------------------------------------------------- --compare-torch helpers
import torch_compare  # noqa: E402  (examples/, on the path through benchmark_gpu)


def test_torch_unet_has_minidl_unets_layers():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (never a dependency)")
    import seg.models
    mine = seg.models.build("unet", 2, 1, depth=3, features_root=4, padding="same")
    theirs = torch_compare.build_torch_unet(torch, depth=3, features_root=4)
    assert torch_compare.layer_list(theirs) == torch_compare.layer_list(mine)
    assert torch_compare.parameter_count(theirs) == torch_compare.parameter_count(mine)
    assert tuple(theirs(torch.zeros(1, 1, 16, 16)).shape) == (1, 2, 16, 16)


def test_layer_list_of_minidl_unet():
    import seg.models
    layers = torch_compare.layer_list(seg.models.build("unet", 2, 1, depth=2, features_root=4,
                                                       padding="same"))
    assert layers == [("Conv2d", (4, 1, 3, 3)), ("Conv2d", (4, 4, 3, 3)), ("Conv2d", (8, 4, 3, 3)),
                      ("Conv2d", (8, 8, 3, 3)), ("ConvTranspose2d", (8, 4, 2, 2)),
                      ("Conv2d", (4, 8, 3, 3)), ("Conv2d", (4, 4, 3, 3)), ("Conv2d", (2, 4, 1, 1))]
    # weights plus one bias per output channel (a transposed conv's are weight.shape[1])
    expected = sum(int(np.prod(shape)) + shape[0 if kind == "Conv2d" else 1] for kind, shape in layers)
    model = seg.models.build("unet", 2, 1, depth=2, features_root=4, padding="same")
    assert torch_compare.parameter_count(model) == expected


def test_breakdown_counts_outermost_calls_and_restores():
    class Work:
        def outer(self):
            time.sleep(0.02)
            self.inner()

        def inner(self):
            time.sleep(0.01)

    w = Work()
    bd = torch_compare.Breakdown(benchmark_gpu.Clock("cpu"))
    bd.wrap(Work, "outer", "a")
    bd.wrap(Work, "inner", "b")
    out = bd.measure(lambda: (w.outer(), w.inner()), ("a", "b"))
    bd.restore()
    assert out["a"] >= 0.03 and 0.01 <= out["b"] < 0.02        # inner inside outer not counted
    assert abs(out["step"] - out["a"] - out["b"] - out["other + idle"]) < 1e-9
    assert Work.outer.__name__ == "outer" and Work.inner.__name__ == "inner"


def test_torch_mode_is_checked():
    with pytest.raises(ValueError, match="mode must be one of"):
        torch_compare.torch_step_time(None, 2, 4, 1, 16, "fp8")


def test_implicit_gemm_step_reruns_every_recorded_layer(monkeypatch):
    """The benchmark's implicit-GEMM call per recorded layer (conv and transposed conv, 'same'
    padding) gives minidl's forward output: through the host emulation of the kernels."""
    import gpu_emulation_blocks
    import kernels.implicit_gemm as ig
    module = gpu_emulation_blocks.BlockModule(ig.cuda_source(("highest",), includes=False))
    monkeypatch.setattr(ig, "_xp", lambda: np)
    monkeypatch.setattr(ig, "_run_kernel", lambda name, grid, args: module.launch(name, grid, ig.THREADS, args))
    options, _, _ = benchmark.MODELS["default"]
    model = benchmark.build_model(dict(options, depth=2))
    layers = benchmark.record_layers(model, minidl.tensor(np.zeros((1, 1, 8, 8), np.float32)))
    assert {layer["kind"] for layer in layers} == {"conv", "convT"}
    rng = np.random.default_rng(0)
    for layer in layers:
        x, w = (rng.standard_normal(layer[k]).astype(np.float32) for k in ("x", "w"))
        op, params, out_shape = benchmark_gpu.layer_op(layer)
        gy = rng.standard_normal(out_shape).astype(np.float32)
        y = benchmark_gpu.implicit_gemm_step(layer, x, w, gy, "highest")
        with minidl.no_grad():
            ref = op.apply(minidl.tensor(x), minidl.tensor(w), **params).numpy()
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- the settings of a step
TINY = ["--depth", "2", "--features", "4", "--size", "16", "--batch", "1", "--warmup", "1",
        "--iters", "1", "--layer-iters", "1", "--matmul-size", "32"]


@pytest.mark.parametrize("amp_dtype, matmul, algorithm",
                         [("bf16", "high", "auto"), ("fp16", "highest", "implicit_gemm")])
def test_gpu_benchmark_runs_in_the_settings_asked_for(device, amp_dtype, matmul, algorithm):
    """--amp, --matmul-precision, --conv-algorithm: the step runs in them (on the GPU the
    implicit-GEMM kernels take the convs: the breakdown sees them), and they are restored."""
    result = benchmark_gpu.main(["--device", device, "--amp", amp_dtype, "--matmul-precision",
                                 matmul, "--conv-algorithm", algorithm, "--skip-layers"] + TINY)
    assert (result["amp"], result["matmul_precision"], result["conv_algorithm"]) == \
        (amp_dtype, matmul, algorithm)
    assert np.isfinite(result["final_loss"]) and result["images_per_s"] > 0
    implicit_ms = result["breakdown_ms"]["implicit GEMM"]
    assert implicit_ms > 0 if device == "gpu" else implicit_ms == 0
    assert minidl.get_float32_matmul_precision() == "highest"
    assert minidl.backends.conv_algorithm == "auto"


def test_minidl_modes_of_the_torch_comparison_each_give_a_time(device):
    import seg.models
    clock = benchmark_gpu.Clock(device)
    model = seg.models.build("unet", 2, 1, depth=2, features_root=4, padding="same").to(device)
    x = minidl.randn(1, 1, 16, 16, device=device)
    target = minidl.randint(0, 2, (1, 16, 16), device=device)
    step = benchmark_gpu.make_step(model, minidl.optim.Adam(model.parameters()), x, target)
    times = benchmark_gpu.minidl_mode_times(clock, step, iters=1)
    labels = [row[0] for rows in benchmark_gpu.MINIDL_MODES.values() for row in rows]
    assert list(times) == labels and all(t > 0 for t in times.values())
    assert minidl.get_float32_matmul_precision() == "highest"
    assert minidl.backends.conv_algorithm == "auto"


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_compare_torch_puts_minidl_next_to_every_torch_mode(device, cuda_graph, monkeypatch, capsys):
    """--compare-torch's table with a stand-in for PyTorch (its step time fixed): every mode
    gets PyTorch's time and minidl's in each matching setting, with the ratio printed; with
    cuda_graph, each setting also as a CUDA-graph replay (captured on the CuPy emulation too)."""
    import argparse
    import types
    import seg.models
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(
        __version__="stand-in", cuda=types.SimpleNamespace(is_available=lambda: True)))
    monkeypatch.setattr(torch_compare, "torch_step_time", lambda torch, *a, iters=5: 0.01)
    model = seg.models.build("unet", 2, 1, depth=2, features_root=4, padding="same").to(device)
    step = benchmark_gpu.make_step(model, minidl.optim.Adam(model.parameters()),
                                   minidl.randn(1, 1, 16, 16, device=device),
                                   minidl.randint(0, 2, (1, 16, 16), device=device))
    args = argparse.Namespace(depth=2, features=4, batch=1, size=16, iters=1,
                              cuda_graph=cuda_graph)
    out = benchmark_gpu.compare_torch(benchmark_gpu.Clock(device), args, step)
    printed = capsys.readouterr().out
    if device == "cpu":                   # PyTorch's side needs CUDA: nothing compared
        assert out is None and "needs a GPU" in printed
        return
    assert list(out) == list(torch_compare.TORCH_MODES)
    per_mode = 2 if cuda_graph else 1
    for mode, rows in benchmark_gpu.MINIDL_MODES.items():
        assert out[mode]["torch"] == 0.01
        assert len(out[mode]) == 1 + per_mode * len(rows)
        for label, *_ in rows:
            for shown in [label, label + ", graph"][:per_mode]:
                assert out[mode][shown] > 0 and f"minidl ({shown:20s})" in printed
    assert printed.count("minidl/PyTorch") == per_mode * sum(
        map(len, benchmark_gpu.MINIDL_MODES.values()))


def test_gpu_benchmark_times_the_step_as_a_cuda_graph(device, capsys):
    """--cuda-graph: on a GPU (or the CuPy emulation) the step is captured and timed as a
    replay; on the CPU there is nothing to capture, and the reason is printed."""
    result = benchmark_gpu.main(["--device", device, "--depth", "2", "--features", "4",
                                 "--size", "16", "--batch", "1", "--warmup", "1", "--iters", "1",
                                 "--skip-layers", "--matmul-size", "32", "--cuda-graph"])
    printed = capsys.readouterr().out
    if device == "cpu":
        assert result["graph_step_s"] is None and "CUDA graph: not captured" in printed
    else:
        assert result["graph_step_s"] > 0 and "step as a CUDA-graph replay" in printed
