"""The compiled kernels (kernels/cpu.py, kernels/gpu.py where present) against kernels/reference.py.

Each test runs once per device: the bundle under test is `kernels.for_array` of an array on
that device, so the same checks cover the Numba and the CuPy kernels.
"""
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

import kernels
from minidl import backend

from conftest import to_numpy

# By module path: the kernels package also has a `reference()` helper of the same name.
ref = importlib.import_module("kernels.reference")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bundle(xp):
    return kernels.for_array(xp.zeros(1))


@st.composite
def geometry(draw, max_hw=9):
    """A random window geometry, possibly with extra output rows/columns past the natural size."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    h = draw(st.integers(max(1, (kh - 1) * dh + 1 - 2 * ph), max((kh - 1) * dh + 1, max_hw)))
    w = draw(st.integers(max(1, (kw - 1) * dw + 1 - 2 * pw), max((kw - 1) * dw + 1, max_hw)))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1 + draw(st.integers(0, 1))
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1 + draw(st.integers(0, 1))
    return dict(n=draw(st.integers(1, 2)), c=draw(st.integers(1, 3)), h=h, w=w,
                args=(kh, kw, sh, sw, ph, pw, dh, dw, ho, wo))


@given(g=geometry(), dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 99))
def test_im2col_col2im_match_reference_and_are_adjoint(device, xp, g, dtype, seed):
    rng = np.random.default_rng(seed)
    K = bundle(xp)
    x = rng.standard_normal((g["n"], g["c"], g["h"], g["w"])).astype(dtype)
    cols = to_numpy(K.im2col(xp.asarray(x), *g["args"]))
    np.testing.assert_array_equal(cols, ref.im2col(x, *g["args"]))
    c = rng.standard_normal(cols.shape).astype(dtype)
    back = to_numpy(K.col2im(xp.asarray(c), g["c"], g["h"], g["w"], *g["args"]))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(back, ref.col2im(c, g["c"], g["h"], g["w"], *g["args"]),
                               rtol=tol, atol=tol)
    # <im2col(x), c> == <x, col2im(c)>: col2im is im2col's adjoint.
    x64, c64 = x.astype(np.float64), c.astype(np.float64)
    lhs = (ref.im2col(x64, *g["args"]) * c64).sum()
    rhs = (x64 * ref.col2im(c64, g["c"], g["h"], g["w"], *g["args"])).sum()
    assert abs(lhs - rhs) <= 1e-10 * (1 + abs(lhs))


@given(g=geometry(), seed=st.integers(0, 99), data=st.data())
def test_im2col_of_a_band_by_negative_padding(device, xp, g, seed, data):
    """im2col with padding ph - r0*sh (negative past the top) gives output rows r0.. of the
    full unfolding: conv_plan.py unfolds bands of rows that way, without copying x's rows."""
    kh, kw, sh, sw, ph, pw, dh, dw, ho, wo = g["args"]
    r0 = data.draw(st.integers(0, ho - 1))
    x = np.random.default_rng(seed).standard_normal((g["n"], g["c"], g["h"], g["w"]))
    full = ref.im2col(x, *g["args"])
    band_args = (kh, kw, sh, sw, ph - r0 * sh, pw, dh, dw, ho - r0, wo)
    np.testing.assert_array_equal(ref.im2col(x, *band_args), full[:, :, r0 * wo:])
    np.testing.assert_array_equal(to_numpy(bundle(xp).im2col(xp.asarray(x), *band_args)),
                                  full[:, :, r0 * wo:])


def test_im2col_layout_is_the_gemm_layout():
    """Row (c, i, j) of the columns pairs with column (c, i, j) of weight.reshape(C_out, -1)."""
    x = np.arange(2 * 4 * 4, dtype=np.float64).reshape(1, 2, 4, 4)
    cols = ref.im2col(x, 2, 3, 1, 1, 0, 0, 1, 1, 3, 2)
    assert cols.shape == (1, 2 * 2 * 3, 3 * 2)
    # row for c=1, i=1, j=2 at output (oy=2, ox=1) reads x[0, 1, 2 + 1, 1 + 2]
    assert cols[0, (1 * 2 + 1) * 3 + 2, 2 * 2 + 1] == x[0, 1, 3, 3]


@st.composite
def pool_case(draw):
    g = draw(geometry(max_hw=8))
    kh, kw, sh, sw, ph, pw, dh, dw, ho, wo = g["args"]
    # Pooling keeps padding at most half the kernel, so every window sees the input.
    ph, pw = min(ph, kh // 2), min(pw, kw // 2)
    h, w = max(g["h"], (kh - 1) * dh + 1), max(g["w"], (kw - 1) * dw + 1)
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    g.update(h=h, w=w, args=(kh, kw, sh, sw, ph, pw, dh, dw, ho, wo))
    return g


@given(g=pool_case(), dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 99),
       levels=st.sampled_from([3, 1000]))
def test_maxpool_matches_reference_with_ties_and_overlaps(device, xp, g, dtype, seed, levels):
    """Few distinct levels make ties common: the first maximum in scan order must win."""
    rng = np.random.default_rng(seed)
    K = bundle(xp)
    x = rng.integers(0, levels, (g["n"], g["c"], g["h"], g["w"])).astype(dtype)
    y, idx = K.maxpool2d_forward(xp.asarray(x), *g["args"])
    y_ref, idx_ref = ref.maxpool2d_forward(x, *g["args"])
    np.testing.assert_array_equal(to_numpy(y), y_ref)
    np.testing.assert_array_equal(to_numpy(idx), idx_ref)
    assert idx.dtype == np.int64
    gy = rng.standard_normal(y_ref.shape).astype(dtype)
    gx = K.maxpool2d_backward(xp.asarray(gy), xp.asarray(idx_ref), g["h"], g["w"])
    np.testing.assert_allclose(to_numpy(gx), ref.maxpool2d_backward(gy, idx_ref, g["h"], g["w"]),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 6, 8), (1, 2, 7, 5)])
def test_maxpool_2x2_fast_path(device, xp, shape):
    """Every pooling layer of U-Net/SegNet: 2x2 stride 2; odd sizes drop the last row/column."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 3, shape).astype(np.float32)    # many ties
    ho, wo = shape[2] // 2, shape[3] // 2
    y, idx = bundle(xp).maxpool2d_forward(xp.asarray(x), 2, 2, 2, 2, 0, 0, 1, 1, ho, wo)
    y_ref, idx_ref = ref.maxpool2d_forward(x, 2, 2, 2, 2, 0, 0, 1, 1, ho, wo)
    np.testing.assert_array_equal(to_numpy(y), y_ref)
    np.testing.assert_array_equal(to_numpy(idx), idx_ref)


def test_maxpool_ties_padding_and_minus_infinity(device, xp):
    K = bundle(xp)
    x = np.array([[[[1.0, 1.0], [1.0, 1.0]]]], dtype=np.float32)
    y, idx = K.maxpool2d_forward(xp.asarray(x), 2, 2, 2, 2, 0, 0, 1, 1, 1, 1)
    assert to_numpy(idx).item() == 0 and to_numpy(y).item() == 1.0     # first of four ties
    # Negative values next to zero padding: the padding must never win.
    x = -np.arange(1, 10, dtype=np.float64).reshape(1, 1, 3, 3)
    y, idx = K.maxpool2d_forward(xp.asarray(x), 3, 3, 1, 1, 1, 1, 1, 1, 3, 3)
    assert to_numpy(y)[0, 0, 0, 0] == -1.0 and to_numpy(idx)[0, 0, 0, 0] == 0
    assert (to_numpy(y) < 0).all()
    # A window of -inf points at its first pixel, not at -1.
    x = np.full((1, 1, 2, 2), -np.inf)
    y, idx = K.maxpool2d_forward(xp.asarray(x), 2, 2, 2, 2, 0, 0, 1, 1, 1, 1)
    assert to_numpy(idx).item() == 0


@given(n=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6),
       extra=st.integers(0, 3), seed=st.integers(0, 99))
def test_maxunpool_matches_reference(device, xp, n, c, h, w, extra, seed):
    rng = np.random.default_rng(seed)
    K = bundle(xp)
    ho, wo = 2 * h + extra, 2 * w + extra
    # Distinct positions per plane (as max pooling without overlap produces).
    idx = np.stack([rng.permutation(ho * wo)[:h * w] for _ in range(n * c)]).reshape(n, c, h, w)
    x = rng.standard_normal((n, c, h, w))
    y = K.maxunpool2d_forward(xp.asarray(x), xp.asarray(idx), ho, wo)
    np.testing.assert_array_equal(to_numpy(y), ref.maxunpool2d_forward(x, idx, ho, wo))
    gy = rng.standard_normal((n, c, ho, wo))
    gx = K.maxunpool2d_backward(xp.asarray(gy), xp.asarray(idx))
    np.testing.assert_array_equal(to_numpy(gx), ref.maxunpool2d_backward(gy, idx))


@given(n=st.integers(1, 2), c=st.integers(1, 2), h=st.integers(1, 6), w=st.integers(1, 6),
       ho=st.integers(1, 13), wo=st.integers(1, 13), align=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 99))
def test_bilinear_matches_reference_and_is_adjoint(device, xp, n, c, h, w, ho, wo, align, dtype, seed):
    rng = np.random.default_rng(seed)
    K = bundle(xp)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    y = to_numpy(K.bilinear_forward(xp.asarray(x), ho, wo, align))
    np.testing.assert_allclose(y, ref.bilinear_forward(x, ho, wo, align), rtol=tol, atol=tol)
    gy = rng.standard_normal((n, c, ho, wo)).astype(dtype)
    gx = to_numpy(K.bilinear_backward(xp.asarray(gy), h, w, align))
    np.testing.assert_allclose(gx, ref.bilinear_backward(gy, h, w, align), rtol=tol, atol=tol)
    lhs = (ref.bilinear_forward(x.astype(np.float64), ho, wo, align) * gy).sum()
    rhs = (x * ref.bilinear_backward(gy.astype(np.float64), h, w, align)).sum()
    assert abs(lhs - rhs) <= 1e-9 * (1 + abs(lhs))


def test_bilinear_reference_follows_torch_source_coordinates():
    """1-D [1, 2] upsampled to 4: half-pixel rule gives 1, 1.25, 1.75, 2; corners 1, 4/3, 5/3, 2."""
    x = np.array([1.0, 2.0]).reshape(1, 1, 1, 2)
    np.testing.assert_allclose(ref.bilinear_forward(x, 1, 4, False)[0, 0, 0], [1, 1.25, 1.75, 2])
    np.testing.assert_allclose(ref.bilinear_forward(x, 1, 4, True)[0, 0, 0], [1, 4 / 3, 5 / 3, 2])


@given(n=st.integers(1, 3), c=st.integers(1, 4), s=st.integers(1, 40), training=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), offset=st.sampled_from([0.0, 1e3]),
       seed=st.integers(0, 99), relu=st.booleans())
def test_batchnorm_kernels_match_reference(device, xp, n, c, s, training, dtype, offset, seed,
                                           relu):
    """Statistics, normalisation and gradients on (N, C, S), with and without the fused
    ReLU; the 1e3 offset checks that the variance is not computed as E[x^2] - E[x]^2, which
    loses all digits in float32 there."""
    if n * s == 1:
        return      # one value per channel: batch_norm refuses it before any kernel runs
    rng = np.random.default_rng(seed)
    K = bundle(xp)
    x = (offset + rng.standard_normal((n, c, s))).astype(dtype)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)
    mean, var = (to_numpy(a) for a in K.batchnorm_stats(xp.asarray(x)))
    ref_mean, ref_var = ref.batchnorm_stats(x.astype(np.float64))
    # atol too: a mean near zero (values of order 1 summed in float32) has no relative accuracy.
    np.testing.assert_allclose(mean, ref_mean, **tol)
    np.testing.assert_allclose(var, ref_var, rtol=1e-3 if dtype == np.float32 else 1e-9,
                               atol=tol["atol"])
    inv_std = (1 / np.sqrt(ref_var + 1e-5)).astype(dtype)
    scale, shift = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    ref_mean = ref_mean.astype(dtype)
    y, xhat = K.batchnorm_forward(*(xp.asarray(a) for a in (x, ref_mean, inv_std, scale, shift)),
                                  relu=relu)
    ry, rxhat = ref.batchnorm_forward(x, ref_mean, inv_std, scale, shift, relu=relu)
    np.testing.assert_allclose(to_numpy(xhat), rxhat, **tol)
    np.testing.assert_allclose(to_numpy(y), ry, **tol)
    if relu:
        assert (ry >= 0).all() and (ry == 0).any() == (rxhat * scale[:, None] + shift[:, None] <= 0).any()
    gy = rng.standard_normal((n, c, s)).astype(dtype)
    relu_shift = shift if relu else None
    got = K.batchnorm_backward(xp.asarray(gy), xp.asarray(rxhat), xp.asarray(inv_std),
                               xp.asarray(scale), training,
                               None if relu_shift is None else xp.asarray(relu_shift))
    want = ref.batchnorm_backward(gy, rxhat, inv_std, scale, training, relu_shift)
    for name, a, b in zip(("gx", "gscale", "gshift"), got, want):
        assert a.dtype == dtype, name
        np.testing.assert_allclose(to_numpy(a), b, err_msg=name, **tol)


@given(shape=st.sampled_from([(1,), (5,), (3, 4), (2, 3, 3, 3)]), amsgrad=st.booleans(),
       weight_decay=st.sampled_from([0.0, 0.01]), dtype=st.sampled_from([np.float32, np.float64]),
       steps=st.integers(1, 3), seed=st.integers(0, 99))
def test_adam_update_matches_reference(device, xp, shape, amsgrad, weight_decay, dtype, steps, seed):
    """A few steps in place on p, m, v (, v_max), against the reference doing the same."""
    rng = np.random.default_rng(seed)
    K = bundle(xp)
    p = rng.standard_normal(shape).astype(dtype)
    mine = [xp.asarray(a) for a in (p, np.zeros_like(p), np.zeros_like(p), np.zeros_like(p))]
    theirs = [p.copy(), np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)]
    for t in range(1, steps + 1):
        g = rng.standard_normal(shape).astype(dtype)
        args = (amsgrad, 0.9, 0.999, 1e-2 / (1 - 0.9 ** t), np.sqrt(1 - 0.999 ** t), 1e-8,
                weight_decay)
        K.adam_update(mine[0], xp.asarray(g), *mine[1:], *args)
        ref.adam_update(theirs[0], g, *theirs[1:], *args)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for name, a, b in zip(("p", "m", "v", "v_max"), mine, theirs):
        if name == "v_max" and not amsgrad:
            continue
        assert a.dtype == dtype
        np.testing.assert_allclose(to_numpy(a), b, rtol=tol, atol=tol, err_msg=name)


@given(g=geometry(), dtype=st.sampled_from([np.float32, np.float64]), seed=st.integers(0, 99))
def test_parallel_cpu_kernels_give_the_serial_results(g, dtype, seed):
    """Every prange kernel of kernels/cpu.py also has a parallel build, used when
    NUMBA_NUM_THREADS is raised (see _serial_and_parallel): bit for bit the serial results,
    which the tests above hold against the reference."""
    cpu = importlib.import_module("kernels.cpu")
    rng = np.random.default_rng(seed)
    n, c, h, w = g["n"], g["c"], g["h"], g["w"]
    kh, kw, sh, sw, ph, pw, dh, dw, ho, wo = g["args"]
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    cols = rng.standard_normal((n, c * kh * kw, ho * wo)).astype(dtype)
    up = rng.standard_normal((n, c, 2 * h + 1, 2 * w)).astype(dtype)
    unpool_idx = np.stack([rng.permutation((2 * h + 1) * 2 * w)[:h * w]
                           for _ in range(n * c)]).reshape(n, c, h, w)
    pool_ok = ph <= kh // 2 and pw <= kw // 2
    results = []
    for parallel in (False, True):
        saved, cpu.FORCE_PARALLEL = cpu.FORCE_PARALLEL, parallel
        try:
            out = [cpu.im2col(x, *g["args"]), cpu.col2im(cols, c, h, w, *g["args"]),
                   cpu.maxunpool2d_forward(x, unpool_idx, 2 * h + 1, 2 * w),
                   cpu.maxunpool2d_backward(up, unpool_idx),
                   cpu.bilinear_forward(x, ho, wo, bool(seed % 2)),
                   cpu.bilinear_backward(up, h, w, bool(seed % 2))]
            if pool_ok:
                y, idx = cpu.maxpool2d_forward(x, *g["args"])
                out += [y, idx, cpu.maxpool2d_backward(y, idx, h, w)]
            if h >= 2 and w >= 2:
                out += list(cpu.maxpool2d_forward(x, 2, 2, 2, 2, 0, 0, 1, 1, h // 2, w // 2))
        finally:
            cpu.FORCE_PARALLEL = saved
        results.append(out)
    for serial, parallel in zip(*results):
        np.testing.assert_array_equal(serial, parallel)


def test_cpu_kernels_run_without_jit():
    """NUMBA_DISABLE_JIT=1 turns kernels/cpu.py into plain Python (for a debugger): same results."""
    code = (
        "import numpy as np\n"
        "import kernels.cpu as K, kernels.reference as R\n"
        "x = np.random.default_rng(0).standard_normal((1, 2, 5, 6))\n"
        "a = (3, 2, 2, 1, 1, 1, 1, 2, 3, 5)\n"
        "assert np.array_equal(K.im2col(x, *a), R.im2col(x, *a))\n"
        "c = K.im2col(x, *a)\n"
        "assert np.allclose(K.col2im(c, 2, 5, 6, *a), R.col2im(c, 2, 5, 6, *a))\n"
        "y, i = K.maxpool2d_forward(x, 2, 2, 2, 2, 0, 0, 1, 1, 2, 3)\n"
        "assert np.array_equal(i, R.maxpool2d_forward(x, 2, 2, 2, 2, 0, 0, 1, 1, 2, 3)[1])\n"
        "assert np.allclose(K.bilinear_forward(x, 7, 4, False), R.bilinear_forward(x, 7, 4, False))\n"
        "x3 = x.reshape(1, 2, 30)\n"
        "assert np.allclose(K.batchnorm_stats(x3), R.batchnorm_stats(x3))\n"
        "print('ok')\n")
    env = dict(os.environ, NUMBA_DISABLE_JIT="1", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_for_array_picks_cpu_bundle_for_numpy():
    assert bundle(np).__name__ == "kernels.cpu"
    assert backend.device_of(np.zeros(1)) == "cpu"
