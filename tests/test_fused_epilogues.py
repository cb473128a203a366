"""The fused epilogues: softmax cross-entropy and a conv's bias + ReLU, one kernel each on the GPU.

Each bundle (kernels.for_array of an array on the device) against the NumPy reference in
kernels/reference.py, and the ops built on them (F.cross_entropy, F.conv2d_relu) against
plain NumPy and finite differences in float64, on every device present.
"""
import importlib

import numpy as np
import pytest
from hypothesis import given, strategies as st

import kernels
import minidl
from minidl import functional as F, nn

from conftest import assert_close, to_numpy
from test_conv import direct_conv2d
from test_losses import make_case, np_cross_entropy

ref = importlib.import_module("kernels.reference")


def bundle(xp):
    return kernels.for_array(xp.zeros(1))


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------- kernels vs reference
@given(n=st.integers(1, 3), c=st.integers(1, 5), s=st.integers(1, 6), weighted=st.booleans(),
       per_pixel=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 999))
def test_cross_entropy_kernels_match_reference(device, xp, n, c, s, weighted, per_pixel, dtype,
                                               seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, c, s)) * 5).astype(dtype)
    target = rng.integers(0, c, (n, s))
    weight = rng.uniform(0, 2, (n, s)).astype(dtype) if weighted else None
    K = bundle(xp)
    on = (lambda a: None if a is None else xp.asarray(a))
    loss, probs = K.cross_entropy_forward(xp.asarray(x), xp.asarray(target), on(weight))
    ref_loss, ref_probs = ref.cross_entropy_forward(x, target, weight)
    assert_close(loss, ref_loss, **tol(dtype))
    assert_close(probs, ref_probs, **tol(dtype))
    coef = (rng.standard_normal((n, s)) if per_pixel else np.asarray(rng.standard_normal()))
    coef = coef.astype(dtype)
    gx = K.cross_entropy_backward(probs, xp.asarray(target), xp.asarray(coef), on(weight))
    assert_close(gx, ref.cross_entropy_backward(ref_probs, target, coef, weight), **tol(dtype))


def test_cross_entropy_kernel_keeps_huge_logits_finite(device, xp):
    x = np.array([[[1e4, -1e4], [0.0, 1e4]]], dtype=np.float32)       # (1, 2, 2)
    target = np.array([[0, 1]])
    loss, probs = bundle(xp).cross_entropy_forward(xp.asarray(x), xp.asarray(target), None)
    assert np.isfinite(to_numpy(loss)).all() and np.isfinite(to_numpy(probs)).all()
    assert_close(loss, ref.cross_entropy_forward(x, target, None)[0])


@given(n=st.integers(1, 3), c=st.integers(1, 4), s=st.integers(1, 7), has_bias=st.booleans(),
       bias_grad=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 999))
def test_bias_relu_kernels_match_reference(device, xp, n, c, s, has_bias, bias_grad, dtype, seed):
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((n, c, s)).astype(dtype)
    bias = rng.standard_normal(c).astype(dtype) if has_bias else None
    K = bundle(xp)
    out = K.bias_relu(xp.array(y), None if bias is None else xp.asarray(bias))   # in place
    expected = ref.bias_relu(y, bias)
    assert_close(out, expected, **tol(dtype))
    gy = rng.standard_normal((n, c, s)).astype(dtype)
    gx, gb = K.relu_bias_backward(xp.asarray(gy), out, bias_grad)
    ref_gx, ref_gb = ref.relu_bias_backward(gy, expected, bias_grad)
    assert_close(gx, ref_gx, **tol(dtype))
    assert (gb is None) == (not bias_grad)
    if bias_grad:
        assert_close(gb, ref_gb, **tol(dtype))
    # Channel-major (the layout the GPU's folded conv backward multiplies with): (C, N, S).
    gx_cm, gb_cm = K.relu_bias_backward(xp.asarray(gy), out, bias_grad, channel_major=True)
    ref_cm, _ = ref.relu_bias_backward(gy, expected, bias_grad, channel_major=True)
    assert gx_cm.shape == (c, n, s) and ref_cm.shape == (c, n, s)
    assert_close(gx_cm, ref_cm, **tol(dtype))
    np.testing.assert_array_equal(to_numpy(gx_cm), to_numpy(gx).transpose(1, 0, 2))
    if bias_grad:
        assert_close(gb_cm, ref_gb, **tol(dtype))


def test_bias_relu_keeps_nan(device, xp):
    y = xp.asarray(np.array([[[np.nan, -1.0, 2.0]]], dtype=np.float32))
    out = to_numpy(bundle(xp).bias_relu(y, None))
    assert np.isnan(out[0, 0, 0]) and out[0, 0, 1] == 0 and out[0, 0, 2] == 2


# ---------------------------------------------------------------------- the ops
@given(seed=st.integers(0, 2 ** 31), n=st.integers(1, 2), c=st.integers(2, 4),
       spatial=st.sampled_from([(), (3,), (2, 3)]), reduction=st.sampled_from(["mean", "sum", "none"]),
       use_weight=st.booleans(), use_pixel=st.booleans(), ignored=st.sampled_from([0.0, 0.3]))
def test_cross_entropy_on_every_device(device, seed, n, c, spatial, reduction, use_weight,
                                       use_pixel, ignored):
    x, target = make_case(seed, n, c, spatial, ignore_fraction=ignored)
    rng = np.random.default_rng(seed + 1)
    weight = rng.uniform(0.2, 2.0, size=c) if use_weight else None
    pixel = rng.uniform(0.5, 3.0, size=target.shape) if use_pixel else None
    on = (lambda a: None if a is None else minidl.tensor(a, device=device))
    kwargs = dict(weight=on(weight), reduction=reduction, pixel_weight=on(pixel))
    t = minidl.tensor(target, device=device)
    out = F.cross_entropy(minidl.tensor(x, device=device), t, **kwargs)
    expected = np_cross_entropy(x, target, weight=weight, reduction=reduction, pixel_weight=pixel)
    assert_close(out.data, expected, rtol=1e-10, atol=1e-12)
    xt = minidl.tensor(x, requires_grad=True, device=device)
    assert minidl.gradcheck(lambda z: F.cross_entropy(z, t, **kwargs) * 1.0, [xt], mode="random",
                            n_directions=4)


CONVS = [  # (x shape, weight shape, stride, padding, dilation, groups, bias)
    ((2, 3, 5, 5), (4, 3, 3, 3), 1, 1, 1, 1, True),
    ((1, 4, 6, 5), (4, 2, 3, 2), 2, 0, 1, 2, True),
    ((2, 2, 5, 6), (3, 2, 3, 3), 1, 2, 2, 1, False),
    ((1, 3, 4, 4), (5, 3, 1, 1), 1, 0, 1, 1, True),
]


@pytest.mark.parametrize("case", CONVS)
def test_conv2d_relu_is_relu_of_conv2d(device, case):
    xs, ws, stride, padding, dilation, groups, has_bias = case
    rng = np.random.default_rng(len(xs) + sum(ws))
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    b = rng.standard_normal(ws[0]) if has_bias else None
    args = (stride, padding, dilation, groups)
    pair = lambda v: (v, v)      # noqa: E731
    expected = np.maximum(direct_conv2d(x, w, b, *map(pair, args[:3]), groups), 0)
    on = (lambda a, grad=False: None if a is None else
          minidl.tensor(a, requires_grad=grad, device=device))
    y = F.conv2d_relu(on(x), on(w), on(b), *args)
    assert_close(y.data, expected, rtol=1e-10, atol=1e-12)
    # float32 forward and backward equal relu(conv2d) (the unfused ops) on the same device.
    gout = on(rng.standard_normal(expected.shape).astype(np.float32))
    results = []
    for op in (F.conv2d_relu, lambda *a: F.relu(F.conv2d(*a))):
        inputs = [on(a.astype(np.float32), True) for a in (x, w, b) if a is not None]
        if b is None:
            inputs.append(None)
        y = op(*inputs, *args)
        (y * gout).sum().backward()
        results.append([y.data] + [t.grad for t in inputs if t is not None])
    for fused, plain in zip(*results):
        assert_close(fused, plain, rtol=1e-4, atol=1e-5)


@given(seed=st.integers(0, 2 ** 31), case=st.sampled_from(CONVS))
def test_conv2d_relu_gradcheck(device, seed, case):
    xs, ws, stride, padding, dilation, groups, has_bias = case
    rng = np.random.default_rng(seed)
    # Values away from the ReLU's kink: shift the outputs away from 0 through the bias.
    arrays = [rng.standard_normal(xs), rng.standard_normal(ws)]
    if has_bias:
        arrays.append(rng.standard_normal(ws[0]))
    tensors = [minidl.tensor(a, requires_grad=True, device=device) for a in arrays]

    def fn(x, w, b=None):
        return F.conv2d_relu(x, w, b, stride, padding, dilation, groups)
    bias = tensors[2] if has_bias else None
    pre = to_numpy(F.conv2d(*tensors[:2], bias, stride, padding, dilation, groups).data)
    if np.abs(pre).min() < 1e-3:
        return      # an output within finite-difference reach of the kink: no derivative there
    assert minidl.gradcheck(fn, tensors, mode="random", n_directions=4)


def test_conv_relu_module_is_a_conv2d_with_its_relu(device):
    minidl.manual_seed(0)
    fused = nn.ConvReLU2d(3, 4, 3, padding=1).to(device)
    plain = nn.Conv2d(3, 4, 3, padding=1).to(device)
    plain.load_state_dict(fused.state_dict())          # the same keys and shapes
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert isinstance(fused, nn.Conv2d) and "ConvReLU2d(3, 4" in repr(fused)
    x = minidl.randn(2, 3, 5, 5, device=device)
    assert_close(fused(x).data, F.relu(plain(x)).data)
