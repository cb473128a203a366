"""Per-sample normalisation: layer_norm, group_norm and instance_norm.

Unlike batch norm, these normalise each sample on its own, so they behave the same in
training and evaluation and need no running statistics. All three are one op, Standardize,
applied to a view of x that puts the values to normalise together in trailing axes:

    layer_norm     (N, *, D1..Dk) normalised over the last k dims  (Ba et al. 2016)
    group_norm     (N, C, *) viewed as (N, G, C/G * prod(*))       (Wu & He 2018)
    instance_norm  (N, C, *) viewed as (N, C, prod(*))             (Ulyanov et al. 2016)

followed by the elementwise affine weight/bias, which the ordinary mul/add ops differentiate.

Standardize: with m = mean(x), v = mean((x - m)^2) (biased, as PyTorch) over the axes,
s = 1 / sqrt(v + eps) and xhat = (x - m) s, the backward is batch norm's training formula:

    gx = s * (gy - mean(gy) - xhat * mean(gy * xhat))
"""
from .. import backend
from ..function import Function
from .shape import reshape


class Standardize(Function):
    """(x - mean) / sqrt(var + eps) over the last `count` axes of x."""
    def forward(self, x):
        axes = tuple(range(x.ndim - self.count, x.ndim))
        xp = backend.get_array_module(x)
        centred = x - x.mean(axis=axes, keepdims=True)
        var = (centred * centred).mean(axis=axes, keepdims=True)
        self.axes = axes
        self.inv_std = 1 / xp.sqrt(var + x.dtype.type(self.eps))
        self.xhat = centred * self.inv_std
        return self.xhat

    def backward(self, gy):
        xhat, axes = self.xhat, self.axes
        return self.inv_std * (gy - gy.mean(axis=axes, keepdims=True)
                               - xhat * (gy * xhat).mean(axis=axes, keepdims=True))


def _shape(x):
    return tuple(x.shape)


def _affine(y, weight, bias, shape):
    """y * weight + bias with weight/bias reshaped to `shape` for broadcasting."""
    if weight is not None:
        y = y * reshape(weight, *shape)
    if bias is not None:
        y = y + reshape(bias, *shape)
    return y


def _check_param(name, fn, value, shape):
    if value is not None and _shape(value) != tuple(shape):
        raise ValueError(f"{fn}() {name} must have shape {tuple(shape)}, got {_shape(value)}.")


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Normalise over the trailing dims `normalized_shape` (torch.nn.functional.layer_norm).

    x: (*, *normalized_shape); weight, bias: normalized_shape or None.
    """
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(normalized_shape)
    k = len(normalized_shape)
    if k == 0 or _shape(x)[len(_shape(x)) - k:] != normalized_shape or len(_shape(x)) < k:
        raise ValueError(f"layer_norm() got input of shape {_shape(x)}; its last dims must equal "
                         f"normalized_shape {normalized_shape}.")
    for name, v in (("weight", weight), ("bias", bias)):
        _check_param(name, "layer_norm", v, normalized_shape)
    y = Standardize.apply(x, count=k, eps=float(eps))
    return _affine(y, weight, bias, normalized_shape)


def _channel_view(x, fn):
    shape = _shape(x)
    if len(shape) < 2:
        raise ValueError(f"{fn}() needs input of shape (N, C, ...), got {shape}.")
    return shape, (1, shape[1]) + (1,) * (len(shape) - 2)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """Normalise each of num_groups channel groups per sample (torch.nn.functional.group_norm).

    x: (N, C, *) with C divisible by num_groups; weight, bias: (C,) or None.
    """
    shape, per_channel = _channel_view(x, "group_norm")
    c = shape[1]
    if num_groups < 1 or c % num_groups:
        raise ValueError(f"group_norm() needs num_groups dividing the {c} channels, got "
                         f"num_groups={num_groups}.")
    for name, v in (("weight", weight), ("bias", bias)):
        _check_param(name, "group_norm", v, (c,))
    y = Standardize.apply(reshape(x, shape[0], num_groups, -1), count=1, eps=float(eps))
    return _affine(reshape(y, *shape), weight, bias, per_channel)


def instance_norm(x, weight=None, bias=None, eps=1e-5):
    """Normalise each channel of each sample over its spatial positions (no running stats).

    x: (N, C, *); weight, bias: (C,) or None. (torch's use_input_stats=True path.)
    """
    shape, per_channel = _channel_view(x, "instance_norm")
    for name, v in (("weight", weight), ("bias", bias)):
        _check_param(name, "instance_norm", v, (shape[1],))
    y = Standardize.apply(reshape(x, shape[0], shape[1], -1), count=1, eps=float(eps))
    return _affine(reshape(y, *shape), weight, bias, per_channel)

