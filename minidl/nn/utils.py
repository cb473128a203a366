"""Gradient clipping: clip_grad_norm_ and clip_grad_value_ (torch.nn.utils).

Both change each parameter's .grad in place after backward() and before optimizer.step().
"""
import math

from .. import backend
from ..tensor import Tensor


def _grads(parameters):
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    return [p for p in parameters if p.grad is not None]


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False):
    """Scale every gradient by max_norm / total_norm when the total norm exceeds max_norm.

    total_norm is the norm_type-norm of all gradients taken together (as one long vector);
    returned as a Python float. norm_type may be float("inf") (the largest |g|).
    """
    params = _grads(parameters)
    if not params:
        return 0.0
    norm_type = float(norm_type)
    if norm_type == math.inf:
        total = max(float(abs(p.grad).max()) for p in params)
    else:
        total = sum(float((abs(p.grad) ** norm_type).sum()) for p in params) ** (1.0 / norm_type)
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(f"the total gradient norm is {total}; clip_grad_norm_ cannot scale a "
                           "non-finite gradient (pass error_if_nonfinite=False to skip this check).")
    # The 1e-6 keeps the factor finite when the norm is 0 (PyTorch uses the same guard).
    factor = float(max_norm) / (total + 1e-6)
    if factor < 1:
        for p in params:
            p.grad = p.grad * p.grad.dtype.type(factor)
    return total


def clip_grad_value_(parameters, clip_value):
    """Clamp every gradient element to [-clip_value, clip_value]."""
    clip_value = float(clip_value)
    for p in _grads(parameters):
        xp = backend.get_array_module(p.grad)
        p.grad = xp.clip(p.grad, -clip_value, clip_value)
