"""Loss functions: cross_entropy (with label smoothing), nll_loss, binary_cross_entropy(_with_logits),
mse_loss, l1_loss, smooth_l1_loss, kl_div.

cross_entropy is one fused Function: it computes log_softmax once and its backward is
the closed form softmax(x) - onehot(target), scaled by the weights. That is both cheaper
and more stable than chaining log_softmax and a gather. The other losses are short
compositions of differentiable ops, so they get their gradients from those ops.

Shapes follow torch.nn.functional: logits (N, C) or (N, C, d1, ..., dk) with integer
targets (N,) or (N, d1, ..., dk); the class axis is axis 1.
"""
import math

import numpy

from .. import backend, device_checks
from ..function import Function
from ..tensor import Tensor
from . import activation
from .arithmetic import abs, log, where  # noqa: A004
import kernels

_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(name, value, allowed=_REDUCTIONS):
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name}() got reduction={value!r}; use one of {choices}.")


def _array(x):
    return x.data if isinstance(x, Tensor) else x


def _constant(x, xp, dtype=None):
    """A non-differentiable input (target, weight) as an array on xp's device."""
    if x is None:
        return None
    a = _array(x)
    a = backend.to_numpy(a) if xp.__name__ == "numpy" else xp.asarray(a)
    return a if dtype is None else a.astype(dtype, copy=False)


def _class_targets(name, logits, target, weight, ignore_index, pixel_weight=None):
    """Validate an integer target against (N, C, ...) logits and build the per-element weights.

    Returns (target_safe, loss_weight, denominator):
      target_safe  target with ignored entries replaced by class 0 (any valid id works: their
                   weight is 0), shape (N, ...)
      loss_weight  per-element factor: 0 where ignored, else class weight * pixel weight;
                   None when that is 1 everywhere
      denominator  sum of the class weights of the non-ignored targets ("mean" divides by it),
                   1 where that is 0 (_safe_denominator)
    """
    x = _array(logits)
    xp = backend.get_array_module(x)
    if x.ndim < 2:
        raise ValueError(f"{name}() needs logits of shape (N, C) or (N, C, H, W, ...), got shape "
                         f"{tuple(x.shape)}; add a batch axis with .reshape(1, -1).")
    n, c = x.shape[0], x.shape[1]
    expected = (n,) + tuple(x.shape[2:])
    t = _constant(target, xp)
    if t.dtype.kind not in "iu":
        raise TypeError(f"{name}() needs integer class ids as target, got dtype {t.dtype}; convert "
                        "it with .astype('int64') (for probability targets use kl_div or "
                        "binary_cross_entropy_with_logits).")
    if tuple(t.shape) != expected:
        raise ValueError(f"{name}() got logits of shape {tuple(x.shape)} and target of shape "
                         f"{tuple(t.shape)}; the target must have shape {expected} (the logits' "
                         "shape without the class axis 1).")
    # Weights checked before the GPU's target kernels: their pair must run to its end (the
    # second resets what the first leaves for it).
    wc = None if weight is None else _class_weight(name, weight, c, xp, x.dtype)
    pw = None if pixel_weight is None else _pixel_weight(name, pixel_weight, expected, xp, x.dtype)
    ids = _array(target)
    fused = backend.is_gpu_array(ids) and t.size > 0 and numpy.dtype(x.dtype) in _KERNEL_DTYPES
    if fused:
        t = xp.ascontiguousarray(t, dtype=numpy.int64)
        t_safe, w = kernels.for_array(t).class_targets(t, c, ignore_index, x.dtype)
    elif backend.is_gpu_array(ids):
        t_safe, w = _class_ids_checked_on_device(name, t, c, ignore_index, x.dtype)
    else:
        host = t if xp is numpy else numpy.asarray(ids)
        t_safe, w = _class_ids_checked_on_host(name, host, t, c, ignore_index, x.dtype)
    if wc is not None:
        w = wc[t_safe] if w is None else w * wc[t_safe]
    denominator = xp.asarray(t.size, dtype=x.dtype) if w is None else w.sum()
    if fused:
        denominator = _defer_class_id_check(name, t, c, ignore_index, denominator)
    else:
        denominator = _safe_denominator(denominator, xp)
    if pw is not None:
        w = pw if w is None else w * pw
    return t_safe, w, denominator


def _class_weight(name, weight, c, xp, dtype):
    wc = _constant(weight, xp, dtype)
    if tuple(wc.shape) != (c,):
        raise ValueError(f"{name}() got a class weight of shape {tuple(wc.shape)}; it must have "
                         f"shape ({c},), one weight per class.")
    return wc


def _pixel_weight(name, pixel_weight, expected, xp, dtype):
    pw = _constant(pixel_weight, xp, dtype)
    if tuple(pw.shape) != expected:
        raise ValueError(f"{name}() got pixel_weight of shape {tuple(pw.shape)}; it must have "
                         f"the target's shape {expected}.")
    return pw


# The logits' dtypes the GPU kernels of the target check write weights in (others, as
# bfloat16 logits, take the CuPy expressions of _class_ids_checked_on_device).
_KERNEL_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))


def _defer_class_id_check(name, t, c, ignore_index, denominator):
    """The GPU's record of the first id outside [0, c) of t (int64, after the kernel
    class_targets) registered with minidl.device_checks, merged on the device with the
    check's unread record, in one kernel that also makes the denominator safe. Returns it."""
    key = (name, "class ids", c)
    old = device_checks.unread(key)
    record, denominator = kernels.for_array(t).class_targets_record(t, c, ignore_index,
                                                                    denominator, old)
    device_checks.defer(key, record, _bad_class_id(name, c), merged=True)
    return denominator


def _bad_class_id(name, c):
    """The error for a target id outside [0, c): error(value) -> ValueError."""
    def error(value):
        return ValueError(f"{name}() target holds class id {value}, outside [0, {c}) for "
                          f"logits with {c} classes; fix the labels, or pass "
                          f"ignore_index={value} to skip those elements.")
    return error


def _class_ids_checked_on_host(name, host, t, c, ignore_index, dtype):
    """Class ids whose values are on the host (host: them as a NumPy array; t: the same on
    the logits' device), checked at once. Returns (target_safe, loss_weight or None)."""
    lo, hi = (int(host.min()), int(host.max())) if host.size else (0, -1)
    if 0 <= lo and hi < c and not lo <= ignore_index <= hi:
        # The common case, checked with two reductions: every id valid, none ignored.
        return t, None
    valid = host != ignore_index
    bad = valid & ((host < 0) | (host >= c))
    if bad.any():
        raise _bad_class_id(name, c)(int(host[bad].reshape(-1)[0]))
    xp = backend.get_array_module(t)
    valid = t != ignore_index
    return xp.where(valid, t, 0), valid.astype(dtype)


def _class_ids_checked_on_device(name, t, c, ignore_index, dtype):
    """Class ids on the GPU, checked without a device-to-host read: the first id outside
    [0, c) is recorded on the device and raised at the next host read (minidl.device_checks),
    and meanwhile it counts for nothing (weight 0, a safe id), as ignored ones do.
    Returns (target_safe, loss_weight)."""
    xp = backend.get_array_module(t)
    if t.size == 0:
        return t, None
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= c))
    first = bad.reshape(-1).argmax()                     # 0 when no id is bad
    record = xp.stack([bad.any().astype(numpy.int64),
                       xp.take(t.reshape(-1), first).astype(numpy.int64)])
    device_checks.defer((name, "class ids", c), record, _bad_class_id(name, c))
    keep = valid & ~bad
    return xp.where(keep, t, 0), keep.astype(dtype)


def _scale(gy, weight, denominator, reduction):
    """d(loss)/d(per-element loss) times the per-element weight (None: all ones)."""
    g = gy / denominator if reduction == "mean" else gy   # "sum": a scalar; "none": a map
    return g if weight is None else weight * g


def _target_positions(shape, target):
    """Flat indices of a[n, target[n, ...], ...] in an array a of `shape` (N, C, ...): one
    gather with them is 3x faster than take_along_axis, which indexes every axis."""
    xp = backend.get_array_module(target)
    n, c = shape[:2]
    s = target.size // max(n, 1)
    rows = xp.arange(n).reshape(n, 1) * c + target.reshape(n, s)
    return (rows * s + xp.arange(s)).reshape(-1)


class CrossEntropy(Function):
    """Fused log_softmax + weighted negative log-likelihood over axis 1.

    Params: target (N, ...) ints (ignored entries already replaced), weight (N, ...) per-element
    factors or None, denominator (for "mean"), reduction.

    With z = x - max(x) (log-sum-exp: no overflow even for logits of 1e4) and s = sum exp(z):
    loss = log(s) - z[target]; d loss / dx = softmax(x) - onehot(target). Forward keeps the
    softmax for backward, so backward needs no exp. Both run as one kernel on the GPU
    (kernels.gpu.cross_entropy_forward / _backward) on x viewed as (N, C, S).
    """
    def forward(self, x):
        n, c, s = x.shape[0], x.shape[1], math.prod(x.shape[2:])
        self.x_shape, self.x_dtype = x.shape, x.dtype
        if backend.is_gpu_array(x) and x.dtype.itemsize < 4:
            # float16 logits outside autocast: the GPU kernels take float32/float64, so the
            # softmax runs in float32 (as PyTorch accumulates it) and the results go back.
            x = x.astype("float32")
        loss, self.probs = kernels.for_array(x).cross_entropy_forward(
            x.reshape(n, c, s), self.target.reshape(n, s), _pixels(self.weight, n, s))
        loss = _reduce_array(loss.reshape(self.target.shape), self.reduction, self.denominator)
        return loss.astype(self.x_dtype, copy=False)

    def backward(self, gy):
        n, _, s = self.probs.shape
        # d(result)/d(loss element) before the weight: a scalar, or a map for "none".
        coef = gy / self.denominator if self.reduction == "mean" else gy
        if getattr(coef, "ndim", 0):
            coef = coef.reshape(n, s)
        g = kernels.for_array(self.probs).cross_entropy_backward(
            self.probs, self.target.reshape(n, s), coef, _pixels(self.weight, n, s))
        return g.reshape(self.x_shape).astype(self.x_dtype, copy=False)


def _pixels(a, n, s):
    """An (N, ...) per-element array as (N, S), or None."""
    return None if a is None else a.reshape(n, s)


class NLL(Function):
    """Weighted negative log-likelihood of log-probabilities (N, C, ...) over axis 1."""
    def forward(self, logp):
        xp = backend.get_array_module(logp)
        self.shape, self.dtype = logp.shape, logp.dtype
        self.positions = _target_positions(logp.shape, self.target)
        loss = -xp.take(logp.reshape(-1), self.positions).reshape(self.target.shape)
        if self.weight is not None:
            loss *= self.weight
        return _reduce_array(loss, self.reduction, self.denominator)

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        coef = _scale(gy, self.weight, self.denominator, self.reduction)  # scalar or a map
        g = xp.zeros(self.shape, dtype=self.dtype)
        g.reshape(-1)[self.positions] = -(coef.reshape(-1) if getattr(coef, "ndim", 0) else coef)
        return g


def _reduce_array(loss, reduction, denominator):
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / denominator


def _safe_denominator(denominator, xp):
    # All targets ignored: the numerator is exactly 0, so dividing by 1 returns 0, not NaN.
    return xp.where(denominator > 0, denominator, denominator.dtype.type(1))


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", pixel_weight=None,
                  label_smoothing=0.0):
    """Softmax cross-entropy between logits and integer class ids.

    input:        logits (N, C) or (N, C, H, W, ...), float
    target:       class ids (N,) or (N, H, W, ...), integer; entries equal to ignore_index
                  add nothing to the loss or its gradient
    weight:       (C,) class weights, or None
    pixel_weight: (N, H, W, ...) per-element factors (the U-Net weight map), or None
    reduction:    "mean" (as PyTorch: the sum of weighted losses divided by the sum of the
                  class weights of the non-ignored targets; pixel_weight multiplies each
                  element's loss but does not enter the divisor, so with no class weights and
                  nothing ignored it equals (loss_map * pixel_weight).mean()), "sum", or
                  "none" (the (N, H, W, ...) map of weighted losses).

    label_smoothing: eps in [0, 1]; the target becomes (1 - eps) onehot + eps / C, as in
                  PyTorch: loss = (1 - eps) * CE + eps * sum_c(-w_c log p_c) / C per element,
                  reduced with the same divisor.

    If every target is ignored, "mean" returns 0 with a zero gradient (PyTorch gives NaN).
    """
    _check_reduction("cross_entropy", reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy() got label_smoothing={label_smoothing}; it must be in [0, 1].")
    t, w, den = _class_targets("cross_entropy", input, target, weight, ignore_index, pixel_weight)
    loss = CrossEntropy.apply(input, target=t, weight=w, denominator=den, reduction=reduction)
    if not label_smoothing:
        return loss
    return (1 - label_smoothing) * loss + label_smoothing * _smoothing_term(
        input, target, weight, ignore_index, pixel_weight, reduction, den)


def _smoothing_term(input, target, weight, ignore_index, pixel_weight, reduction, den):
    """sum_c(-w_c log p_c) / C per element (0 where ignored), reduced like the CE term."""
    x = _as_tensor(input)
    xp = backend.get_array_module(x.data)
    c = x.shape[1]
    logp = activation.log_softmax(x, 1)
    if weight is not None:   # class weights along axis 1
        logp = logp * _constant(weight, xp, x.dtype).reshape((1, c) + (1,) * (x.ndim - 2))
    per = -logp.sum(axis=1) / float(c)
    factor = (_constant(target, xp) != ignore_index).astype(x.dtype)
    if pixel_weight is not None:
        factor = factor * _constant(pixel_weight, xp, x.dtype)
    per = per * factor
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / den


def nll_loss(input, target, weight=None, ignore_index=-100, reduction="mean"):
    """Negative log-likelihood of log-probabilities input (N, C, ...) at integer targets (N, ...).

    cross_entropy(x, t) == nll_loss(log_softmax(x, dim=1), t). Weights, ignore_index and
    reductions as in cross_entropy (all targets ignored -> 0 for "mean").
    """
    _check_reduction("nll_loss", reduction)
    t, w, den = _class_targets("nll_loss", input, target, weight, ignore_index)
    return NLL.apply(input, target=t, weight=w, denominator=den,
                     reduction=reduction)


def _reduce(loss, reduction):
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _same_shape(name, input, target):
    if tuple(input.shape) != tuple(target.shape):
        raise ValueError(f"{name}() got input of shape {tuple(input.shape)} and target of shape "
                         f"{tuple(target.shape)}; they must be equal.")


def _float_target(target, like):
    """A target that is not a Tensor becomes an array of the input's dtype and device."""
    if isinstance(target, Tensor):
        return target
    xp = backend.get_array_module(like.data)
    return _constant(target, xp, like.dtype)


def _as_tensor(x):
    return x if isinstance(x, Tensor) else Tensor(x)


def binary_cross_entropy_with_logits(input, target, weight=None, *, reduction="mean", pos_weight=None):
    """Sigmoid + binary cross-entropy in one stable formula.

    input, target: same shape (target in [0, 1]); weight: broadcastable factor per element;
    pos_weight: factor for the positive term, broadcast along the last axis (one per class).
    loss = (1 - t) x + (1 + (pos_weight - 1) t) softplus(-x), which never overflows.
    """
    _check_reduction("binary_cross_entropy_with_logits", reduction)
    x = _as_tensor(input)
    _same_shape("binary_cross_entropy_with_logits", x, target)
    t = _float_target(target, x)
    log_weight = 1
    if pos_weight is not None:
        log_weight = 1 + (_float_target(pos_weight, x) - 1) * t
    loss = (1 - t) * x + log_weight * activation.softplus(-x)
    if weight is not None:
        loss = loss * _float_target(weight, x)
    return _reduce(loss, reduction)


def mse_loss(input, target, reduction="mean"):
    """Mean squared error: (input - target)^2, reduced. input, target: same shape."""
    _check_reduction("mse_loss", reduction)
    x = _as_tensor(input)
    _same_shape("mse_loss", x, target)
    diff = x - _float_target(target, x)
    return _reduce(diff * diff, reduction)


def kl_div(input, target, reduction="mean", log_target=False):
    """Kullback-Leibler divergence KL(target || exp(input)), pointwise then reduced.

    input: log-probabilities; target: probabilities (log-probabilities if log_target).
    Pointwise: target * (log(target) - input), with 0 where target == 0.
    reduction: "batchmean" (sum / N, the true KL per sample), "sum", "mean" (over all
    elements, as torch's default), or "none".
    """
    _check_reduction("kl_div", reduction, _REDUCTIONS + ("batchmean",))
    x = _as_tensor(input)
    _same_shape("kl_div", x, target)
    t = _float_target(target, x)
    if log_target:
        t = _as_tensor(t)
        loss = t.exp() * (t - x)
    else:
        # log(1) = 0 where target is 0, so 0 * log 0 counts as 0 and its gradient stays finite.
        loss = t * log(where(_array(t) > 0, t, 1)) - t * x
    if reduction == "batchmean":
        return loss.sum() / (x.shape[0] if x.ndim else 1)
    return _reduce(loss, reduction)


class BinaryCrossEntropy(Function):
    """Element-wise -(t log p + (1 - t) log(1 - p)); p: probabilities, t: targets, same shape.

    As PyTorch: each log is clamped at -100, so p = 0 or 1 gives a finite loss, and the
    gradient (p - t) / (p (1 - p)) has its denominator clamped at 1e-12, so it stays finite
    there too (composing log and clip would give 0 * inf = NaN).
    """
    LOG_FLOOR, EPS = -100.0, 1e-12

    def forward(self, p, t):
        xp = backend.get_array_module(p)
        self.p, self.t = p, t
        with numpy.errstate(divide="ignore"):     # log(0) = -inf, clamped next (CuPy never warns)
            log_p = xp.maximum(xp.log(p), self.LOG_FLOOR)
            log_q = xp.maximum(xp.log1p(-p), self.LOG_FLOOR)
        return -(t * log_p + (1 - t) * log_q)

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        p, t = self.p, self.t
        return gy * (p - t) / xp.maximum(p * (1 - p), self.EPS), None


def binary_cross_entropy(input, target, weight=None, reduction="mean"):
    """-(t log p + (1 - t) log(1 - p)) for probabilities p = input in [0, 1].

    As PyTorch, each log is clamped at -100 so p = 0 or 1 gives a finite loss. For logits,
    binary_cross_entropy_with_logits is the stabler choice.
    """
    _check_reduction("binary_cross_entropy", reduction)
    p = _as_tensor(input)
    _same_shape("binary_cross_entropy", p, target)
    t = _float_target(target, p)
    a = _array(p)

    def error(*_):
        return ValueError("binary_cross_entropy() needs probabilities in [0, 1] as input; apply "
                          "sigmoid first or use binary_cross_entropy_with_logits.")
    if a.size and backend.is_gpu_array(a):     # no host read: checked at the next one
        failed = (a.min() < 0) | (a.max() > 1)
        device_checks.defer(("binary_cross_entropy", "range"),
                            failed.reshape(1).astype(numpy.int64), error)
    elif a.size and (float(a.min()) < 0 or float(a.max()) > 1):
        raise error()
    loss = BinaryCrossEntropy.apply(p, _array(t))
    if weight is not None:
        loss = loss * _float_target(weight, p)
    return _reduce(loss, reduction)


def l1_loss(input, target, reduction="mean"):
    """|input - target|, reduced. input, target: same shape."""
    _check_reduction("l1_loss", reduction)
    x = _as_tensor(input)
    _same_shape("l1_loss", x, target)
    return _reduce(abs(x - _float_target(target, x)), reduction)


def smooth_l1_loss(input, target, reduction="mean", beta=1.0):
    """Huber-like: 0.5 d^2 / beta where |d| < beta, else |d| - 0.5 beta (d = input - target)."""
    _check_reduction("smooth_l1_loss", reduction)
    if beta < 0:
        raise ValueError(f"smooth_l1_loss() needs beta >= 0, got {beta}.")
    x = _as_tensor(input)
    _same_shape("smooth_l1_loss", x, target)
    d = x - _float_target(target, x)
    ad = abs(d)
    if beta == 0:
        return _reduce(ad, reduction)
    loss = where(_array(ad) < beta, (0.5 / beta) * d * d, ad - 0.5 * beta)
    return _reduce(loss, reduction)
