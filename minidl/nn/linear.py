"""Linear (fully connected) layer."""
import math

from .. import backend
from ..ops.linear import linear
from . import init
from .module import Module, Parameter


class Linear(Module):
    """y = x @ weight.T + bias.  x: (..., in_features) -> (..., out_features).

    weight: (out_features, in_features); bias: (out_features,). Initialised as torch does:
    both uniform in [-1/sqrt(in_features), 1/sqrt(in_features)] (torch's kaiming_uniform_
    with a=sqrt(5) works out to this bound).
    """
    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        xp = backend.array_module(device)
        dtype = "float32" if dtype is None else dtype
        self.weight = Parameter(xp.empty((out_features, in_features), dtype=dtype))
        self.bias = Parameter(xp.empty((out_features,), dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        return linear(x, self.weight, self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")
