"""2-D convolution and transposed convolution, both built on one im2col / col2im pair.

Convolution as a matrix product. im2col unfolds every receptive window of x (N, C, H, W)
into a column: cols[n] is (K, L) with K = C*kh*kw rows ordered (c, i, j) and L = ho*wo
columns. With W = weight.reshape(C_out, K):

    conv forward              y[n]  = W @ cols[n]                   (C_out, L) = NCHW already
    conv input gradient       gx[n] = col2im(W.T @ gy[n])           col2im = adjoint of im2col
    conv weight gradient      gW    = sum_n gy[n] @ cols[n].T
    transposed conv forward   = the conv input gradient             (it *is* conv's adjoint)
    transposed conv backward  = conv forward (for x) and the conv weight gradient with the
                                roles of input and output swapped (for the weight)

so three routines (forward, input_grad, weight_grad) serve both Functions. `Im2col` below
is them as written here, on the whole column matrix at once. Groups split K and C_out into
`groups` independent blocks; the (c, i, j) row order keeps each group's rows contiguous, so
a group is just one more batch axis of the matmul: (G, C_out/G, K/G) @ (N, G, K/G, L).

The column matrix is kh*kw times bigger than the input, and with few channels writing it
costs more than the GEMM, so by default the Functions run the same three routines from a
plan of conv_plan.py: in pieces, on row columns, with the input gradient as a convolution
of gy, keeping small column matrices for backward. `conv_plan.plan` picks per layer and
device; `conv_plan.settings.algorithm = "plain"` runs `Im2col` instead. Argument checks and
output sizes are in geometry.py.
"""
from .. import backend
from ..function import Function
from ..tensor import Tensor
from . import conv_plan
from .geometry import (Geometry, conv2d_geometry, conv_output_size,  # noqa: F401
                       conv_transpose2d_geometry, conv_transpose_output_size)
import kernels


# ---------------------------------------------------------------------- the plain path
def columns(x, geom):
    """im2col: x (N, C, H, W) -> cols (N, G, K/G, L); column (oy, ox) is output pixel
    (oy, ox)'s receptive window, rows (c, i, j) as the weight's."""
    xp = backend.get_array_module(x)
    cols = kernels.for_array(x).im2col(xp.ascontiguousarray(x), *geom.args(), geom.ho, geom.wo)
    return cols.reshape(x.shape[0], geom.groups, -1, geom.ho * geom.wo)


class Im2col:
    """The textbook route: the whole column matrix, one matrix product per routine.

    Same methods as conv_plan.ConvPlan (the Functions call either). geom: the Geometry.
    """

    def __init__(self, geom):
        self.geom = geom

    def forward(self, x, weight, keep_columns=False):
        """y = conv2d(x, weight) without bias: x (N, C, H, W) -> (N, C_out, ho, wo);
        (y, cols) with keep_columns, cols (N, G, K/G, L) for weight_grad."""
        geom, (n, c_out) = self.geom, (x.shape[0], weight.shape[0])
        cols = columns(x, geom)                                       # (N, G, K/G, L)
        W = weight.reshape(geom.groups, c_out // geom.groups, -1)     # (G, C_out/G, K/G)
        y = W @ cols                                                  # (N, G, C_out/G, L)
        y = y.reshape(n, c_out, geom.ho, geom.wo)
        return (y, cols) if keep_columns else y

    def input_grad(self, gy, weight, x_shape):
        """gx = col2im(W.T @ gy): gy (N, C_out, ho, wo) -> gx of x_shape (N, C, H, W)."""
        geom, (n, c, h, w) = self.geom, x_shape
        L = geom.ho * geom.wo
        W = weight.reshape(geom.groups, weight.shape[0] // geom.groups, -1)
        gcols = W.transpose(0, 2, 1) @ gy.reshape(n, geom.groups, -1, L)   # (N, G, K/G, L)
        return kernels.for_array(gy).col2im(gcols.reshape(n, -1, L), c, h, w, *geom.args(),
                                            geom.ho, geom.wo)

    def weight_grad(self, x, gy, w_shape, cols=None):
        """gW = sum_n gy[n] @ cols[n].T: x (N, C, H, W), gy (N, C_out, ho, wo) -> w_shape.
        cols: what forward kept, else rebuilt from x."""
        geom = self.geom
        cols = columns(x, geom) if cols is None else cols             # (N, G, K/G, L)
        gy = gy.reshape(gy.shape[0], geom.groups, -1, geom.ho * geom.wo)
        gw = (gy @ cols.transpose(0, 1, 3, 2)).sum(axis=0)            # (G, C_out/G, K/G)
        return gw.reshape(w_shape)

    def backward(self, gy, weight, x, cols, x_shape, w_shape, need_x, need_w):
        """Both gradients of y = conv2d(x, weight) -> (gx or None, gW or None)."""
        gx = self.input_grad(gy, weight, x_shape) if need_x else None
        gw = self.weight_grad(x, gy, w_shape, cols) if need_w else None
        return gx, gw


def plan_for(geom, x_shape, c_out, x):
    """How the conv geom from x_shape (N, C, H, W) to c_out channels runs where array x
    lives: a conv_plan.ConvPlan, or Im2col when the settings ask for the plain path."""
    return conv_plan.plan(geom, x_shape, c_out, backend.device_of(x)) or Im2col(geom)


# ---------------------------------------------------------------------- Functions
def _bias_grad(gy):
    """gy (N, C, H, W) -> (C,): the sum over everything but the channel axis, as a
    matrix-vector product (N*C, H*W) @ ones: 2-3x faster than NumPy's sum over axes (0, 2, 3).
    On the GPU the sum is one reduction kernel; the product would be three launches (the
    ones' fill, the product, the sum over N)."""
    xp = backend.get_array_module(gy)
    if backend.is_gpu_array(gy):
        return gy.sum(axis=(0, 2, 3))
    n, c = gy.shape[:2]
    rows = xp.ascontiguousarray(gy).reshape(n * c, -1)
    return (rows @ xp.ones(rows.shape[1], dtype=gy.dtype)).reshape(n, c).sum(axis=0)


class Conv2d(Function):
    """y = conv2d(x, weight) + bias. Params: geom (Geometry), relu (then y = max(y, 0):
    conv2d_relu, the bias and the ReLU one pass over y, one kernel on the GPU)."""
    relu = False

    def forward(self, x, weight, bias=None):
        need = self.needs_input_grad
        need_w = len(need) > 1 and need[1]
        self.plan = plan_for(self.geom, x.shape, weight.shape[0], x)
        # Keep only what backward uses: for the weight gradient x's columns when the plan
        # keeps them (small layers), else x itself; the weight for x's gradient.
        if need_w:
            y, self.cols = self.plan.forward(x, weight, keep_columns=True)
        else:
            y, self.cols = self.plan.forward(x, weight), None
        self.x = x if need_w and self.cols is None else None
        self.weight = weight if need and need[0] else None
        self.x_shape, self.w_shape = x.shape, weight.shape
        if self.relu:
            return self._bias_relu(y, bias)
        if bias is not None:
            y += bias.reshape(1, -1, 1, 1)
        return y

    def _bias_relu(self, y, bias):
        """The epilogue of conv2d_relu: y (N, C_out, ho, wo) -> max(y + bias, 0); keeps y,
        whose sign is the ReLU's mask in backward."""
        n, c = y.shape[:2]
        y = kernels.for_array(y).bias_relu(y.reshape(n, c, -1), bias).reshape(y.shape)
        self.y = y if self.needs_input_grad else None
        return y

    def backward(self, gy):
        need = self.needs_input_grad
        gy = backend.get_array_module(gy).ascontiguousarray(gy)   # once, for all three
        gb = None
        channel_major = False
        if self.relu:   # through the ReLU first: the masked gradient and the bias gradient
            n, c = gy.shape[:2]
            # Written as (C, N, ...) where the plan multiplies with that layout (GPU).
            channel_major = (isinstance(self.plan, conv_plan.ConvPlan) and self.cols is None
                             and self.plan.folds(n, gy.dtype))
            gy, gb = kernels.for_array(gy).relu_bias_backward(
                gy.reshape(n, c, -1), self.y.reshape(n, c, -1), len(need) > 2 and need[2],
                channel_major)
            gy = gy.reshape((c, n) + self.y.shape[2:] if channel_major else self.y.shape)
        args = (gy, self.weight, self.x, self.cols, self.x_shape, self.w_shape, need[0], need[1])
        gx, gw = (self.plan.backward(*args, channel_major=True) if channel_major
                  else self.plan.backward(*args))
        if not self.relu:
            gb = _bias_grad(gy) if len(need) > 2 and need[2] else None
        return gx, gw, gb


class ConvTranspose2d(Function):
    """y = conv_transpose2d(x, weight) + bias. Params: geom (of the adjoint conv), out_shape."""

    def forward(self, x, weight, bias=None):
        need = self.needs_input_grad
        self.x = x if len(need) > 1 and need[1] else None
        self.weight = weight if need and need[0] else None
        self.x_shape, self.w_shape = x.shape, weight.shape
        # The adjoint conv maps y-space (out_shape) to x-space: weight read as (C_in, C_out/G, ..).
        self.plan = plan_for(self.geom, self.out_shape, weight.shape[0], x)
        y = self.plan.input_grad(x, weight, self.out_shape)
        if bias is not None:
            y += bias.reshape(1, -1, 1, 1)
        return y

    def backward(self, gy):
        need = self.needs_input_grad
        gy = backend.get_array_module(gy).ascontiguousarray(gy)   # once, for all three
        gx = cols = None
        if need[0] and need[1]:   # gy's columns, once for both products when they are small
            gx, cols = self.plan.forward(gy, self.weight, keep_columns=True)
        elif need[0]:
            gx = self.plan.forward(gy, self.weight)
        # The weight is shared with the adjoint conv that maps y-space to x-space, so its
        # gradient is that conv's weight gradient with input gy and output gradient x.
        gw = (self.plan.weight_grad(gy, self.x, self.w_shape, cols=cols)
              if need[1] else None)
        gb = _bias_grad(gy) if len(need) > 2 and need[2] else None
        return gx, gw, gb


# ---------------------------------------------------------------------- public functions
def _data(t):
    return t.data if isinstance(t, Tensor) else t


def _check_bias(op, bias, c_out):
    if bias is not None and tuple(_data(bias).shape) != (c_out,):
        raise ValueError(f"{op}: bias must have shape ({c_out},) (one value per output "
                         f"channel), got {tuple(_data(bias).shape)}.")


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D cross-correlation, as torch.nn.functional.conv2d.

    x: (N, C_in, H, W); weight: (C_out, C_in / groups, kh, kw); bias: (C_out,) or None.
    stride, padding, dilation: int or (h, w); padding may also be "valid" or "same".
    Returns (N, C_out, H_out, W_out) with H_out = floor((H + 2p - d(kh-1) - 1) / s) + 1.
    """
    geom = conv2d_geometry(tuple(_data(x).shape), tuple(_data(weight).shape), stride, padding,
                           dilation, groups)
    _check_bias("conv2d", bias, _data(weight).shape[0])
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return Conv2d.apply(*inputs, geom=geom)


def conv2d_relu(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """relu(conv2d(x, weight, bias, ...)) as one op: the bias and the ReLU are one pass over
    the conv's output (one kernel on the GPU instead of three), and in backward the ReLU's
    mask and the bias gradient are one more (instead of four). Arguments and shapes as
    conv2d. (PyTorch has no such function; torch.ao.nn.intrinsic.ConvReLU2d is its module.)
    """
    geom = conv2d_geometry(tuple(_data(x).shape), tuple(_data(weight).shape), stride, padding,
                           dilation, groups)
    _check_bias("conv2d_relu", bias, _data(weight).shape[0])
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return Conv2d.apply(*inputs, geom=geom, relu=True)


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1):
    """Transposed convolution (the adjoint of conv2d in its input), as torch's.

    x: (N, C_in, H, W); weight: (C_in, C_out / groups, kh, kw); bias: (C_out,) or None.
    Returns (N, C_out, H_out, W_out), H_out = (H - 1)s - 2p + d(kh-1) + output_padding + 1.
    """
    xs, ws = tuple(_data(x).shape), tuple(_data(weight).shape)
    geom, out = conv_transpose2d_geometry(xs, ws, stride, padding, output_padding, groups,
                                          dilation)
    c_out = ws[1] * groups
    _check_bias("conv_transpose2d", bias, c_out)
    inputs = (x, weight) if bias is None else (x, weight, bias)
    return ConvTranspose2d.apply(*inputs, geom=geom, out_shape=(xs[0], c_out) + out)
