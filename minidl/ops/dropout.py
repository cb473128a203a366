"""Dropout: zero random elements (dropout) or whole channels (dropout2d) while training.

"Inverted" dropout: the kept values are scaled by 1 / (1 - p) during training, so the
expected activation is unchanged and evaluation needs no rescaling. Masks come from
minidl.random.dropout_mask, so manual_seed makes them repeatable: on the GPU from a Philox
stream whose position lives on the device (a CUDA graph of a step with dropout draws new
masks on every replay), on the CPU from NumPy's generator.
"""
from .. import backend
from .. import random as _random
from ..function import Function
from ..tensor import Tensor


class MaskMultiply(Function):
    """x * mask, where mask (broadcastable to x) already holds 0 or 1 / (1 - p)."""
    def forward(self, x):
        return x * self.mask

    def backward(self, gy):
        return gy * self.mask


def _check_p(p, name):
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}() needs a drop probability p in [0, 1], got {p}.")


def _masked(x, p, mask_shape):
    data = x.data if isinstance(x, Tensor) else x
    xp = backend.get_array_module(data)
    dtype = data.dtype
    if p == 1.0:   # everything dropped: 1 / (1 - p) is undefined, the output is just zero
        mask = xp.zeros(mask_shape, dtype=dtype)
    else:
        mask = _random.dropout_mask(xp, mask_shape, p, dtype)
    return MaskMultiply.apply(x, mask=mask)


def dropout(x, p=0.5, training=True):
    """Zero each element with probability p and scale the rest by 1 / (1 - p).

    x: any shape. Returns x itself when not training or when p == 0.
    """
    _check_p(p, "dropout")
    if not training or p == 0.0:
        return x
    return _masked(x, p, tuple(x.shape))


def dropout2d(x, p=0.5, training=True):
    """Zero whole channels: x (N, C, H, W) or (C, H, W); each (n, c) plane is kept or dropped.

    Neighbouring pixels of a feature map are strongly correlated, so dropping single pixels
    barely regularises a convolutional net; dropping whole feature maps does.
    """
    _check_p(p, "dropout2d")
    if x.ndim not in (3, 4):
        raise ValueError(f"dropout2d() needs input of shape (N, C, H, W) or (C, H, W), got shape "
                         f"{tuple(x.shape)}.")
    if not training or p == 0.0:
        return x
    return _masked(x, p, tuple(x.shape[:-2]) + (1, 1))
