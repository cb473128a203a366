"""Activation layers: thin Modules around minidl.ops.activation (no parameters)."""
from ..ops import activation as A
from .module import Module


class ReLU(Module):
    def __init__(self, inplace=False):   # inplace is accepted for torch compatibility, not used
        super().__init__()

    def forward(self, x):
        return A.relu(x)


class LeakyReLU(Module):
    def __init__(self, negative_slope=0.01, inplace=False):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        return A.leaky_relu(x, self.negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"


class Sigmoid(Module):
    def forward(self, x):
        return A.sigmoid(x)


class Tanh(Module):
    def forward(self, x):
        return A.tanh(x)


class SiLU(Module):
    def __init__(self, inplace=False):   # inplace is accepted for torch compatibility, not used
        super().__init__()

    def forward(self, x):
        return A.silu(x)


class GELU(Module):
    """x * Phi(x); approximate="tanh" for the tanh formula (see minidl.ops.activation.GELU)."""
    def __init__(self, approximate="none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU got approximate={approximate!r}; use 'none' or 'tanh'.")
        self.approximate = approximate

    def forward(self, x):
        return A.gelu(x, self.approximate)

    def extra_repr(self):
        return f"approximate={self.approximate!r}"


class Softmax(Module):
    """Softmax over `dim` (dim=1 for (N, C, H, W) class scores)."""
    def __init__(self, dim=None):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return A.softmax(x, self.dim)

    def extra_repr(self):
        return f"dim={self.dim}"


class LogSoftmax(Softmax):
    def forward(self, x):
        return A.log_softmax(x, self.dim)


class Identity(Module):
    """Returns its input; any constructor arguments are ignored (as torch.nn.Identity)."""
    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x):
        return x
