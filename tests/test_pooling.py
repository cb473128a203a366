"""Pooling: max (values, switches, ceil_mode), max-unpooling, average and adaptive average,
against NumPy oracles written from torch's documented rules; float64 gradient checks; errors."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import minidl
from minidl import functional as F, nn

from conftest import to_numpy


def t(a, device, grad=False):
    return minidl.tensor(np.asarray(a), requires_grad=grad, device=device)


def check_grad(fn, arrays, device, mode="random"):
    tensors = [t(np.asarray(a, dtype=np.float64), device, grad=True) for a in arrays]
    assert minidl.gradcheck(fn, tensors, mode=mode, n_directions=4)


def distinct_values(rng, shape):
    """No ties and gaps of 0.1, so a finite-difference step never changes which value is max."""
    return (rng.permutation(int(np.prod(shape))).reshape(shape) * 0.1 - 1.0).astype(np.float64)


def torch_pool_size(size, k, s, p, d, ceil_mode):
    """torch.nn.MaxPool2d docs: floor (or ceil) of (H + 2p - d(k-1) - 1)/s + 1; with ceil_mode a
    window that would start in the right padding is dropped."""
    r = (size + 2 * p - d * (k - 1) - 1) / s + 1
    out = int(np.ceil(r)) if ceil_mode else int(np.floor(r))
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def windows(x, k, s, p, d, out, fill):
    """Stack every tap's view: (kh*kw, N, C, ho, wo), padding (and beyond) = fill."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (ho, wo) = k, s, p, d, out
    n, c, h, w = x.shape
    big = np.full((n, c, h + 2 * ph + sh * ho + dh * kh, w + 2 * pw + sw * wo + dw * kw), fill)
    big[:, :, ph:ph + h, pw:pw + w] = x
    taps = []
    for i in range(kh):
        for j in range(kw):
            taps.append(big[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw])
    return np.stack(taps)


def empty_window(case):
    """Whether some window (with dilation) holds padding only; max_pool2d refuses those."""
    for size, k, s, p, d in zip(case["shape"][2:], case["k"], case["s"], case["p"], case["d"]):
        for o in range(torch_pool_size(size, k, s, p, d, case["ceil"])):
            if all(not 0 <= o * s - p + i * d < size for i in range(k)):
                return True
    return False


@st.composite
def pool_case(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h = draw(st.integers(max(1, (kh - 1) * dh + 1 - 2 * ph), 7))
    w = draw(st.integers(max(1, (kw - 1) * dw + 1 - 2 * pw), 7))
    return dict(shape=(draw(st.integers(1, 2)), draw(st.integers(1, 2)), h, w), k=(kh, kw),
                s=(sh, sw), p=(ph, pw), d=(dh, dw), ceil=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 16)))


# ---------------------------------------------------------------------- max pooling
@given(case=pool_case(), ties=st.booleans())
def test_max_pool2d_values_and_indices(device, case, ties):
    rng = np.random.default_rng(case["seed"])
    x = (rng.integers(0, 3, case["shape"]).astype(np.float64) if ties
         else rng.standard_normal(case["shape"]))
    if empty_window(case):
        with pytest.raises(ValueError, match="padding only"):
            F.max_pool2d(t(x, device), case["k"], case["s"], case["p"], case["d"], case["ceil"])
        return
    y, idx = F.max_pool2d(t(x, device), case["k"], case["s"], case["p"], case["d"], case["ceil"],
                          return_indices=True)
    h, w = case["shape"][2:]
    out = tuple(torch_pool_size(n, k, s, p, d, case["ceil"]) for n, k, s, p, d in
                zip((h, w), case["k"], case["s"], case["p"], case["d"]))
    assert y.shape == case["shape"][:2] + out and idx.shape == y.shape
    win = windows(x, case["k"], case["s"], case["p"], case["d"], out, -np.inf)
    np.testing.assert_array_equal(to_numpy(y.data), win.max(axis=0))
    tap = win.argmax(axis=0)                       # first maximum in scan order
    i, j = np.divmod(tap, case["k"][1])
    oy, ox = np.meshgrid(np.arange(out[0]), np.arange(out[1]), indexing="ij")
    iy = oy * case["s"][0] - case["p"][0] + i * case["d"][0]
    ix = ox * case["s"][1] - case["p"][1] + j * case["d"][1]
    assert to_numpy(idx.data).dtype == np.int64
    np.testing.assert_array_equal(to_numpy(idx.data), iy * w + ix)


@given(case=pool_case())
def test_max_pool2d_gradient(device, case):
    if empty_window(case):
        return
    x = distinct_values(np.random.default_rng(case["seed"]), case["shape"])
    check_grad(lambda x: F.max_pool2d(x, case["k"], case["s"], case["p"], case["d"], case["ceil"]),
               [x], device)


def test_max_pool2d_overlapping_windows_add_gradients(device):
    """3x3 windows at stride 1: the global maximum wins 9 windows and gets 9 gradients."""
    x = np.zeros((1, 1, 5, 5))
    x[0, 0, 2, 2] = 1.0
    xt = t(x, device, grad=True)
    y = F.max_pool2d(xt, 3, stride=1)
    y.backward(np.ones(y.shape))
    g = to_numpy(xt.grad)
    assert g[0, 0, 2, 2] == 9 and g.sum() == 9


def test_max_pool2d_first_maximum_wins_ties(device):
    x = np.array([[[[1, 3, 0, 0], [3, 2, 0, 0]]]], dtype=np.float32)
    y, idx = F.max_pool2d(t(x, device), 2, return_indices=True)
    assert to_numpy(y.data).tolist() == [[[[3, 0]]]]
    # 3 at flat 1 and at flat 4: the first in scan order wins; the all-zero window -> its first
    assert to_numpy(idx.data).tolist() == [[[[1, 2]]]]


@pytest.mark.parametrize("call,match", [
    (lambda: F.max_pool2d(np.zeros((1, 1, 4, 4)), 2, padding=2), "half the kernel"),
    (lambda: F.max_pool2d(np.zeros((1, 1, 2, 2)), 3), "too small"),
    (lambda: F.max_pool2d(np.zeros((1, 4, 4)), 2), "4-D"),
    (lambda: F.max_pool2d(np.zeros((1, 1, 4, 4)), 2, stride=0), "positive"),
    (lambda: F.avg_pool2d(np.zeros((1, 1, 4, 4)), 3, padding=2), "half the kernel"),
])
def test_pooling_argument_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------- unpooling
@pytest.mark.parametrize("size", [(4, 6), (5, 7)])
def test_max_unpool2d_puts_maxima_back(device, size):
    rng = np.random.default_rng(0)
    x = distinct_values(rng, (2, 3) + size)
    y, idx = F.max_pool2d(t(x, device), 2, return_indices=True)
    up = F.max_unpool2d(y, idx, 2, output_size=x.shape)
    assert up.shape == x.shape
    u = to_numpy(up.data)
    kept = u != 0
    np.testing.assert_array_equal(u[kept], x[kept])
    assert kept.sum() == y.data.size                # one value back per window
    # every kept value is the maximum of its 2x2 window
    ho, wo = size[0] // 2, size[1] // 2
    crop = x[:, :, :2 * ho, :2 * wo].reshape(2, 3, ho, 2, wo, 2)
    np.testing.assert_array_equal(np.sort(u[kept]), np.sort(crop.max(axis=(3, 5)).ravel()))


@given(seed=st.integers(0, 999), k=st.integers(2, 3), extra=st.integers(0, 1))
def test_max_unpool2d_gradient_and_default_size(device, seed, k, extra):
    rng = np.random.default_rng(seed)
    x = distinct_values(rng, (1, 2, 2 * k + extra, 2 * k + extra))
    y, idx = F.max_pool2d(t(x, device), k, return_indices=True)
    h, w = y.shape[2:]
    if extra == 0:      # the default size (h - 1) * stride + k is the pooled map's size
        assert F.max_unpool2d(y, idx, k).shape == (1, 2, (h - 1) * k + k, (w - 1) * k + k)
    vals = rng.standard_normal(y.shape)
    check_grad(lambda v: F.max_unpool2d(v, idx, k, output_size=x.shape[2:]), [vals], device,
               mode="full")


def test_max_unpool2d_errors(device):
    y, idx = F.max_pool2d(t(np.random.default_rng(1).standard_normal((1, 1, 5, 5)), device), 2,
                          return_indices=True)
    with pytest.raises(ValueError, match="within one stride"):
        F.max_unpool2d(y, idx, 2, output_size=(7, 4))
    with pytest.raises(ValueError, match="indices shape"):
        F.max_unpool2d(y, idx.data[:, :, :1], 2)
    bad = idx.data.copy()
    bad[0, 0, 0, 0] = 99
    # On the GPU the range is checked at the next host read (minidl.device_checks): .numpy().
    with pytest.raises(ValueError, match=r"must lie in \[0, 16\)"):
        F.max_unpool2d(y, bad, 2).numpy()


# ---------------------------------------------------------------------- average pooling
def avg_oracle(x, k, s, p, ceil_mode, count_include_pad):
    """torch's avg_pool2d rule, written out per output pixel."""
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    n, c, h, w = x.shape
    ho = torch_pool_size(h, kh, sh, ph, 1, ceil_mode)
    wo = torch_pool_size(w, kw, sw, pw, 1, ceil_mode)
    y = np.zeros((n, c, ho, wo))
    for oy in range(ho):
        for ox in range(wo):
            y0, x0 = oy * sh - ph, ox * sw - pw
            y1, x1 = min(y0 + kh, h + ph), min(x0 + kw, w + pw)
            pool = (y1 - y0) * (x1 - x0)
            y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
            total = x[:, :, y0:y1, x0:x1].sum(axis=(2, 3))
            y[:, :, oy, ox] = total / (pool if count_include_pad else (y1 - y0) * (x1 - x0))
    return y


@given(case=pool_case(), include=st.booleans())
def test_avg_pool2d_matches_torch_rule_and_gradient(device, case, include):
    x = np.random.default_rng(case["seed"]).standard_normal(case["shape"])
    h, w = case["shape"][2:]
    if min(torch_pool_size(n, k, s, p, 1, case["ceil"]) for n, k, s, p in
           zip((h, w), case["k"], case["s"], case["p"])) < 1:
        return
    y = F.avg_pool2d(t(x, device), case["k"], case["s"], case["p"], case["ceil"], include)
    np.testing.assert_allclose(to_numpy(y.data),
                               avg_oracle(x, case["k"], case["s"], case["p"], case["ceil"], include),
                               rtol=1e-12, atol=1e-12)
    check_grad(lambda x: F.avg_pool2d(x, case["k"], case["s"], case["p"], case["ceil"], include),
               [x], device)


def test_avg_pool2d_plain_case(device):
    """kernel == stride, no padding: the reshape path; the odd last row is dropped."""
    x = np.arange(2 * 5 * 6, dtype=np.float64).reshape(1, 2, 5, 6)
    y = F.avg_pool2d(t(x, device), 2)
    np.testing.assert_allclose(to_numpy(y.data), x[:, :, :4].reshape(1, 2, 2, 2, 3, 2).mean(axis=(3, 5)))
    check_grad(lambda x: F.avg_pool2d(x, 2), [x], device, mode="full")


# ---------------------------------------------------------------------- adaptive
@given(h=st.integers(1, 9), w=st.integers(1, 9), oh=st.integers(1, 5), ow=st.integers(1, 5),
       seed=st.integers(0, 999))
def test_adaptive_avg_pool2d(device, h, w, oh, ow, seed):
    x = np.random.default_rng(seed).standard_normal((2, 2, h, w))
    y = F.adaptive_avg_pool2d(t(x, device), (oh, ow))
    expected = np.zeros((2, 2, oh, ow))
    for i in range(oh):
        for j in range(ow):
            a, b = (i * h) // oh, int(np.ceil((i + 1) * h / oh))   # torch's start / end
            c, d = (j * w) // ow, int(np.ceil((j + 1) * w / ow))
            expected[:, :, i, j] = x[:, :, a:b, c:d].mean(axis=(2, 3))
    np.testing.assert_allclose(to_numpy(y.data), expected, rtol=1e-12, atol=1e-12)
    check_grad(lambda x: F.adaptive_avg_pool2d(x, (oh, ow)), [x], device)


def test_adaptive_avg_pool2d_none_and_int():
    x = np.ones((1, 1, 6, 4))
    assert F.adaptive_avg_pool2d(x, (2, None)).shape == (1, 1, 2, 4)
    assert F.adaptive_avg_pool2d(x, 1).shape == (1, 1, 1, 1)


# ---------------------------------------------------------------------- layers
def test_pooling_layers(device):
    x = minidl.randn(2, 3, 8, 9, device=device)
    pool = nn.MaxPool2d(2, return_indices=True)
    unpool = nn.MaxUnpool2d(2)
    y, idx = pool(x)
    assert y.shape == (2, 3, 4, 4)
    assert unpool(y, idx, output_size=x.shape).shape == x.shape
    assert nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)(x).shape == (2, 3, 5, 5)
    assert nn.AvgPool2d(3, stride=2, padding=1)(x).shape == (2, 3, 4, 5)
    assert nn.AdaptiveAvgPool2d((1, 1))(x).shape == (2, 3, 1, 1)
    assert list(nn.MaxPool2d(2).parameters()) == []
