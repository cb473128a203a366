"""Activation functions: relu, leaky_relu, sigmoid, tanh, softplus, softmax, log_softmax.

Each saves the cheapest thing its backward needs: relu a mask, sigmoid/tanh their output
(their derivatives are functions of the output), softmax its output, log_softmax its output.
"""
from .. import backend
from ..function import Function


class ReLU(Function):
    def forward(self, x):
        self.mask = x > 0
        return backend.get_array_module(x).maximum(x, x.dtype.type(0))

    def backward(self, gy):
        return gy * self.mask


class LeakyReLU(Function):
    """x for x > 0, negative_slope * x otherwise."""
    def forward(self, x):
        xp = backend.get_array_module(x)
        self.mask = x > 0
        return xp.where(self.mask, x, x * x.dtype.type(self.negative_slope))

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        return xp.where(self.mask, gy, gy * gy.dtype.type(self.negative_slope))


class Sigmoid(Function):
    """1 / (1 + exp(-x)), evaluated so that exp never overflows.

    With e = exp(-|x|) (always in (0, 1]): sigmoid(x) = 1 / (1 + e) for x >= 0 and
    e / (1 + e) for x < 0. The derivative is y * (1 - y).
    """
    def forward(self, x):
        xp = backend.get_array_module(x)
        e = xp.exp(-xp.abs(x))
        one = x.dtype.type(1)
        self.y = xp.where(x >= 0, one, e) / (one + e)
        return self.y

    def backward(self, gy):
        y = self.y
        return gy * y * (1 - y)


class Tanh(Function):
    def forward(self, x):
        self.y = backend.get_array_module(x).tanh(x)
        return self.y

    def backward(self, gy):
        return gy * (1 - self.y * self.y)


class Softplus(Function):
    """log(1 + exp(beta * x)) / beta; linear where beta * x > threshold (as torch)."""
    def forward(self, x):
        xp = backend.get_array_module(x)
        self.z = z = x * x.dtype.type(self.beta)
        # max(z, 0) + log1p(exp(-|z|)) never overflows.
        soft = (xp.maximum(z, 0) + xp.log1p(xp.exp(-xp.abs(z)))) / x.dtype.type(self.beta)
        return xp.where(z > self.threshold, x, soft)

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        z = self.z
        e = xp.exp(-xp.abs(z))
        sig = xp.where(z >= 0, z.dtype.type(1), e) / (1 + e)   # sigmoid(z), stable
        return gy * xp.where(z > self.threshold, z.dtype.type(1), sig)


class Softmax(Function):
    """exp(x) / sum(exp(x)) along `dim`, shifted by the max so exp never overflows."""
    def forward(self, x):
        xp = backend.get_array_module(x)
        e = xp.exp(x - x.max(axis=self.dim, keepdims=True))
        self.y = e / e.sum(axis=self.dim, keepdims=True)
        return self.y

    def backward(self, gy):
        # The Jacobian is diag(y) - y y^T, so J^T gy = y * (gy - <gy, y>).
        y = self.y
        return y * (gy - (gy * y).sum(axis=self.dim, keepdims=True))


class LogSoftmax(Function):
    """x - logsumexp(x) along `dim`: finite for any finite logits (log-sum-exp trick)."""
    def forward(self, x):
        xp = backend.get_array_module(x)
        z = x - x.max(axis=self.dim, keepdims=True)
        self.y = z - xp.log(xp.exp(z).sum(axis=self.dim, keepdims=True))
        return self.y

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        return gy - xp.exp(self.y) * gy.sum(axis=self.dim, keepdims=True)


def _check_dim(x, dim, name):
    ndim = x.ndim
    if dim is None:
        raise TypeError(f"{name}() needs the axis to normalise over, e.g. {name}(x, dim=1) "
                        "for (N, C, ...) logits.")
    if not -ndim <= dim < max(ndim, 1):
        raise ValueError(f"{name}() got dim={dim} for a tensor with {ndim} dimensions.")
    return dim % max(ndim, 1)


def relu(x):
    """max(x, 0), element-wise. x: any shape."""
    return ReLU.apply(x)


def leaky_relu(x, negative_slope=0.01):
    """x where x > 0, negative_slope * x elsewhere."""
    return LeakyReLU.apply(x, negative_slope=float(negative_slope))


def sigmoid(x):
    """1 / (1 + exp(-x)), numerically stable for large |x|."""
    return Sigmoid.apply(x)


def tanh(x):
    return Tanh.apply(x)


def softplus(x, beta=1.0, threshold=20.0):
    """log(1 + exp(beta * x)) / beta, computed without overflow (torch.nn.functional.softplus)."""
    return Softplus.apply(x, beta=float(beta), threshold=float(threshold))


def softmax(x, dim):
    """exp(x) normalised to sum to 1 along `dim` (dim=1 for (N, C, H, W) logits)."""
    return Softmax.apply(x, dim=_check_dim(x, dim, "softmax"))


def log_softmax(x, dim):
    """log(softmax(x, dim)) computed as x - logsumexp(x): finite even for logits of +-1e4."""
    return LogSoftmax.apply(x, dim=_check_dim(x, dim, "log_softmax"))
