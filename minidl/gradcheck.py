"""gradcheck: compare an op's backward with central finite differences in float64.

For a function y = fn(x_1, ..., x_k) the backward pass computes v^T J (J the Jacobian of y
with respect to an input, v the gradient arriving at y). Finite differences estimate J
column by column: J[:, j] ~ (fn(x + eps e_j) - fn(x - eps e_j)) / (2 eps), with error
O(eps^2), which float64 keeps far below the tolerances.

    mode "full"    every entry of every Jacobian (one backward per output element, two
                   forward calls per input element): for small inputs
    mode "random"  n_directions random unit vectors u (input) and v (output):
                   v^T J u from backward against (v . fn(x + eps u) - v . fn(x - eps u)) / (2 eps):
                   cheap for large inputs, and a wrong gradient fails it with probability 1
    mode "auto"    "full" when inputs and output each have at most 256 elements, else "random"
"""
import numpy

from . import backend
from .grad_mode import no_grad
from .tensor import Tensor

FULL_LIMIT = 256


def _host(a):
    # A copy: fn may return a view of an input, which the next perturbation would change.
    return numpy.array(backend.to_numpy(a), dtype=numpy.float64, copy=True)


def _evaluate(fn, inputs):
    out = fn(*inputs)
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck() needs fn to return a Tensor, it returned {type(out).__name__}; "
                        "reduce several outputs into one, e.g. with sum().")
    return out


def _analytic_vjp(out, inputs, checked, seed):
    """Gradients of (seed . out) with respect to each checked input, as float64 host arrays."""
    for i in checked:
        inputs[i].grad = None
    if out.requires_grad:
        out.backward(seed, retain_graph=True)
    grads = []
    for i in checked:
        g = inputs[i].grad
        grads.append(numpy.zeros(inputs[i].shape) if g is None else _host(g))
        inputs[i].grad = None
    return grads


def _numeric_difference(fn, inputs, i, direction, eps):
    """(fn(x + eps d) - fn(x - eps d)) / (2 eps), moving only input i; x is restored exactly."""
    data = inputs[i].data
    xp = backend.get_array_module(data)
    original = data.copy()
    step = xp.asarray(direction * eps, dtype=data.dtype) if xp is not numpy else direction * eps
    try:
        with no_grad():
            data += step
            plus = _host(_evaluate(fn, inputs).data)
            data[...] = original
            data -= step
            minus = _host(_evaluate(fn, inputs).data)
    finally:
        data[...] = original
    return (plus - minus) / (2 * eps)


def _check_arguments(inputs, mode):
    """inputs as a list, and the indices of the Tensors to check; one sentence per mistake."""
    inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    checked = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck() needs at least one input Tensor with requires_grad=True.")
    for i in checked:
        if inputs[i].dtype != numpy.float64:
            raise ValueError(f"gradcheck() input {i} has dtype {inputs[i].dtype}; finite differences "
                             "need float64 inputs: make them with dtype='float64'.")
    if mode not in ("auto", "full", "random"):
        raise ValueError(f"gradcheck() got mode={mode!r}; use 'auto', 'full' or 'random'.")
    return inputs, checked


def _full_checks(fn, inputs, checked, out, eps):
    """Every Jacobian entry: one backward per output element, two forwards per input element.
    Returns [(input index, analytic (n_out, size), numeric (n_out, size), describe)]."""
    xp = backend.get_array_module(out.data)
    n_out = out.data.size
    rows = []
    for k in range(n_out):
        v = numpy.zeros(n_out)
        v[k] = 1.0
        seed_k = xp.asarray(v.reshape(out.shape), dtype=out.dtype)
        rows.append(_analytic_vjp(out, inputs, checked, seed_k))
    checks = []
    for slot, i in enumerate(checked):
        shape, size = inputs[i].shape, inputs[i].data.size
        jac_analytic = numpy.stack([r[slot].reshape(-1) for r in rows])   # (n_out, size)
        jac_numeric = numpy.empty((n_out, size))
        for j in range(size):
            e = numpy.zeros(size)
            e[j] = 1.0
            jac_numeric[:, j] = _numeric_difference(fn, inputs, i, e.reshape(shape), eps).reshape(-1)

        def describe(flat, shape=shape, size=size):
            k, j = divmod(flat, size)
            return (f"position {tuple(int(p) for p in numpy.unravel_index(j, shape))}, "
                    f"output {tuple(int(p) for p in numpy.unravel_index(k, out.shape))}")
        checks.append((i, jac_analytic, jac_numeric, describe))
    return checks


def _random_checks(fn, inputs, checked, out, eps, n_directions, rng):
    """v^T J u for random unit vectors v (output) and u (input), backward against finite
    differences. Returns [(input index, analytic (n,), numeric (n,), describe)]."""
    xp = backend.get_array_module(out.data)
    plans = []
    for d in range(n_directions):
        v = rng.standard_normal(out.shape)
        v /= max(numpy.linalg.norm(v), 1e-300)
        plans.append((v, _analytic_vjp(out, inputs, checked, xp.asarray(v, dtype=out.dtype))))
    checks = []
    for slot, i in enumerate(checked):
        analytic, numeric = numpy.empty(n_directions), numpy.empty(n_directions)
        for d, (v, grads) in enumerate(plans):
            u = rng.standard_normal(inputs[i].shape)
            u /= max(numpy.linalg.norm(u), 1e-300)
            numeric[d] = (v * _numeric_difference(fn, inputs, i, u, eps)).sum()
            analytic[d] = (grads[slot] * u).sum()
        checks.append((i, analytic, numeric, lambda d: f"random direction {d}"))
    return checks


def _worst_failure(checks, atol, rtol):
    """(number of failed entries, total entries, the worst failure or None) where an entry
    fails when |analytic - numeric| > atol + rtol * |numeric| (NaN fails)."""
    worst, failed, total = None, 0, 0
    for i, analytic, numeric, describe in checks:
        analytic, numeric = analytic.reshape(-1), numeric.reshape(-1)
        tolerance = atol + rtol * numpy.abs(numeric)
        excess = numpy.abs(analytic - numeric) / tolerance
        excess[~numpy.isfinite(excess)] = numpy.inf        # NaN anywhere is a failure
        failed += int((excess > 1).sum())
        total += excess.size
        k = int(numpy.argmax(excess))
        if excess[k] > 1 and (worst is None or excess[k] > worst[0]):
            worst = (excess[k], i, describe(k), analytic[k], numeric[k], tolerance[k])
    return failed, total, worst


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, mode="auto", n_directions=10,
              raise_exception=True, seed=0):
    """Check fn's backward against finite differences.

    fn:      callable taking the inputs and returning one Tensor (any shape)
    inputs:  a Tensor or a sequence of Tensors/other arguments; every Tensor with
             requires_grad=True is checked and must be float64
    Returns True when every checked entry satisfies |analytic - numeric| <= atol + rtol * |numeric|.
    Otherwise raises AssertionError naming the worst entry (input index, position, analytic
    and numeric values), or returns False when raise_exception=False.
    """
    inputs, checked = _check_arguments(inputs, mode)
    saved_grads = [inputs[i].grad for i in checked]
    out = _evaluate(fn, inputs)
    if mode == "auto":
        n_in = sum(inputs[i].data.size for i in checked)
        mode = "full" if n_in <= FULL_LIMIT and out.data.size <= FULL_LIMIT else "random"
    # All backward passes run before any input is perturbed, because ops may have saved
    # the input arrays themselves for their backward.
    try:
        if mode == "full":
            checks = _full_checks(fn, inputs, checked, out, eps)
        else:
            rng = numpy.random.default_rng(seed)
            checks = _random_checks(fn, inputs, checked, out, eps, n_directions, rng)
    finally:
        for i, g in zip(checked, saved_grads):
            inputs[i].grad = g

    failed, total, worst = _worst_failure(checks, atol, rtol)
    if failed == 0:
        return True
    _, i, where, a, n, tol = worst
    message = (f"gradcheck failed ({mode} mode): input {i} at {where}: analytic {a:.8g} vs numeric "
               f"{n:.8g} (|difference| {abs(a - n):.3g} > atol + rtol*|numeric| = {tol:.3g}); "
               f"{failed} of {total} checked entries are off.")
    if raise_exception:
        raise AssertionError(message)
    return False
