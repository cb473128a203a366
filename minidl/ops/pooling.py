"""Pooling: max (with argmax "switches"), max-unpooling, average and adaptive average.

Sizes follow torch's pooling arithmetic (`pool_output_size` in geometry.py, with ceil_mode);
padding may be at most half the kernel. The kernels get ho/wo explicitly and treat
everything outside the input as padding, so ceil_mode's extra window needs no special case.
"""
import numpy

from .. import backend, device_checks
from ..function import Function
from ..tensor import Tensor
from .geometry import check_4d, pair, pool_geometry, pool_output_size  # noqa: F401
import kernels


def _data(t):
    return t.data if isinstance(t, Tensor) else t


# ---------------------------------------------------------------------- max pooling
class MaxPool2d(Function):
    """Params: geom = (kh, kw, sh, sw, ph, pw, dh, dw, ho, wo). Leaves `idx` for the caller."""

    def forward(self, x):
        xp = backend.get_array_module(x)
        # The kernels take float32/float64; a maximum is exact in any dtype, so float16 (from
        # autocast) is pooled in float32 and handed back as float16, unchanged.
        y, self.idx = kernels.for_array(x).maxpool2d_forward(
            xp.ascontiguousarray(x, dtype=_kernel_dtype(x)), *self.geom)
        self.in_hw = x.shape[2:]
        return y.astype(x.dtype, copy=False)

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        gx = kernels.for_array(gy).maxpool2d_backward(
            xp.ascontiguousarray(gy, dtype=_kernel_dtype(gy)), self.idx, *self.in_hw)
        return gx.astype(gy.dtype, copy=False)


def _kernel_dtype(a):
    return numpy.float32 if a.dtype == numpy.float16 else a.dtype


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """Max over windows, as torch.nn.functional.max_pool2d.

    x: (N, C, H, W) -> y (N, C, H_out, W_out); with return_indices also the int64 indices
    (N, C, H_out, W_out) of each maximum as h*W + w inside its input plane (first maximum wins
    ties), which max_unpool2d takes back.
    """
    geom = pool_geometry("max_pool2d", _data(x).shape, kernel_size, stride, padding,
                          dilation, ceil_mode)
    fn = MaxPool2d(geom=geom)
    y = fn(x)
    if return_indices:
        return y, Tensor(fn.idx)
    return y


class MaxUnpool2d(Function):
    """Params: idx (N, C, h, w) int64, out_hw. The indices get no gradient."""

    def forward(self, x):
        xp = backend.get_array_module(x)
        return kernels.for_array(x).maxunpool2d_forward(xp.ascontiguousarray(x), self.idx,
                                                        *self.out_hw)

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        return kernels.for_array(gy).maxunpool2d_backward(xp.ascontiguousarray(gy), self.idx)


def max_unpool2d(x, indices, kernel_size, stride=None, padding=0, output_size=None):
    """Partial inverse of max_pool2d (SegNet / DeconvNet unpooling), as torch's.

    x, indices: (N, C, h, w), indices from max_pool2d(..., return_indices=True).
    Returns (N, C, H, W) holding x at the indexed positions and zeros elsewhere. Default
    H = (h - 1) * stride - 2 * padding + kernel_size; output_size ((H, W) or a full
    (N, C, H, W)) picks another size within one stride of it, e.g. to undo pooling of an
    odd-sized map.
    """
    op = "max_unpool2d"
    xa, idx = _data(x), _data(indices)
    check_4d(xa, "input", op, "(N, C, h, w)")
    kernel = pair(kernel_size, "kernel_size", op)
    stride = kernel if stride is None else pair(stride, "stride", op)
    padding = pair(padding, "padding", op)
    h, w = xa.shape[2:]
    default = tuple((s - 1) * st - 2 * p + k for s, st, p, k in zip((h, w), stride, padding, kernel))
    if output_size is None:
        out = default
    else:
        out = tuple(int(v) for v in tuple(output_size)[-2:])
        if len(tuple(output_size)) not in (2, 4):
            raise ValueError(f"{op}: output_size must be (H, W) or (N, C, H, W), got {output_size!r}.")
        for size, d, st in zip(out, default, stride):
            if not d - st < size < d + st:
                raise ValueError(f"{op}: output_size {out} is not within one stride {stride} of "
                                 f"the default size {default}.")
    if tuple(idx.shape) != tuple(xa.shape):
        raise ValueError(f"{op}: indices shape {tuple(idx.shape)} must equal the input shape "
                         f"{tuple(xa.shape)}.")
    if idx.dtype.kind not in "iu":
        raise TypeError(f"{op}: indices must be integers (from max_pool2d with "
                        f"return_indices=True), got dtype {idx.dtype}.")
    xp = backend.get_array_module(xa)
    idx = xp.ascontiguousarray(idx, dtype=numpy.int64)
    if idx.size:
        size = out[0] * out[1]

        def error(lo, hi):
            return ValueError(f"{op}: indices must lie in [0, {size}) for an output of "
                              f"{out[0]}x{out[1]}, got the range [{lo}, {hi}]; pass the "
                              "output_size of the map that was pooled.")
        bounds = xp.stack([idx.min(), idx.max()])
        if xp is numpy:
            lo, hi = (int(v) for v in bounds)
            if lo < 0 or hi >= size:
                raise error(lo, hi)
        else:
            # No device-to-host read (a stall, and refused inside a CUDA graph): the range is
            # checked at the next host read, and meanwhile clipped so no write goes astray.
            failed = (bounds[0] < 0) | (bounds[1] >= size)
            record = xp.concatenate([failed.reshape(1).astype(numpy.int64), bounds])
            device_checks.defer((op, "indices", size), record, error)
            idx = xp.clip(idx, 0, size - 1)
    return MaxUnpool2d.apply(x, idx=idx, out_hw=out)


# ---------------------------------------------------------------------- average pooling
def _avg_divisor(h, w, geom, count_include_pad):
    """Per output position, the number torch divides the window sum by, (ho*wo,) float64.

    count_include_pad: the window clipped to the padded input (padding counts, whatever
    ceil_mode adds beyond it does not); otherwise only the input pixels it covers.
    """
    kh, kw, sh, sw, ph, pw, _, _, ho, wo = geom

    def one_axis(n_out, size, k, s, p):
        start = numpy.arange(n_out) * s - p
        end = numpy.minimum(start + k, size + p)
        padded = end - start
        inside = numpy.minimum(end, size) - numpy.maximum(start, 0)
        return padded, inside
    ph_, ih = one_axis(ho, h, kh, sh, ph)
    pw_, iw = one_axis(wo, w, kw, sw, pw)
    div = numpy.outer(ph_, pw_) if count_include_pad else numpy.outer(ih, iw)
    return div.reshape(-1).astype(numpy.float64)


class AvgPool2d(Function):
    """Params: geom (as MaxPool2d, dilation 1), count_include_pad."""

    def forward(self, x):
        xp = backend.get_array_module(x)
        kh, kw, sh, sw, ph, pw, _, _, ho, wo = self.geom
        n, c, h, w = self.shape = x.shape
        self.plain = ph == pw == 0 and (sh, sw) == (kh, kw) and ho * kh <= h and wo * kw <= w
        if self.plain:   # non-overlapping windows inside the input: a reshape and a mean
            return x[:, :, :ho * kh, :wo * kw].reshape(n, c, ho, kh, wo, kw).mean(axis=(3, 5))
        self.div = xp.asarray(_avg_divisor(h, w, self.geom, self.count_include_pad), dtype=x.dtype)
        planes = xp.ascontiguousarray(x).reshape(n * c, 1, h, w)
        cols = kernels.for_array(x).im2col(planes, kh, kw, sh, sw, ph, pw, 1, 1, ho, wo)
        return (cols.sum(axis=1) / self.div).reshape(n, c, ho, wo)

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        kh, kw, sh, sw, ph, pw, _, _, ho, wo = self.geom
        n, c, h, w = self.shape
        if self.plain:
            gx = xp.zeros(self.shape, dtype=gy.dtype)
            share = gy[:, :, :, None, :, None] / gy.dtype.type(kh * kw)   # per pixel
            gx[:, :, :ho * kh, :wo * kw] = xp.broadcast_to(share, (n, c, ho, kh, wo, kw)).reshape(
                n, c, ho * kh, wo * kw)
            return gx
        share = (gy.reshape(n * c, 1, ho * wo) / self.div).astype(gy.dtype)
        gcols = xp.ascontiguousarray(xp.broadcast_to(share, (n * c, kh * kw, ho * wo)))
        gx = kernels.for_array(gy).col2im(gcols, 1, h, w, kh, kw, sh, sw, ph, pw, 1, 1, ho, wo)
        return gx.reshape(self.shape)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """Mean over windows, as torch.nn.functional.avg_pool2d (no divisor_override).

    x: (N, C, H, W) -> (N, C, H_out, W_out).
    """
    geom = pool_geometry("avg_pool2d", _data(x).shape, kernel_size, stride, padding, 1,
                          ceil_mode)
    return AvgPool2d.apply(x, geom=geom, count_include_pad=bool(count_include_pad))


# ---------------------------------------------------------------------- adaptive average
def adaptive_ranges(size, n_out):
    """torch's adaptive pooling windows along one axis: [floor(i*size/n), ceil((i+1)*size/n))."""
    starts = [(i * size) // n_out for i in range(n_out)]
    ends = [-((-(i + 1) * size) // n_out) for i in range(n_out)]
    return starts, ends


def _averaging_matrix(size, n_out):
    """(n_out, size) matrix whose row i averages window i: pooling = P_h @ x @ P_w.T."""
    m = numpy.zeros((n_out, size))
    for i, (a, b) in enumerate(zip(*adaptive_ranges(size, n_out))):
        m[i, a:b] = 1.0 / (b - a)
    return m


class AdaptiveAvgPool2d(Function):
    """Params: out_hw. An average over a rectangle is separable, so the op is two matmuls."""

    def forward(self, x):
        xp = backend.get_array_module(x)
        h, w = x.shape[2:]
        self.ph = xp.asarray(_averaging_matrix(h, self.out_hw[0]), dtype=x.dtype)
        self.pw = xp.asarray(_averaging_matrix(w, self.out_hw[1]), dtype=x.dtype)
        return xp.matmul(self.ph, xp.matmul(x, self.pw.T))

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        return xp.matmul(self.ph.T, xp.matmul(gy, self.pw))


def adaptive_avg_pool2d(x, output_size):
    """Average pooling to a fixed output size, as torch's (windows may overlap or differ in size).

    x: (N, C, H, W); output_size: int or (H_out, W_out), None keeping that input size.
    """
    xa = _data(x)
    check_4d(xa, "input", "adaptive_avg_pool2d", "(N, C, H, W)")
    if isinstance(output_size, (tuple, list)):
        if len(output_size) != 2:
            raise ValueError(f"adaptive_avg_pool2d: output_size must be an int or (H, W), got "
                             f"{output_size!r}.")
        out = tuple(s if o is None else int(o) for o, s in zip(output_size, xa.shape[2:]))
    else:
        out = (int(output_size),) * 2
    if min(out) <= 0:
        raise ValueError(f"adaptive_avg_pool2d: output_size must be positive, got {out}.")
    return AdaptiveAvgPool2d.apply(x, out_hw=out)
