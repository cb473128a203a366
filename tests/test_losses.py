"""Losses against plain NumPy references, their stability, the all-ignored case, gradchecks."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minidl
from minidl import functional as F, nn
from conftest import assert_close, to_numpy
from strategies import check_grad, values


def np_log_softmax(x, axis=1):
    z = x - x.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def np_cross_entropy(x, target, weight=None, ignore_index=-100, reduction="mean", pixel_weight=None):
    """Reference written from the definition, one element at a time."""
    logp = np_log_softmax(x)
    n, c = x.shape[:2]
    losses = np.zeros(target.shape)
    class_weights = np.zeros(target.shape)
    for idx in np.ndindex(*target.shape):
        k = target[idx]
        if k == ignore_index:
            continue
        wk = 1.0 if weight is None else weight[k]
        pw = 1.0 if pixel_weight is None else pixel_weight[idx]
        losses[idx] = -logp[(idx[0], k) + idx[1:]] * wk * pw
        class_weights[idx] = wk
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / class_weights.sum()


def make_case(seed, n, c, spatial, ignore_fraction=0.2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c) + spatial) * 2
    target = rng.integers(0, c, size=(n,) + spatial)
    target[rng.random(target.shape) < ignore_fraction] = -100
    if (target == -100).all():
        target.reshape(-1)[0] = 0
    return x, target


@settings(max_examples=20)
@given(seed=st.integers(0, 2 ** 31), n=st.integers(1, 3), c=st.integers(2, 4),
       spatial=st.sampled_from([(), (3,), (2, 3)]), reduction=st.sampled_from(["mean", "sum", "none"]),
       use_weight=st.booleans(), use_pixel=st.booleans(), ignored=st.sampled_from([0.0, 0.2]))
def test_cross_entropy_matches_reference_and_gradcheck(seed, n, c, spatial, reduction, use_weight,
                                                       use_pixel, ignored):
    """ignored=0 takes the fast path (every id valid, checked by min/max), 0.2 the masked one."""
    x, target = make_case(seed, n, c, spatial, ignore_fraction=ignored)
    rng = np.random.default_rng(seed + 1)
    weight = rng.uniform(0.2, 2.0, size=c) if use_weight else None
    pixel = rng.uniform(0.5, 3.0, size=target.shape) if use_pixel else None
    kwargs = dict(weight=weight, reduction=reduction, pixel_weight=pixel)
    out = F.cross_entropy(minidl.tensor(x), target, **kwargs)
    assert_close(out.data, np_cross_entropy(x, target, **kwargs), rtol=1e-10, atol=1e-12)
    check_grad(lambda z: F.cross_entropy(z, target, **kwargs) * 1.0, x)


def test_cross_entropy_gradient_is_softmax_minus_onehot():
    x, target = make_case(0, 4, 5, (), ignore_fraction=0.0)
    logits = minidl.tensor(x, requires_grad=True)
    F.cross_entropy(logits, target, reduction="sum").backward()
    p = np.exp(np_log_softmax(x))
    assert_close(logits.grad, p - np.eye(5)[target], rtol=1e-12)


def test_cross_entropy_equals_nll_of_log_softmax():
    x, target = make_case(3, 2, 3, (2, 2))
    w = np.array([0.5, 1.0, 2.0])
    ce = F.cross_entropy(minidl.tensor(x), target, weight=w)
    nll = F.nll_loss(F.log_softmax(minidl.tensor(x), dim=1), target, weight=w)
    assert_close(ce.data, nll.data, rtol=1e-12)
    check_grad(lambda lp: F.nll_loss(lp, target, weight=w), np_log_softmax(x))


def test_pixel_weight_mean_equals_weighted_map_mean():
    x, target = make_case(5, 2, 3, (3, 4), ignore_fraction=0.0)
    pixel = np.random.default_rng(0).uniform(0.5, 2.0, size=target.shape)
    weighted = F.cross_entropy(minidl.tensor(x), target, pixel_weight=pixel)
    plain_map = F.cross_entropy(minidl.tensor(x), target, reduction="none")
    assert_close(weighted.data, (plain_map.data * pixel).mean(), rtol=1e-12)


def test_cross_entropy_is_stable_on_huge_logits(device):
    x = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], dtype=np.float32)
    logits = minidl.tensor(x, requires_grad=True, device=device)
    loss = F.cross_entropy(logits, np.array([1, 2]), reduction="none")
    loss.sum().backward()
    assert_close(loss.data, [2e4, np.log(2)], rtol=1e-6)
    grad = to_numpy(logits.grad)
    assert np.all(np.isfinite(grad))
    assert_close(grad, [[1.0, -1.0, 0.0], [0.0, 0.5, -0.5]], atol=1e-6)


def test_all_ignored_gives_zero_loss_and_zero_gradient(device):
    logits = minidl.tensor(np.random.default_rng(0).normal(size=(2, 3, 2, 2)).astype(np.float32),
                           requires_grad=True, device=device)
    target = np.full((2, 2, 2), 255)
    loss = F.cross_entropy(logits, target, ignore_index=255, weight=np.ones(3, np.float32))
    loss.backward()
    assert loss.item() == 0.0
    assert np.all(to_numpy(logits.grad) == 0)


def test_cross_entropy_input_errors():
    x = minidl.tensor(np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"target must have shape \(2, 4, 4\)"):
        F.cross_entropy(x, np.zeros((2, 4), np.int64))
    with pytest.raises(TypeError, match="integer class ids"):
        F.cross_entropy(x, np.zeros((2, 4, 4), np.float32))
    bad = np.zeros((2, 4, 4), np.int64)
    bad[1, 2, 3] = 7
    with pytest.raises(ValueError, match="class id 7, outside \\[0, 3\\)"):
        F.cross_entropy(x, bad)
    with pytest.raises(ValueError, match="one weight per class"):
        F.cross_entropy(x, np.zeros((2, 4, 4), np.int64), weight=np.ones(4))
    with pytest.raises(ValueError, match="pixel_weight of shape"):
        F.cross_entropy(x, np.zeros((2, 4, 4), np.int64), pixel_weight=np.ones((2, 4)))
    with pytest.raises(ValueError, match="reduction='avg'"):
        F.cross_entropy(x, np.zeros((2, 4, 4), np.int64), reduction="avg")
    with pytest.raises(ValueError, match=r"shape \(N, C\)"):
        F.cross_entropy(minidl.tensor(np.zeros(3, np.float32)), np.zeros((), np.int64))


def test_cross_entropy_float32_stays_float32():
    x = minidl.tensor(np.zeros((2, 3), np.float32), requires_grad=True)
    loss = F.cross_entropy(x, np.array([0, 2]), weight=np.array([1.0, 2.0, 3.0]))
    loss.backward()
    assert loss.dtype == np.float32 and x.grad.dtype == np.float32
    assert_close(loss.data, np.log(3), rtol=1e-6)


# ---------------------------------------------------------------------- binary cross-entropy
def np_bce_with_logits(x, t, weight=None, pos_weight=None):
    p = 1 / (1 + np.exp(-x))
    pw = 1.0 if pos_weight is None else pos_weight
    loss = -(pw * t * np.log(p) + (1 - t) * np.log(1 - p))
    return loss * (1.0 if weight is None else weight)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_with_logits_matches_reference(reduction):
    x = values(0, (3, 4), high=4.0)
    t = (values(1, (3, 4)) > 0).astype(np.float64)
    w = values(2, (4,), positive=True)
    pw = values(3, (4,), positive=True)
    out = F.binary_cross_entropy_with_logits(minidl.tensor(x), t, w, reduction=reduction, pos_weight=pw)
    ref = np_bce_with_logits(x, t, w, pw)
    ref = {"mean": ref.mean(), "sum": ref.sum(), "none": ref}[reduction]
    assert_close(out.data, ref, rtol=1e-10)
    soft_t = values(4, (3, 4), low=0.05, high=0.95, positive=True)
    check_grad(lambda z, tt: F.binary_cross_entropy_with_logits(z, tt, w, reduction=reduction, pos_weight=pw),
               x, soft_t)


def test_bce_with_logits_is_stable_and_module_form():
    x = minidl.tensor(np.array([1e4, -1e4, 0.0], np.float32), requires_grad=True)
    loss = nn.BCEWithLogitsLoss()(x, np.array([0, 1, 1]))
    loss.backward()
    assert_close(loss.data, (2e4 + np.log(2)) / 3, rtol=1e-6)
    assert np.all(np.isfinite(x.grad))
    with pytest.raises(ValueError, match="must be equal"):
        F.binary_cross_entropy_with_logits(x, np.zeros(4))


# ---------------------------------------------------------------------- mse and kl
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss(reduction):
    a, b = values(0, (2, 3)), values(1, (2, 3))
    out = F.mse_loss(minidl.tensor(a), minidl.tensor(b), reduction=reduction)
    ref = {"mean": ((a - b) ** 2).mean(), "sum": ((a - b) ** 2).sum(), "none": (a - b) ** 2}[reduction]
    assert_close(out.data, ref, rtol=1e-12)
    check_grad(lambda x, y: F.mse_loss(x, y, reduction=reduction), a, b)
    assert_close(nn.MSELoss(reduction)(minidl.tensor(a), b).data, ref, rtol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div(reduction, log_target):
    logq = np_log_softmax(values(0, (3, 4)))
    p = np.exp(np_log_softmax(values(1, (3, 4))))
    p[0, 1] = 0.0                              # a zero probability contributes 0, not NaN
    target = np.log(np.where(p > 0, p, 1e-300)) if log_target else p
    pointwise = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - logq), 0.0)
    ref = {"mean": pointwise.mean(), "sum": pointwise.sum(), "batchmean": pointwise.sum() / 3,
           "none": pointwise}[reduction]
    out = F.kl_div(minidl.tensor(logq), target, reduction=reduction, log_target=log_target)
    assert_close(out.data, ref, rtol=1e-9, atol=1e-12)
    check_grad(lambda x: F.kl_div(x, target, reduction=reduction, log_target=log_target), logq)
    if not log_target:   # d/d(target) needs target > 0 (t log t has no derivative at 0)
        positive = np.exp(np_log_softmax(values(2, (3, 4))))
        check_grad(lambda x, tt: F.kl_div(x, tt, reduction=reduction), logq, positive)


def test_loss_modules_hold_weights_as_buffers():
    w = np.array([1.0, 2.0, 0.5], np.float32)
    ce = nn.CrossEntropyLoss(weight=w, ignore_index=0)
    assert "weight" in ce.state_dict()
    x, target = make_case(2, 2, 3, (2, 2), ignore_fraction=0.0)
    x = x.astype(np.float32)
    assert_close(ce(minidl.tensor(x), target).data,
                 np_cross_entropy(x, target, weight=w, ignore_index=0), rtol=1e-5)
    nll = nn.NLLLoss(weight=w)
    assert_close(nll(F.log_softmax(minidl.tensor(x), 1), target).data,
                 np_cross_entropy(x, target, weight=w), rtol=1e-5)
    kl = nn.KLDivLoss(reduction="batchmean")
    assert kl(F.log_softmax(minidl.tensor(x), 1), np.exp(np_log_softmax(x))).item() == pytest.approx(0, abs=1e-5)


def test_cross_entropy_of_float16_logits_outside_autocast(device):
    """float16 logits (no autocast): the loss and the gradient come back in float16, close to
    the float32 result (on the GPU the kernels compute in float32)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32) * 3
    t = rng.integers(0, 3, size=(2, 4, 5))
    results = {}
    for dtype in ("float16", "float32"):
        logits = minidl.tensor(x.astype(dtype), requires_grad=True, device=device)
        loss = F.cross_entropy(logits, minidl.tensor(t, device=device))
        loss.backward()
        assert loss.dtype == np.dtype(dtype) and logits.grad.dtype == np.dtype(dtype)
        results[dtype] = (float(loss.item()), to_numpy(logits.grad).astype(np.float32))
    assert abs(results["float16"][0] - results["float32"][0]) < 2e-2
    np.testing.assert_allclose(results["float16"][1], results["float32"][1], atol=2e-3)
