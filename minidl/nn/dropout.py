"""Dropout layers: active in training mode, the identity after .eval()."""
from ..ops import dropout as D
from .module import Module


class Dropout(Module):
    """Zero each element with probability p while training (inverted scaling 1 / (1 - p))."""
    def __init__(self, p=0.5, inplace=False):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout needs p in [0, 1], got {p}.")
        self.p = p

    def forward(self, x):
        return D.dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


class Dropout2d(Dropout):
    """Zero whole channels of (N, C, H, W) input with probability p while training."""
    def forward(self, x):
        return D.dropout2d(x, self.p, self.training)
