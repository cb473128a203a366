"""SyncBatchNorm: BatchNorm2d whose training statistics cover the batch of every rank.

    model = SyncBatchNorm.convert_sync_batchnorm(model)    # before DistributedDataParallel
    model = DistributedDataParallel(model)

The same parameters, buffers and state-dict keys as BatchNorm2d; evaluation uses the running
statistics exactly like BatchNorm2d (no communication). minidl/ops/sync_batchnorm.py has the
maths.
"""
from ..ops.sync_batchnorm import sync_batch_norm
from .normalization import BatchNorm2d, BatchNormReLU2d


class SyncBatchNorm(BatchNorm2d):
    """x (N, C, *) -> same shape; in training normalised with the mean and variance over all
    ranks' batches (minidl.distributed; one process without a process group is BatchNorm)."""

    _relu = False

    def forward(self, x):
        if len(x.shape) < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) expects an input "
                             f"(N, {self.num_features}, ...), got shape {tuple(x.shape)}.")
        if not self.training:
            return self._normalize(x, relu=self._relu)   # running statistics: BatchNorm2d's
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked += 1
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return sync_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                               factor, self.eps, relu=self._relu)

    @classmethod
    def convert_sync_batchnorm(cls, module):
        """Return `module` with every BatchNorm2d replaced by a SyncBatchNorm (BatchNormReLU2d
        by SyncBatchNormReLU2d) that shares its parameters and buffers. Converts in place
        below the top; the top module itself is returned converted when it is a batch norm."""
        if isinstance(module, BatchNorm2d) and not isinstance(module, SyncBatchNorm):
            kind = SyncBatchNormReLU2d if isinstance(module, BatchNormReLU2d) else SyncBatchNorm
            new = kind.__new__(kind)
            new.__dict__.update(module.__dict__)   # the same Parameters, buffers and settings
            return new
        for name, child in list(module._modules.items()):
            if child is not None:
                module._modules[name] = cls.convert_sync_batchnorm(child)
        return module


class SyncBatchNormReLU2d(SyncBatchNorm):
    """relu(SyncBatchNorm(x)) in one op, as BatchNormReLU2d is for BatchNorm2d."""

    _relu = True
