"""Synchronised batch normalisation: batch statistics over the global batch of all ranks.

In data-parallel training each rank sees only its part of the batch (N / world_size
samples), too few for good batch statistics on small per-GPU batches. SyncBatchNorm computes
the mean and variance of the whole batch instead, from per-channel sums that one all-reduce
adds up over the ranks (M = number of values per channel over all ranks):

    forward:   S1 = sum(x), S2 = sum(x^2), M           (all-reduced)
               mu = S1 / M,  var = S2 / M - mu^2
    backward:  with g = gy * weight, the training gradient of batch norm
               gx = (g - mean(g) - xhat * mean(g * xhat)) / sigma
               needs means over the global batch too: sum(gy) and sum(gy * xhat) are all-reduced.

The weight and bias gradients stay per rank (sum(gy * xhat), sum(gy) over the local part):
DistributedDataParallel averages them with the other gradients. With one process (or no
process group) this is exactly BatchNorm. The arithmetic itself is the kernel bundle's, as in
minidl/ops/normalization.py.
"""
from .. import backend, distributed
from ..function import Function
import kernels


def _sum_over_ranks(a):
    if distributed.get_world_size() > 1:
        distributed.all_reduce(a)
    return a


class SyncBatchNorm(Function):
    """Params: running_mean, running_var (arrays or None), momentum, eps, relu. Training only
    (evaluation uses the running statistics and needs no communication: ops/normalization.py)."""

    def forward(self, x, weight, bias):
        xp, kern = backend.get_array_module(x), kernels.for_array(x)
        self.x_shape = x.shape
        n, c = x.shape[:2]
        x3 = xp.ascontiguousarray(x).reshape(n, c, -1)     # (N, C, S)
        # Sums in float64 so that var = E[x^2] - mu^2 does not cancel badly in float32.
        x64 = x3.astype(xp.float64, copy=False)
        stats = xp.concatenate([x64.sum(axis=(0, 2)), (x64 * x64).sum(axis=(0, 2)),
                                xp.full(1, x3.shape[0] * x3.shape[2], dtype=xp.float64)])
        _sum_over_ranks(stats)
        m = float(stats[-1])
        mean64 = stats[:c] / m
        var64 = xp.maximum(stats[c:2 * c] / m - mean64 * mean64, 0)
        self.m = m
        if self.running_mean is not None:
            mom = self.momentum
            self.running_mean *= 1 - mom
            self.running_mean += (mom * mean64).astype(self.running_mean.dtype)
            self.running_var *= 1 - mom
            self.running_var += (mom * m / max(m - 1, 1) * var64).astype(self.running_var.dtype)
        mean = mean64.astype(x.dtype)
        inv_std = (1 / xp.sqrt(var64 + self.eps)).astype(x.dtype)
        y, xhat = kern.batchnorm_forward(x3, mean, inv_std, weight, bias, self.relu)
        self.xhat, self.inv_std, self.scale = xhat, inv_std, weight
        self.relu_shift = bias if self.relu else None
        return y.reshape(x.shape)

    def backward(self, gy):
        n, c = self.x_shape[:2]
        xp, kern = backend.get_array_module(gy), kernels.for_array(gy)
        gy3 = xp.ascontiguousarray(gy).reshape(n, c, -1)
        # Local sums (and the ReLU mask) from the kernel in evaluation form, then the global
        # sums put into the training formula by hand.
        _, gscale, gshift = kern.batchnorm_backward(gy3, self.xhat, self.inv_std, self.scale,
                                                    False, self.relu_shift)
        if self.relu_shift is not None:
            gy3 = gy3 * (self.xhat * self.scale[:, None] + self.relu_shift[:, None] > 0)
        sums = _sum_over_ranks(xp.concatenate([gshift, gscale]).astype(xp.float64))
        mean_gy = (sums[:c] / self.m).astype(gy.dtype)
        mean_gy_xhat = (sums[c:] / self.m).astype(gy.dtype)
        k = (self.scale * self.inv_std)[:, None]
        gx = k * (gy3 - mean_gy[:, None] - self.xhat * mean_gy_xhat[:, None])
        return gx.astype(gy.dtype).reshape(self.x_shape), gscale, gshift


def sync_batch_norm(x, running_mean, running_var, weight, bias, momentum=0.1, eps=1e-5, *,
                    relu=False):
    """Training-mode batch norm with statistics over all ranks. x: (N, C, *); running_mean,
    running_var: (C,) arrays updated in place, or None; weight, bias: (C,) Tensors (or arrays).
    relu: return relu(batch_norm(...)), as batch_norm's relu=True."""
    xa = x.data if hasattr(x, "grad") else x
    xp, c = backend.get_array_module(xa), xa.shape[1]
    weight = xp.ones(c, xa.dtype) if weight is None else weight     # affine=False
    bias = xp.zeros(c, xa.dtype) if bias is None else bias
    return SyncBatchNorm.apply(x, weight, bias, running_mean=running_mean,
                               running_var=running_var, momentum=momentum, eps=float(eps),
                               relu=bool(relu))
