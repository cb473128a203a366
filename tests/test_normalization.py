"""batch_norm / BatchNorm2d: normalisation, running-statistic updates against the formulas,
eval mode, float64 gradient checks (training and eval), errors and the module's buffers."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import minidl
from minidl import functional as F, nn

from conftest import to_numpy


def t(a, device, grad=False):
    return minidl.tensor(np.asarray(a), requires_grad=grad, device=device)


def on(device, a):
    return minidl.backend.to_device(np.array(a), device)


@given(n=st.integers(1, 3), c=st.integers(1, 3), h=st.integers(1, 4), w=st.integers(1, 4),
       seed=st.integers(0, 999), momentum=st.sampled_from([0.1, 0.5, 1.0]))
def test_training_normalises_and_updates_running_stats(device, n, c, h, w, seed, momentum):
    if n * h * w == 1:
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)) * 3 + 2
    gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
    rm0, rv0 = rng.standard_normal(c), rng.uniform(0.5, 2, c)
    rm, rv = on(device, rm0), on(device, rv0)
    y = F.batch_norm(t(x, device), rm, rv, t(gamma, device), t(beta, device), training=True,
                     momentum=momentum, eps=1e-5)
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    m = n * h * w
    expected = ((x - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5)
                * gamma[:, None, None] + beta[:, None, None])
    np.testing.assert_allclose(to_numpy(y.data), expected, rtol=1e-9, atol=1e-9)
    # Running statistics: biased variance normalises, the unbiased one is remembered.
    np.testing.assert_allclose(to_numpy(rm), (1 - momentum) * rm0 + momentum * mean, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(rv), (1 - momentum) * rv0 + momentum * var * m / (m - 1),
                               rtol=1e-12)


def test_eval_uses_running_stats_and_leaves_them(device):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 4))
    rm, rv = on(device, [0.5, -1.0, 2.0]), on(device, [1.0, 4.0, 0.25])
    y = F.batch_norm(t(x, device), rm, rv, training=False, eps=0.0)
    expected = (x - np.array([0.5, -1, 2])[:, None, None]) / np.array([1, 2, 0.5])[:, None, None]
    np.testing.assert_allclose(to_numpy(y.data), expected, rtol=1e-12)
    assert to_numpy(rm).tolist() == [0.5, -1.0, 2.0] and to_numpy(rv).tolist() == [1.0, 4.0, 0.25]


@given(seed=st.integers(0, 999), training=st.booleans(), affine=st.booleans(),
       shape=st.sampled_from([(2, 3, 2, 3), (3, 2, 1, 2), (4, 2), (2, 2, 5)]))
def test_batch_norm_gradients(device, seed, training, affine, shape):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = rng.standard_normal(shape)
    rm, rv = on(device, rng.standard_normal(c)), on(device, rng.uniform(0.5, 2, c))
    arrays = [x] + ([rng.standard_normal(c), rng.standard_normal(c)] if affine else [])
    tensors = [t(a, device, grad=True) for a in arrays]

    def fn(x, *wb):
        # fresh copies: the finite differences must not see earlier running-stat updates
        return F.batch_norm(x, rm.copy(), rv.copy(), *wb, training=training, eps=1e-3)
    assert minidl.gradcheck(fn, tensors, mode="full" if x.size <= 12 else "random")


@given(seed=st.integers(0, 999), training=st.booleans(),
       shape=st.sampled_from([(2, 3, 2, 3), (3, 2, 1, 2), (2, 2, 5)]))
def test_batch_norm_with_fused_relu(device, seed, training, shape):
    """relu=True is relu(batch_norm(...)): the same values, and float64 gradients that pass
    the finite-difference check (the ReLU's mask is recomputed in backward, not kept)."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = rng.standard_normal(shape)
    rm, rv = on(device, rng.standard_normal(c)), on(device, rng.uniform(0.5, 2, c))
    tensors = [t(a, device, grad=True) for a in (x, rng.standard_normal(c), rng.standard_normal(c))]

    def fused(x, w, b):
        return F.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training, eps=1e-3, relu=True)

    def separate(x, w, b):
        return F.relu(F.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training, eps=1e-3))
    y1, y2 = fused(*tensors), separate(*tensors)
    np.testing.assert_allclose(to_numpy(y1.data), to_numpy(y2.data), rtol=1e-12, atol=1e-12)
    assert (to_numpy(y1.data) >= 0).all()
    gy = rng.standard_normal(shape)
    grads = []
    for fn in (fused, separate):
        for a in tensors:
            a.grad = None
        fn(*tensors).backward(t(gy, device))
        grads.append([to_numpy(a.grad) for a in tensors])
    for g1, g2 in zip(*grads):
        np.testing.assert_allclose(g1, g2, rtol=1e-10, atol=1e-10)
    assert minidl.gradcheck(fused, tensors, mode="full" if x.size <= 12 else "random")


def test_batchnorm_relu_module_is_batchnorm_then_relu(device):
    """nn.BatchNormReLU2d: BatchNorm2d's parameters, buffers and state-dict keys (checkpoints
    move between the two), and its output and gradients are those of BN followed by ReLU."""
    fused = nn.BatchNormReLU2d(3, device=device)
    plain = nn.BatchNorm2d(3, device=device)
    assert isinstance(fused, nn.BatchNorm2d)
    rng = np.random.default_rng(5)
    state = {"weight": rng.uniform(0.5, 2, 3), "bias": rng.standard_normal(3),
             "running_mean": rng.standard_normal(3), "running_var": rng.uniform(0.5, 2, 3),
             "num_batches_tracked": np.array(4)}
    for m in (fused, plain):
        assert set(m.state_dict()) == set(state)
        m.load_state_dict({k: on(device, v.astype(np.float32) if v.ndim else v)
                           for k, v in state.items()})
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    for train in (True, False):
        fused.train(train)
        plain.train(train)
        xf, xs = t(x, device, grad=True), t(x, device, grad=True)
        yf, ys = fused(xf), F.relu(plain(xs))
        np.testing.assert_allclose(to_numpy(yf.data), to_numpy(ys.data), rtol=1e-5, atol=1e-6)
        gy = rng.standard_normal(x.shape).astype(np.float32)
        yf.backward(t(gy, device))
        ys.backward(t(gy, device))
        np.testing.assert_allclose(to_numpy(xf.grad), to_numpy(xs.grad), rtol=1e-4,
                                   atol=1e-5)
        np.testing.assert_allclose(to_numpy(fused.weight.grad),
                                   to_numpy(plain.weight.grad), rtol=1e-4, atol=1e-5)
        fused.zero_grad()
        plain.zero_grad()
    np.testing.assert_allclose(to_numpy(fused.running_mean), to_numpy(plain.running_mean),
                               rtol=1e-6)


def test_one_value_per_channel_is_an_error_when_training():
    with pytest.raises(ValueError, match="more than one value per channel.*shape \\(1, 3, 1, 1\\)"):
        F.batch_norm(np.zeros((1, 3, 1, 1)), np.zeros(3), np.ones(3), training=True)
    y = F.batch_norm(np.zeros((1, 3, 1, 1)), np.zeros(3), np.ones(3), training=False)
    assert y.shape == (1, 3, 1, 1)
    with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\)"):
        F.batch_norm(np.zeros((2, 3, 1, 1)), np.zeros(2), np.ones(3))


def test_batchnorm2d_module(device):
    bn = nn.BatchNorm2d(3, momentum=0.2, device=device)
    assert [n for n, _ in bn.named_parameters()] == ["weight", "bias"]
    assert set(bn.state_dict()) == {"weight", "bias", "running_mean", "running_var",
                                    "num_batches_tracked"}
    rng = np.random.default_rng(2)
    x1, x2 = rng.standard_normal((4, 3, 2, 2)) + 1, rng.standard_normal((4, 3, 2, 2)) - 1
    bn.train()
    for x in (x1, x2):
        y = bn(t(x.astype(np.float32), device))
    assert int(to_numpy(bn.num_batches_tracked)) == 2
    mean = 0.8 * (0.2 * x1.mean(axis=(0, 2, 3))) + 0.2 * x2.mean(axis=(0, 2, 3))
    np.testing.assert_allclose(to_numpy(bn.running_mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(y.data).mean(axis=(0, 2, 3)), 0, atol=1e-5)
    bn.eval()
    y = bn(t(x1.astype(np.float32), device))
    rm, rv = to_numpy(bn.running_mean), to_numpy(bn.running_var)
    np.testing.assert_allclose(to_numpy(y.data), (x1 - rm[:, None, None]) /
                               np.sqrt(rv[:, None, None] + 1e-5), rtol=1e-4, atol=1e-5)
    assert int(to_numpy(bn.num_batches_tracked)) == 2        # eval does not count


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("momentum", [None, 0.3])
def test_batchnorm2d_float32_steps_match_reference(device, momentum, relu):
    """Three float32 training steps and one eval step of the module (on the GPU: the merge
    kernel updates the running statistics, the inv_std kernel serves eval) against
    kernels.reference; momentum=None is the cumulative average, factor 1 / step."""
    from kernels import reference as ref
    kind = nn.BatchNormReLU2d if relu else nn.BatchNorm2d
    bn = kind(3, momentum=momentum, device=device)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    rng = np.random.default_rng(7)
    for step in range(1, 4):
        x = (100 * step + rng.standard_normal((2, 3, 4, 5))).astype(np.float32)
        y = bn(t(x, device))
        factor = 1 / step if momentum is None else momentum
        mean, inv_std = ref.batchnorm_train_statistics(x.reshape(2, 3, -1), 1e-5, rm, rv, factor)
        want, _ = ref.batchnorm_forward(x.reshape(2, 3, -1), mean, inv_std, np.ones(3, np.float32),
                                        np.zeros(3, np.float32), relu)
        np.testing.assert_allclose(to_numpy(y.data), want.reshape(x.shape), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(to_numpy(bn.running_mean), rm, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(bn.running_var), rv, rtol=1e-3)
    bn.eval()
    y = bn(t(x, device))
    mean, inv_std = ref.batchnorm_eval_statistics(rm, rv, 1e-5)
    want, _ = ref.batchnorm_forward(x.reshape(2, 3, -1), mean, inv_std, np.ones(3, np.float32),
                                    np.zeros(3, np.float32), relu)
    np.testing.assert_allclose(to_numpy(y.data), want.reshape(x.shape), rtol=1e-3, atol=1e-3)


def test_batchnorm2d_cumulative_average_and_no_tracking(device):
    bn = nn.BatchNorm2d(2, momentum=None, device=device)
    batches = [np.random.default_rng(i).standard_normal((3, 2, 2, 2)) + i for i in range(3)]
    for b in batches:
        bn(t(b, device))
    np.testing.assert_allclose(to_numpy(bn.running_mean),
                               np.mean([b.mean(axis=(0, 2, 3)) for b in batches], axis=0),
                               rtol=1e-5)
    free = nn.BatchNorm2d(2, track_running_stats=False, affine=False, device=device).eval()
    assert free.running_mean is None and list(free.parameters()) == []
    y = free(t(batches[2], device))              # no running stats: batch statistics always
    np.testing.assert_allclose(to_numpy(y.data).mean(axis=(0, 2, 3)), 0, atol=1e-6)
    with pytest.raises(ValueError, match="3 channels"):
        bn(t(np.zeros((2, 3, 2, 2)), device))
