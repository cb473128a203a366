"""BatchNorm2d: batch normalisation over (N, H, W) per channel, with running statistics."""
import numpy

from .. import backend
from ..ops.normalization import batch_norm
from . import init
from .module import Module, Parameter


class BatchNorm2d(Module):
    """x (N, C, H, W) -> same shape.

    Parameters weight (C,) = 1 and bias (C,) = 0 when affine; buffers running_mean (C,) = 0,
    running_var (C,) = 1 and num_batches_tracked (an int64 count) when track_running_stats.
    train(): normalise with the batch statistics and update the running ones with
    `momentum` (None: a cumulative average, factor 1 / num_batches_tracked);
    eval(): normalise with the running statistics.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        xp = backend.array_module(device)
        dtype = "float32" if dtype is None else dtype
        if affine:
            self.weight = Parameter(xp.ones((num_features,), dtype=dtype))
            self.bias = Parameter(xp.zeros((num_features,), dtype=dtype))
        else:
            self.weight = self.bias = None
        if track_running_stats:
            self.register_buffer("running_mean", xp.zeros((num_features,), dtype=dtype))
            self.register_buffer("running_var", xp.ones((num_features,), dtype=dtype))
            self.register_buffer("num_batches_tracked", xp.zeros((), dtype=numpy.int64))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            init.zeros_(self.bias)

    def forward(self, x):
        return self._normalize(x, relu=False)

    def _normalize(self, x, relu):
        if len(x.shape) != 4:
            raise ValueError(f"BatchNorm2d expects a 4-D input (N, C, H, W), got shape "
                             f"{tuple(x.shape)}.")
        if x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm2d({self.num_features}) got an input with "
                             f"{x.shape[1]} channels.")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1
            if self.momentum is None:   # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        # Batch statistics when training, or when there are no running ones to use.
        use_batch_stats = self.training or self.running_mean is None
        return batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                          use_batch_stats, factor, self.eps, relu=relu)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class BatchNormReLU2d(BatchNorm2d):
    """relu(BatchNorm2d(x)) in one op: x (N, C, H, W) -> same shape, never negative.

    The same parameters, buffers and state-dict keys as BatchNorm2d (a checkpoint of one
    loads into the other); the ReLU is computed in batch norm's own pass over memory and
    its backward needs no saved mask (minidl/ops/normalization.py). U-Net's conv blocks and
    the VGG encoder (SegNet, DeconvNet) use it.
    """

    def forward(self, x):
        return self._normalize(x, relu=True)

