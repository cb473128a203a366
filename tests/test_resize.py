"""interpolate / Upsample: torch's nearest and bilinear rules, gradients, sizes and errors."""
import importlib

import numpy as np
import pytest
from hypothesis import given, strategies as st

import minidl
from minidl import functional as F, nn

from conftest import to_numpy

ref = importlib.import_module("kernels.reference")


def t(a, device, grad=False):
    return minidl.tensor(np.asarray(a), requires_grad=grad, device=device)


def check_grad(fn, arrays, device):
    tensors = [t(np.asarray(a, dtype=np.float64), device, grad=True) for a in arrays]
    assert minidl.gradcheck(fn, tensors, mode="random", n_directions=4)


def test_nearest_known_values(device):
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    y = F.interpolate(t(x, device), scale_factor=2)
    assert to_numpy(y.data)[0, 0].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    # size 3 from 2: source floor(o * 2/3) = 0, 0, 1
    y = F.interpolate(t(x, device), size=(3, 3))
    assert to_numpy(y.data)[0, 0].tolist() == [[1, 1, 2], [1, 1, 2], [3, 3, 4]]
    # downsampling 5 -> 2 picks floor(o * 2.5) = 0, 2
    z = np.arange(25.0).reshape(1, 1, 5, 5)
    assert to_numpy(F.interpolate(t(z, device), size=2).data)[0, 0].tolist() == [[0, 2], [10, 12]]


def test_nearest_scale_factor_uses_one_over_scale():
    """torch: with scale_factor the source is floor(o / scale), not floor(o * in / out)."""
    x = np.arange(5.0).reshape(1, 1, 1, 5)
    # out = floor(5 * 1.7) = 8; 1/1.7 picks 0,0,1,1,2,2,3,4 while in/out = 5/8 gives 0,0,1,1,2,3,3,4
    y = F.interpolate(x, scale_factor=(1, 1.7))
    assert to_numpy(y.data)[0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 4]
    y = F.interpolate(x, size=(1, 8))
    assert to_numpy(y.data)[0, 0, 0].tolist() == [0, 0, 1, 1, 2, 3, 3, 4]


def test_bilinear_known_values(device):
    x = np.array([[[[1.0, 2.0]]]])
    y = F.interpolate(t(x, device), size=(1, 4), mode="bilinear")
    np.testing.assert_allclose(to_numpy(y.data)[0, 0, 0], [1, 1.25, 1.75, 2])
    y = F.interpolate(t(x, device), size=(1, 4), mode="bilinear", align_corners=True)
    np.testing.assert_allclose(to_numpy(y.data)[0, 0, 0], [1, 4 / 3, 5 / 3, 2])
    # align_corners=True keeps all four corners exactly
    z = np.random.default_rng(0).standard_normal((2, 3, 4, 5))
    up = to_numpy(F.interpolate(t(z, device), size=(9, 11), mode="bilinear", align_corners=True).data)
    np.testing.assert_allclose(up[:, :, [0, 0, -1, -1], [0, -1, 0, -1]], z[:, :, [0, 0, -1, -1], [0, -1, 0, -1]])


@given(h=st.integers(1, 5), w=st.integers(1, 5), ho=st.integers(1, 9), wo=st.integers(1, 9),
       mode=st.sampled_from(["nearest", "bilinear"]), align=st.booleans(), seed=st.integers(0, 999))
def test_interpolate_values_and_gradients(device, h, w, ho, wo, mode, align, seed):
    x = np.random.default_rng(seed).standard_normal((2, 2, h, w))
    kwargs = dict(size=(ho, wo), mode=mode, align_corners=align if mode == "bilinear" else None)
    y = to_numpy(F.interpolate(t(x, device), **kwargs).data)
    assert y.shape == (2, 2, ho, wo)
    if mode == "nearest":
        rows = np.minimum(np.floor(np.arange(ho) * np.float32(h / ho)).astype(int), h - 1)
        cols = np.minimum(np.floor(np.arange(wo) * np.float32(w / wo)).astype(int), w - 1)
        np.testing.assert_array_equal(y, x[:, :, rows][:, :, :, cols])
    else:
        np.testing.assert_allclose(y, ref.bilinear_forward(x, ho, wo, align), rtol=1e-12)
    check_grad(lambda x: F.interpolate(x, **kwargs), [x], device)


@pytest.mark.parametrize("kwargs", [dict(scale_factor=2), dict(scale_factor=(3, 2)), dict(size=(6, 9))])
def test_nearest_integer_scale_gradient_sums_blocks(device, kwargs):
    """Integer factors take the block-sum backward: each input pixel gets its block's sum."""
    x = t(np.zeros((1, 2, 2, 3)), device, grad=True)
    y = F.interpolate(x, **kwargs)
    gy = np.random.default_rng(0).standard_normal(y.shape)
    y.backward(t(gy, device))
    sh, sw = y.shape[2] // 2, y.shape[3] // 3
    expected = gy.reshape(1, 2, 2, sh, 3, sw).sum(axis=(3, 5))
    np.testing.assert_allclose(to_numpy(x.grad), expected, rtol=1e-12)
    check_grad(lambda x: F.interpolate(x, **kwargs), [np.asarray(gy[:, :, ::sh, ::sw])], device)


def test_float32_stays_float32(device):
    x = minidl.randn(1, 2, 3, 3, device=device)
    for mode in ("nearest", "bilinear"):
        assert F.interpolate(x, scale_factor=2, mode=mode).dtype == np.float32


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one of size and scale_factor"),
    (dict(size=4, scale_factor=2), "exactly one"),
    (dict(size=4, mode="bicubic"), "'nearest' or 'bilinear'"),
    (dict(size=4, align_corners=True), "only be set with mode='bilinear'"),
    (dict(scale_factor=0.1), "must be positive"),
])
def test_interpolate_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        F.interpolate(np.zeros((1, 1, 4, 4)), **kwargs)


def test_upsample_layer(device):
    x = minidl.randn(1, 2, 3, 4, device=device)
    assert nn.Upsample(scale_factor=2)(x).shape == (1, 2, 6, 8)
    assert nn.Upsample(size=(5, 7), mode="bilinear", align_corners=False)(x).shape == (1, 2, 5, 7)
