"""Measure a network's receptive field from gradients.

The receptive field of an output pixel is the set of input pixels that can change it. Those
are exactly the pixels where d(output pixel) / d(input) can be non-zero, so one backward pass
from the centre output pixel draws the field as the support of the input gradient.

"Can be" matters: with the model's own weights the gradient may vanish where the field is
not really smaller (identity-initialised layers that see only the centre tap, zero-initialised
weights, ReLUs that are off). So the measurement runs on a deep copy whose weights are
redrawn from U(0.5, 1.5) - positive, so with a positive input every ReLU is on and nothing
cancels - in float64 and evaluation mode (dropout off, batch norm per-pixel with reset
running statistics). Max pooling passes gradient to one pixel per window only, so a few
random inputs are tried and their supports are combined.
"""
import copy
import warnings

import numpy

from . import backend
from .tensor import Tensor


def receptive_field(module, in_channels, size=128, device="cpu", trials=3, seed=0):
    """(height, width) of the input region that influences the centre output pixel.

    module: a Module mapping (N, in_channels, H, W) to (N, C, H', W').
    size: int or (H, W) of the probe input; it must be larger than the field (a warning says
    so when the field reaches the border and may be cut off).
    """
    from .nn.normalization import BatchNorm2d

    h, w = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    probe = copy.deepcopy(module)
    probe.to(device=device, dtype=numpy.float64)
    probe.eval()
    rng = numpy.random.default_rng(seed)
    xp = backend.array_module(device)
    for p in probe.parameters():
        p.data = xp.asarray(rng.uniform(0.5, 1.5, p.shape))
        p.requires_grad = False       # only the input gradient is wanted
    for m in probe.modules():
        if isinstance(m, BatchNorm2d):
            m.reset_running_stats()

    support = numpy.zeros((h, w), dtype=bool)
    for _ in range(trials):
        x = Tensor(xp.asarray(rng.uniform(0.5, 1.5, (1, in_channels, h, w))), requires_grad=True)
        y = probe(x)
        if y.ndim != 4:
            raise ValueError(f"receptive_field() needs a module with a 4-D output (N, C, H, W), "
                             f"got shape {tuple(y.shape)}.")
        seed_grad = xp.zeros(y.shape)
        seed_grad[0, :, y.shape[2] // 2, y.shape[3] // 2] = 1.0
        y.backward(seed_grad)
        support |= numpy.abs(backend.to_numpy(x.grad[0]).sum(axis=0)) > 0
    rows, cols = numpy.nonzero(support.any(axis=1))[0], numpy.nonzero(support.any(axis=0))[0]
    if rows.size == 0:
        raise ValueError("receptive_field(): the centre output pixel does not depend on the "
                         "input at all.")
    if rows[0] == 0 or cols[0] == 0 or rows[-1] == h - 1 or cols[-1] == w - 1:
        warnings.warn(f"receptive_field(): the field reaches the border of the {h}x{w} probe "
                      "input and may be larger; pass a bigger size.", stacklevel=2)
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
