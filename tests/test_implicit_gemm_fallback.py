"""A precision whose kernels do not compile (a CUDA header NVRTC cannot find on the GPU machine,
as scripts/kernel_report.py --nvrtc shows for CuPy's pip headers without crt/mma.h):

1. kernels/implicit_gemm.py raises KernelsUnavailable (a RuntimeError) with a one-line reason,
   compiles that precision once only, and leaves the other precisions' modules alone;
2. the conv plan's implicit-GEMM route falls back to its im2col plan with one warning per
   precision, and gives the im2col plan's result.
"""
import types
import warnings

import numpy as np
import pytest

import kernels.implicit_gemm as ig
from minidl.ops import conv as conv_ops, conv_implicit_gemm, conv_plan
from minidl.ops.conv_implicit_gemm import ImplicitGemmPlan
from minidl.ops.geometry import conv2d_geometry

MISSING = 'kernel.cu(205): catastrophic error: cannot open source file "crt/mma.h"'


class _CompileException(Exception):
    pass


@pytest.fixture
def nvrtc_without_mma(monkeypatch):
    """A stand-in CuPy whose NVRTC fails on sources that include mma.h; records compiles."""
    compiled = []

    class RawModule:
        def __init__(self, code):
            self.code = code
            compiled.append(code)

        def get_function(self, name):
            if "#include <mma.h>" in self.code:
                raise _CompileException(f"{MISSING}\n\n1 catastrophic error detected")
            return lambda grid, block, args: None

    fake = types.SimpleNamespace(RawModule=RawModule, cuda=types.SimpleNamespace(
        compiler=types.SimpleNamespace(CompileException=_CompileException)))
    monkeypatch.setattr(ig, "_cupy", lambda: fake)
    monkeypatch.setattr(ig, "_xp", lambda: np)
    monkeypatch.setattr(ig, "_modules", {})
    monkeypatch.setattr(ig, "_unavailable", {})
    monkeypatch.setattr(conv_implicit_gemm, "_warned", set())
    return compiled


def _conv():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 5, 4)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    return conv2d_geometry(x.shape, w.shape, 1, 1, 1, 1), x, w


def test_a_precision_that_does_not_compile_says_why_in_one_line(nvrtc_without_mma):
    _, x, w = _conv()
    with pytest.raises(ig.KernelsUnavailable, match=r"'tf32' kernels did not compile .*crt/mma\.h") as info:
        ig.conv2d_forward(x, w, 1, 1, 1, 1, 1, 1, 5, 4, 1, "tf32")
    assert isinstance(info.value, RuntimeError) and info.value.reason == MISSING
    # not compiled again: the failure is remembered
    with pytest.raises(ig.KernelsUnavailable):
        ig.conv2d_input_grad(np.zeros((1, 3, 5, 4), np.float32), w, 5, 4, 1, 1, 1, 1, 1, 1, 1, "tf32")
    assert len(nvrtc_without_mma) == 1
    # "highest" includes no header: its own module compiles and runs
    ig.conv2d_forward(x, w, 1, 1, 1, 1, 1, 1, 5, 4, 1, "highest")
    assert len(nvrtc_without_mma) == 2 and "#include" not in nvrtc_without_mma[1]


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_the_conv_plan_falls_back_to_im2col_with_one_warning(precision, nvrtc_without_mma):
    geom, x, w = _conv()
    route = ImplicitGemmPlan(geom, precision, conv_plan.ConvPlan(geom, x.shape, w.shape[0], "cpu"))
    exact = conv_ops.Im2col(geom)
    with pytest.warns(RuntimeWarning, match=rf"implicit-GEMM '{precision}' kernels unavailable "
                                            r"\(.*crt/mma\.h.*\); using the im2col route"):
        y = route.forward(x, w)
    np.testing.assert_allclose(y, exact.forward(x.astype(np.float64), w.astype(np.float64)),
                               rtol=1e-5, atol=1e-5)
    gy = np.ones_like(y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")         # said once: the backward pass warns no more
        gx, gw = route.backward(gy, w, x, None, x.shape, w.shape, True, True)
    want_gx, want_gw = exact.backward(gy.astype(np.float64), w.astype(np.float64),
                                      x.astype(np.float64), None, x.shape, w.shape, True, True)
    np.testing.assert_allclose(gx, want_gx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, want_gw, rtol=1e-5, atol=1e-4)
