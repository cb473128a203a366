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


@given(g=geometry(), dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 99))
def test_col2im_rows_matches_reference_and_is_the_adjoint(device, xp, g, dtype, seed):
    rng = np.random.default_rng(seed)
    n, c, h, w = g["n"], g["c"], g["h"], g["w"]
    kh, kw, ho, wo = g["args"][0], g["args"][1], g["args"][-2], g["args"][-1]
    cols = rng.standard_normal((c * kh * kw, n * ho * wo)).astype(dtype)
    x = kernels.for_array(xp.zeros(1)).col2im_rows(xp.asarray(cols), n, c, h, w, *g["args"])
    expected = ref.col2im_rows(cols, n, c, h, w, *g["args"])
    assert x.shape == expected.shape == (n, c, h, w)
    assert_close(x, expected, **(dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else {}))
    # <im2col_rows(v), cols> == <v, col2im_rows(cols)> for any v (float64 reference).
    v = rng.standard_normal((n, c, h, w))
    lhs = (ref.im2col_rows(v, *g["args"]) * cols).sum()
    assert np.isclose(lhs, (v * ref.col2im_rows(cols.astype(np.float64), n, c, h, w,
                                                *g["args"])).sum())


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("n", [1, 3])
def test_folded_backward_gives_both_gradients_of_the_direct_conv(device, n, relu, monkeypatch):
    """The GPU's folded backward (ConvPlan._backward_folded: gy channel-major, one GEMM per
    gradient, col2im_rows) against the direct conv's adjoint, with and without the ReLU
    kernel writing gy channel-major; the CPU and a single sample take the other routes."""
    rng = np.random.default_rng(n + 5 * relu)
    x = rng.standard_normal((n, 3, 6, 5))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    z = direct_conv2d(x, w, b, (1, 1), (1, 1), (1, 1), 1)
    gy = rng.standard_normal(z.shape)
    gz = gy * (z > 0) if relu else gy
    # Adjoints of the linear map (x, w) -> conv(x, w): one unit input at a time.
    exp_w = np.array([(gz * direct_conv2d(x, u, None, (1, 1), (1, 1), (1, 1), 1)).sum()
                      for u in np.eye(w.size).reshape((-1,) + w.shape)]).reshape(w.shape)
    exp_x = np.array([(gz * direct_conv2d(u, w, None, (1, 1), (1, 1), (1, 1), 1)).sum()
                      for u in np.eye(x.size).reshape((-1,) + x.shape)]).reshape(x.shape)
    folded = []
    original = conv_plan.ConvPlan._backward_folded
    monkeypatch.setattr(conv_plan.ConvPlan, "_backward_folded",
                        lambda self, *a: folded.append(a[-1]) or original(self, *a))
    xt = minidl.tensor(x, requires_grad=True, device=device)
    wt = minidl.tensor(w, requires_grad=True, device=device)
    bt = minidl.tensor(b, requires_grad=True, device=device)
    op = F.conv2d_relu if relu else F.conv2d
    op(xt, wt, bt, 1, 1).backward(minidl.tensor(gy, device=device))
    assert_close(xt.grad, exp_x, rtol=1e-10, atol=1e-10)
    assert_close(wt.grad, exp_w, rtol=1e-10, atol=1e-10)
    assert_close(bt.grad, gz.sum(axis=(0, 2, 3)), rtol=1e-10, atol=1e-10)
    # Folded on the GPU for a batch; channel-major from the ReLU kernel when it is there.
    assert folded == ([relu] if device == "gpu" and n > 1 else [])


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
