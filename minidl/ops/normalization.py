"""Batch normalisation (Ioffe & Szegedy 2015) as one fused op.

Per channel c, over the batch and all spatial positions (M values):

    training:  mu = mean(x),  var = mean((x - mu)^2)   (biased: what normalises)
               running_mean <- (1 - m) running_mean + m mu
               running_var  <- (1 - m) running_var  + m var * M / (M - 1)   (unbiased, as PyTorch)
    eval:      mu, var = running_mean, running_var
    y = (x - mu) / sqrt(var + eps) * weight + bias

Fusing it into one Function gives the compact backward instead of a graph of ten small ops.
With xhat = (x - mu) / sigma and g = gy * weight, in training (mu and var depend on x):

    gx = (g - mean(g) - xhat * mean(g * xhat)) / sigma

and in eval (statistics are constants) simply gx = g / sigma. In both, gweight = sum(gy *
xhat) and gbias = sum(gy).

relu=True also applies the ReLU that follows batch norm in most conv blocks (conv -> BN ->
ReLU in U-Net, SegNet, DeepLab v3): in the same pass over memory, with no mask kept, since
backward recomputes y > 0 from xhat. On the example U-Net a separate ReLU cost about 4% of a
training step.
"""
from .. import backend
from ..function import Function
from ..tensor import Tensor
import kernels


class BatchNorm(Function):
    """Params: running_mean, running_var (arrays or None), training, momentum, eps, relu.

    The arithmetic is in the kernel bundle (kernels/reference.py spells it out; the CPU
    bundle does it in a third of NumPy's passes over memory) on x viewed as (N, C, S).
    """

    def forward(self, x, weight=None, bias=None):
        xp, kern = backend.get_array_module(x), kernels.for_array(x)
        self.x_shape = x.shape
        n, c = x.shape[:2]
        x3 = xp.ascontiguousarray(x).reshape(n, c, -1)     # (N, C, S): a view
        fused = self._fused_statistics(x3)
        if fused:
            mean, inv_std = self._gpu_statistics(kern, x3)
        elif self.training:
            m = x3.shape[0] * x3.shape[2]
            mean, var = kern.batchnorm_stats(x3)
            if self.running_mean is not None:
                mom = self.momentum
                # In place, so the module's buffers see the update.
                self.running_mean *= 1 - mom
                self.running_mean += mom * mean.astype(self.running_mean.dtype, copy=False)
                self.running_var *= 1 - mom
                self.running_var += (mom * m / (m - 1)) * var.astype(self.running_var.dtype,
                                                                     copy=False)
        else:
            mean, var = self.running_mean.astype(x.dtype), self.running_var.astype(x.dtype)
        if not fused:
            inv_std = (1 / xp.sqrt(var + x.dtype.type(self.eps))).astype(x.dtype)
        scale = xp.ones(c, x.dtype) if weight is None else weight.astype(x.dtype, copy=False)
        shift = xp.zeros(c, x.dtype) if bias is None else bias.astype(x.dtype, copy=False)
        y, xhat = kern.batchnorm_forward(x3, mean, inv_std, scale, shift, self.relu)
        need = self.needs_input_grad
        if need:
            self.xhat, self.inv_std, self.scale = xhat, inv_std, scale
            self.relu_shift = shift if self.relu else None
        return y.reshape(x.shape)

    def _fused_statistics(self, x3):
        """On the GPU, with contiguous running statistics (if any) of x's dtype, the
        statistics, inv_std and the running update take two kernels (eval: one) instead of
        some twenty CuPy operations; the CPU keeps the code above, whose results the tests
        pin bit for bit."""
        if not backend.is_gpu_array(x3):
            return False
        running = [r for r in (self.running_mean, self.running_var) if r is not None]
        return all(r.dtype == x3.dtype and r.flags.c_contiguous for r in running)

    def _gpu_statistics(self, kern, x3):
        """x3 (N, C, S) on the GPU -> (mean, inv_std), each (C,); updates the running
        statistics in place when training (no host read: a CUDA graph can capture it)."""
        if self.training:
            return kern.batchnorm_train_statistics(x3, self.eps, self.running_mean,
                                                   self.running_var, self.momentum)
        return kern.batchnorm_eval_statistics(self.running_mean, self.running_var, self.eps)

    def backward(self, gy):
        need = self.needs_input_grad
        n, c = self.x_shape[:2]
        xp, kern = backend.get_array_module(gy), kernels.for_array(gy)
        gy3 = xp.ascontiguousarray(gy).reshape(n, c, -1)
        gx, gw, gb = kern.batchnorm_backward(gy3, self.xhat, self.inv_std, self.scale,
                                             self.training, self.relu_shift)
        return (gx.reshape(self.x_shape) if need[0] else None,
                gw if len(need) > 1 and need[1] else None,
                gb if len(need) > 2 and need[2] else None)


def _data(t):
    return t.data if isinstance(t, Tensor) else t


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, relu=False):
    """Batch normalisation, as torch.nn.functional.batch_norm.

    x: (N, C, *) (e.g. (N, C, H, W)); running_mean, running_var: (C,) arrays updated in place
    when training (either may be None only when training); weight, bias: (C,) or None.
    relu (minidl's addition): return relu(batch_norm(...)), computed in the same pass.
    """
    xa = _data(x)
    if xa.ndim < 2:
        raise ValueError(f"batch_norm: input must be (N, C, ...), got shape {tuple(xa.shape)}.")
    c = xa.shape[1]
    rm, rv = _data(running_mean), _data(running_var)
    if not training and (rm is None or rv is None):
        raise ValueError("batch_norm: evaluation (training=False) needs running_mean and "
                         "running_var; pass them or use training=True.")
    for name, v in (("running_mean", rm), ("running_var", rv), ("weight", _data(weight)),
                    ("bias", _data(bias))):
        if v is not None and tuple(v.shape) != (c,):
            raise ValueError(f"batch_norm: {name} must have shape ({c},) for an input with {c} "
                             f"channels, got {tuple(v.shape)}.")
    if training and xa.size // max(c, 1) <= 1:
        raise ValueError(f"batch_norm: training needs more than one value per channel, got "
                         f"input shape {tuple(xa.shape)}; use a batch of more than one sample "
                         "or evaluation mode.")
    if training and momentum is None:
        raise ValueError("batch_norm: momentum must be a number (BatchNorm2d turns "
                         "momentum=None into the cumulative-average factor).")
    track = training and rm is not None and rv is not None
    inputs = [x]
    if weight is not None or bias is not None:
        inputs.append(weight)
    if bias is not None:
        inputs.append(bias)
    return BatchNorm.apply(*inputs, running_mean=rm if track or not training else None,
                           running_var=rv if track or not training else None,
                           training=bool(training), momentum=momentum, eps=float(eps),
                           relu=bool(relu))
