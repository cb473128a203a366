"""Window geometry shared by convolution and pooling: argument checks and output sizes.

Along one axis, with kernel k, stride s, padding p, dilation d (torch's formulas):

    convolution              out = floor((in + 2p - d(k-1) - 1) / s) + 1
    transposed convolution   out = (in - 1)s - 2p + d(k-1) + output_padding + 1
    pooling                  as convolution, rounded up with ceil_mode (a last window that
                             would start in the right padding is dropped)

`conv2d_geometry` / `conv_transpose2d_geometry` / `pool_geometry` check an op's arguments
against the shapes (one clear sentence per mistake) and return what the kernels need.
"""
import functools
import operator


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


def pair(value, name, op):
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


def check_4d(x, name, op, layout):
    """x: an array or anything with .shape."""
    if len(x.shape) != 4:
        raise ValueError(f"{op}: {name} must be 4-D {layout}, got shape {tuple(x.shape)}; "
                         "add a batch axis with x.reshape(1, *x.shape) for a single image.")


# ---------------------------------------------------------------------- output sizes
def conv_output_size(size, kernel, stride=1, padding=0, dilation=1):
    """torch.nn.Conv2d's formula along one axis: floor((size + 2p - d(k-1) - 1) / s) + 1."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_transpose_output_size(size, kernel, stride=1, padding=0, output_padding=0, dilation=1):
    """torch.nn.ConvTranspose2d's formula: (size - 1)s - 2p + d(k-1) + output_padding + 1."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def pool_output_size(size, kernel, stride, padding=0, dilation=1, ceil_mode=False):
    """torch's pooling_output_shape along one axis.

    ceil_mode=True rounds up (Caffe's rule, which the FCN / SegNet / DeepLab prototxts rely
    on) but, as in PyTorch, drops a last window that would start in the right padding.
    """
    out = (size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)) \
        // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1        # the last window would start in the right padding
    return out


# ---------------------------------------------------------------------- convolution
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


def _check_common(op, x_shape, w_shape, stride, dilation, groups):
    """Checks shared by conv2d and conv_transpose2d; returns (stride, dilation) as pairs."""
    for name, shape, layout in (("input", x_shape, "(N, C, H, W)"),
                                ("weight", w_shape, "(C_out, C_in / groups, kh, kw)" if
                                 op == "conv2d" else "(C_in, C_out / groups, kh, kw)")):
        if len(shape) != 4:
            raise ValueError(f"{op}: {name} must be 4-D {layout}, got shape {tuple(shape)}; "
                             "add a batch axis with x.reshape(1, *x.shape) for a single image.")
    stride = pair(stride, "stride", op)
    dilation = pair(dilation, "dilation", op)
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
        padding, out = pair(padding, "padding", op), None
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
    padding = pair(padding, "padding", op)
    output_padding = pair(output_padding, "output_padding", op)
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


# ---------------------------------------------------------------------- pooling
@memoize_geometry
def pool_geometry(op, x_shape, kernel_size, stride, padding, dilation, ceil_mode):
    """Check pooling arguments; returns (kh, kw, sh, sw, ph, pw, dh, dw, ho, wo).

    Padding may be at most half the kernel (as in PyTorch).
    """
    if len(x_shape) != 4:
        raise ValueError(f"{op}: input must be 4-D (N, C, H, W), got shape {tuple(x_shape)}; "
                         "add a batch axis with x.reshape(1, *x.shape) for a single image.")
    kernel = pair(kernel_size, "kernel_size", op)
    stride = kernel if stride is None or stride == () or stride == [] else pair(stride, "stride", op)
    padding, dilation = pair(padding, "padding", op), pair(dilation, "dilation", op)
    if min(kernel) <= 0 or min(stride) <= 0 or min(dilation) <= 0:
        raise ValueError(f"{op}: kernel_size {kernel}, stride {stride} and dilation {dilation} "
                         "must be positive.")
    if min(padding) < 0 or padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ValueError(f"{op}: padding {padding} must be between 0 and half the kernel size "
                         f"{kernel} (as in PyTorch).")
    h, w = x_shape[2:]
    out = tuple(pool_output_size(s, k, st, p, d, ceil_mode) for s, k, st, p, d in
                zip((h, w), kernel, stride, padding, dilation))
    if min(out) < 1:
        raise ValueError(f"{op}: input {h}x{w} is too small for kernel {kernel} with padding "
                         f"{padding} and dilation {dilation}: the output would be "
                         f"{out[0]}x{out[1]}.")
    for axis, (size, k, st, p, d, n) in enumerate(zip((h, w), kernel, stride, padding,
                                                       dilation, out)):
        if d == 1:   # padding <= k // 2: every window overlaps the input
            continue
        for o in range(n):   # with dilation a window can fall between the pixels entirely
            if not any(0 <= o * st - p + i * d < size for i in range(k)):
                raise ValueError(f"{op}: output {'row' if axis == 0 else 'column'} {o} would "
                                 f"pool over padding only (input {h}x{w}, kernel {kernel}, "
                                 f"padding {padding}, dilation {dilation}); reduce the padding "
                                 "or the dilation.")
    return kernel + stride + padding + dilation + out
