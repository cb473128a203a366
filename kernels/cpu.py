"""CPU kernels compiled with Numba: the same functions and signatures as kernels/reference.py.

Read reference.py first for *what* each kernel computes; this file is about doing it fast:

* Work is split with `prange` over independent rows of the output (im2col: one row of the
  column matrix per (sample, channel, tap); the others: one (sample, channel) plane each),
  so no two threads ever write the same element and no locks are needed.
* Inner loops run over a precomputed range of valid output columns, so the hot loop has no
  bounds test, and with stride 1 it is a plain contiguous copy that LLVM vectorises.
* im2col writes straight into the layout the GEMM wants, (N, C*kh*kw, ho*wo), so
  `weight2d @ cols[n]` produces NCHW output with no transpose or copy.
* 2x2 / stride-2 max pooling (every pooling layer of U-Net, SegNet, VGG) has its own loop.
* Each prange kernel is compiled two ways (`_serial_and_parallel`): serial, which is what
  runs by default (minidl/__init__.py gives Numba one thread: a second one next to the BLAS
  threads made training slower on 2 cores), and parallel, used only when NUMBA_NUM_THREADS
  is raised and the job is big enough to be worth waking the thread team. A parallel loop
  takes 4-10x longer to compile, so the serial default cut the cold start (first training
  step with an empty Numba cache) from 15-19 s to about 6 s. The public functions at the
  end are thin wrappers that pick the variant.

Everything is `@njit(cache=True)`: compiled once per dtype, then loaded from kernels/__pycache__.
With NUMBA_DISABLE_JIT=1 the same code runs as plain Python (prange becomes range), which is
slow but lets you step through it in a debugger.
"""
import math
import os

# Numba's OpenMP threads spin-wait after each parallel loop by default. On a 2-core machine
# that spinning steals a core from the BLAS threads of the GEMM that follows every im2col,
# so ask them to sleep instead (must be set before libgomp starts; an explicit setting wins).
# By default minidl/__init__.py runs Numba on one thread anyway (its measurements: a second
# Numba thread next to the BLAS threads makes a training step slower on 2 cores); this
# matters when NUMBA_NUM_THREADS is raised.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import types  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402

from . import reference  # noqa: E402  (the fallback for what a kernel does not cover)
from numba import njit, prange  # noqa: E402

# Below this many output elements a kernel runs serially even when Numba has a thread team:
# starting the team costs tens of microseconds (milliseconds on a busy machine), more than
# the work itself.
PARALLEL_MIN_ELEMENTS = 1 << 16
# Tests set this to run the parallel variants (on however many threads Numba has).
FORCE_PARALLEL = False


class _serial_and_parallel:
    """A kernel written with prange, compiled serially and (on first use) in parallel.

    `kernel.for_size(n)` returns the compiled function to call for a job of n output
    elements. The parallel twin is a copy of the function under its own name, so the two
    have separate entries in Numba's on-disk cache.
    """

    def __init__(self, fn):
        self.serial = njit(cache=True)(fn)
        twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_parallel",
                                  fn.__defaults__, fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_parallel"
        self.parallel = njit(cache=True, parallel=True)(twin)

    def for_size(self, n_elements):
        # numba.config.NUMBA_NUM_THREADS (the team's size, fixed at start) is read first:
        # get_num_threads() costs microseconds, and by default the team has one thread.
        if FORCE_PARALLEL or (n_elements >= PARALLEL_MIN_ELEMENTS
                              and numba.config.NUMBA_NUM_THREADS > 1
                              and not numba.config.DISABLE_JIT and numba.get_num_threads() > 1):
            return self.parallel
        return self.serial


@njit(cache=True)
def _valid_range(off, stride, size, n_out):
    """Output positions o in [lo, hi) whose input coordinate o * stride + off lies in [0, size)."""
    lo = 0 if off >= 0 else (-off + stride - 1) // stride
    hi = (size - 1 - off) // stride + 1 if size - 1 - off >= 0 else 0
    lo = min(lo, n_out)
    hi = max(lo, min(hi, n_out))
    return lo, hi


# ---------------------------------------------------------------------- im2col / col2im
# Unsigned indices. Numba accepts negative indices (x[-1]), so for a signed index it emits
# "if i < 0: i += len" on every access, and that test stops LLVM from vectorising the loop.
# Indices that are known to be in range are therefore cast to unsigned (`_u(i)`), which
# Numba takes as never negative: the copy loops below then compile to SIMD moves (3-5x
# faster than slicing per output row on U-Net's small maps, measured in examples/benchmark.py).
_u = np.uint64


@_serial_and_parallel
def _im2col(x, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    """x (N, C, H, W), C-contiguous -> cols (N, C*kh*kw, ho*wo); see reference.im2col."""
    n, c, h, w = x.shape
    k = c * kh * kw
    L = ho * wo
    cols = np.empty((n, k, L), dtype=x.dtype)
    xf, cf = x.reshape(-1), cols.reshape(-1)      # flat views: plain offsets below
    for r in prange(n * k):                       # r = one row (b, c, i, j) of cols
        b = r // k
        row = r % k
        ch = row // (kh * kw)
        i = (row // kw) % kh
        j = row % kw
        plane = (b * c + ch) * h * w              # where x[b, ch] starts in xf
        offx = j * dw - pw                        # ix = ox * sw + offx
        lo, hi = _valid_range(offx, sw, w, wo)    # ox whose ix lies inside the image
        for oy in range(ho):
            iy = oy * sh - ph + i * dh
            out = r * L + oy * wo                 # where this output row starts in cf
            if iy < 0 or iy >= h:                 # a whole row of padding
                for ox in range(wo):
                    cf[_u(out + ox)] = 0
                continue
            for ox in range(lo):
                cf[_u(out + ox)] = 0
            src = plane + iy * w + offx
            if sw == 1:                           # a contiguous copy
                for ox in range(lo, hi):
                    cf[_u(out + ox)] = xf[_u(src + ox)]
            else:
                for ox in range(lo, hi):
                    cf[_u(out + ox)] = xf[_u(src + ox * sw)]
            for ox in range(hi, wo):
                cf[_u(out + ox)] = 0
    return cols


@_serial_and_parallel
def _col2im(cols, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    """cols (N, C*kh*kw, ho*wo), C-contiguous -> x (N, C, h, w), summing overlaps; see
    reference.col2im.

    One thread owns one (sample, channel) plane and visits all kh*kw rows that write into
    it, so overlapping windows never race.
    """
    n = cols.shape[0]
    L = ho * wo
    x = np.zeros((n, c, h, w), dtype=cols.dtype)
    xf, cf = x.reshape(-1), cols.reshape(-1)
    for p in prange(n * c):                       # p = b * c + ch: one plane of x
        plane = p * h * w
        for i in range(kh):
            for j in range(kw):
                row = (p * kh + i) * kw + j       # row (b, ch, i, j) of cols
                offx = j * dw - pw
                lo, hi = _valid_range(offx, sw, w, wo)
                for oy in range(ho):
                    iy = oy * sh - ph + i * dh
                    if iy < 0 or iy >= h:
                        continue
                    src = row * L + oy * wo
                    dst = plane + iy * w + offx
                    if sw == 1:
                        for ox in range(lo, hi):
                            xf[_u(dst + ox)] += cf[_u(src + ox)]
                    else:
                        for ox in range(lo, hi):
                            xf[_u(dst + ox * sw)] += cf[_u(src + ox)]
    return x


# ---------------------------------------------------------------------- max pooling
@_serial_and_parallel
def _maxpool2x2(x, ho, wo):
    """2x2 windows, stride 2, no padding, every window fully inside the input."""
    n, c, h, w = x.shape
    y = np.empty((n, c, ho, wo), dtype=x.dtype)
    idx = np.empty((n, c, ho, wo), dtype=np.int64)
    for p in prange(n * c):
        b = p // c
        ch = p % c
        src = x[b, ch]
        for oy in range(ho):
            iy = 2 * oy
            for ox in range(wo):
                ix = 2 * ox
                best = src[iy, ix]
                where = iy * w + ix
                # The other three taps in scan order; only a larger value (or NaN) replaces.
                v = src[iy, ix + 1]
                if v > best or v != v:
                    best, where = v, iy * w + ix + 1
                v = src[iy + 1, ix]
                if v > best or v != v:
                    best, where = v, (iy + 1) * w + ix
                v = src[iy + 1, ix + 1]
                if v > best or v != v:
                    best, where = v, (iy + 1) * w + ix + 1
                y[b, ch, oy, ox] = best
                idx[b, ch, oy, ox] = where
    return y, idx


@_serial_and_parallel
def _maxpool_general(x, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    n, c, h, w = x.shape
    y = np.empty((n, c, ho, wo), dtype=x.dtype)
    idx = np.empty((n, c, ho, wo), dtype=np.int64)
    for p in prange(n * c):
        b = p // c
        ch = p % c
        src = x[b, ch]
        for oy in range(ho):
            for ox in range(wo):
                best = -np.inf
                where = -1
                for i in range(kh):
                    iy = oy * sh - ph + i * dh
                    if iy < 0 or iy >= h:
                        continue
                    for j in range(kw):
                        ix = ox * sw - pw + j * dw
                        if ix < 0 or ix >= w:
                            continue
                        v = src[iy, ix]
                        if where < 0 or v > best or v != v:
                            best = v
                            where = iy * w + ix
                y[b, ch, oy, ox] = best
                idx[b, ch, oy, ox] = where
    return y, idx


def maxpool2d_forward(x, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    """x (N, C, H, W) -> (y, idx int64), both (N, C, ho, wo); see reference.maxpool2d_forward."""
    h, w = x.shape[2], x.shape[3]
    if (kh == kw == 2 and sh == sw == 2 and ph == pw == 0 and dh == dw == 1
            and 2 * ho <= h and 2 * wo <= w):
        return _maxpool2x2.for_size(x.size)(x, ho, wo)
    return _maxpool_general.for_size(x.size)(x, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo)


@_serial_and_parallel
def _maxpool2d_backward(gy, idx, h, w):
    """gy, idx (N, C, ho, wo) -> gx (N, C, h, w); one thread per plane, so repeats add safely."""
    n, c, ho, wo = gy.shape
    gx = np.zeros((n, c, h * w), dtype=gy.dtype)
    for p in prange(n * c):
        b = p // c
        ch = p % c
        dst = gx[b, ch]
        g = gy[b, ch]
        where = idx[b, ch]
        for oy in range(ho):
            for ox in range(wo):
                if where[oy, ox] >= 0:       # -1: a window of padding only, no input pixel
                    dst[where[oy, ox]] += g[oy, ox]
    return gx.reshape(n, c, h, w)


@_serial_and_parallel
def _maxunpool2d_forward(x, idx, ho, wo):
    """x, idx (N, C, h, w) -> y (N, C, ho, wo): a scatter per plane, zeros elsewhere.

    Unpooling is already a single pass over the input, so the 2x2 case needs no special loop.
    """
    n, c, h, w = x.shape
    y = np.zeros((n, c, ho * wo), dtype=x.dtype)
    for p in prange(n * c):
        b = p // c
        ch = p % c
        dst = y[b, ch]
        src = x[b, ch]
        where = idx[b, ch]
        for iy in range(h):
            for ix in range(w):
                dst[where[iy, ix]] = src[iy, ix]
    return y.reshape(n, c, ho, wo)


@_serial_and_parallel
def _maxunpool2d_backward(gy, idx):
    """gy (N, C, ho, wo), idx (N, C, h, w) -> gx (N, C, h, w): a gather per plane."""
    n, c, ho, wo = gy.shape
    h, w = idx.shape[2], idx.shape[3]
    gx = np.empty((n, c, h, w), dtype=gy.dtype)
    for p in prange(n * c):
        b = p // c
        ch = p % c
        src = gy[b, ch].reshape(ho * wo)
        where = idx[b, ch]
        for iy in range(h):
            for ix in range(w):
                gx[b, ch, iy, ix] = src[where[iy, ix]]
    return gx


# ---------------------------------------------------------------------- bilinear resize
@njit(cache=True)
def _bilinear_weights(n_in, n_out, align_corners):
    """Per output coordinate: source indices i0, i1 and weights l0, l1 (reference.bilinear_weights)."""
    i0 = np.empty(n_out, dtype=np.int64)
    i1 = np.empty(n_out, dtype=np.int64)
    l0 = np.empty(n_out, dtype=np.float64)
    l1 = np.empty(n_out, dtype=np.float64)
    if align_corners:
        scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    else:
        scale = n_in / n_out
    for o in range(n_out):
        if align_corners:
            src = o * scale
        else:
            src = max((o + 0.5) * scale - 0.5, 0.0)
        a = min(int(np.floor(src)), n_in - 1)
        i0[o] = a
        i1[o] = min(a + 1, n_in - 1)
        frac = min(max(src - a, 0.0), 1.0)
        l0[o] = 1.0 - frac
        l1[o] = frac
    return i0, i1, l0, l1


@_serial_and_parallel
def _bilinear_forward(x, ho, wo, align_corners):
    """x (N, C, h, w) -> y (N, C, ho, wo)."""
    n, c, h, w = x.shape
    y0, y1, a0, a1 = _bilinear_weights(h, ho, align_corners)
    x0, x1, b0, b1 = _bilinear_weights(w, wo, align_corners)
    y = np.empty((n, c, ho, wo), dtype=x.dtype)
    for p in prange(n * c):
        b = p // c
        ch = p % c
        src = x[b, ch]
        for oy in range(ho):
            r0 = y0[oy]
            r1 = y1[oy]
            for ox in range(wo):
                top = b0[ox] * src[r0, x0[ox]] + b1[ox] * src[r0, x1[ox]]
                bottom = b0[ox] * src[r1, x0[ox]] + b1[ox] * src[r1, x1[ox]]
                y[b, ch, oy, ox] = a0[oy] * top + a1[oy] * bottom
    return y


@_serial_and_parallel
def _bilinear_backward(gy, h, w, align_corners):
    """gy (N, C, ho, wo) -> gx (N, C, h, w), the adjoint of bilinear_forward."""
    n, c, ho, wo = gy.shape
    y0, y1, a0, a1 = _bilinear_weights(h, ho, align_corners)
    x0, x1, b0, b1 = _bilinear_weights(w, wo, align_corners)
    gx = np.zeros((n, c, h, w), dtype=gy.dtype)
    for p in prange(n * c):
        b = p // c
        ch = p % c
        dst = gx[b, ch]
        for oy in range(ho):
            r0 = y0[oy]
            r1 = y1[oy]
            for ox in range(wo):
                g = gy[b, ch, oy, ox]
                dst[r0, x0[ox]] += a0[oy] * b0[ox] * g
                dst[r0, x1[ox]] += a0[oy] * b1[ox] * g
                dst[r1, x0[ox]] += a1[oy] * b0[ox] * g
                dst[r1, x1[ox]] += a1[oy] * b1[ox] * g
    return gx


# ---------------------------------------------------------------------- batch normalisation
# A loop over channels; each kernel makes the fewest passes over the data that its result
# allows (NumPy's version makes about three times as many, each a full read and write):
# stats two (mean, then squared deviations: the one-pass sum of squares loses digits),
# forward one, backward two (two channel sums, then gx). Sums are accumulated in float64.
# fastmath "reassoc" lets LLVM reorder those sums into SIMD lanes; the order is still
# fixed by the code, so results do not change from run to run. Serial (no prange): with
# minidl's one Numba thread a parallel loop only adds compile time (about 1.5 s per kernel,
# paid at every cold start).
@njit(cache=True, fastmath={"reassoc"})
def _batchnorm_stats(x):
    n, c, s = x.shape
    mean = np.empty(c, dtype=x.dtype)
    var = np.empty(c, dtype=x.dtype)
    for ch in range(c):
        total = 0.0
        for b in range(n):
            row = x[b, ch]
            for t in range(s):
                total += row[t]
        mu = total / (n * s)
        squares = 0.0
        for b in range(n):
            row = x[b, ch]
            for t in range(s):
                d = row[t] - mu
                squares += d * d
        mean[ch] = mu
        var[ch] = squares / (n * s)
    return mean, var


@njit(cache=True)
def _batchnorm_forward(x, mean, inv_std, scale, shift, relu):
    n, c, s = x.shape
    y = np.empty_like(x)
    xhat = np.empty_like(x)
    for ch in range(c):
        mu, k, a, b0 = mean[ch], inv_std[ch], scale[ch], shift[ch]
        for b in range(n):
            src, dst_hat, dst_y = x[b, ch], xhat[b, ch], y[b, ch]
            for t in range(s):
                v = (src[t] - mu) * k
                dst_hat[t] = v
                out = v * a + b0
                if relu and out < 0:          # the fused ReLU; NaN passes, as in NumPy
                    out = 0
                dst_y[t] = out
    return y, xhat


@njit(cache=True, fastmath={"reassoc"})
def _batchnorm_backward(gy, xhat, inv_std, scale, training, relu, shift):
    n, c, s = gy.shape
    gx = np.empty_like(gy)
    gscale = np.empty(c, dtype=gy.dtype)
    gshift = np.empty(c, dtype=gy.dtype)
    zero = gy.dtype.type(0)
    for ch in range(c):
        a, b0 = scale[ch], shift[ch]
        sum_g = 0.0
        sum_gx = 0.0
        for b in range(n):
            g, xh = gy[b, ch], xhat[b, ch]
            for t in range(s):
                gt = g[t]
                if relu and not xh[t] * a + b0 > 0:   # forward's ReLU output was 0 here
                    gt = zero
                sum_g += gt
                sum_gx += gt * xh[t]
        gshift[ch] = sum_g
        gscale[ch] = sum_gx
        k = a * inv_std[ch]
        mean_g = sum_g / (n * s) if training else 0.0
        mean_gx = sum_gx / (n * s) if training else 0.0
        for b in range(n):
            g, xh, out = gy[b, ch], xhat[b, ch], gx[b, ch]
            for t in range(s):
                gt = g[t]
                if relu and not xh[t] * a + b0 > 0:
                    gt = zero
                out[t] = k * (gt - mean_g - xh[t] * mean_gx)
    return gx, gscale, gshift


# ---------------------------------------------------------------------- Adam
# NumPy's version of an Adam step makes about a dozen passes over every parameter array,
# most of them writing temporaries; this loop reads p, g, m, v once and writes p, m, v once
# (it matters for big models: the U-Net of the benchmark has 31 million parameters).
# error_model="numpy": by default Numba follows Python and tests every division for a zero
# divisor (to raise ZeroDivisionError); that branch stops LLVM from vectorising the loop.
# Without it (the divisor here is sqrt(v) * c + eps > 0 anyway) the update runs on 8 floats
# at a time: 7.5x faster on the example U-Net's 121k parameters, bit for bit the same.
@njit(cache=True, error_model="numpy")
def _adam_update(p, g, m, v, v_max, amsgrad, coef):
    # coef = (beta1, 1 - beta1, beta2, 1 - beta2, step_size, 1 / bias2_sqrt, eps,
    # weight_decay) in the arrays' dtype (see adam_update): float32 parameters are updated
    # in float32 arithmetic, 8 to a SIMD register, and one array argument instead of eight
    # scalars keeps the call cheap for the many small parameters (biases, BN scales).
    beta1, one_minus_beta1, beta2, one_minus_beta2 = coef[0], coef[1], coef[2], coef[3]
    step_size, inv_bias2_sqrt, eps, weight_decay = coef[4], coef[5], coef[6], coef[7]
    for i in range(p.size):
        gi = g[i]
        if weight_decay != 0:
            gi += weight_decay * p[i]
        mi = beta1 * m[i] + one_minus_beta1 * gi
        vi = beta2 * v[i] + one_minus_beta2 * (gi * gi)
        m[i] = mi
        v[i] = vi
        if amsgrad:
            vi = max(v_max[i], vi)
            v_max[i] = vi
        p[i] -= step_size * mi / (np.sqrt(vi) * inv_bias2_sqrt + eps)


# ---------------------------------------------------------------------- the public entry points
# Thin wrappers with reference.py's signatures: they pick the serial or parallel variant.
def im2col(x, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    """x (N, C, H, W) -> cols (N, C*kh*kw, ho*wo); see reference.im2col."""
    x = np.ascontiguousarray(x)       # the kernel indexes the flat buffer
    return _im2col.for_size(x.shape[0] * x.shape[1] * kh * kw * ho * wo)(
        x, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo)


def col2im(cols, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    """cols (N, C*kh*kw, ho*wo) -> x (N, C, h, w), summing overlaps; see reference.col2im."""
    cols = np.ascontiguousarray(cols)
    return _col2im.for_size(cols.size)(cols, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo)


def maxpool2d_backward(gy, idx, h, w):
    """gy, idx (N, C, ho, wo) -> gx (N, C, h, w); see reference.maxpool2d_backward."""
    return _maxpool2d_backward.for_size(gy.shape[0] * gy.shape[1] * h * w)(gy, idx, h, w)


def maxunpool2d_forward(x, idx, ho, wo):
    """x, idx (N, C, h, w) -> y (N, C, ho, wo); see reference.maxunpool2d_forward."""
    return _maxunpool2d_forward.for_size(x.shape[0] * x.shape[1] * ho * wo)(x, idx, ho, wo)


def maxunpool2d_backward(gy, idx):
    """gy (N, C, ho, wo), idx (N, C, h, w) -> gx (N, C, h, w); see reference."""
    return _maxunpool2d_backward.for_size(idx.size)(gy, idx)


def bilinear_forward(x, ho, wo, align_corners):
    """x (N, C, h, w) -> y (N, C, ho, wo); see reference.bilinear_forward."""
    return _bilinear_forward.for_size(x.shape[0] * x.shape[1] * ho * wo)(
        x, ho, wo, bool(align_corners))


def bilinear_backward(gy, h, w, align_corners):
    """gy (N, C, ho, wo) -> gx (N, C, h, w); see reference.bilinear_backward."""
    return _bilinear_backward.for_size(gy.size)(gy, h, w, bool(align_corners))


def batchnorm_stats(x):
    """x (N, C, S) -> (mean, biased var), each (C,); see reference.batchnorm_stats."""
    return _batchnorm_stats(np.ascontiguousarray(x))


def batchnorm_forward(x, mean, inv_std, scale, shift, relu=False):
    """x (N, C, S), per-channel (C,) vectors -> (y, xhat); see reference.batchnorm_forward."""
    dt = x.dtype
    return _batchnorm_forward(np.ascontiguousarray(x), mean.astype(dt), inv_std.astype(dt),
                              scale.astype(dt), shift.astype(dt), bool(relu))


def batchnorm_backward(gy, xhat, inv_std, scale, training, relu_shift=None):
    """-> (gx, gscale, gshift); see reference.batchnorm_backward."""
    dt = gy.dtype
    relu = relu_shift is not None
    shift = relu_shift.astype(dt) if relu else scale.astype(dt)   # unread unless relu
    return _batchnorm_backward(np.ascontiguousarray(gy), np.ascontiguousarray(xhat, dtype=dt),
                               inv_std.astype(dt), scale.astype(dt), bool(training), relu, shift)


_adam_coef = {}    # the last step's coefficient array per (hyper-parameters, dtype)


def adam_update(p, g, m, v, v_max, amsgrad, beta1, beta2, step_size, bias2_sqrt, eps,
                weight_decay, found_inf=None):
    """In place on p, m, v (, v_max); see reference.adam_update. Non-contiguous state (never
    made by minidl's optimizers) falls back to the reference.

    Called once per parameter, so the Python here is kept to a few microseconds: every
    parameter of a step shares one coefficient array, built for the first of them."""
    if _skipped(found_inf):
        return
    if not (p.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous
            and (not amsgrad or v_max.flags.c_contiguous)):
        return reference.adam_update(p, g, m, v, v_max, amsgrad, beta1, beta2, step_size,
                                     bias2_sqrt, eps, weight_decay)
    key = (beta1, beta2, step_size, bias2_sqrt, eps, weight_decay, p.dtype)
    coef = _adam_coef.get(key)
    if coef is None:
        _adam_coef.clear()
        coef = _adam_coef[key] = np.array([beta1, 1 - beta1, beta2, 1 - beta2, step_size,
                                           1 / bias2_sqrt, eps, weight_decay], dtype=p.dtype)
    flat = p.reshape(-1)
    _adam_update(flat, np.ascontiguousarray(g, dtype=p.dtype).reshape(-1), m.reshape(-1),
                 v.reshape(-1), v_max.reshape(-1) if amsgrad else flat[:0], bool(amsgrad), coef)


def adam_update_at_step(p, g, m, v, v_max, amsgrad, beta1, beta2, lr, step, eps,
                        weight_decay, found_inf=None):
    """adam_update at the step count in the 0-d array `step`; see
    reference.adam_update_at_step (on the CPU the count is read as a number)."""
    t = float(step)
    adam_update(p, g, m, v, v_max, amsgrad, beta1, beta2, lr / (1 - beta1 ** t),
                math.sqrt(1 - beta2 ** t), eps, weight_decay, found_inf)


# SGD: a few NumPy in-place passes; called on one flat buffer of every parameter by the
# multi-tensor optimizers (minidl/optim/flat.py), so there is no per-parameter loop to compile.
def sgd_update(p, g, buf, first, lr, momentum, dampening, weight_decay, nesterov,
               found_inf=None):
    """In place on p (and buf); see reference.sgd_update."""
    if not _skipped(found_inf):
        reference.sgd_update(p, g, buf, first, lr, momentum, dampening, weight_decay, nesterov)


def _skipped(found_inf):
    # The GradScaler's inf/NaN flag (a 0-d array): on the CPU, reading it is no device sync.
    return found_inf is not None and found_inf != 0


# The GradScaler's unscale-and-check and scale update: a few NumPy operations on small or
# flat arrays, nothing to compile.
unscale_and_check = reference.unscale_and_check
update_scale = reference.update_scale


# ---------------------------------------------------------------------------- dense CRF
# The permutohedral lattice is an algorithm of its own, with its own modules (the oracle
# permutohedral_reference.py, permutohedral_cpu.py, permutohedral_gpu.py). Each bundle exposes
# its device's version, so that seg/crf picks it with kernels.for_array like every other kernel:
# PermutohedralLattice(features) is built once per image, softmax_rows(x, out) is the
# per-pixel softmax of a mean-field step.
from .permutohedral_cpu import PermutohedralLattice, softmax_rows  # noqa: E402,F401


# ---------------------------------------------------------------------------- fused epilogues
# Softmax cross-entropy and a conv's bias + ReLU are one kernel each on the GPU (to save
# launches); on the CPU NumPy's array expressions are as fast, so these are those, exactly
# as minidl's CrossEntropy and ReLU computed them before the GPU kernels existed.
def _target_positions(shape, target):
    """Flat indices of a[n, target[n, s], s] in an (N, C, S) array: one gather with them is
    3x faster than take_along_axis, which indexes every axis."""
    n, c, s = shape
    rows = np.arange(n).reshape(n, 1) * c + target
    return (rows * s + np.arange(s)).reshape(-1)


def cross_entropy_forward(x, target, weight):
    """x (N, C, S), target (N, S), weight (N, S) or None -> (loss (N, S), probs (N, C, S));
    see reference.cross_entropy_forward."""
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    picked = np.take(z.reshape(-1), _target_positions(x.shape, target)).reshape(target.shape)
    loss = np.log(s)[:, 0] - picked
    e /= s
    if weight is not None:
        loss *= weight
    return loss, e


def cross_entropy_backward(probs, target, coef, weight):
    """-> gx (N, C, S); see reference.cross_entropy_backward."""
    k = coef if weight is None else weight * coef
    positions = _target_positions(probs.shape, target)
    if getattr(k, "ndim", 0):
        g = probs * np.expand_dims(k, 1)
        g.reshape(-1)[positions] -= k.reshape(-1)
    else:
        g = probs * k
        g.reshape(-1)[positions] -= k
    return g


def bias_relu(y, bias):
    """y (N, C, S), bias (C,) or None -> max(y + bias, 0), in place on y (y is the conv's own
    output); see reference.bias_relu."""
    if bias is not None:
        y += bias.reshape(1, -1, 1)
    return np.maximum(y, y.dtype.type(0), out=y)


def relu_bias_backward(gy, y, bias_grad=True, channel_major=False):
    """-> (gx, gbias); see reference.relu_bias_backward. The bias gradient as a
    matrix-vector product (N*C, S) @ ones: 2-3x faster than NumPy's sum over axes (0, 2).
    (channel_major is for the bundles' parity: the CPU's conv plans never ask for it.)"""
    gx = gy * (y > 0)
    gb = None
    if bias_grad:
        n, c = gx.shape[:2]
        rows = gx.reshape(n * c, -1)
        gb = (rows @ np.ones(rows.shape[1], dtype=gx.dtype)).reshape(n, c).sum(axis=0)
    return (np.ascontiguousarray(gx.transpose(1, 0, 2)) if channel_major else gx), gb


def im2col_rows(x, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo):
    """x (N, C, H, W) -> cols (C*kh*kw, N*ho*wo); see reference.im2col_rows. (The CPU's conv
    plans sum the weight gradient per piece with batched products instead.)"""
    cols = im2col(x, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo)
    return np.ascontiguousarray(cols.transpose(1, 0, 2)).reshape(cols.shape[1], -1)


col2im_rows = reference.col2im_rows     # its adjoint (GPU only in the conv plans, too)


# bfloat16 rounding (autocast's casts): a few NumPy passes over the bits, as fast as a loop here.
round_bfloat16 = reference.round_bfloat16

# Class-id targets (the loss checks its host targets itself, in minidl/ops/loss.py).
class_targets = reference.class_targets
class_targets_record = reference.class_targets_record
