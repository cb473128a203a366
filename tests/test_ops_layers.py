"""pad / center_crop, dropout / dropout2d and linear: NumPy references and gradchecks."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minidl
from minidl import functional as F
from conftest import assert_close, to_numpy
from strategies import check_grad, float64_arrays, values


# ---------------------------------------------------------------------- pad
NUMPY_MODE = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}


@settings(max_examples=20)
@given(data=st.data(), mode=st.sampled_from(sorted(NUMPY_MODE)),
       shape=st.sampled_from([(5,), (2, 4, 5), (1, 2, 3, 4)]), n_axes=st.integers(1, 2))
def test_pad_matches_numpy_and_gradcheck(data, mode, shape, n_axes):
    n_axes = min(n_axes, len(shape))
    widths = []
    for axis in range(len(shape) - 1, len(shape) - 1 - n_axes, -1):   # last axis first (torch order)
        limit = shape[axis] - 1 if mode == "reflect" else 3
        widths += [data.draw(st.integers(0, limit)), data.draw(st.integers(0, limit))]
    a = data.draw(float64_arrays(shape))
    np_widths = [(0, 0)] * len(shape)
    for i in range(n_axes):
        np_widths[len(shape) - 1 - i] = (widths[2 * i], widths[2 * i + 1])
    extra = {"constant_values": 1.5} if mode == "constant" else {}
    expected = np.pad(a, np_widths, mode=NUMPY_MODE[mode], **extra)
    out = F.pad(minidl.tensor(a), tuple(widths), mode=mode, value=1.5)
    assert_close(out.data, expected)
    weights = values(9, expected.shape)      # every output position weighted differently
    check_grad(lambda x: F.pad(x, tuple(widths), mode=mode, value=1.5) * weights, a)


def test_reflect_pad_is_overlap_tile_mirroring(device):
    x = minidl.tensor(np.arange(4.0).reshape(1, 1, 1, 4), device=device, requires_grad=True)
    y = F.pad(x, (2, 2), mode="reflect")
    assert_close(y.data, [[[[2, 1, 0, 1, 2, 3, 2, 1]]]])
    y.sum().backward()
    # each input position receives 1 + the number of mirrored copies of it
    assert_close(x.grad, [[[[1, 3, 3, 1]]]])


def test_constant_pad_with_negative_widths_crops():
    a = values(0, (3, 5))
    out = F.pad(minidl.tensor(a), (-1, 2, 1, -2))
    expected = np.pad(a[:1, 1:], ((1, 0), (0, 2)))
    assert_close(out.data, expected)
    check_grad(lambda x: F.pad(x, (-1, 2, 1, -2)) * values(3, expected.shape), a)


def test_pad_errors():
    x = minidl.tensor(np.zeros((1, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match="smaller than axis"):
        F.pad(x, (3, 0), mode="reflect")
    with pytest.raises(ValueError, match="even number"):
        F.pad(x, (1, 2, 3))
    with pytest.raises(ValueError, match="mode='wrap'"):
        F.pad(x, (1, 1), mode="wrap")


# ---------------------------------------------------------------------- center_crop
@given(data=st.data(), h=st.integers(1, 6), w=st.integers(1, 6))
def test_center_crop(data, h, w):
    a = data.draw(float64_arrays((2, 2, 6, 6)))
    out = F.center_crop(minidl.tensor(a), (h, w))
    top, left = (6 - h) // 2, (6 - w) // 2
    assert_close(out.data, a[:, :, top:top + h, left:left + w])
    check_grad(lambda x: F.center_crop(x, (h, w)) * 2.0, a, mode="random")


def test_center_crop_int_size_and_error():
    x = minidl.tensor(np.zeros((1, 3, 8, 10), np.float32))
    assert F.center_crop(x, 4).shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="not be larger than the input"):
        F.center_crop(x, (9, 4))
    # A crop to the input's own size is the input itself (U-Net's skips with padding "same").
    assert F.center_crop(x, (8, 10)) is x


# ---------------------------------------------------------------------- dropout
def test_dropout_statistics_and_scaling(device):
    minidl.manual_seed(0)
    x = minidl.ones(200, 500, device=device, requires_grad=True)
    y = F.dropout(x, p=0.3)
    out = to_numpy(y.data)
    kept = out != 0
    assert abs(kept.mean() - 0.7) < 0.01
    assert_close(out[kept], np.full(kept.sum(), 1 / 0.7), rtol=1e-6)
    y.sum().backward()
    assert_close(x.grad, out)              # the gradient passes exactly where the value did


def test_dropout_eval_p0_p1_and_seeding():
    x = minidl.tensor(values(0, (4, 5)).astype(np.float32), requires_grad=True)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x
    assert np.all(F.dropout(x, 1.0).data == 0)
    minidl.manual_seed(7)
    first = F.dropout(x, 0.5).data
    minidl.manual_seed(7)
    assert np.array_equal(first, F.dropout(x, 0.5).data)
    with pytest.raises(ValueError, match=r"p in \[0, 1\]"):
        F.dropout(x, 1.5)


def test_dropout2d_drops_whole_channels():
    minidl.manual_seed(1)
    x = minidl.ones(8, 16, 5, 5)
    y = F.dropout2d(x, p=0.5).data
    per_channel = y.reshape(8, 16, -1)
    assert np.all((per_channel == 0).all(axis=2) | (per_channel == 2.0).all(axis=2))
    assert 0.3 < (per_channel[:, :, 0] == 0).mean() < 0.7
    assert F.dropout2d(minidl.ones(3, 4, 4), 0.5).shape == (3, 4, 4)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        F.dropout2d(minidl.ones(4, 4), 0.5)


def test_dropout_gradcheck_with_a_fixed_mask():
    a = values(0, (3, 4))

    def fn(x):
        minidl.manual_seed(3)                  # the same mask on every evaluation
        return F.dropout(x, 0.4) + F.dropout2d(x.reshape(1, 3, 2, 2), 0.4).reshape(3, 4)
    check_grad(fn, a)


# ---------------------------------------------------------------------- linear
@settings(max_examples=20)
@given(data=st.data(), lead=st.sampled_from([(), (3,), (2, 3)]), n_in=st.integers(1, 4),
       n_out=st.integers(1, 4), bias=st.booleans())
def test_linear(data, lead, n_in, n_out, bias):
    x = data.draw(float64_arrays(lead + (n_in,)))
    w = data.draw(float64_arrays((n_out, n_in)))
    b = data.draw(float64_arrays((n_out,))) if bias else None
    out = F.linear(minidl.tensor(x), minidl.tensor(w), None if b is None else minidl.tensor(b))
    assert_close(out.data, x @ w.T + (0 if b is None else b), rtol=1e-12)
    if bias:
        check_grad(F.linear, x, w, b)
    else:
        check_grad(F.linear, x, w)


def test_linear_shape_errors():
    with pytest.raises(ValueError, match="in_features"):
        F.linear(minidl.ones(2, 3), minidl.ones(4, 5))
    with pytest.raises(ValueError, match=r"bias of shape \(3,\)"):
        F.linear(minidl.ones(2, 5), minidl.ones(4, 5), minidl.ones(3))
