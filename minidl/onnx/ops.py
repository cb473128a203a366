"""One small function per minidl op, adding the ONNX nodes that compute the same thing.

Each mapping is `fn(g, op, names, xs, y) -> name of the output value`: g is the Recorder
(recorder.py), op the Function that ran (the parameters given to its apply() are its
attributes: op.geom, op.dim, ...), names the ONNX value names of its inputs ("" for None),
xs the input arrays (None where the input was None) and y its output array.
Register a mapping for your own op with `@minidl.onnx.register(MyOp)`.
"""
import numpy

from .. import backend
from ..ops import activation, arithmetic, conv, normalization, padding, pooling, reduction
from ..ops import resize, shape
from ..tensor import Tensor

MAPPINGS = {}


class UnsupportedOpError(ValueError):
    """The recorded forward pass used an op that has no ONNX mapping."""


def register(*function_classes):
    """Decorator: `fn(g, op, names, xs, y)` maps these Function classes to ONNX nodes."""
    def wrap(fn):
        for cls in function_classes:
            MAPPINGS[cls] = fn
        return fn
    return wrap


def unsupported(op, why):
    return UnsupportedOpError(f"minidl.onnx.export: cannot export {type(op).__name__}: {why}.")


def convert(g, op, inputs, y):
    """The ONNX value name of `op`'s output, after adding the nodes that compute it."""
    fn = MAPPINGS.get(type(op))
    if fn is None:
        raise UnsupportedOpError(
            f"minidl.onnx.export: the model uses the op {type(op).__name__} "
            f"({type(op).__module__}), which has no ONNX mapping; register one with "
            "@minidl.onnx.register(...) or avoid the op in forward().")
    xs = [x.data if isinstance(x, Tensor) else x for x in inputs]
    return fn(g, op, [g.name(x) for x in xs], xs, y)


def _int64(values, g, hint):
    return g.constant(numpy.array(values, numpy.int64), hint)


def _end_pad(size, out, kernel, stride, begin, dilation=1):
    """Padding after the input so that `out` windows fit; never negative (rows that no
    window reaches are simply not read, as in minidl)."""
    needed = (out - 1) * stride + dilation * (kernel - 1) + 1
    return int(max(needed - size - begin, 0))


def _nc_and(g, x, hw):
    """int64 (N, C, H, W): the N, C of value x (from the graph, so that a dynamic batch axis
    keeps working) followed by the constants hw."""
    nc = g.node("Slice", [g.node("Shape", [x]), _int64([0], g, "zero"), _int64([2], g, "two")])
    return g.node("Concat", [nc, _int64(list(hw), g, "hw")], axis=0)


# ------------------------------------------------------------------------- convolutions
@register(conv.Conv2d)
def _conv(g, op, names, xs, y):
    s, (h, w), (ho, wo) = op.geom, xs[0].shape[2:], y.shape[2:]
    pads = [s.ph, s.pw, _end_pad(h, ho, s.kh, s.sh, s.ph, s.dh),
            _end_pad(w, wo, s.kw, s.sw, s.pw, s.dw)]
    y = g.node("Conv", names, kernel_shape=[s.kh, s.kw], strides=[s.sh, s.sw],
               dilations=[s.dh, s.dw], group=s.groups, pads=[int(p) for p in pads])
    return g.node("Relu", [y]) if op.relu else y     # conv2d_relu: the ReLU after the bias


@register(conv.ConvTranspose2d)
def _conv_transpose(g, op, names, xs, y):
    # op.geom describes the adjoint conv (y-space -> x-space): its kernel, stride, padding.
    s, (h, w), (ho, wo) = op.geom, xs[0].shape[2:], y.shape[2:]
    pads, extra = [s.ph, s.pw, 0, 0], [0, 0]
    for axis, (n_in, n_out, k, st, p, d) in enumerate(((h, ho, s.kh, s.sh, s.ph, s.dh),
                                                      (w, wo, s.kw, s.sw, s.pw, s.dw))):
        # ONNX: out = st (n_in - 1) + output_padding + d (k - 1) + 1 - pad_begin - pad_end
        end = st * (n_in - 1) + d * (k - 1) + 1 - p - n_out
        pads[2 + axis], extra[axis] = max(end, 0), max(-end, 0)
    return g.node("ConvTranspose", names, kernel_shape=[s.kh, s.kw], strides=[s.sh, s.sw],
                  dilations=[s.dh, s.dw], group=s.groups, pads=[int(p) for p in pads],
                  output_padding=[int(e) for e in extra])


# ------------------------------------------------------------------------- pooling
def _pool_attributes(geom, in_hw, out_hw):
    kh, kw, sh, sw, ph, pw, dh, dw = geom[:8]
    pads = [ph, pw, _end_pad(in_hw[0], out_hw[0], kh, sh, ph, dh),
            _end_pad(in_hw[1], out_hw[1], kw, sw, pw, dw)]
    return dict(kernel_shape=[kh, kw], strides=[sh, sw], pads=[int(p) for p in pads],
                dilations=[dh, dw])


@register(pooling.MaxPool2d)
def _max_pool(g, op, names, xs, y):
    # Padding for max pooling never wins, so ceil_mode's extra windows become end padding.
    attrs = _pool_attributes(op.geom, xs[0].shape[2:], y.shape[2:])
    node_count = len(g.nodes)
    out = g.node("MaxPool", names, **attrs)
    node = g.nodes[node_count]
    idx = getattr(op, "idx", None)          # max_pool2d hands these on (return_indices)
    if idx is not None:
        h, w = xs[0].shape[2:]

        def indices():
            # ONNX numbers positions over the whole (N, C, H, W) tensor, minidl within each
            # (H, W) plane: h * W + w = ONNX index mod (H * W).
            if len(node.output) == 1:
                node.output.append(g.fresh("MaxPool.indices"))
            return node.output[1]
        g.notes.setdefault("pool_indices", []).append((idx, indices, h * w))
        g.bind_lazy(idx, lambda: g.node("Mod", [indices(), _int64(h * w, g, "plane")],
                                        hint="indices"))
    return out


def _same_memory(a, b):
    """Whether a and b are the same array (max_unpool2d may hand on a fresh view of the
    indices max_pool2d returned)."""
    def address(x):
        return x.__array_interface__["data"][0] if isinstance(x, numpy.ndarray) else x.data.ptr
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and address(a) == address(b))


@register(pooling.MaxUnpool2d)
def _max_unpool(g, op, names, xs, y):
    found = [(make, plane) for idx, make, plane in g.notes.get("pool_indices", ())
             if _same_memory(idx, op.idx)]
    if not found:
        raise unsupported(op, "its indices were not made by a max_pool2d of the recorded "
                              "forward pass, so the graph could not recompute them")
    make, plane_in = found[-1]
    raw = make()
    ho, wo = y.shape[2:]
    if plane_in != ho * wo:
        # plane = raw div (H W) = n C + c; the index in the larger/smaller output tensor is
        # plane * (Ho Wo) + the index inside the plane.
        plane = g.node("Div", [raw, _int64(plane_in, g, "plane")])
        local = g.node("Mod", [raw, _int64(plane_in, g, "plane")])
        raw = g.node("Add", [g.node("Mul", [plane, _int64(ho * wo, g, "plane_out")]), local])
    h, w = xs[0].shape[2:]
    # The output_shape input decides the size; kernel = stride = floor(out / in) only keeps
    # ONNX Runtime's default size (in * stride) within it.
    kernel = [max(1, ho // h), max(1, wo // w)]
    return g.node("MaxUnpool", [names[0], raw, _nc_and(g, names[0], (ho, wo))],
                  kernel_shape=kernel, strides=kernel)


@register(pooling.AvgPool2d)
def _avg_pool(g, op, names, xs, y):
    kh, kw, sh, sw, ph, pw = op.geom[:6]
    (h, w), (ho, wo) = xs[0].shape[2:], y.shape[2:]
    if tuple(op.geom[6:8]) != (1, 1):
        raise unsupported(op, "dilated average pooling has no ONNX form")
    floor_hw = ((h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)
    return g.node("AveragePool", names, kernel_shape=[kh, kw], strides=[sh, sw],
                  pads=[ph, pw, ph, pw], count_include_pad=int(op.count_include_pad),
                  ceil_mode=int(floor_hw != (ho, wo)))


@register(pooling.AdaptiveAvgPool2d)
def _adaptive_avg_pool(g, op, names, xs, y):
    (h, w), (ho, wo) = xs[0].shape[2:], y.shape[2:]
    if (ho, wo) == (1, 1):
        return g.node("GlobalAveragePool", names)
    if h % ho or w % wo:
        raise unsupported(op, f"adaptive pooling of {h}x{w} to {ho}x{wo} has unequal windows")
    k = [h // ho, w // wo]
    return g.node("AveragePool", names, kernel_shape=k, strides=k)


# ------------------------------------------------------------------------- normalization
@register(normalization.BatchNorm)
def _batch_norm(g, op, names, xs, y):
    if op.training:
        raise unsupported(op, "batch norm in training mode uses batch statistics; call "
                              "model.eval() (export does) or batch_norm(training=False)")
    c = xs[0].shape[1]
    weight = names[1] if len(names) > 1 and names[1] else g.constant(
        numpy.ones(c, xs[0].dtype), "bn.ones")
    bias = names[2] if len(names) > 2 and names[2] else g.constant(
        numpy.zeros(c, xs[0].dtype), "bn.zeros")
    out = g.node("BatchNormalization", [names[0], weight, bias, g.name(op.running_mean),
                                        g.name(op.running_var)], epsilon=float(op.eps))
    return g.node("Relu", [out]) if op.relu else out


# ------------------------------------------------------------------------- element-wise
def _simple(onnx_op, **attributes):
    return lambda g, op, names, xs, y: g.node(onnx_op, names, **attributes)


for _cls, _onnx in ((activation.ReLU, "Relu"), (activation.Sigmoid, "Sigmoid"),
                    (activation.Tanh, "Tanh"), (arithmetic.Add, "Add"), (arithmetic.Sub, "Sub"),
                    (arithmetic.Mul, "Mul"), (arithmetic.Div, "Div"), (arithmetic.Neg, "Neg"),
                    (arithmetic.Exp, "Exp"), (arithmetic.Log, "Log"), (arithmetic.Sqrt, "Sqrt"),
                    (arithmetic.Abs, "Abs"), (arithmetic.Maximum, "Max"),
                    (arithmetic.Minimum, "Min"), (arithmetic.MatMul, "MatMul"),
                    (arithmetic.Pow, "Pow")):
    register(_cls)(_simple(_onnx))


@register(activation.LeakyReLU)
def _leaky_relu(g, op, names, xs, y):
    return g.node("LeakyRelu", names, alpha=float(op.negative_slope))


@register(activation.Softmax)
def _softmax(g, op, names, xs, y):
    return g.node("Softmax", names, axis=int(op.dim))


@register(activation.LogSoftmax)
def _log_softmax(g, op, names, xs, y):
    return g.node("LogSoftmax", names, axis=int(op.dim))


@register(arithmetic.PowScalar)
def _pow_scalar(g, op, names, xs, y):
    return g.node("Pow", [names[0], g.constant(numpy.array(op.p, xs[0].dtype), "exponent")])


@register(arithmetic.Cast)
def _cast(g, op, names, xs, y):
    return g.node("Cast", names, to=g.onnx.helper.np_dtype_to_tensor_dtype(numpy.dtype(op.dtype)))


# ------------------------------------------------------------------------- shapes
@register(shape.Concatenate)
def _concat(g, op, names, xs, y):
    return g.node("Concat", names, axis=int(op.axis))


@register(shape.Reshape)
def _reshape(g, op, names, xs, y):
    return g.node("Reshape", [names[0], _int64(list(y.shape), g, "shape")])


@register(shape.Transpose)
def _transpose(g, op, names, xs, y):
    perm = op.axes if op.axes is not None else tuple(reversed(range(xs[0].ndim)))
    return g.node("Transpose", names, perm=[int(a) for a in perm])


@register(shape.GetItem)
def _getitem(g, op, names, xs, y):
    """Basic indexing (slices and integers, an Ellipsis) as Slice, then Squeeze for integers."""
    index = op.index if isinstance(op.index, tuple) else (op.index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (xs[0].ndim - len(index) + 1) + index[at + 1:]
    if not all(isinstance(i, (int, numpy.integer, slice)) for i in index):
        raise unsupported(op, f"only slices and integers can be exported, got index {op.index!r}")
    starts, ends, axes, steps, squeeze = [], [], [], [], []
    for axis, item in enumerate(index):
        n = xs[0].shape[axis]
        if isinstance(item, slice):
            if item == slice(None):
                continue
            start, stop, step = item.indices(n)
            if step < 0 and stop < 0:
                stop = -n - 1          # ONNX clamps this to "before the first element"
        else:
            start, stop, step = int(item) % n, int(item) % n + 1, 1
            squeeze.append(axis)
        starts.append(start), ends.append(stop), axes.append(axis), steps.append(step)
    out = names[0]
    if axes:
        out = g.node("Slice", [out, _int64(starts, g, "starts"), _int64(ends, g, "ends"),
                               _int64(axes, g, "axes"), _int64(steps, g, "steps")])
    if squeeze:
        out = g.node("Squeeze", [out, _int64(squeeze, g, "axes")])
    return out if out != names[0] else g.node("Identity", [out])


# ------------------------------------------------------------------------- resize and pad
@register(resize.Bilinear)
def _bilinear(g, op, names, xs, y):
    # With output sizes given, ONNX's scale is out / in, as minidl's kernels compute it.
    mode = "align_corners" if op.align_corners else "pytorch_half_pixel"
    return g.node("Resize", [names[0], "", "", _nc_and(g, names[0], y.shape[2:])], mode="linear",
                  coordinate_transformation_mode=mode)


@register(resize.Nearest)
def _nearest(g, op, names, xs, y):
    # op.rows / op.cols list the source pixel of every output row / column: two Gathers
    # reproduce them exactly, whatever rounding rule made them.
    rows = g.constant(backend.to_numpy(op.rows).astype(numpy.int64), "rows")
    cols = g.constant(backend.to_numpy(op.cols).astype(numpy.int64), "cols")
    return g.node("Gather", [g.node("Gather", [names[0], rows], axis=2), cols], axis=3)


def _onnx_pads(op, ndim):
    begin, end = [0] * ndim, [0] * ndim
    for axis, before, after in op.pairs:
        begin[axis], end[axis] = before, after
    return begin + end


@register(padding.ConstantPad)
def _constant_pad(g, op, names, xs, y):
    value = g.constant(numpy.array(op.value, xs[0].dtype), "pad_value")
    return g.node("Pad", [names[0], _int64(_onnx_pads(op, xs[0].ndim), g, "pads"), value],
                  mode="constant")


@register(padding.MirrorPad)
def _mirror_pad(g, op, names, xs, y):
    return g.node("Pad", [names[0], _int64(_onnx_pads(op, xs[0].ndim), g, "pads")],
                  mode="reflect" if op.mode == "reflect" else "edge")


# ------------------------------------------------------------------------- reductions
@register(reduction.Mean, reduction.Sum)
def _reduce(g, op, names, xs, y):
    onnx_op = "ReduceMean" if isinstance(op, reduction.Mean) else "ReduceSum"
    axis = op.axis
    axes = list(range(xs[0].ndim)) if axis is None else (
        [axis] if isinstance(axis, int) else list(axis))
    axes = [a % xs[0].ndim for a in axes]
    keep = int(bool(op.keepdims))
    if onnx_op == "ReduceSum" or g.opset >= 18:    # axes became an input
        return g.node(onnx_op, [names[0], _int64(axes, g, "axes")], keepdims=keep)
    return g.node(onnx_op, names, axes=axes, keepdims=keep)
