"""The Tensor API as a PyTorch user types it: dims (transpose/permute/.T/.mT, dim/keepdim
reductions, max(dim) pairs), size/numel/dim, the copy/broadcast/index methods, in-place ops,
factories and dtype names. Each differentiable op: a float64 gradcheck driven by hypothesis
and a plain NumPy reference written from PyTorch's documented behaviour."""
import math

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

import minidl
from minidl import functional as F
from conftest import assert_close, to_numpy
from strategies import check_grad, float64_arrays, shapes


def t(a, device="cpu", **kwargs):
    return minidl.tensor(a, device=device, **kwargs)


def weights(shape):
    """Distinct output weights, so a gradcheck of sum(out * w) sees every output separately."""
    return np.arange(1, math.prod(shape) + 1, dtype=np.float64).reshape(shape)


# ---------------------------------------------------------------------- dims
def test_transpose_swaps_two_dims_of_a_matrix():
    # The silent difference this fixes: NumPy's a.transpose(0, 1) is the identity on 2-D.
    a = np.arange(6.0).reshape(2, 3)
    assert_close(t(a).transpose(0, 1).data, a.T)
    assert_close(t(a).transpose(1, 0).data, a.T)
    assert_close(t(a).transpose(-1, -2).data, a.T)


@given(data=st.data(), shape=shapes(min_dims=1, max_dims=4))
def test_transpose_matches_swapaxes_and_gradchecks(data, shape):
    a = data.draw(float64_arrays(shape))
    d0 = data.draw(st.integers(-len(shape), len(shape) - 1))
    d1 = data.draw(st.integers(-len(shape), len(shape) - 1))
    expected = np.swapaxes(a, d0, d1)
    assert_close(t(a).transpose(d0, d1).data, expected)
    assert_close(F.transpose(t(a), d0, d1).data, expected)
    check_grad(lambda x: x.transpose(d0, d1) * weights(expected.shape), a)


@given(data=st.data(), shape=shapes(min_dims=2, max_dims=4))
def test_T_reverses_and_mT_swaps_the_last_two(data, shape):
    a = data.draw(float64_arrays(shape))
    assert_close(t(a).T.data, np.transpose(a))
    assert_close(t(a).mT.data, np.swapaxes(a, -1, -2))
    check_grad(lambda x: x.mT * weights(np.swapaxes(a, -1, -2).shape), a)


def test_permute_and_transpose_reject_bad_dims():
    x = t(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="not a permutation"):
        x.permute(0, 0, 1)
    with pytest.raises(ValueError, match="got dim 3 for a tensor with 3 dimensions"):
        x.transpose(0, 3)
    with pytest.raises(TypeError):
        x.transpose(2, 0, 1)          # three dims: that is permute(2, 0, 1)
    assert x.permute(2, 0, 1).shape == (4, 2, 3) and x.permute((1, 2, 0)).shape == (3, 4, 2)


def test_size_numel_dim_and_number_conversions():
    x = t(np.ones((2, 3, 4), dtype=np.float32))
    assert x.size() == (2, 3, 4) and x.size(1) == 3 and x.size(-1) == 4
    assert x.numel() == 24 and x.dim() == 3
    one = t(np.array([[2.5]]))
    assert float(one) == 2.5 and int(one) == 2 and isinstance(float(one), float)
    with pytest.raises(ValueError, match="one element"):
        float(x)


# ---------------------------------------------------------------------- reductions
def dim_choices(ndim):
    return st.one_of(st.none(), st.integers(-ndim, ndim - 1),
                     st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True)
                     .map(tuple))


@pytest.mark.parametrize("name", ["sum", "mean", "amax", "amin"])
@given(data=st.data(), shape=shapes(min_dims=1), keepdim=st.booleans())
def test_reductions_take_dim_and_keepdim(name, data, shape, keepdim):
    a = data.draw(float64_arrays(shape))
    dim = data.draw(dim_choices(len(shape)))
    ref = {"sum": np.sum, "mean": np.mean, "amax": np.max, "amin": np.min}[name]
    expected = ref(a, axis=dim, keepdims=keepdim)
    assert_close(getattr(t(a), name)(dim, keepdim).data, expected, rtol=1e-12)
    assert_close(getattr(t(a), name)(dim=dim, keepdim=keepdim).data, expected, rtol=1e-12)
    assert_close(getattr(t(a), name)(axis=dim, keepdims=keepdim).data, expected, rtol=1e-12)
    check_grad(lambda x: getattr(F, name)(x, dim, keepdim), a)


def test_dim_and_axis_together_is_an_error():
    with pytest.raises(TypeError, match="both dim and axis"):
        t(np.ones((2, 3))).sum(0, axis=1)


@pytest.mark.parametrize("name", ["max", "min"])
@given(data=st.data(), shape=shapes(min_dims=1), keepdim=st.booleans())
def test_max_min_along_a_dim_return_values_and_indices(name, data, shape, keepdim):
    a = data.draw(float64_arrays(shape))
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    out = getattr(t(a), name)(dim, keepdim=keepdim)
    values, indices = out               # unpacks like torch.return_types.max
    assert out.values is values and out.indices is indices
    ref, arg = (np.max, np.argmax) if name == "max" else (np.min, np.argmin)
    assert_close(values.data, ref(a, axis=dim, keepdims=keepdim), rtol=1e-12)
    np.testing.assert_array_equal(indices.data, arg(a, axis=dim, keepdims=keepdim))
    assert indices.dtype == np.int64
    check_grad(lambda x: getattr(x, name)(dim, keepdim).values, a)


def test_max_along_dim_sends_the_gradient_to_the_index_on_ties(device):
    # torch.max(x, dim) backpropagates through the returned index only; max() of everything
    # shares tied gradients (tested in test_ops_elementwise).
    x = t(np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]]), device, requires_grad=True)
    values, indices = x.max(1)
    values.sum().backward()
    assert_close(indices.data, [1, 0])
    assert_close(x.grad, [[0, 1, 0], [1, 0, 0]])


def test_max_of_two_tensors_is_elementwise():
    a, b = np.array([1.0, 5.0]), np.array([3.0, 2.0])
    assert_close(minidl.max(t(a), t(b)).data, np.maximum(a, b))
    assert_close(minidl.min(t(a), t(b)).data, np.minimum(a, b))


@given(data=st.data(), shape=shapes(min_dims=1), keepdim=st.booleans())
def test_argmax_argmin(data, shape, keepdim):
    a = data.draw(float64_arrays(shape))
    dim = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
    for name, ref in (("argmax", np.argmax), ("argmin", np.argmin)):
        got = getattr(t(a), name)(dim, keepdim).data
        if dim is None and keepdim:      # torch keeps every dim with length 1
            expected = np.reshape(ref(a), (1,) * a.ndim)
        else:
            expected = ref(a, axis=dim, keepdims=keepdim)
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(minidl.argmax(t(a)).data, np.argmax(a))


@given(data=st.data(), shape=shapes(min_dims=1, min_side=2), correction=st.sampled_from([0, 1, 2]))
def test_var_std_with_correction(data, shape, correction):
    a = data.draw(float64_arrays(shape))
    dim = data.draw(dim_choices(len(shape)))
    count = a.size if dim is None else math.prod(np.array(a.shape)[list(np.atleast_1d(dim))])
    assume(count > correction)
    # torch.var: sum((x - mean)^2) / (N - correction)
    dev = a - a.mean(axis=dim, keepdims=True)
    expected = (dev ** 2).sum(axis=dim) / (count - correction)
    assert_close(t(a).var(dim, correction=correction).data, expected, rtol=1e-10)
    assert_close(t(a).std(dim, correction=correction).data, np.sqrt(expected), rtol=1e-10)
    check_grad(lambda x: x.var(dim, correction=correction), a)
    check_grad(lambda x: x.std(dim, correction=correction), a)


def test_var_is_unbiased_by_default_and_unbiased_false_is_population():
    a = np.array([1.0, 2.0, 4.0, 7.0])
    assert_close(t(a).var().data, np.var(a, ddof=1))
    assert_close(t(a).var(unbiased=False).data, np.var(a))
    assert_close(minidl.std(t(a), keepdim=True).data, [np.std(a, ddof=1)])


@pytest.mark.parametrize("p", [1, 2, "fro", 3, math.inf])
@given(data=st.data(), shape=shapes(min_dims=1), keepdim=st.booleans())
def test_norm(p, data, shape, keepdim):
    a = data.draw(float64_arrays(shape))
    dim = data.draw(dim_choices(len(shape)))
    q = 2 if p == "fro" else p
    absa = np.abs(a)
    expected = (absa.max(axis=dim, keepdims=keepdim) if q == math.inf else
                (absa ** q).sum(axis=dim, keepdims=keepdim) ** (1 / q))
    assert_close(t(a).norm(p, dim, keepdim).data, expected, rtol=1e-10)
    check_grad(lambda x: x.norm(p, dim, keepdim), a)


def test_norm_2_gradient_is_zero_at_an_all_zero_input_like_torch(device):
    x = minidl.tensor(np.zeros((2, 3)), requires_grad=True, device=device)
    y = minidl.tensor(np.array([[3.0, 4.0], [0.0, 0.0]]), requires_grad=True, device=device)
    x.norm().backward()
    y.norm(dim=1).sum().backward()
    assert_close(minidl.backend.to_numpy(x.grad), np.zeros((2, 3)))
    assert_close(minidl.backend.to_numpy(y.grad), [[0.6, 0.8], [0.0, 0.0]])


def test_norm_rejects_unknown_p():
    with pytest.raises(ValueError, match="norm\\(\\) supports p"):
        t(np.ones(3)).norm("nuc")


@given(data=st.data(), shape=shapes(min_dims=1, max_dims=3))
def test_cat_and_stack_take_dim(data, shape):
    a, b = data.draw(float64_arrays(shape)), data.draw(float64_arrays(shape))
    d = data.draw(st.integers(0, len(shape) - 1))
    assert_close(minidl.cat([t(a), t(b)], dim=d).data, np.concatenate([a, b], axis=d))
    assert_close(minidl.cat([t(a), t(b)], axis=d).data, np.concatenate([a, b], axis=d))
    assert_close(minidl.stack([t(a), t(b)], d).data, np.stack([a, b], axis=d))
    check_grad(lambda x, y: minidl.stack([x, y], dim=d) * weights(np.stack([a, b], d).shape), a, b)


# ---------------------------------------------------------------------- copies and broadcasts
def test_clone_copies_and_contiguous_only_when_needed():
    a = np.arange(6.0).reshape(2, 3)
    x = t(a, requires_grad=True)
    c = x.clone()
    c.data[0, 0] = 100.0
    assert x.data[0, 0] == 0.0
    (c * 2).sum().backward()
    assert_close(x.grad, np.full((2, 3), 2.0))
    assert x.contiguous() is x
    s = x.transpose(0, 1).contiguous()
    assert s.data.flags.c_contiguous and s.requires_grad
    assert_close(s.data, a.T)


@given(data=st.data(), shape=shapes(max_dims=3, max_side=3))
def test_expand(data, shape):
    # Some dims of length 1 grow, others stay (-1), and one new leading dim is added.
    a = data.draw(float64_arrays(shape))
    grow = [data.draw(st.integers(1, 3)) if n == 1 else -1 for n in shape]
    sizes = [2] + grow
    expected = np.broadcast_to(a, [2] + [g if g != -1 else n for g, n in zip(grow, shape)])
    assert_close(t(a).expand(*sizes).data, expected)
    check_grad(lambda x: x.expand(sizes) * weights(expected.shape), a)


def test_expand_refuses_to_grow_a_dim_longer_than_one():
    with pytest.raises(ValueError, match="only dims of size 1"):
        t(np.ones((2, 3))).expand(4, 3)


@given(data=st.data(), shape=shapes(min_dims=1, max_dims=3, max_side=3))
def test_repeat_matches_tile(data, shape):
    a = data.draw(float64_arrays(shape))
    reps = [data.draw(st.integers(1, 3)) for _ in range(len(shape) + data.draw(st.integers(0, 1)))]
    expected = np.tile(a, reps)
    assert_close(t(a).repeat(*reps).data, expected)
    check_grad(lambda x: x.repeat(reps) * weights(expected.shape), a)


def test_repeat_needs_a_count_per_dim():
    with pytest.raises(ValueError, match="one per dim"):
        t(np.ones((2, 3))).repeat(2)


def np_gather(a, dim, index):
    """torch.gather from its documented formula, one element at a time."""
    out = np.empty(index.shape, dtype=a.dtype)
    for pos in np.ndindex(*index.shape):
        src = list(pos)
        src[dim] = index[pos]
        out[pos] = a[tuple(src)]
    return out


@given(data=st.data(), shape=shapes(min_dims=1, max_dims=3))
def test_gather(data, shape):
    a = data.draw(float64_arrays(shape))
    dim = data.draw(st.integers(0, len(shape) - 1))
    # An index no larger than a in the other dims (torch allows smaller), repeats allowed.
    ishape = tuple(data.draw(st.integers(1, n)) if d != dim else data.draw(st.integers(1, 4))
                   for d, n in enumerate(shape))
    seed = data.draw(st.integers(0, 2 ** 31))
    index = np.random.default_rng(seed).integers(0, shape[dim], ishape)
    assert_close(t(a).gather(dim, t(index)).data, np_gather(a, dim, index))
    check_grad(lambda x: F.gather(x, dim, index) * weights(ishape), a)


def np_scatter(a, dim, index, src):
    out = a.copy()
    for pos in np.ndindex(*index.shape):
        dst = list(pos)
        dst[dim] = index[pos]
        out[tuple(dst)] = src[pos]
    return out


@given(data=st.data(), shape=shapes(min_dims=1, max_dims=3))
def test_scatter(data, shape):
    a = data.draw(float64_arrays(shape))
    dim = data.draw(st.integers(0, len(shape) - 1))
    seed = data.draw(st.integers(0, 2 ** 31))
    rng = np.random.default_rng(seed)
    # Distinct targets along dim (repeats have no defined winner in torch).
    k = data.draw(st.integers(1, shape[dim]))
    ishape = shape[:dim] + (k,) + shape[dim + 1:]
    index = np.argsort(rng.random(shape), axis=dim).take(range(k), axis=dim)
    src = data.draw(float64_arrays(ishape))
    assert_close(t(a).scatter(dim, t(index), t(src)).data, np_scatter(a, dim, index, src))
    check_grad(lambda x, s: F.scatter(x, dim, index, s) * weights(shape), a, src)
    assert_close(t(a).scatter(dim, index, value=7.0).data,
                 np_scatter(a, dim, index, np.full(ishape, 7.0)))


def test_gather_and_scatter_errors():
    x = t(np.zeros((2, 3)))
    with pytest.raises(TypeError, match="integer index"):
        x.gather(1, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
        x.gather(1, np.array([[0, 3]]))
    with pytest.raises(ValueError, match="as many dims"):
        x.gather(1, np.array([0, 1]))
    with pytest.raises(TypeError, match="exactly one of src"):
        x.scatter(1, np.array([[0]]))


@given(data=st.data(), shape=shapes(min_dims=1))
def test_masked_fill(data, shape):
    a = data.draw(float64_arrays(shape))
    mask = a > 0.5
    assert_close(t(a).masked_fill(t(mask), -1.0).data, np.where(mask, -1.0, a))
    check_grad(lambda x: x.masked_fill(mask, 0.0) * weights(shape), a)


def test_masked_fill_needs_a_boolean_mask():
    with pytest.raises(TypeError, match="boolean mask"):
        t(np.ones(3)).masked_fill(np.ones(3), 0.0)


@given(data=st.data(), shape=shapes(min_dims=1, max_side=6))
def test_split_and_chunk(data, shape):
    a = data.draw(float64_arrays(shape))
    dim = data.draw(st.integers(0, len(shape) - 1))
    n = shape[dim]
    size = data.draw(st.integers(1, n))
    pieces = t(a).split(size, dim)
    bounds = list(range(size, n, size))
    for got, ref in zip(pieces, np.split(a, bounds, axis=dim), strict=True):
        assert_close(got.data, ref)
    chunks = data.draw(st.integers(1, n))
    step = -(-n // chunks)   # torch.chunk: pieces of ceil(n / chunks)
    got = t(a).chunk(chunks, dim)
    assert len(got) == len(range(0, n, step))
    for piece, ref in zip(got, np.split(a, list(range(step, n, step)), axis=dim), strict=True):
        assert_close(piece.data, ref)
    check_grad(lambda x: x.split(size, dim)[-1] * 2.0, a)


def test_split_with_section_sizes():
    a = np.arange(10.0)
    first, second = t(a).split([3, 7])
    assert_close(first.data, a[:3]) and assert_close(second.data, a[3:])
    with pytest.raises(ValueError, match="add up to 9"):
        t(a).split([3, 6])


def test_integer_and_bool_casts_leave_the_graph():
    x = t(np.array([1.7, -0.2, 0.0]), requires_grad=True)
    for cast, dtype in ((x.long, np.int64), (x.int, np.int32), (x.bool, np.bool_)):
        out = cast()
        assert out.dtype == dtype and not out.requires_grad
    np.testing.assert_array_equal(x.long().data, [1, 0, 0])
    np.testing.assert_array_equal(x.bool().data, [True, True, False])
    assert x.to(minidl.float64).dtype == np.float64 and x.double().requires_grad


@given(data=st.data(), shape=shapes())
def test_pow_method(data, shape):
    a = data.draw(float64_arrays(shape, positive=True))
    assert_close(t(a).pow(2.5).data, a ** 2.5)
    check_grad(lambda x: x.pow(2.5), a)


# ---------------------------------------------------------------------- in-place
def test_inplace_ops_match_their_out_of_place_forms(device):
    a = np.array([[-2.0, 0.5], [3.0, 1.0]], dtype=np.float32)
    x = t(a.copy(), device)                # minidl.tensor shares a NumPy array's memory
    assert x.add_(1.0) is x
    assert_close(x.data, a + 1)
    x.add_(t(a, device), alpha=2)
    assert_close(x.data, a + 1 + 2 * a)
    x.mul_(0.5).clamp_(min=0.0, max=2.0)
    assert_close(x.data, np.clip((a + 1 + 2 * a) * 0.5, 0, 2))
    x.fill_(3.0)
    assert_close(x.data, np.full_like(a, 3.0))
    x.zero_()
    assert_close(x.data, np.zeros_like(a))


def test_inplace_on_tensors_that_record_gradients_is_refused(device):
    leaf = t(np.ones(3), device, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf tensor that requires grad.*no_grad"):
        leaf.mul_(2.0)
    with pytest.raises(RuntimeError, match="computed by the graph"):
        (leaf * 2).zero_()
    with minidl.no_grad():                 # a manual parameter update, as in PyTorch
        leaf.add_(-0.5)
    assert_close(leaf.data, np.full(3, 0.5))


def test_requires_grad_underscore():
    x = t(np.ones(2, dtype=np.float32))
    assert x.requires_grad_() is x and x.requires_grad
    with pytest.raises(TypeError, match="only floating-point"):
        t(np.ones(2, dtype=np.int64)).requires_grad_()
    with pytest.raises(RuntimeError, match="leaf tensors only"):
        (x * 2).requires_grad_(False)


# ---------------------------------------------------------------------- factories, dtypes
def test_from_numpy_and_as_tensor_share_memory():
    a = np.arange(4.0)                     # float64 stays float64 (torch.from_numpy)
    x = minidl.from_numpy(a)
    assert x.dtype == np.float64
    a[0] = 9.0
    assert x.data[0] == 9.0
    y = minidl.as_tensor(a)
    assert np.shares_memory(y.data, a)
    assert minidl.as_tensor(x) is x
    assert minidl.as_tensor(a, dtype=minidl.float32).dtype == np.float32
    assert minidl.as_tensor([1.0, 2.0]).dtype == np.float32
    with pytest.raises(TypeError, match="numpy.ndarray"):
        minidl.from_numpy([1, 2])


def test_factories(device, xp):
    assert_close(minidl.linspace(0, 1, 5, device=device).data, np.linspace(0, 1, 5))
    assert minidl.linspace(0, 1, 5).dtype == np.float32
    assert minidl.arange(5).dtype == np.int64
    full = minidl.full((2, 3), 1.5, dtype=minidl.float64, device=device)
    assert full.dtype == np.float64 and full.device == device
    assert_close(full.data, np.full((2, 3), 1.5))
    like = minidl.zeros_like(full)
    assert like.shape == (2, 3) and like.dtype == np.float64 and like.device == device
    assert_close(minidl.ones_like(full, dtype=minidl.int64).data, np.ones((2, 3)))
    with pytest.raises(ValueError, match="number of steps"):
        minidl.linspace(0, 1, 2.5)


def test_dtype_names():
    assert minidl.float32 == np.float32 and minidl.float16 == np.float16
    assert minidl.int64 == np.int64 and minidl.float64 == np.float64
    x = minidl.tensor([1, 2], dtype=minidl.float16)
    assert x.dtype == minidl.float16
    assert minidl.zeros(2, dtype=minidl.int64).dtype == np.int64


def test_bfloat16_is_clear_about_its_support():
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        with pytest.raises(TypeError, match="bfloat16 is not available.*ml_dtypes"):
            minidl.zeros(2, dtype=minidl.bfloat16)
        with pytest.raises(TypeError, match="ml_dtypes"):
            minidl.tensor([1.0]).to(dtype="bfloat16")
    else:
        x = minidl.tensor([1.0, 2.5]).to(dtype=minidl.bfloat16)
        assert x.dtype == minidl.bfloat16
        assert_close(x.float().data, [1.0, 2.5])


def test_module_level_functions():
    a = np.array([[1.0, 4.0, 2.0], [3.0, 0.0, 5.0]])
    assert_close(minidl.sum(t(a), dim=1).data, a.sum(1))
    assert_close(minidl.mean(t(a), 0, keepdim=True).data, a.mean(0, keepdims=True))
    np.testing.assert_array_equal(minidl.argmax(t(a), dim=1).data, a.argmax(1))
    assert_close(minidl.max(t(a)).data, a.max())
    assert_close(minidl.max(t(a), 1).values.data, a.max(1))
    assert_close(minidl.where(t(a) > 2, t(a), 0.0).data, np.where(a > 2, a, 0.0))
    assert_close(minidl.permute(t(a), 1, 0).data, a.T)


def test_softmax_takes_dim_on_tensors_and_functional():
    a = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    e = np.exp(a - a.max(0, keepdims=True))
    expected = e / e.sum(0, keepdims=True)
    assert_close(t(a).softmax(dim=0).data, expected)
    assert_close(F.softmax(t(a), dim=0).data, expected)
    assert_close(to_numpy(minidl.softmax(t(a), 0).data), expected)
