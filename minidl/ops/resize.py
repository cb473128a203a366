"""Resizing feature maps: `interpolate` with "nearest" and "bilinear", as torch's.

Output size: `size`, or floor(in * scale_factor) per axis.

nearest: output index o reads input floor(o * scale) (clamped to in - 1), where scale is
1 / scale_factor when a scale factor was given and in / out otherwise (torch's rule). It is
separable, so forward is a gather with one index array per axis and backward a scatter-add
with the same arrays (several outputs may read one input).

bilinear: the kernels (kernels/*.bilinear_*) follow torch's source-coordinate rules for both
align_corners settings, computing the scale as in / out. torch instead uses 1 / scale_factor
when a scale factor is given (unless recompute_scale_factor=True); the two agree whenever
in * scale_factor is a whole number, which covers the usual 2x, 4x, 8x.
"""
import math

import numpy

from .. import backend
from ..function import Function
from ..tensor import Tensor
from .shape import scatter_add
import kernels


def nearest_indices(n_in, n_out, scale_factor=None):
    """Source index for each output position along one axis (int64, numpy)."""
    if n_out == n_in:
        return numpy.arange(n_out)
    # torch computes this in float32; doing the same keeps rare rounding cases identical.
    scale = numpy.float32(1.0 / scale_factor if scale_factor else n_in / n_out)
    src = numpy.floor(numpy.arange(n_out, dtype=numpy.float32) * scale).astype(numpy.int64)
    return numpy.minimum(src, n_in - 1)


def integer_factor(index, n_in):
    """s when `index` (numpy) is o // s for an output of exactly n_in * s, otherwise None."""
    s = len(index) // n_in
    if s >= 1 and len(index) == n_in * s and numpy.array_equal(index, numpy.arange(len(index)) // s):
        return s
    return None


class Nearest(Function):
    """Params: rows (ho,), cols (wo,) index arrays on x's device; factors: (sh, sw) when the
    output is exactly an integer multiple of the input (each input pixel an s x s block)."""

    def forward(self, x):
        self.in_shape = x.shape
        return x[:, :, self.rows][:, :, :, self.cols]

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        n, c, h, w = self.in_shape
        if self.factors is not None:
            # Each input pixel fed one sh x sw block: sum the blocks (deterministic, and a
            # plain reduction instead of two scatter-adds).
            sh, sw = self.factors
            return gy.reshape(n, c, h, sh, w, sw).sum(axis=(3, 5))
        across = xp.zeros((n, c, gy.shape[2], w), dtype=gy.dtype)
        scatter_add(across, (slice(None), slice(None), slice(None), self.cols), gy)
        gx = xp.zeros(self.in_shape, dtype=gy.dtype)
        scatter_add(gx, (slice(None), slice(None), self.rows), across)
        return gx


class Bilinear(Function):
    """Params: out_hw, align_corners."""

    def forward(self, x):
        xp = backend.get_array_module(x)
        self.in_hw = x.shape[2:]
        return kernels.for_array(x).bilinear_forward(xp.ascontiguousarray(x), *self.out_hw,
                                                     self.align_corners)

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        return kernels.for_array(gy).bilinear_backward(xp.ascontiguousarray(gy), *self.in_hw,
                                                       self.align_corners)


def interpolate(x, size=None, scale_factor=None, mode="nearest", align_corners=None):
    """Resize x (N, C, H, W) to `size` (int or (H, W)) or by `scale_factor` (number or pair).

    mode: "nearest" or "bilinear". align_corners (bilinear only, default False): True lines
    up the corner pixels of input and output, False their pixel grids (half-pixel centres).
    """
    xa = x.data if isinstance(x, Tensor) else x
    if xa.ndim != 4:
        raise ValueError(f"interpolate: input must be 4-D (N, C, H, W), got shape "
                         f"{tuple(xa.shape)}.")
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"interpolate: mode must be 'nearest' or 'bilinear', got {mode!r}.")
    if mode == "nearest" and align_corners is not None:
        raise ValueError("interpolate: align_corners can only be set with mode='bilinear'.")
    if (size is None) == (scale_factor is None):
        raise ValueError("interpolate: give exactly one of size and scale_factor.")
    h, w = xa.shape[2:]
    scales = (None, None)
    if size is not None:
        out = tuple(int(s) for s in size) if isinstance(size, (tuple, list)) else (int(size),) * 2
        if len(out) != 2:
            raise ValueError(f"interpolate: size must be an int or (H, W), got {size!r}.")
    else:
        scales = (tuple(float(s) for s in scale_factor) if isinstance(scale_factor, (tuple, list))
                  else (float(scale_factor),) * 2)
        if len(scales) != 2 or min(scales) <= 0:
            raise ValueError(f"interpolate: scale_factor must be a positive number or pair, got "
                             f"{scale_factor!r}.")
        out = (int(math.floor(h * scales[0])), int(math.floor(w * scales[1])))
    if min(out) <= 0:
        raise ValueError(f"interpolate: the output size {out} must be positive (input {h}x{w}).")
    if mode == "nearest":
        xp = backend.get_array_module(xa)
        rows, cols = nearest_indices(h, out[0], scales[0]), nearest_indices(w, out[1], scales[1])
        factors = (integer_factor(rows, h), integer_factor(cols, w))
        return Nearest.apply(x, rows=xp.asarray(rows), cols=xp.asarray(cols),
                             factors=None if None in factors else factors)
    return Bilinear.apply(x, out_hw=out, align_corners=bool(align_corners))

