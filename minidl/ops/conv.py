"""2-D convolution and transposed convolution, both built on one im2col / col2im pair.

Convolution as a matrix product. im2col unfolds every receptive window of x (N, C, H, W)
into a column: cols[n] is (K, L) with K = C*kh*kw rows ordered (c, i, j) and L = ho*wo
columns. With W2 = weight.reshape(C_out, K):

    conv forward              y[n]  = W2 @ cols[n]                  (C_out, L) = NCHW already
    conv input gradient       gx[n] = col2im(W2.T @ gy[n])          col2im = adjoint of im2col
                              (stride 1 and C_out < C: a conv of gy with the flipped kernel,
                              see _adjoint_geometry; it moves less memory)
    conv weight gradient      gW    = sum_n gy[n] @ cols[n].T       (computed as its transpose)
    transposed conv forward   = the conv input gradient             (it *is* conv's adjoint)
    transposed conv backward  = conv forward (for x) and the conv weight gradient with the
                                roles of input and output swapped (for the weight)

so three array routines below (`conv_forward`, `conv_input_grad`, `conv_weight_grad`) serve
both Functions. On the CPU, stride-1 convs with few channels take the "row route" (see
`_row_route`): im2col along the width only, and the kernel rows as one GEMM of stacked
weights whose shifted windows are summed. Groups split K and C_out into `groups` independent blocks; the (c, i, j)
row order keeps each group's rows contiguous, so a group is just one more batch axis of
the matmul: (G, C_out/G, K/G) @ (n, G, K/G, L).

Memory. The column buffer is kh*kw times bigger than the input (a 3x3 conv on a
64 x 572 x 572 U-Net map needs 750 MB), so a big layer never keeps it from forward to
backward (recomputing it is cheap next to the GEMM) and builds it in chunks. A small layer
(all its columns within KEEP_COLUMNS_BYTES) is different: with few channels its GEMM is
about as cheap as im2col itself, so Conv2d keeps the columns for the weight gradient
(measured on the example's U-Net: a training step 5-7% faster for 8 MiB, 5% more for
16 MiB, about 60 MB in all), and
ConvTranspose2d's backward unfolds its output gradient once for both of its products.
Chunks are whole samples while
they fit in COLUMN_BUFFER_BYTES, otherwise bands of output rows of one sample. The bound
applies to one column buffer (and the equally sized column gradient in backward); it is
exceeded only when a single output row of one sample is larger than it. On the GPU the
bounds are GPU_COLUMN_BUFFER_BYTES / GPU_TARGET_COLUMNS (big pieces, few GEMM launches).

Piece size: about TARGET_COLUMNS (4096) output pixels, capped at COLUMN_BUFFER_BYTES
(16 MiB). 4096 columns keep the GEMM efficient while the columns im2col has just written are
still in the cache when the GEMM reads them; small images are grouped by whole samples
instead. Buffers below glibc's 32 MiB mmap ceiling are recycled by malloc from call to call,
while bigger ones are fresh pages that the kernel must fault in and zero on every call
(measured on the 2-core box: 63 MiB chunks made im2col ~5x slower per byte than 16 MiB ones).
"""
import functools
import operator

from .. import backend
from ..function import Function
from ..tensor import Tensor
import kernels

# Upper bound on one layer's column buffer (im2col output, or its gradient), in bytes.
COLUMN_BUFFER_BYTES = 16 * 2 ** 20
# Output pixels per piece: enough for an efficient GEMM, few enough that the columns are
# still in cache when the GEMM reads them right after im2col wrote them.
TARGET_COLUMNS = 4096
# On the GPU there is no cache to stay in and every GEMM launch has a fixed cost, so the
# pieces are as big as memory comfortably allows (a U-Net level-0 layer is one GEMM, not 80).
GPU_COLUMN_BUFFER_BYTES = 512 * 2 ** 20
GPU_TARGET_COLUMNS = 1 << 30
# A conv layer whose whole column matrix is at most this big keeps it for backward (CPU only:
# on the GPU im2col is cheap next to everything else).
KEEP_COLUMNS_BYTES = 16 * 2 ** 20


# ---------------------------------------------------------------------- argument checking
def memoize_geometry(check):
    """Cache a geometry function's result per argument tuple.

    A model calls each layer with the same shapes every step, and checking the arguments
    costs 10-60 microseconds a call in Python. Arguments that cannot be hashed (a list as
    stride, say) skip the cache. Errors are not cached: bad input raises every time.
    """
    cached = functools.lru_cache(maxsize=1024)(check)

    @functools.wraps(check)
    def lookup(*args, **kwargs):
        try:
            hash((args, tuple(kwargs.values())))
        except TypeError:
            return check(*args, **kwargs)
        return cached(*args, **kwargs)
    return lookup


def _pair(value, name, op):
    """An int or a pair of ints -> (int, int), with an error naming `op` and `name`."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{op}: {name} must be an int or a pair (h, w), got {value!r}.")
        items = value
    else:
        items = (value, value)
    try:
        return tuple(operator.index(v) for v in items)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}.") from None


class Geometry:
    """Everything the kernels need about one convolution, height values first.

    kh, kw kernel; sh, sw stride; ph, pw padding before; dh, dw dilation; ho, wo the conv's
    output size (for a transposed conv: its input size); groups.
    """
    __slots__ = ("kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw", "ho", "wo", "groups")

    def __init__(self, kernel, stride, padding, dilation, out, groups):
        (self.kh, self.kw), (self.sh, self.sw) = kernel, stride
        (self.ph, self.pw), (self.dh, self.dw) = padding, dilation
        (self.ho, self.wo), self.groups = out, groups

    def args(self):
        return (self.kh, self.kw, self.sh, self.sw, self.ph, self.pw, self.dh, self.dw)

    def __repr__(self):
        return "Geometry(" + ", ".join(f"{k}={getattr(self, k)}" for k in self.__slots__) + ")"


def conv_output_size(size, kernel, stride=1, padding=0, dilation=1):
    """torch.nn.Conv2d's formula along one axis: floor((size + 2p - d(k-1) - 1) / s) + 1."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_transpose_output_size(size, kernel, stride=1, padding=0, output_padding=0, dilation=1):
    """torch.nn.ConvTranspose2d's formula: (size - 1)s - 2p + d(k-1) + output_padding + 1."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def _check_4d(x, name, op, layout):
    """x: an array or anything with .shape."""
    if len(x.shape) != 4:
        raise ValueError(f"{op}: {name} must be 4-D {layout}, got shape {tuple(x.shape)}; "
                         "add a batch axis with x.reshape(1, *x.shape) for a single image.")


def _check_common(op, x_shape, w_shape, stride, dilation, groups):
    """Checks shared by conv2d and conv_transpose2d; returns (stride, dilation) as pairs."""
    for name, shape, layout in (("input", x_shape, "(N, C, H, W)"),
                                ("weight", w_shape, "(C_out, C_in / groups, kh, kw)" if
                                 op == "conv2d" else "(C_in, C_out / groups, kh, kw)")):
        if len(shape) != 4:
            raise ValueError(f"{op}: {name} must be 4-D {layout}, got shape {tuple(shape)}; "
                             "add a batch axis with x.reshape(1, *x.shape) for a single image.")
    stride = _pair(stride, "stride", op)
    dilation = _pair(dilation, "dilation", op)
    if min(stride) <= 0:
        raise ValueError(f"{op}: stride must be positive, got {stride}.")
    if min(dilation) <= 0:
        raise ValueError(f"{op}: dilation must be positive, got {dilation}.")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}.")
    return stride, dilation


@memoize_geometry
def conv2d_geometry(x_shape, w_shape, stride=1, padding=0, dilation=1, groups=1):
    """Check conv2d's arguments against the shapes and return its Geometry (shared between
    calls with the same arguments: treat it as read-only)."""
    op = "conv2d"
    stride, dilation = _check_common(op, x_shape, w_shape, stride, dilation, groups)
    n, c, h, w = x_shape
    c_out, c_in_g, kh, kw = w_shape
    if c % groups or c_out % groups:
        raise ValueError(f"{op}: groups={groups} must divide both the input channels ({c}) and "
                         f"the output channels ({c_out}).")
    if c != c_in_g * groups:
        raise ValueError(f"{op}: input has {c} channels but the weight {tuple(w_shape)} expects "
                         f"{c_in_g * groups} (weight.shape[1]={c_in_g} x groups={groups}).")
    eff = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1)   # dilated kernel extent
    if isinstance(padding, str):
        if padding == "valid":
            padding, out = (0, 0), None
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{op}: padding='same' needs stride 1 (as in PyTorch), got "
                                 f"stride {stride}; give the padding as numbers instead.")
            # Total padding eff-1 per axis; an odd total puts the extra row/column at the end,
            # which the kernels get by being asked for ho = h rows (they pad with zeros).
            padding, out = ((eff[0] - 1) // 2, (eff[1] - 1) // 2), (h, w)
        else:
            raise ValueError(f"{op}: padding must be an int, a pair, 'same' or 'valid', "
                             f"got {padding!r}.")
    else:
        padding, out = _pair(padding, "padding", op), None
        if min(padding) < 0:
            raise ValueError(f"{op}: padding must be non-negative, got {padding}.")
    if out is None:
        if h + 2 * padding[0] < eff[0] or w + 2 * padding[1] < eff[1]:
            raise ValueError(f"{op}: kernel {kh}x{kw} with dilation {dilation} spans "
                             f"{eff[0]}x{eff[1]} pixels, more than the padded input "
                             f"{h + 2 * padding[0]}x{w + 2 * padding[1]} (input {h}x{w}, "
                             f"padding {padding}).")
        out = tuple(conv_output_size(s, k, st, p, d) for s, k, st, p, d in
                    zip((h, w), (kh, kw), stride, padding, dilation))
    return Geometry((kh, kw), stride, padding, dilation, out, groups)


@memoize_geometry
def conv_transpose2d_geometry(x_shape, w_shape, stride=1, padding=0, output_padding=0,
                              groups=1, dilation=1):
    """Check conv_transpose2d's arguments; returns (Geometry, output (H, W)).

    The Geometry describes the *forward* convolution whose adjoint this is: its output size
    (ho, wo) is the transposed conv's input size.
    """
    op = "conv_transpose2d"
    stride, dilation = _check_common(op, x_shape, w_shape, stride, dilation, groups)
    n, c, h, w = x_shape
    c_in, c_out_g, kh, kw = w_shape
    if isinstance(padding, str):
        raise ValueError(f"{op}: padding must be an int or a pair (as in PyTorch), got {padding!r}.")
    padding = _pair(padding, "padding", op)
    output_padding = _pair(output_padding, "output_padding", op)
    if min(padding) < 0 or min(output_padding) < 0:
        raise ValueError(f"{op}: padding and output_padding must be non-negative, got "
                         f"{padding} and {output_padding}.")
    if c_in % groups:
        raise ValueError(f"{op}: groups={groups} must divide the input channels ({c_in}).")
    if c != c_in:
        raise ValueError(f"{op}: input has {c} channels but the weight {tuple(w_shape)} "
                         f"expects {c_in} (weight.shape[0]).")
    for op_, s, d in zip(output_padding, stride, dilation):
        if op_ >= s and op_ >= d:
            raise ValueError(f"{op}: output_padding {output_padding} must be smaller than "
                             f"either the stride {stride} or the dilation {dilation}.")
    out = tuple(conv_transpose_output_size(s, k, st, p, o, d) for s, k, st, p, o, d in
                zip((h, w), (kh, kw), stride, padding, output_padding, dilation))
    if min(out) <= 0:
        raise ValueError(f"{op}: the output size {out} is not positive (input {h}x{w}, kernel "
                         f"{kh}x{kw}, stride {stride}, padding {padding}, dilation {dilation}); "
                         "reduce the padding.")
    return Geometry((kh, kw), stride, padding, dilation, (h, w), groups), out


# ---------------------------------------------------------------------- the three routines
def _chunks(n, ho, wo, row_bytes, device="cpu", kernel_rows=1):
    """Split (samples, output rows) into pieces (n0, n1, r0, r1) for the column buffer.

    row_bytes: bytes of the column buffer for one output row of one sample. A piece covers
    about TARGET_COLUMNS output pixels (whole samples when they are that small), and never
    more than COLUMN_BUFFER_BYTES unless one output row alone is larger. device "gpu" uses
    the GPU_ bounds instead. kernel_rows: the row route's kh, whose columns are kh times
    smaller per pixel, so its pieces cover kh times as many pixels (measured: 4% faster).
    """
    if device == "gpu":
        budget, target = GPU_COLUMN_BUFFER_BYTES, GPU_TARGET_COLUMNS
    else:
        budget, target = COLUMN_BUFFER_BYTES, TARGET_COLUMNS * kernel_rows
    max_rows = max(1, budget // row_bytes)
    rows = min(max_rows, max(1, -(-target // wo)))
    if rows >= ho:                      # whole samples, several per piece when they are small
        step = max(1, min(max_rows // ho, -(-target // (ho * wo))))
        for n0 in range(0, n, step):
            yield n0, min(n, n0 + step), 0, ho
    else:                               # bands of output rows of one sample
        for b in range(n):
            for r0 in range(0, ho, rows):
                yield b, b + 1, r0, min(ho, r0 + rows)


def _band(g, h, r0, r1):
    """Input rows [a, b) that output rows [r0, r1) read, and the padding left above row a."""
    start = r0 * g.sh - g.ph
    a = min(max(0, start), h)
    b = max(a, min(h, (r1 - 1) * g.sh - g.ph + (g.kh - 1) * g.dh + 1))
    return a, b, a - start


def _columns(x, g, n0, n1, r0, r1):
    """im2col of samples n0:n1 for output rows r0:r1 -> (n, K, (r1-r0)*wo).

    A band of rows is asked for by moving the padding: with ph - r0*sh (negative past the
    top) the kernel's first output row is row r0, and rows outside the image read zeros, so
    no band of x is copied (that copy cost 2% of the big U-Net's step).
    """
    return kernels.for_array(x).im2col(x[n0:n1], g.kh, g.kw, g.sh, g.sw, g.ph - r0 * g.sh,
                                       g.pw, g.dh, g.dw, r1 - r0, g.wo)


def _weight_blocks(weight, groups):
    """weight (C_out, C_in/G, kh, kw) -> (G, C_out/G, K/G), a view."""
    c_out = weight.shape[0]
    return weight.reshape(groups, c_out // groups, -1)


def _is_pointwise(g, in_hw):
    """A 1x1 conv with stride 1 and no padding: the input already is its column matrix."""
    return (g.kh == g.kw == 1 and g.sh == g.sw == 1 and g.ph == g.pw == 0
            and (g.ho, g.wo) == tuple(in_hw))


# ---------------------------------------------------------------------- the row route
# A conv with vertical stride 1 (every 3x3 conv of U-Net, SegNet, DeepLab's atrous convs)
# can unfold only along the width. Its "row columns" are im2col with a 1 x kw kernel over
# ho + (kh-1)*dh rows: B[(c, j), (r, ox)] holds x[c, r - ph, ox*sw + j*dw - pw]. The
# kh*kw-tap column matrix is then kh overlapping windows of B, one per kernel row i,
# shifted by i*dh rows:
#
#     y[o, (oy, ox)] = sum_i  W_i[o, (c, j)] @ B[(c, j), (oy + i*dh, ox)]
#
# so one GEMM of the stacked weights (kh*C_out, C*kw) @ B gives all kh partial products,
# and y is the sum of their shifted windows. B is kh times smaller than the full columns,
# which matters where writing the columns to memory, not the GEMM, sets the pace: few
# output channels on large maps. It costs (kh-1)*dh extra rows of GEMM and a pass over the
# kh partial products, which is a loss on small maps and for wide layers (compute-bound).
# Measured per layer, forward + backward, 2-core CPU (rows route speed / full im2col):
#
#     C -> C_out on N x H x W          rows/full      C -> C_out on N x H x W     rows/full
#     8 -> 8 on 4 x 64 x 88            1.05           64 -> 64 on 1 x 256^2       0.98
#     16 -> 8 on 4 x 64 x 88           1.22           128 -> 64 on 1 x 256^2      1.19
#     32 -> 16 on 4 x 32 x 44          1.24           128 -> 128 on 1 x 128^2     1.02
#     64 -> 32 on 4 x 16 x 22          1.08           256 -> 256 on 1 x 64^2      1.05
#     64 -> 64 on 4 x 8 x 11           0.82           512 -> 512 on 1 x 32^2      0.88
#     1 -> 64 on 1 x 256^2             0.18           1024 -> 1024 on 1 x 16^2    0.66
#
# (forward and weight gradient on the row route), hence the rule below. With the input
# gradient on it too (conv_input_grad), interleaved A/B runs of a training step gave the
# example U-Net 13-20% and the big U-Net 8% (its layers of <= 256 channels on large maps).
# CPU only: on the GPU im2col is cheap next to the GEMM, and this was not measured there.
def _row_route(g, c_in, c_out, device):
    return (ROW_COLUMNS and device == "cpu" and g.sh == 1 and g.kh > 1
            and c_in // g.groups >= ROW_MIN_CHANNELS and c_out <= ROW_MAX_OUT_CHANNELS
            and (g.kh - 1) * g.dh <= ROW_MAX_EXTRA_SHARE * g.ho)


def _row_geometry(g):
    """The im2col geometry of g's row columns: kernel (1, kw) over ho + (kh-1)*dh rows."""
    return Geometry((1, g.kw), (1, g.sw), (g.ph, g.pw), (1, g.dw),
                    (g.ho + (g.kh - 1) * g.dh, g.wo), g.groups)


def _stacked_weights(weight, groups):
    """(C_out, C/G, kh, kw) -> (G, kh*C_out/G, C/G*kw): rows (i, o), columns (c, j)."""
    xp = backend.get_array_module(weight)
    c_out, c_in_g, kh, kw = weight.shape
    w = weight.reshape(groups, c_out // groups, c_in_g, kh, kw).transpose(0, 3, 1, 2, 4)
    return xp.ascontiguousarray(w).reshape(groups, kh * (c_out // groups), c_in_g * kw)


ROW_COLUMNS = True            # False: every conv takes the full im2col route (to compare)
ROW_MIN_CHANNELS = 4          # input channels per group at least this (the GEMM's K is C*kw)
ROW_MAX_OUT_CHANNELS = 256    # wider layers are compute-bound: the full route is faster
ROW_MAX_EXTRA_SHARE = 1 / 8   # the (kh-1)*dh extra rows at most this share of the output's


def conv_forward(x, weight, g, keep_columns=False):
    """y = conv2d(x, weight) without bias, as arrays. x (N, C, H, W) -> (N, C_out, ho, wo).

    keep_columns: also return the column matrix (N, G, K/G, L) for conv_weight_grad when the
    layer is small enough (see KEEP_COLUMNS_BYTES), else None: returns (y, cols) then. On
    the row route (see above) the kept matrix is the row columns (N, G, C/G*kw, rows*wo).
    """
    xp = backend.get_array_module(x)
    x, weight = xp.ascontiguousarray(x), xp.ascontiguousarray(weight)
    device = backend.device_of(x)
    n, c = x.shape[:2]
    G, c_out = g.groups, weight.shape[0]
    cog, wo, L = c_out // G, g.wo, g.ho * g.wo
    y = xp.empty((n, G, cog, L), dtype=xp.result_type(x.dtype, weight.dtype))
    if _is_pointwise(g, x.shape[2:]):
        xp.matmul(_weight_blocks(weight, G), x.reshape(n, G, c // G, L), out=y)
        y = y.reshape(n, c_out, g.ho, wo)
        return (y, None) if keep_columns else y
    if _row_route(g, c, c_out, device):
        unfold, extra, w_mat = _row_geometry(g), (g.kh - 1) * g.dh, _stacked_weights(weight, G)
    else:
        unfold, extra, w_mat = g, 0, _weight_blocks(weight, G)
    k = c * unfold.kh * unfold.kw

    def piece(n0, n1, r0, r1):
        """y for samples n0:n1, output rows r0:r1; returns the columns it used."""
        cols = _columns(x, unfold, n0, n1, r0, r1 + extra).reshape(n1 - n0, G, k // G, -1)
        out = y[n0:n1, :, :, r0 * wo:r1 * wo]
        if not extra:
            xp.matmul(w_mat, cols, out=out)
            return cols
        z = xp.matmul(w_mat, cols)          # (n, G, kh*C_out/G, rows*wo): all kernel rows
        l, step = (r1 - r0) * wo, g.dh * wo
        xp.add(z[:, :, :cog, :l], z[:, :, cog:2 * cog, step:step + l], out=out)
        for i in range(2, g.kh):
            out += z[:, :, i * cog:(i + 1) * cog, i * step:i * step + l]
        return cols

    kept = None
    keep_bound = min(KEEP_COLUMNS_BYTES, COLUMN_BUFFER_BYTES)
    if keep_columns and device == "cpu" and n * k * unfold.ho * wo * x.itemsize <= keep_bound:
        kept = piece(0, n, 0, g.ho)
    else:
        for n0, n1, r0, r1 in _chunks(n, g.ho, wo, k * wo * x.itemsize, device,
                                      g.kh if extra else 1):
            piece(n0, n1, r0, r1)
    y = y.reshape(n, c_out, g.ho, wo)
    return (y, kept) if keep_columns else y


def _adjoint_geometry(g, in_hw):
    """The Geometry of the stride-1 conv that computes this conv's input gradient, or None.

    With stride 1, y[o] = sum_i w[i] x[o + d*i - p] has the adjoint
    gx[t] = sum_i w[k-1-i] gy[t + d*i - p'] with p' = d*(k-1) - p: a convolution of gy
    with the flipped kernel, padded by p' before (and cut to x's size after). It needs
    p' >= 0, i.e. padding at most the dilated kernel's reach, true of every layer in seg/.
    """
    if (g.sh, g.sw) != (1, 1):
        return None
    padding = (g.dh * (g.kh - 1) - g.ph, g.dw * (g.kw - 1) - g.pw)
    if min(padding) < 0:
        return None
    return Geometry((g.kh, g.kw), (1, 1), padding, (g.dh, g.dw), tuple(in_hw), g.groups)


def _adjoint_weight(weight, groups):
    """weight (C_out, C/G, kh, kw) -> (C, C_out/G, kh, kw): each group's block transposed
    (input and output channels swap roles) and the kernel flipped in both axes."""
    xp = backend.get_array_module(weight)
    c_out, c_in_g, kh, kw = weight.shape
    blocks = weight.reshape(groups, c_out // groups, c_in_g, kh, kw).transpose(0, 2, 1, 3, 4)
    return xp.ascontiguousarray(blocks[..., ::-1, ::-1]).reshape(groups * c_in_g,
                                                                 c_out // groups, kh, kw)


# When a stride-1 conv has fewer output than input channels (U-Net's decoder convs after
# the concatenation, 2C -> C), its input gradient is computed as a convolution of gy: im2col
# of gy, then a GEMM whose output is gx itself. The usual W2.T @ gy then col2im writes and
# re-reads a column matrix of C*kh*kw rows; this one has C_out*kh*kw rows, read once.
# Measured per layer on the 2-core box: 1.2-1.6x faster for C_out = C/2, about even for
# C_out = C, 0.6-0.8x for C_out = 2C (hence the rule); with the row route (above) the
# example U-Net's step is still 1-2% faster with it than without. CPU only, like the row
# route: not yet measured on a GPU, where col2im is the route the README's figures used.
# Set to False to compare.
ADJOINT_AS_CONV = True


def _shifted_rows(gy_p, g, span):
    """The row route's stack of gy: gy_p (n, G, C_out/G, rows*wo) -> (n, G, kh*C_out/G,
    span*wo) whose block i holds gy_p moved down by i*dh rows (zeros elsewhere), so that
    (stacked weights).T @ it and it @ (row columns).T sum over the kernel rows in one GEMM."""
    xp = backend.get_array_module(gy_p)
    m, G, cog, l = gy_p.shape
    out = xp.empty((m, G, g.kh * cog, span * g.wo), dtype=gy_p.dtype)
    for i in range(g.kh):
        block, start = out[:, :, i * cog:(i + 1) * cog], i * g.dh * g.wo
        block[..., :start] = 0
        block[..., start:start + l] = gy_p
        block[..., start + l:] = 0
    return out


def conv_input_grad(gy, weight, g, in_shape, weight_grad=None):
    """The adjoint of conv_forward in x: gy (N, C_out, ho, wo) -> gx of in_shape (N, C, H, W).

    weight_grad: a _WeightGrad to feed with the row route's shifted stacks of gy as they are
    built (Conv2d.backward: one stack per piece for both gradients); it stays unfed on the
    other routes.
    """
    xp, kern = backend.get_array_module(gy), kernels.for_array(gy)
    gy, weight = xp.ascontiguousarray(gy), xp.ascontiguousarray(weight)
    device = backend.device_of(gy)
    n, c, h, w = in_shape
    G, c_out = g.groups, weight.shape[0]
    adjoint = (_adjoint_geometry(g, (h, w)) if ADJOINT_AS_CONV and device == "cpu"
               and c_out < c and not _is_pointwise(g, (h, w)) else None)
    if adjoint is not None:
        return conv_forward(gy, _adjoint_weight(weight, G), adjoint)
    L, wo = g.ho * g.wo, g.wo
    gy_blocks = gy.reshape(n, G, c_out // G, L)
    dtype = xp.result_type(gy.dtype, weight.dtype)
    if _is_pointwise(g, (h, w)):
        w_t = _weight_blocks(weight, G).transpose(0, 2, 1)
        return xp.matmul(w_t, gy_blocks).reshape(in_shape)
    # The column gradient W2.T @ gy, folded back onto the pixels by col2im; on the row route
    # the (smaller) row-column gradient, from the stacked weights and gy's shifted stack.
    if _row_route(g, c, c_out, device):
        unfold, extra = _row_geometry(g), (g.kh - 1) * g.dh
        w_t = _stacked_weights(weight, G).transpose(0, 2, 1)       # (G, C/G*kw, kh*C_out/G)
    else:
        unfold, extra = g, 0
        w_t = _weight_blocks(weight, G).transpose(0, 2, 1)         # (G, K/G, C_out/G), a view
    k = c * unfold.kh * unfold.kw
    pieces = list(_chunks(n, g.ho, wo, k * wo * xp.dtype(dtype).itemsize, device,
                          g.kh if extra else 1))
    gx = None if len(pieces) == 1 else xp.zeros(in_shape, dtype=dtype)
    for n0, n1, r0, r1 in pieces:
        gy_p = gy_blocks[n0:n1, :, :, r0 * wo:r1 * wo]
        if extra:
            gy_p = _shifted_rows(gy_p, g, r1 - r0 + extra)
            if weight_grad is not None:
                weight_grad.add(gy_p, n0, n1, r0, r1, shifted=True)
        gcols = xp.matmul(w_t, gy_p).reshape(n1 - n0, k, -1)
        if r0 == 0 and r1 == g.ho:
            part = kern.col2im(gcols, c, h, w, *unfold.args(), unfold.ho, wo)
            if gx is None:
                return part
            gx[n0:n1] = part
        else:
            a, b, top = _band(unfold, h, r0, r1 + extra)
            if b > a:    # bands overlap by the kernel's reach: add, do not assign
                gx[n0:n1, :, a:b] += kern.col2im(gcols, c, b - a, w, unfold.kh, unfold.kw,
                                                 unfold.sh, unfold.sw, top, unfold.pw,
                                                 unfold.dh, unfold.dw, r1 + extra - r0, wo)
    return gx


class _WeightGrad:
    """d<gy, conv2d(x, W)>/dW, summed piece by piece: x (N, C, H, W) -> (C_out, C/G, kh, kw).

    cols: the columns conv_forward kept (same geometry, so the same route); else each
    piece's columns are rebuilt from x. `add` takes gy for samples n0:n1, output rows r0:r1;
    on the row route it may get gy's shifted stack (built by conv_input_grad) instead.

    The sum is kept as gW itself, (G, rows*C_out/G, K/G) with rows = kh on the row route
    (its stacked kernel rows) and 1 otherwise, or, for a full-route layer of at most
    TRANSPOSED_MAX_OUT output channels on the CPU, as its transpose (G, K/G, C_out/G):
    cols @ gy.T puts the long K side first, where OpenBLAS's kernels want it (gy @ cols.T ran
    1.3-1.7x slower on the example U-Net's 8-32-channel layers). A wide layer keeps gW's own
    layout: turning a transposed sum back costs a strided copy of the whole weight (7% of the
    big U-Net's step). The GPU keeps it too (cuBLAS was not measured either way).
    """
    TRANSPOSED_MAX_OUT = 32

    def __init__(self, x, g, w_shape, cols, device, dtype):
        xp = self.xp = backend.get_array_module(x if cols is None else cols)
        self.x, self.g, self.w_shape, self.cols, self.device = x, g, w_shape, cols, device
        G, cog = g.groups, w_shape[0] // g.groups
        if cols is None and _is_pointwise(g, x.shape[2:]):
            self.unfold, self.extra = None, 0
        elif _row_route(g, w_shape[1] * G, w_shape[0], device):
            self.unfold, self.extra = _row_geometry(g), (g.kh - 1) * g.dh
        else:
            self.unfold, self.extra = g, 0
        taps = g.kh * g.kw if self.unfold is None else self.unfold.kh * self.unfold.kw
        self.k = w_shape[1] * G * taps
        self.fed = False
        self.rows = g.kh if self.extra else 1
        self.transposed = (device == "cpu" and not self.extra
                           and cog <= self.TRANSPOSED_MAX_OUT)
        shape = (G, self.k // G, cog) if self.transposed else (G, self.rows * cog, self.k // G)
        self.gw = xp.zeros(shape, dtype=dtype)

    def columns(self, n0, n1, r0, r1):
        """The columns of samples n0:n1, output rows r0:r1: (n, G, K/G, rows*wo)."""
        G, wo, k, xp = self.g.groups, self.g.wo, self.k, self.xp
        if self.cols is not None:               # kept by conv_forward
            return self.cols[n0:n1, :, :, r0 * wo:(r1 + self.extra) * wo]
        if self.unfold is None:                 # 1x1: the input is its own column matrix
            x = xp.ascontiguousarray(self.x[n0:n1]).reshape(n1 - n0, G, k // G, -1)
            return x[..., r0 * wo:r1 * wo]
        x = self.x = xp.ascontiguousarray(self.x)
        return _columns(x, self.unfold, n0, n1, r0, r1 + self.extra).reshape(
            n1 - n0, G, k // G, -1)

    def add(self, gy_p, n0, n1, r0, r1, shifted=False):
        """gy_p: gy (n, G, C_out/G, rows*wo) of those samples and rows, or (shifted=True, row
        route only) its shifted stack."""
        xp, G, self.fed = self.xp, self.g.groups, True
        cols_p = self.columns(n0, n1, r0, r1)
        if self.extra and not shifted:
            # The row route: gy's rows shifted by each kernel row i, stacked (i, o), so one
            # product gives every kernel row's gradient.
            gy_p = _shifted_rows(gy_p, self.g, cols_p.shape[-1] // self.g.wo)
        a, b = (cols_p, gy_p) if self.transposed else (gy_p, cols_p)
        if self.device == "cpu":
            # One batched product (NumPy hands each sample's transposed view to BLAS as a
            # transpose flag), then the sum over samples.
            self.gw += xp.matmul(a, b.transpose(0, 1, 3, 2)).sum(axis=0)
        elif G == 1:
            # 2-D products per sample: the .T of a C-contiguous matrix is F-contiguous, which
            # cuBLAS takes as a transpose flag, so nothing is copied (CuPy's batched matmul
            # copies a transposed view); the temporary stays small.
            for s in range(n1 - n0):
                self.gw[0] += xp.matmul(a[s, 0], b[s, 0].T)
        else:   # grouped convs: small blocks, one batched product per sample
            for s in range(n1 - n0):
                self.gw += xp.matmul(a[s], b[s].transpose(0, 2, 1))

    def add_all(self, gy):
        """Every piece of gy (N, C_out, ho, wo): kept or 1x1 columns in one, else chunks."""
        g, n = self.g, gy.shape[0]
        gy_blocks = gy.reshape(n, g.groups, -1, g.ho * g.wo)
        if self.cols is not None or self.unfold is None:
            self.add(gy_blocks, 0, n, 0, g.ho)
            return
        for n0, n1, r0, r1 in _chunks(n, g.ho, g.wo, self.k * g.wo * self.x.itemsize,
                                      backend.device_of(self.x), g.kh if self.extra else 1):
            self.add(gy_blocks[n0:n1, :, :, r0 * g.wo:r1 * g.wo], n0, n1, r0, r1)

    def result(self):
        G, c_out, c_in_g = self.g.groups, self.w_shape[0], self.w_shape[1]
        cog, taps = c_out // G, self.k // G // c_in_g      # taps: kh*kw, or kw (row route)
        if self.transposed:                     # (G, C/G * taps, C_out/G)
            gw = self.gw.reshape(G, c_in_g, taps, cog).transpose(0, 3, 1, 2)
        else:                                   # (G, rows * C_out/G, C/G * taps)
            gw = self.gw.reshape(G, self.rows, cog, c_in_g, taps).transpose(0, 2, 3, 1, 4)
        return self.xp.ascontiguousarray(gw).reshape(self.w_shape)


def conv_weight_grad(x, gy, g, w_shape, cols=None):
    """d<gy, conv2d(x, W)>/dW: x (N, C, H, W), gy (N, C_out, ho, wo) -> (C_out, C/G, kh, kw).

    cols: the columns conv_forward kept (same geometry, so the same route); else rebuilt.
    """
    xp = backend.get_array_module(gy)
    gy = xp.ascontiguousarray(gy)
    dtype = xp.result_type(gy.dtype, x.dtype if cols is None else cols.dtype)
    acc = _WeightGrad(x, g, w_shape, cols, backend.device_of(gy), dtype)
    acc.add_all(gy)
    return acc.result()


# ---------------------------------------------------------------------- Functions
def _bias_grad(gy):
    """gy (N, C, H, W) -> (C,): the sum over everything but the channel axis, as a
    matrix-vector product (N*C, H*W) @ ones: 2-3x faster than NumPy's sum over axes (0, 2, 3)."""
    xp = backend.get_array_module(gy)
    n, c = gy.shape[:2]
    rows = xp.ascontiguousarray(gy).reshape(n * c, -1)
    return (rows @ xp.ones(rows.shape[1], dtype=gy.dtype)).reshape(n, c).sum(axis=0)


class Conv2d(Function):
    """y = conv2d(x, weight) + bias. Params: geom (Geometry)."""

    def forward(self, x, weight, bias=None):
        need = self.needs_input_grad
        need_w = len(need) > 1 and need[1]
        # Keep only what backward uses: for the weight gradient x's columns when the layer is
        # small (see KEEP_COLUMNS_BYTES), else x itself; the weight for x's gradient.
        if need_w:
            y, self.cols = conv_forward(x, weight, self.geom, keep_columns=True)
        else:
            y, self.cols = conv_forward(x, weight, self.geom), None
        self.x = x if need_w and self.cols is None else None
        self.weight = weight if need and need[0] else None
        self.x_shape, self.w_shape = x.shape, weight.shape
        if bias is not None:
            y += bias.reshape(1, -1, 1, 1)
        return y

    def backward(self, gy):
        need = self.needs_input_grad
        xp = backend.get_array_module(gy)
        gy = xp.ascontiguousarray(gy)               # once, for all three
        gx = gw = None
        if need[1]:
            dtype = xp.result_type(gy.dtype, (self.x if self.cols is None else self.cols).dtype)
            acc = _WeightGrad(self.x, self.geom, self.w_shape, self.cols,
                              backend.device_of(gy), dtype)
        if need[0]:   # on the row route this also feeds acc, with the stacks of gy it builds
            gx = conv_input_grad(gy, self.weight, self.geom, self.x_shape,
                                 weight_grad=acc if need[1] else None)
        if need[1]:
            if not acc.fed:
                acc.add_all(gy)
            gw = acc.result()
        gb = _bias_grad(gy) if len(need) > 2 and need[2] else None
        return gx, gw, gb


class ConvTranspose2d(Function):
    """y = conv_transpose2d(x, weight) + bias. Params: geom (of the adjoint conv), out_shape."""

    def forward(self, x, weight, bias=None):
        need = self.needs_input_grad
        self.x = x if len(need) > 1 and need[1] else None
        self.weight = weight if need and need[0] else None
        self.x_shape, self.w_shape = x.shape, weight.shape
        y = conv_input_grad(x, weight, self.geom, self.out_shape)
        if bias is not None:
            y += bias.reshape(1, -1, 1, 1)
        return y

    def backward(self, gy):
        need = self.needs_input_grad
        gy = backend.get_array_module(gy).ascontiguousarray(gy)   # once, for all three
        gx = cols = None
        if need[0] and need[1]:   # gy's columns, once for both products when they are small
            gx, cols = conv_forward(gy, self.weight, self.geom, keep_columns=True)
        elif need[0]:
            gx = conv_forward(gy, self.weight, self.geom)
        # The weight is shared with the adjoint conv that maps y-space to x-space, so its
        # gradient is that conv's weight gradient with input gy and output gradient x.
        gw = (conv_weight_grad(gy, self.x, self.geom, self.w_shape, cols=cols)
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
