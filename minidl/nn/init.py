"""Weight initialisers, filling a tensor in place (like torch.nn.init).

Each takes a Tensor (or Parameter, or a plain array) and overwrites its values on its own
device, drawing from minidl.random's generator, and returns it. Fan-in/fan-out follow torch:
for a weight (out, in, *kernel) fan_in = in * prod(kernel) and fan_out = out * prod(kernel).
"""
import math

from .. import backend
from .. import random as _random
from ..tensor import Tensor


def _array(tensor):
    return tensor.data if isinstance(tensor, Tensor) else tensor


def _fill(tensor, values):
    """Write values into the tensor's own array (so every holder of the array sees them)."""
    a = _array(tensor)
    a[...] = values
    return tensor


def calculate_fan_in_and_fan_out(tensor):
    """(fan_in, fan_out) of a weight with at least 2 dimensions: (out, in, *kernel)."""
    shape = tuple(_array(tensor).shape)
    if len(shape) < 2:
        raise ValueError(f"fan in and fan out need a weight with at least 2 dimensions, got shape "
                         f"{shape}; a bias has none (use uniform_ or zeros_ for it).")
    receptive = 1
    for n in shape[2:]:
        receptive *= n
    return shape[1] * receptive, shape[0] * receptive


_calculate_fan_in_and_fan_out = calculate_fan_in_and_fan_out   # torch's private spelling


def calculate_gain(nonlinearity, param=None):
    """The factor that keeps activations' variance steady through the nonlinearity (as torch)."""
    linear = ("linear", "identity", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
              "conv_transpose2d", "conv_transpose3d", "sigmoid")
    if nonlinearity in linear:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"calculate_gain() does not know nonlinearity {nonlinearity!r}; use one of "
                     "'linear', 'sigmoid', 'tanh', 'relu', 'leaky_relu', 'selu'.")


def _fan(tensor, mode):
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}.")
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    return fan_in if mode == "fan_in" else fan_out


def _xp(tensor):
    return backend.get_array_module(_array(tensor))


def uniform_(tensor, a=0.0, b=1.0):
    """Fill with samples from U(a, b)."""
    arr = _array(tensor)
    return _fill(tensor, _random.uniform(_xp(tensor), arr.shape, a, b, dtype=arr.dtype))


def normal_(tensor, mean=0.0, std=1.0):
    """Fill with samples from N(mean, std^2)."""
    arr = _array(tensor)
    return _fill(tensor, _random.normal(_xp(tensor), arr.shape, mean, std, dtype=arr.dtype))


def constant_(tensor, val):
    return _fill(tensor, val)


def zeros_(tensor):
    return _fill(tensor, 0)


def ones_(tensor):
    return _fill(tensor, 1)


def kaiming_normal_(tensor, a=0, mode="fan_in", nonlinearity="leaky_relu"):
    """He et al. (2015): N(0, std^2) with std = gain / sqrt(fan).

    The defaults are torch's: leaky ReLU with slope a = 0, which is ReLU, so
    std = sqrt(2 / N), N = k * k * C_in for a conv weight
    (C_out, C_in, k, k): the initialisation the U-Net paper recommends.
    """
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(tensor, mode))
    return normal_(tensor, 0.0, std)


def kaiming_uniform_(tensor, a=0, mode="fan_in", nonlinearity="leaky_relu"):
    """U(-bound, bound) with bound = gain * sqrt(3 / fan): the variance of kaiming_normal_.

    Defaults as torch: nonlinearity "leaky_relu" with slope a (0 = ReLU's gain sqrt(2)).
    """
    bound = calculate_gain(nonlinearity, a) * math.sqrt(3.0 / _fan(tensor, mode))
    return uniform_(tensor, -bound, bound)


def xavier_uniform_(tensor, gain=1.0):
    """Glorot & Bengio (2010): U(-b, b) with b = gain * sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(tensor, -bound, bound)


def xavier_normal_(tensor, gain=1.0):
    """N(0, std^2) with std = gain * sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    return normal_(tensor, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)))


def _bilinear_1d(k):
    """1-D tent of the FCN upsampling kernel: size k, factor f = (k+1)//2, weights 1 - |i-c|/f."""
    f = (k + 1) // 2
    center = f - 1 if k % 2 == 1 else f - 0.5
    return [1.0 - abs(i - center) / f for i in range(k)]


def bilinear_(weight):
    """FCN's bilinear-upsampling initialisation of a transposed-conv weight (C_in, C_out, kh, kw).

    Each kernel is the outer product of two tents (_bilinear_1d): k = 4 gives rows
    0.25, 0.75, 0.75, 0.25, and for kernel 2s (stride s) every kernel sums to s^2, so a
    constant map stays constant inside. Only the channel diagonal (channel i -> channel i) is
    set; all other weights are zero, so channels are upsampled independently.
    """
    a = _array(weight)
    if a.ndim != 4:
        raise ValueError(f"bilinear_() needs a 4-D weight (C_in, C_out, kh, kw), got shape "
                         f"{tuple(a.shape)}.")
    import numpy
    kernel = numpy.outer(_bilinear_1d(a.shape[2]), _bilinear_1d(a.shape[3]))
    values = numpy.zeros(a.shape, dtype=numpy.float64)
    for i in range(min(a.shape[0], a.shape[1])):
        values[i, i] = kernel
    return _fill(weight, _xp(weight).asarray(values, dtype=a.dtype))


def identity_(weight):
    """DilatedNet's identity initialisation of a conv weight (C_out, C_in, kh, kw).

    The centre tap of output channel o reads input channel o % C_in with weight 1, everything
    else is 0: with C_out == C_in the layer passes its input through unchanged (Yu & Koltun
    2016, context module). When C_out > C_in the input channels are repeated cyclically
    (a simple stand-in for the paper's scaled version with noise).
    """
    a = _array(weight)
    if a.ndim != 4:
        raise ValueError(f"identity_() needs a 4-D weight (C_out, C_in, kh, kw), got shape "
                         f"{tuple(a.shape)}.")
    import numpy
    c_out, c_in, kh, kw = a.shape
    values = numpy.zeros(a.shape, dtype=numpy.float64)
    for o in range(c_out):
        values[o, o % c_in, kh // 2, kw // 2] = 1.0
    return _fill(weight, _xp(weight).asarray(values, dtype=a.dtype))
