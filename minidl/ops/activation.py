"""Activation functions: relu, leaky_relu, sigmoid, tanh, softplus, silu, gelu, softmax,
log_softmax.

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


def _sigmoid(x):
    """1 / (1 + exp(-x)) without overflow (see Sigmoid)."""
    xp = backend.get_array_module(x)
    e = xp.exp(-xp.abs(x))
    one = x.dtype.type(1)
    return xp.where(x >= 0, one, e) / (one + e)


class SiLU(Function):
    """x * sigmoid(x) (also called swish); derivative s + x s (1 - s) with s = sigmoid(x)."""
    def forward(self, x):
        self.x, self.s = x, _sigmoid(x)
        return x * self.s

    def backward(self, gy):
        s = self.s
        return gy * (s + self.x * s * (1 - s))


def _erf(x):
    """The error function on either backend (NumPy has none: SciPy's, or CuPy's own)."""
    if backend.device_of(x) == "cpu":
        from scipy.special import erf
    else:
        from cupyx.scipy.special import erf
    return erf(x)


class GELU(Function):
    """x * Phi(x), Phi the standard normal CDF (torch.nn.functional.gelu).

    approximate="none": Phi(x) = (1 + erf(x / sqrt 2)) / 2, derivative Phi(x) + x phi(x).
    approximate="tanh": Phi(x) ~ (1 + tanh(u)) / 2 with u = sqrt(2/pi) (x + 0.044715 x^3),
    the form in Hendrycks & Gimpel (2016), differentiated exactly.
    """
    def forward(self, x):
        xp = backend.get_array_module(x)
        self.x = x
        if self.approximate == "tanh":
            k = x.dtype.type((2 / 3.141592653589793) ** 0.5)
            self.t = xp.tanh(k * (x + x.dtype.type(0.044715) * x ** 3))
            return x.dtype.type(0.5) * x * (1 + self.t)
        self.cdf = x.dtype.type(0.5) * (1 + _erf(x * x.dtype.type(0.5 ** 0.5)))
        return x * self.cdf

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        x = self.x
        if self.approximate == "tanh":
            k = x.dtype.type((2 / 3.141592653589793) ** 0.5)
            du = k * (1 + x.dtype.type(3 * 0.044715) * x * x)
            return gy * (0.5 * (1 + self.t) + 0.5 * x * (1 - self.t * self.t) * du)
        pdf = xp.exp(-0.5 * x * x) * x.dtype.type((2 * 3.141592653589793) ** -0.5)
        return gy * (self.cdf + x * pdf)


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


def silu(x):
    """x * sigmoid(x), element-wise (torch.nn.functional.silu)."""
    return SiLU.apply(x)


def gelu(x, approximate="none"):
    """Gaussian error linear unit x * Phi(x); approximate="tanh" uses the tanh formula."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu() got approximate={approximate!r}; use 'none' or 'tanh'.")
    return GELU.apply(x, approximate=approximate)
