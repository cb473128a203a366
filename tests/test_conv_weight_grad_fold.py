"""The GPU's weight gradient with the batch folded into one GEMM (conv_plan.WeightGrad's
_add_folded, on kernels' im2col_rows): the kernel against its NumPy reference, and the
conv's gradients against the direct-loop conv's on every device."""
import importlib

import numpy as np
import pytest
from hypothesis import given, strategies as st

import kernels
import minidl
from minidl import functional as F
from minidl.ops import conv_plan

from conftest import assert_close, to_numpy
from test_conv import direct_conv2d
from test_kernels import geometry

ref = importlib.import_module("kernels.reference")


@given(g=geometry(), dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 99))
def test_im2col_rows_matches_reference(device, xp, g, dtype, seed):
    x = np.random.default_rng(seed).standard_normal((g["n"], g["c"], g["h"], g["w"])).astype(dtype)
    cols = kernels.for_array(xp.zeros(1)).im2col_rows(xp.asarray(x), *g["args"])
    expected = ref.im2col_rows(x, *g["args"])
    assert cols.shape == expected.shape
    np.testing.assert_array_equal(to_numpy(cols), expected)
    # The same columns as im2col, samples side by side.
    n, k = g["n"], expected.shape[0]
    per_sample = ref.im2col(x, *g["args"])                          # (N, K, L)
    np.testing.assert_array_equal(expected.reshape(k, n, -1), per_sample.transpose(1, 0, 2))


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_weight_gradient_over_the_batch(device, n, stride, padding, dilation, monkeypatch):
    """d<gy, conv2d(x, w)>/dw = sum over samples and pixels, checked against the direct conv
    (the gradient of a linear map is its adjoint: <gy, conv(x, dw)> for each unit dw)."""
    rng = np.random.default_rng(n + 10 * stride + padding)
    x = rng.standard_normal((n, 3, 7, 6))
    w = rng.standard_normal((4, 3, 3, 3))
    args = ((stride,) * 2, (padding,) * 2, (dilation,) * 2, 1)
    y = direct_conv2d(x, w, None, *args)
    gy = rng.standard_normal(y.shape)
    expected = np.zeros_like(w)
    for idx in np.ndindex(*w.shape):        # column idx of the Jacobian, one unit weight at a time
        unit = np.zeros_like(w)
        unit[idx] = 1
        expected[idx] = (gy * direct_conv2d(x, unit, None, *args)).sum()
    folded = []
    original = conv_plan.WeightGrad._add_folded
    monkeypatch.setattr(conv_plan.WeightGrad, "_add_folded",
                        lambda self, *a: folded.append(a) or original(self, *a))
    wt = minidl.tensor(w, requires_grad=True, device=device)
    out = F.conv2d(minidl.tensor(x, device=device), wt, None, stride, padding, dilation)
    out.backward(minidl.tensor(gy, device=device))
    assert_close(wt.grad, expected, rtol=1e-10, atol=1e-10)
    # The GPU folds a batch of several samples into one GEMM; the CPU never does.
    assert bool(folded) == (device == "gpu" and n > 1)
