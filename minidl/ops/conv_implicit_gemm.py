"""The implicit-GEMM route of a convolution: kernels/implicit_gemm.py behind conv_plan's interface.

conv_plan.plan returns an `ImplicitGemmPlan` (kind "implicit_gemm") for a GPU conv when the
settings or the automatic rule ask for one (see conv_plan.implicit_gemm_precision). It has
the four methods of every plan, so conv.py's Functions run it unchanged:

    forward(x, W)            y  = conv2d(x, W)                     kernel "fwd"
    input_grad(gy, W, shape) gx = the adjoint of forward in x      kernel "dgrad"
    weight_grad(x, gy, ...)  gW = the adjoint of forward in W      kernel "wgrad"
    backward(...)            both, as asked

No column matrix exists on this route, so forward keeps none: the Functions then keep x for
the weight gradient, which reads it again through the gathers.

The kernels take float32 arrays only (their tensor-core modes round while loading a tile).
Any other dtype (float64 in gradient checks, a float16 array from user code) goes to the
im2col plan this plan holds as `fallback`, call by call; so does a weight gradient asked
for with columns that a fallback forward kept. `precision` ("highest", "tf32", "bf16",
"fp16") is fixed when the plan is made, during forward: backward runs outside autocast but
in the precision forward chose, as PyTorch's autocast does for convolutions.
"""
import warnings

import numpy as np

from kernels import implicit_gemm


class ImplicitGemmPlan:
    """One conv layer on the implicit-GEMM kernels. geom: the Geometry; precision: the
    kernels' mode; fallback: the conv_plan.ConvPlan for arrays the kernels do not take."""

    kind = "implicit_gemm"

    def __init__(self, geom, precision, fallback):
        implicit_gemm.check_precision(precision)
        self.geom, self.precision, self.fallback = geom, precision, fallback
        self.device = fallback.device
        g = geom
        self.strides = (g.sh, g.sw, g.ph, g.pw, g.dh, g.dw)   # the kernels' geometry arguments

    def __repr__(self):
        return f"ImplicitGemmPlan(precision={self.precision!r}, device={self.device!r})"

    @staticmethod
    def takes(*arrays):
        """Whether the kernels take these arrays (float32 only)."""
        return all(a.dtype == np.float32 for a in arrays)

    def forward(self, x, weight, keep_columns=False):
        """y = conv2d(x, weight) without bias: x (N, C, H, W) -> (N, C_out, ho, wo);
        (y, None) with keep_columns (no columns exist to keep)."""
        if not self.takes(x, weight):
            return self.fallback.forward(x, weight, keep_columns)
        g = self.geom
        try:
            y = implicit_gemm.conv2d_forward(x, weight, *self.strides, g.ho, g.wo, g.groups,
                                             self.precision)
        except implicit_gemm.KernelsUnavailable as exc:
            _warn_unavailable(exc)
            return self.fallback.forward(x, weight, keep_columns)
        return (y, None) if keep_columns else y

    def input_grad(self, gy, weight, in_shape, weight_grad=None):
        """gy (N, C_out, ho, wo) -> gx of in_shape (N, C, H, W). (weight_grad: the row
        route's hook, unused here as on every route but that one.)"""
        if not self.takes(gy, weight):
            return self.fallback.input_grad(gy, weight, in_shape)
        try:
            return implicit_gemm.conv2d_input_grad(gy, weight, in_shape[2], in_shape[3],
                                                   *self.strides, self.geom.groups, self.precision)
        except implicit_gemm.KernelsUnavailable as exc:
            _warn_unavailable(exc)
            return self.fallback.input_grad(gy, weight, in_shape)

    def weight_grad(self, x, gy, w_shape, cols=None):
        """x (N, C, H, W), gy (N, C_out, ho, wo) -> gW of w_shape (C_out, C/G, kh, kw).
        cols: columns a fallback forward kept (then the fallback sums them)."""
        if cols is not None or not self.takes(x, gy):
            return self.fallback.weight_grad(x, gy, w_shape, cols)
        g = self.geom
        try:
            return implicit_gemm.conv2d_weight_grad(x, gy, g.kh, g.kw, *self.strides, g.groups,
                                                    self.precision)
        except implicit_gemm.KernelsUnavailable as exc:
            _warn_unavailable(exc)
            return self.fallback.weight_grad(x, gy, w_shape, cols)

    def backward(self, gy, weight, x, cols, x_shape, w_shape, need_x, need_w):
        """Both gradients of y = conv2d(x, weight) -> (gx or None, gW or None)."""
        arrays = [a for a in (gy, weight if need_x else None, x if need_w else None)
                  if a is not None]
        if cols is not None or not self.takes(*arrays):
            return self.fallback.backward(gy, weight, x, cols, x_shape, w_shape, need_x, need_w)
        gx = self.input_grad(gy, weight, x_shape) if need_x else None
        gw = self.weight_grad(x, gy, w_shape) if need_w else None
        return gx, gw


_warned = set()     # precisions whose fallback has been announced


def _warn_unavailable(exc):
    """Say once per precision, in one line, that its kernels did not compile and why."""
    if exc.precision not in _warned:
        _warned.add(exc.precision)
        warnings.warn(f"implicit-GEMM {exc.precision!r} kernels unavailable ({exc.reason}); "
                      "using the im2col route instead (docs/PERFORMANCE.md, what ptxas says)", RuntimeWarning, stacklevel=3)
