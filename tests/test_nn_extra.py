"""Layers and functions added for PyTorch users: per-sample norms, GELU/SiLU, BCE/L1/SmoothL1
losses, label smoothing, Embedding, PixelShuffle, Module.apply/requires_grad_, gradient
clipping and the minidl.nn.functional alias. Forwards against plain NumPy references written
from PyTorch's documented formulas; float64 gradchecks driven by hypothesis."""
import math

import warnings

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

import minidl
from minidl import functional as F, nn
from conftest import assert_close
from strategies import check_grad, float64_arrays, values

erf = np.vectorize(math.erf)


def t(a, device="cpu", **kwargs):
    return minidl.tensor(a, device=device, **kwargs)


def np_standardize(x, axes, eps=1e-5):
    m = x.mean(axis=axes, keepdims=True)
    v = ((x - m) ** 2).mean(axis=axes, keepdims=True)   # biased, as torch
    return (x - m) / np.sqrt(v + eps)


# ---------------------------------------------------------------------- normalisation
@given(data=st.data(), n=st.integers(1, 3), dims=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       k=st.integers(1, 2), affine=st.booleans())
def test_layer_norm(data, n, dims, k, affine):
    shape = (n,) + tuple(dims)
    k = min(k, len(dims))
    norm_shape = shape[len(shape) - k:]
    x = data.draw(float64_arrays(shape))
    w = data.draw(float64_arrays(norm_shape)) if affine else None
    b = data.draw(float64_arrays(norm_shape)) if affine else None
    expected = np_standardize(x, tuple(range(len(shape) - k, len(shape))))
    if affine:
        expected = expected * w + b
    out = F.layer_norm(t(x), norm_shape, None if w is None else t(w), None if b is None else t(b))
    assert_close(out.data, expected, rtol=1e-10, atol=1e-10)
    # A weighted sum: the plain sum of a normalised row has zero gradient.
    mix = values(1, shape)
    if affine:
        check_grad(lambda x, w, b: F.layer_norm(x, norm_shape, w, b) * mix, x, w, b)
    else:
        check_grad(lambda x: F.layer_norm(x, norm_shape) * mix, x)


@given(data=st.data(), n=st.integers(1, 2), groups=st.integers(1, 3), per=st.integers(1, 2),
       hw=st.tuples(st.integers(1, 3), st.integers(1, 3)))
def test_group_norm(data, n, groups, per, hw):
    c = groups * per
    shape = (n, c) + hw
    x = data.draw(float64_arrays(shape))
    w, b = data.draw(float64_arrays((c,))), data.draw(float64_arrays((c,)))
    assume(per * hw[0] * hw[1] > 1)   # one value per group normalises to 0 whatever x is
    expected = np_standardize(x.reshape(n, groups, -1), 2).reshape(shape)
    expected = expected * w[:, None, None] + b[:, None, None]
    assert_close(F.group_norm(t(x), groups, t(w), t(b)).data, expected, rtol=1e-10, atol=1e-10)
    mix = values(2, shape)
    check_grad(lambda x, w, b: F.group_norm(x, groups, w, b) * mix, x, w, b)


@given(data=st.data(), shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(2, 3),
                                       st.integers(1, 3)))
def test_instance_norm(data, shape):
    x = data.draw(float64_arrays(shape))
    expected = np_standardize(x, (2, 3))
    assert_close(F.instance_norm(t(x)).data, expected, rtol=1e-10, atol=1e-10)
    layer = nn.InstanceNorm2d(shape[1]).double()
    assert_close(layer(t(x)).data, expected, rtol=1e-10, atol=1e-10)
    mix = values(3, shape)
    check_grad(lambda x: F.instance_norm(x) * mix, x)


def test_norm_layers_hold_their_parameters(device):
    ln = nn.LayerNorm((4,)).to(device)
    gn = nn.GroupNorm(2, 4).to(device)
    inn = nn.InstanceNorm2d(4, affine=True).to(device)
    for layer in (ln, gn, inn):
        names = [name for name, _ in layer.named_parameters()]
        assert names == ["weight", "bias"]
    assert_close(ln.weight.data, np.ones(4)) and assert_close(gn.bias.data, np.zeros(4))
    x = minidl.randn(2, 4, 3, 5, device=device)
    assert gn(x).shape == x.shape and inn(x).shape == x.shape
    assert ln(x.permute(0, 2, 3, 1)).shape == (2, 3, 5, 4)
    assert not list(nn.LayerNorm(3, elementwise_affine=False).parameters())


def test_norm_errors():
    x = minidl.zeros(2, 6, 3, 3)
    with pytest.raises(ValueError, match="dividing the 6 channels"):
        F.group_norm(x, 4)
    with pytest.raises(ValueError, match="normalized_shape"):
        F.layer_norm(x, (4,))
    with pytest.raises(ValueError, match="must have shape \\(6,\\)"):
        F.instance_norm(x, weight=minidl.ones(5))
    with pytest.raises(ValueError, match="track_running_stats=True"):
        nn.InstanceNorm2d(3, track_running_stats=True)


# ---------------------------------------------------------------------- activations
@given(data=st.data(), shape=st.tuples(st.integers(1, 3), st.integers(1, 4)),
       approximate=st.sampled_from(["none", "tanh"]))
def test_gelu(data, shape, approximate):
    x = data.draw(float64_arrays(shape, low=0.0, high=4.0))
    if approximate == "none":      # x * Phi(x)
        expected = x * 0.5 * (1 + erf(x / math.sqrt(2)))
    else:
        expected = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    assert_close(F.gelu(t(x), approximate=approximate).data, expected, rtol=1e-12, atol=1e-12)
    assert_close(nn.GELU(approximate)(t(x)).data, expected, rtol=1e-12, atol=1e-12)
    check_grad(lambda x: F.gelu(x, approximate=approximate), x)


@given(data=st.data(), shape=st.tuples(st.integers(1, 3), st.integers(1, 4)))
def test_silu(data, shape):
    x = data.draw(float64_arrays(shape, low=0.0, high=30.0))
    expected = x / (1 + np.exp(-x))
    assert_close(F.silu(t(x)).data, expected, rtol=1e-12)
    assert_close(nn.SiLU()(t(x)).data, expected, rtol=1e-12)
    check_grad(F.silu, x)


def test_activations_on_device(device):
    x = np.linspace(-5, 5, 11).astype(np.float32)
    assert_close(F.gelu(t(x, device)).data, x * 0.5 * (1 + erf(x / math.sqrt(2))), rtol=1e-5)
    assert_close(F.silu(t(x, device)).data, x / (1 + np.exp(-x)), rtol=1e-5)
    with pytest.raises(ValueError, match="approximate"):
        F.gelu(t(x), approximate="fast")


# ---------------------------------------------------------------------- losses
REDUCE = {"mean": np.mean, "sum": np.sum, "none": lambda v: v}


@pytest.mark.parametrize("reduction", sorted(REDUCE))
@given(data=st.data(), shape=st.tuples(st.integers(1, 3), st.integers(1, 4)))
def test_bce_l1_smooth_l1(reduction, data, shape):
    p = data.draw(float64_arrays(shape, low=0.05, high=0.95, positive=True))
    x = data.draw(float64_arrays(shape))
    y = data.draw(float64_arrays(shape, low=0.0, high=1.0, positive=True))
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    d = x - y
    beta = 0.5
    smooth = np.where(np.abs(d) < beta, 0.5 * d * d / beta, np.abs(d) - 0.5 * beta)
    red = REDUCE[reduction]
    assert_close(F.binary_cross_entropy(t(p), t(y), reduction=reduction).data, red(bce), rtol=1e-10)
    assert_close(F.l1_loss(t(x), t(y), reduction=reduction).data, red(np.abs(d)), rtol=1e-10)
    assert_close(F.smooth_l1_loss(t(x), t(y), reduction=reduction, beta=beta).data, red(smooth),
                 rtol=1e-10)
    assert_close(nn.BCELoss(reduction=reduction)(t(p), t(y)).data, red(bce), rtol=1e-10)
    assert_close(nn.L1Loss(reduction)(t(x), t(y)).data, red(np.abs(d)), rtol=1e-10)
    assert_close(nn.SmoothL1Loss(reduction, beta)(t(x), t(y)).data, red(smooth), rtol=1e-10)
    check_grad(lambda p: F.binary_cross_entropy(p, y, reduction=reduction), p)
    # keep |x - y| away from the kinks (0 for L1, beta for smooth L1)
    x = y + values(4, shape, low=0.1, high=2.0, away_from=(beta, -beta), margin=0.05)
    check_grad(lambda x: F.l1_loss(x, y, reduction=reduction), x)
    check_grad(lambda x: F.smooth_l1_loss(x, y, reduction=reduction, beta=beta), x)


def test_bce_clamps_its_logs_like_torch():
    p, y = np.array([0.0, 1.0]), np.array([1.0, 0.0])
    assert_close(F.binary_cross_entropy(t(p), t(y), reduction="none").data, [100.0, 100.0])
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
        F.binary_cross_entropy(t(np.array([1.5])), t(np.array([1.0])))


def test_bce_gradient_is_finite_at_0_and_1_like_torch():
    # PyTorch's gradient (p - t) / max(p (1 - p), 1e-12): 0 where p equals its target,
    # -(or +)1e12 where it is the opposite end; never NaN, and no warning on the way.
    p = t(np.array([0.0, 1.0, 0.0, 1.0]))
    p.requires_grad = True
    y = np.array([0.0, 1.0, 1.0, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.binary_cross_entropy(p, y, reduction="sum").backward()
    assert_close(p.grad, [0.0, 0.0, -1e12, 1e12])


def np_smoothed_ce(x, target, eps, weight=None, ignore_index=-100, reduction="mean"):
    """torch's label-smoothed cross-entropy from its definition: target distribution
    (1 - eps) onehot + eps / C; each class's term weighted by its class weight."""
    z = x - x.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    n, c = x.shape[:2]
    w = np.ones(c) if weight is None else weight
    losses, denom = np.zeros(target.shape), 0.0
    for idx in np.ndindex(*target.shape):
        k = target[idx]
        if k == ignore_index:
            continue
        lp = logp[(idx[0], slice(None)) + idx[1:]]
        q = np.full(c, eps / c)
        q[k] += 1 - eps
        losses[idx] = -(w * q * lp).sum()
        denom += w[k]
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.sum() / denom


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@given(seed=st.integers(0, 2 ** 31), eps=st.sampled_from([0.0, 0.1, 0.5]))
def test_cross_entropy_label_smoothing(reduction, weighted, seed, eps):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 3, 2, 2))
    target = rng.integers(0, 3, (2, 2, 2))
    target[0, 0, 0] = -100                          # one ignored pixel
    weight = rng.uniform(0.5, 2.0, 3) if weighted else None
    expected = np_smoothed_ce(x, target, eps, weight, reduction=reduction)
    got = F.cross_entropy(t(x), target, weight=weight, reduction=reduction, label_smoothing=eps)
    assert_close(got.data, expected, rtol=1e-10, atol=1e-12)
    layer = nn.CrossEntropyLoss(weight=weight, reduction=reduction, label_smoothing=eps)
    assert_close(layer(t(x), target).data, expected, rtol=1e-10, atol=1e-12)
    check_grad(lambda x: F.cross_entropy(x, target, weight=weight, reduction=reduction,
                                         label_smoothing=eps), x)


def test_label_smoothing_out_of_range():
    with pytest.raises(ValueError, match="label_smoothing=1.5"):
        F.cross_entropy(minidl.zeros(2, 3), np.array([0, 1]), label_smoothing=1.5)


# ---------------------------------------------------------------------- embedding, pixel shuffle
@given(data=st.data(), num=st.integers(2, 5), dim=st.integers(1, 3),
       ids_shape=st.tuples(st.integers(1, 3), st.integers(1, 4)))
def test_embedding(data, num, dim, ids_shape):
    w = data.draw(float64_arrays((num, dim)))
    ids = np.random.default_rng(data.draw(st.integers(0, 2 ** 31))).integers(0, num, ids_shape)
    assert_close(F.embedding(t(ids), t(w)).data, w[ids])
    mix = values(5, ids_shape + (dim,))
    check_grad(lambda w: F.embedding(ids, w) * mix, w)   # repeated ids add up


def test_embedding_padding_idx_gets_no_gradient(device):
    layer = nn.Embedding(4, 3, padding_idx=1).to(device)
    assert_close(layer.weight.data[1], np.zeros(3))
    out = layer(t(np.array([[1, 2, 1]]), device))
    assert out.shape == (1, 3, 3)
    out.sum().backward()
    assert_close(layer.weight.grad, [[0, 0, 0], [0, 0, 0], [1, 1, 1], [0, 0, 0]])
    with pytest.raises(ValueError, match="in \\[0, 4\\)"):   # GPU: at the next host read
        layer(t(np.array([4]), device)).numpy()
    with pytest.raises(TypeError, match="integer ids"):
        layer(t(np.array([1.0]), device))


def np_pixel_shuffle(x, r):
    """out[n, c, h r + i, w r + j] = x[n, c r^2 + i r + j, h, w] (torch's documented layout)."""
    n, cr2, h, w = x.shape
    c = cr2 // (r * r)
    out = np.empty((n, c, h * r, w * r))
    for nn_, cc, hh, ww, i, j in np.ndindex(n, c, h, w, r, r):
        out[nn_, cc, hh * r + i, ww * r + j] = x[nn_, cc * r * r + i * r + j, hh, ww]
    return out


@given(data=st.data(), r=st.integers(1, 3), c=st.integers(1, 2), hw=st.tuples(st.integers(1, 3),
                                                                             st.integers(1, 3)))
def test_pixel_shuffle_and_unshuffle(data, r, c, hw):
    x = data.draw(float64_arrays((2, c * r * r) + hw))
    expected = np_pixel_shuffle(x, r)
    out = F.pixel_shuffle(t(x), r)
    assert_close(out.data, expected)
    assert_close(nn.PixelShuffle(r)(t(x)).data, expected)
    assert_close(nn.PixelUnshuffle(r)(out).data, x)
    mix = values(6, expected.shape)
    check_grad(lambda x: F.pixel_shuffle(x, r) * mix, x)


def test_pixel_shuffle_errors():
    with pytest.raises(ValueError, match="divisible by upscale_factor\\^2 = 4"):
        F.pixel_shuffle(minidl.zeros(1, 3, 2, 2), 2)
    with pytest.raises(ValueError, match="\\(N, C, H, W\\)"):
        F.pixel_shuffle(minidl.zeros(4, 2, 2), 2)


# ---------------------------------------------------------------------- modules and utils
def test_module_apply_requires_grad_and_modules():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 1)))
    seen = []
    assert model.apply(lambda m: seen.append(type(m).__name__)) is model
    # children first, then the parent (torch's order)
    assert seen == ["Linear", "ReLU", "Linear", "Sequential", "Sequential"]
    assert [type(m).__name__ for m in model.modules()] == ["Sequential", "Linear", "ReLU",
                                                            "Sequential", "Linear"]

    def zero_linear(m):
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.weight)
    model.apply(zero_linear)
    assert all(not p.data.any() for name, p in model.named_parameters() if name.endswith("weight"))
    model[2].requires_grad_(False)
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, False]


def test_clip_grad_norm_and_value():
    params = [nn.Parameter(np.zeros(3)), nn.Parameter(np.zeros((2, 2)))]
    grads = [np.array([3.0, -4.0, 0.0]), np.array([[1.0, 2.0], [-2.0, 0.5]])]
    for p, g in zip(params, grads):
        p.grad = g.copy()
    total = np.sqrt(sum((g ** 2).sum() for g in grads))
    got = nn.utils.clip_grad_norm_(params, max_norm=1.0)
    assert got == pytest.approx(total)
    for p, g in zip(params, grads):
        assert_close(p.grad, g * (1.0 / (total + 1e-6)))
    # Under the limit: unchanged. Infinity norm: the largest |g|.
    for p, g in zip(params, grads):
        p.grad = g.copy()
    assert nn.utils.clip_grad_norm_(params, 100.0, norm_type=math.inf) == pytest.approx(4.0)
    assert_close(params[0].grad, grads[0])
    nn.utils.clip_grad_value_(params, 1.5)
    for p, g in zip(params, grads):
        assert_close(p.grad, np.clip(g, -1.5, 1.5))
    params[0].grad = np.array([np.inf, 0.0, 0.0])
    with pytest.raises(RuntimeError, match="non-finite"):
        nn.utils.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)


def test_nn_functional_is_minidl_functional():
    import minidl.nn.functional as NF
    from minidl.nn import functional as NF2
    assert NF is F and NF2 is F and minidl.nn.functional is F
