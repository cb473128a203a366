"""Arithmetic, reduction, shape and activation ops: float64 gradchecks driven by hypothesis
(shapes with broadcasting, size-1 axes, strided inputs) and forwards against plain NumPy."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minidl
from minidl import functional as F
from conftest import assert_close
from strategies import broadcastable_shape_pairs, check_grad, float64_arrays, shapes, values


def t(a, device="cpu"):
    return minidl.tensor(a, device=device)


# ---------------------------------------------------------------------- binary arithmetic
BINARY = {
    # name: (minidl op, NumPy reference, options for the second operand's values)
    "add": (F.add, np.add, {}),
    "sub": (F.sub, np.subtract, {}),
    "mul": (F.mul, np.multiply, {}),
    "div": (F.div, np.divide, {"low": 0.5}),          # keep the divisor away from 0
    "maximum": (F.maximum, np.maximum, {}),
    "minimum": (F.minimum, np.minimum, {}),
}


@pytest.mark.parametrize("name", sorted(BINARY))
@given(data=st.data(), pair=broadcastable_shape_pairs())
def test_binary_ops_gradcheck_with_broadcasting(name, data, pair):
    op, ref, b_opts = BINARY[name]
    a = data.draw(float64_arrays(pair[0]))
    b = data.draw(float64_arrays(pair[1], **b_opts))
    assert_close(op(t(a), t(b)).data, ref(a, b), rtol=1e-12)
    check_grad(op, a, b)


@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_ops_match_numpy_on_device(name, device, xp):
    op, ref, _ = BINARY[name]
    a, b = values(1, (3, 4)), values(2, (4,), low=0.5)
    out = op(t(a, device), t(b, device))
    assert out.device == device
    assert_close(out.data, ref(a, b), rtol=1e-12)


def test_binary_ops_with_python_scalars_keep_float32():
    x = minidl.tensor(values(0, (2, 3)).astype(np.float32))
    for out in (x + 1, 2.0 - x, x * 3, x / 4.0, x ** 2, F.maximum(x, 0.5), F.minimum(1.0, x)):
        assert out.dtype == np.float32


@given(data=st.data(), pair=broadcastable_shape_pairs())
def test_pow_of_two_tensors(data, pair):
    a = data.draw(float64_arrays(pair[0], low=0.5, positive=True))
    b = data.draw(float64_arrays(pair[1], high=1.5))
    assert_close(F.pow(t(a), t(b)).data, a ** b, rtol=1e-12)
    check_grad(F.pow, a, b)


@given(data=st.data(), shape=shapes(), p=st.sampled_from([2, 3, 0.5, -1.5]))
def test_pow_scalar_exponent(data, shape, p):
    a = data.draw(float64_arrays(shape, low=0.5, positive=True))
    assert_close((t(a) ** p).data, a ** p, rtol=1e-12)
    check_grad(lambda x: x ** p, a)


@settings(max_examples=15)
@given(data=st.data(), n=st.integers(1, 4), k=st.integers(1, 4), m=st.integers(1, 4),
       batch=st.sampled_from([(), (2,), (2, 1)]), form=st.sampled_from(["mm", "vec_left", "vec_right"]))
def test_matmul(data, n, k, m, batch, form):
    shape_a = {"mm": batch + (n, k), "vec_left": (k,), "vec_right": batch + (n, k)}[form]
    shape_b = {"mm": (k, m), "vec_left": batch + (k, m), "vec_right": (k,)}[form]
    a, b = data.draw(float64_arrays(shape_a)), data.draw(float64_arrays(shape_b))
    assert_close(F.matmul(t(a), t(b)).data, a @ b, rtol=1e-12)
    assert_close((t(a) @ t(b)).data, a @ b, rtol=1e-12)
    check_grad(F.matmul, a, b)


def test_matmul_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="do not fit"):
        F.matmul(t(np.ones((2, 3))), t(np.ones((2, 3))))


# ---------------------------------------------------------------------- unary arithmetic
UNARY = {
    # name: (minidl op, NumPy reference, value options)
    "neg": (F.neg, np.negative, {}),
    "exp": (F.exp, np.exp, {}),
    "log": (F.log, np.log, {"positive": True}),
    "sqrt": (F.sqrt, np.sqrt, {"positive": True}),
    "abs": (F.abs, np.abs, {}),                          # values keep a margin from the kink at 0
    "clip": (lambda x: F.clip(x, -1.0, 1.0), lambda a: np.clip(a, -1.0, 1.0),
             {"away_from": (-1.0, 1.0)}),
    "clip_low": (lambda x: x.clip(min=0.5), lambda a: np.clip(a, 0.5, None), {"away_from": (0.5,)}),
    "relu": (F.relu, lambda a: np.maximum(a, 0), {}),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.2), lambda a: np.where(a > 0, a, 0.2 * a), {}),
    "sigmoid": (F.sigmoid, lambda a: 1 / (1 + np.exp(-a)), {"high": 6.0}),
    "tanh": (F.tanh, np.tanh, {}),
    "softplus": (F.softplus, lambda a: np.log1p(np.exp(a)), {"high": 6.0}),
    "softplus_beta": (lambda x: F.softplus(x, beta=2.0, threshold=3.0),
                      lambda a: np.where(2 * a > 3, a, np.log1p(np.exp(2 * a)) / 2),
                      {"away_from": (1.5,)}),
    "tensor_methods": (lambda x: x.relu() + x.sigmoid() * x.tanh(),
                       lambda a: np.maximum(a, 0) + np.tanh(a) / (1 + np.exp(-a)), {}),
}


@pytest.mark.parametrize("name", sorted(UNARY))
@given(data=st.data(), shape=shapes())
def test_unary_ops(name, data, shape):
    op, ref, opts = UNARY[name]
    a = data.draw(float64_arrays(shape, **opts))
    assert_close(op(t(a)).data, ref(a), rtol=1e-10, atol=1e-12)
    check_grad(op, a)


@pytest.mark.parametrize("name", ["relu", "sigmoid", "tanh", "exp", "abs"])
def test_unary_ops_on_device(name, device):
    op, ref, _ = UNARY[name]
    a = values(3, (5, 6))
    out = op(t(a, device))
    assert out.device == device
    assert_close(out.data, ref(a), rtol=1e-12)


def test_sigmoid_and_softplus_are_stable_for_huge_inputs():
    x = minidl.tensor(np.array([-1e4, -50.0, 0.0, 50.0, 1e4], dtype=np.float32), requires_grad=True)
    y = F.sigmoid(x)
    s = F.softplus(x)
    (y + s).sum().backward()
    assert np.all(np.isfinite(y.data)) and np.all(np.isfinite(s.data)) and np.all(np.isfinite(x.grad))
    assert_close(y.data, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)
    assert_close(s.data, [0.0, 0.0, np.log(2), 50.0, 1e4], atol=1e-6)


@given(data=st.data(), shape=shapes(min_dims=1))
def test_where(data, shape):
    a, b = data.draw(float64_arrays(shape)), data.draw(float64_arrays(shape))
    cond = values(0, shape) > 0
    assert_close(F.where(cond, t(a), t(b)).data, np.where(cond, a, b))
    check_grad(lambda x, y: F.where(cond, x, y), a, b)
    check_grad(lambda x: F.where(cond, x, 0.0), a)


# ---------------------------------------------------------------------- reductions
def axis_choices(ndim):
    options = [None] + list(range(-ndim, ndim))
    if ndim >= 2:
        options.append((0, ndim - 1))
    return st.sampled_from(options)


REDUCTIONS = {"sum": (F.sum, np.sum), "mean": (F.mean, np.mean), "max": (F.max, np.max),
              "min": (F.min, np.min)}


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
@given(data=st.data(), shape=shapes(), keepdims=st.booleans())
def test_reductions(name, data, shape, keepdims):
    op, ref = REDUCTIONS[name]
    axis = data.draw(axis_choices(len(shape))) if shape else None
    a = data.draw(float64_arrays(shape))
    # max/min along one int dim return (values, indices), as torch.max(x, dim) does.
    pair = name in ("max", "min") and isinstance(axis, int)
    value = (lambda r: r.values) if pair else (lambda r: r)
    out = op(t(a), axis=axis, keepdims=keepdims)
    assert_close(value(out).data, ref(a, axis=axis, keepdims=keepdims), rtol=1e-12)
    if pair:
        arg = np.argmax if name == "max" else np.argmin
        np.testing.assert_array_equal(out.indices.data, arg(a, axis=axis, keepdims=keepdims))
    method = getattr(t(a), name)(axis=axis, keepdims=keepdims)
    assert_close(value(method).data, value(out).data)
    check_grad(lambda x: value(op(x, axis=axis, keepdims=keepdims)), a)


def test_max_ties_share_the_gradient():
    x = minidl.tensor(np.array([1.0, 3.0, 3.0]), requires_grad=True)
    x.max().backward()
    assert_close(x.grad, [0.0, 0.5, 0.5])


def test_reduction_axis_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        t(np.ones((2, 3))).sum(axis=2)


# ---------------------------------------------------------------------- shapes and indexing
@given(data=st.data(), shape=shapes(min_dims=1))
def test_reshape_flatten_unsqueeze_squeeze(data, shape):
    a = data.draw(float64_arrays(shape))
    assert_close(F.reshape(t(a), -1).data, a.reshape(-1))
    assert_close(F.flatten(t(a)).data, a.reshape(-1))
    assert t(a).unsqueeze(0).shape == (1,) + shape
    assert t(a).unsqueeze(-1).squeeze(-1).shape == shape
    assert t(a).squeeze().shape == tuple(n for n in shape if n != 1)
    check_grad(lambda x: F.reshape(x, *reversed(shape)) * F.reshape(x, -1)[0], a)
    check_grad(lambda x: x.unsqueeze(1).squeeze() * 2.0, a)


@given(data=st.data(), shape=shapes(min_dims=1))
def test_permute(data, shape):
    a = data.draw(float64_arrays(shape))
    axes = data.draw(st.permutations(range(len(shape))))
    assert_close(F.permute(t(a), *axes).data, a.transpose(axes))
    assert_close(t(a).T.data, a.T)
    check_grad(lambda x: F.permute(x, *axes) * np.arange(a.size).reshape(a.transpose(axes).shape), a)


@given(data=st.data(), shape=shapes(min_dims=2, min_side=2))
def test_getitem_basic_and_integer_array(data, shape):
    a = data.draw(float64_arrays(shape))
    basic = (slice(1, None), 0)
    picks = np.array([0, 1, 1, 0])                       # repeated rows: gradients must add
    assert_close(t(a)[basic].data, a[basic])
    assert_close(t(a)[picks].data, a[picks])
    check_grad(lambda x: x[basic] * 3.0, a)
    check_grad(lambda x: x[picks] * np.arange(picks.size).reshape((-1,) + (1,) * (len(shape) - 1)), a)
    check_grad(lambda x: x[..., ::2], a)


@given(data=st.data(), shape=shapes(min_dims=1), count=st.integers(1, 3))
def test_cat_and_stack(data, shape, count):
    arrays = [data.draw(float64_arrays(shape)) for _ in range(count)]
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    assert_close(F.cat([t(a) for a in arrays], axis=axis).data, np.concatenate(arrays, axis=axis))
    assert_close(F.stack([t(a) for a in arrays], axis=0).data, np.stack(arrays))
    weights = np.arange(np.concatenate(arrays, axis=axis).size).reshape(
        np.concatenate(arrays, axis=axis).shape)
    check_grad(lambda *xs: minidl.cat(list(xs), axis=axis) * weights, *arrays)
    check_grad(lambda *xs: minidl.stack(list(xs), axis=-1) * 2.0, *arrays)


def test_cat_and_stack_shape_errors():
    with pytest.raises(ValueError, match="equal sizes"):
        F.cat([t(np.ones((2, 3))), t(np.ones((3, 3)))], axis=1)
    with pytest.raises(ValueError, match="one shape"):
        F.stack([t(np.ones(2)), t(np.ones(3))])


# ---------------------------------------------------------------------- softmax family
@given(data=st.data(), shape=shapes(min_dims=1))
def test_softmax_and_log_softmax(data, shape):
    a = data.draw(float64_arrays(shape, high=3.0))
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    e = np.exp(a - a.max(axis=dim, keepdims=True))
    ref = e / e.sum(axis=dim, keepdims=True)
    assert_close(F.softmax(t(a), dim).data, ref, rtol=1e-12)
    assert_close(F.log_softmax(t(a), dim).data, np.log(ref), rtol=1e-10, atol=1e-12)
    assert_close(t(a).softmax(dim).data, ref, rtol=1e-12)
    assert_close(t(a).log_softmax(dim).data, np.log(ref), rtol=1e-10, atol=1e-12)
    w = values(7, shape)           # a non-uniform upstream gradient
    check_grad(lambda x: F.softmax(x, dim) * w, a)
    check_grad(lambda x: F.log_softmax(x, dim) * w, a)


def test_log_softmax_is_finite_on_huge_logits(device):
    x = minidl.tensor(np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], dtype=np.float32),
                      requires_grad=True, device=device)
    y = F.log_softmax(x, dim=1)
    (y * minidl.tensor(np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]], np.float32), device=device)).sum().backward()
    assert np.all(np.isfinite(minidl.backend.to_numpy(y.data)))
    assert np.all(np.isfinite(minidl.backend.to_numpy(x.grad)))
    assert_close(y.data, [[0.0, -2e4, -1e4], [-np.log(3)] * 3], rtol=1e-6)
    assert_close(F.softmax(x, 1).data, [[1.0, 0.0, 0.0], [1 / 3] * 3], atol=1e-7)


def test_softmax_needs_a_valid_dim():
    with pytest.raises(TypeError, match="needs the axis"):
        F.softmax(t(np.ones((2, 3))), None)
    with pytest.raises(ValueError, match="dim=2"):
        F.log_softmax(t(np.ones((2, 3))), 2)
