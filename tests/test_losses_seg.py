"""seg.losses: the U-Net weight map by hand, weighted CE, soft Dice edge cases and gradients."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import minidl
from seg import losses


def corners_mask():
    """5x5 background with two one-pixel objects at (0, 0) and (4, 4)."""
    m = np.zeros((5, 5), dtype=np.uint8)
    m[0, 0] = m[4, 4] = 1
    return m


# ----------------------------------------------------------------------------- weight map

def test_weight_map_hand_computed():
    w = losses.unet_weight_map(corners_mask(), w0=10, sigma=5, class_weights=None)
    assert w.shape == (5, 5) and w.dtype == np.float32

    def border(d1, d2):
        return 10 * math.exp(-(d1 + d2) ** 2 / (2 * 25))

    # Centre: sqrt(8) from both objects. (1, 0): 1 from the first, 5 from the second.
    # (0, 4): 4 from both. (2, 0): 2 and sqrt(4 + 16).
    assert w[2, 2] == pytest.approx(1 + border(math.sqrt(8), math.sqrt(8)), rel=1e-6)
    assert w[1, 0] == pytest.approx(1 + border(1, 5), rel=1e-6)
    assert w[0, 4] == pytest.approx(1 + border(4, 4), rel=1e-6)
    assert w[2, 0] == pytest.approx(1 + border(2, math.sqrt(20)), rel=1e-6)
    # Object pixels get no border term.
    assert w[0, 0] == 1 and w[4, 4] == 1


def test_weight_map_balanced_class_weights():
    mask = corners_mask()               # 2 foreground, 23 background pixels
    w = losses.unet_weight_map(mask, w0=0)
    assert w[0, 0] == pytest.approx(25 / (2 * 2))
    assert w[1, 1] == pytest.approx(25 / (2 * 23))
    assert w.mean() == pytest.approx(1.0)   # balanced weights average to 1
    with_border = losses.unet_weight_map(mask, w0=10, sigma=5)
    assert with_border[2, 2] == pytest.approx(25 / 46 + 10 * math.exp(-32 / 50), rel=1e-6)
    given = losses.unet_weight_map(mask, w0=0, class_weights=[0.5, 3.0])
    assert given[0, 0] == 3.0 and given[2, 2] == 0.5


def test_weight_map_uses_the_two_nearest_of_three_objects():
    mask = np.zeros((1, 11), dtype=np.int64)
    mask[0, [0, 4, 10]] = [1, 1, 2]     # three objects, two classes
    w = losses.unet_weight_map(mask, w0=10, sigma=5, class_weights=None)
    # Pixel 6: objects at distance 2 (x=4), 4 (x=10), 6 (x=0): d1 + d2 = 6.
    assert w[0, 6] == pytest.approx(1 + 10 * math.exp(-36 / 50), rel=1e-6)
    # Pixel 1: distance 1 (x=0) and 3 (x=4).
    assert w[0, 1] == pytest.approx(1 + 10 * math.exp(-16 / 50), rel=1e-6)


def test_weight_map_single_or_no_object_has_no_border_term():
    one = np.zeros((6, 6), dtype=np.uint8)
    one[2:4, 2:4] = 1
    np.testing.assert_array_equal(losses.unet_weight_map(one, class_weights=None), np.ones((6, 6)))
    empty = np.zeros((4, 4), dtype=np.uint8)
    np.testing.assert_array_equal(losses.unet_weight_map(empty), np.ones((4, 4)))


def test_weight_map_bad_input():
    with pytest.raises(ValueError, match=r"one \(H, W\) label map"):
        losses.unet_weight_map(np.zeros((2, 4, 4), dtype=np.uint8))
    with pytest.raises(TypeError, match="integer class ids"):
        losses.unet_weight_map(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="one weight per class"):
        losses.unet_weight_map(corners_mask(), class_weights=[1.0])


# ----------------------------------------------------------------------------- cross-entropy

def _numpy_ce(logits, target):
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -np.take_along_axis(logp, target[:, None], axis=1)[:, 0]


def test_weighted_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
    target = rng.integers(0, 3, size=(2, 5, 5))
    weight = rng.uniform(0.5, 3, size=(2, 5, 5)).astype(np.float32)
    got = losses.weighted_cross_entropy(minidl.tensor(logits), target, weight).item()
    expected = (_numpy_ce(logits, target) * weight).mean()
    assert got == pytest.approx(expected, rel=1e-5)
    # The callable computes the U-Net weight maps from the targets itself.
    binary = np.stack([corners_mask(), corners_mask()]).astype(np.int64)
    lg = rng.normal(size=(2, 2, 5, 5)).astype(np.float32)
    maps = np.stack([losses.unet_weight_map(m) for m in binary])
    assert losses.get_loss("weighted_ce")(minidl.tensor(lg), binary).item() == \
        pytest.approx((_numpy_ce(lg, binary) * maps).mean(), rel=1e-5)


# ----------------------------------------------------------------------------- soft Dice

def _confident(target, num_classes, scale=30.0):
    """Logits that put almost all probability on `target`."""
    onehot = np.eye(num_classes, dtype=np.float32)[target]           # (N, H, W, C)
    return minidl.tensor(np.moveaxis(onehot, -1, 1) * scale)


def test_soft_dice_edge_cases():
    target = np.zeros((2, 6, 6), dtype=np.int64)
    target[0, 1:4, 1:4] = 1
    # Perfect prediction -> 0; the empty image, predicted empty, also scores Dice 1 (Kaggle).
    assert losses.soft_dice_loss(_confident(target, 2), target).item() == pytest.approx(0, abs=1e-4)
    # Everything predicted the wrong way round: no overlap, so each image's Dice is only
    # smooth / (predicted + true + smooth) = 1 / (27 + 9 + 1) and 1 / (36 + 0 + 1).
    wrong = losses.soft_dice_loss(_confident(1 - target, 2), target).item()
    assert wrong == pytest.approx(1 - 1 / 37, abs=1e-4)
    # Background included: perfect is still 0.
    assert losses.soft_dice_loss(_confident(target, 2), target, include_background=True).item() == \
        pytest.approx(0, abs=1e-4)
    with pytest.raises(ValueError, match="needs a foreground class"):
        losses.soft_dice_loss(minidl.zeros(1, 1, 4, 4), np.zeros((1, 4, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="does not match logits shape"):
        losses.soft_dice_loss(minidl.zeros(1, 2, 4, 4), np.zeros((1, 4, 5), dtype=np.int64))


def test_soft_dice_class_weights_and_pooling():
    rng = np.random.default_rng(3)
    target = rng.integers(0, 3, size=(2, 5, 5))
    logits = minidl.tensor(rng.normal(size=(2, 3, 5, 5)))
    # Weight only class 2: equals the class-2 Dice alone.
    only2 = losses.soft_dice_loss(logits, target, class_weights=[0, 0, 1]).item()
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(axis=1, keepdims=True)
    t = (target == 2)
    inter = (p[:, 2] * t).sum(axis=(1, 2))
    dice = (2 * inter + 1) / (p[:, 2].sum(axis=(1, 2)) + t.sum(axis=(1, 2)) + 1)
    assert only2 == pytest.approx(1 - dice.mean(), rel=1e-6)
    pooled = losses.soft_dice_loss(logits, target, class_weights=[0, 0, 1], per_image=False).item()
    assert pooled == pytest.approx(1 - (2 * inter.sum() + 1) / (p[:, 2].sum() + t.sum() + 1), rel=1e-6)


def test_soft_dice_gradient():
    rng = np.random.default_rng(4)
    target = rng.integers(0, 3, size=(2, 4, 4))
    x = minidl.tensor(rng.normal(size=(2, 3, 4, 4)), dtype="float64", requires_grad=True)
    assert minidl.gradcheck(lambda z: losses.soft_dice_loss(z, target), [x])
    assert minidl.gradcheck(lambda z: losses.soft_dice_loss(z, target, include_background=True,
                                                            class_weights=[1, 2, 3]), [x])
    assert minidl.gradcheck(lambda z: losses.ce_dice_loss(z, target), [x])


def _composed_soft_dice(logits, target, first, weights, smooth, per_image):
    """The same loss written with tensor ops (softmax, products, sums): the oracle for the
    fused SoftDice op."""
    c = logits.shape[1]
    onehot = (target[:, None] == np.arange(c).reshape(1, -1, 1, 1)).astype(np.float64)
    probs = minidl.functional.softmax(logits, dim=1)
    axes = (2, 3) if per_image else (0, 2, 3)
    inter = (probs * onehot).sum(axis=axes)
    dice = (inter * 2.0 + smooth) / (probs.sum(axis=axes) + onehot.sum(axis=axes) + smooth)
    w = np.asarray(weights, dtype=np.float64)[first:]
    return 1.0 - (dice[..., first:] * (w / w.sum())).sum(axis=-1).mean()


@given(n=st.integers(1, 3), c=st.integers(2, 4), h=st.integers(1, 4), w=st.integers(1, 4),
       background=st.booleans(), weighted=st.booleans(), per_image=st.booleans(),
       smooth=st.sampled_from([0.5, 1.0]), seed=st.integers(0, 999))
def test_fused_soft_dice_matches_the_composed_formula(n, c, h, w, background, weighted,
                                                      per_image, smooth, seed):
    """SoftDice (one op, analytic backward) against the formula composed of tensor ops:
    the loss and its gradient agree, and the gradient passes the float64 check."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, c, size=(n, h, w))
    x = rng.normal(size=(n, c, h, w)) * 2
    weights = rng.uniform(0.5, 2.0, size=c) if weighted else np.ones(c)
    first = 0 if background else 1
    options = dict(include_background=background, smooth=smooth, per_image=per_image,
                   class_weights=weights if weighted else None)
    fused_x = minidl.tensor(x, requires_grad=True)
    fused = losses.soft_dice_loss(fused_x, target, **options)
    composed_x = minidl.tensor(x, requires_grad=True)
    composed = _composed_soft_dice(composed_x, target, first, weights, smooth, per_image)
    assert fused.item() == pytest.approx(composed.item(), rel=1e-12, abs=1e-12)
    # And the value in plain NumPy.
    e = np.exp(x - x.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    t = (target[:, None] == np.arange(c).reshape(1, -1, 1, 1))
    axes = (2, 3) if per_image else (0, 2, 3)
    dice = (2 * (p * t).sum(axis=axes) + smooth) / (p.sum(axis=axes) + t.sum(axis=axes) + smooth)
    share = weights[first:] / weights[first:].sum()
    assert fused.item() == pytest.approx(1 - (dice[..., first:] * share).sum(axis=-1).mean(),
                                         rel=1e-12, abs=1e-12)
    fused.backward()
    composed.backward()
    np.testing.assert_allclose(fused_x.grad, composed_x.grad, rtol=1e-10, atol=1e-12)
    assert minidl.gradcheck(lambda z: losses.soft_dice_loss(z, target, **options),
                            [minidl.tensor(x, requires_grad=True)])


def test_soft_dice_runs_on_each_device_in_float32(device):
    target = np.random.default_rng(0).integers(0, 2, size=(2, 6, 6))
    x = np.random.default_rng(1).normal(size=(2, 2, 6, 6)).astype(np.float32)
    logits = minidl.tensor(x, requires_grad=True, device=device)
    loss = losses.soft_dice_loss(logits, minidl.tensor(target, device=device))
    loss.backward()
    ref_x = minidl.tensor(x.astype(np.float64), requires_grad=True)
    ref = _composed_soft_dice(ref_x, target, 1, np.ones(2), 1.0, True)
    ref.backward()
    assert loss.dtype == np.float32 and logits.grad.dtype == np.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    np.testing.assert_allclose(minidl.backend.to_numpy(logits.grad), ref_x.grad, rtol=1e-4,
                               atol=1e-6)


def test_ce_dice_is_the_sum_and_get_loss():
    rng = np.random.default_rng(5)
    target = rng.integers(0, 2, size=(2, 6, 6))
    logits = minidl.tensor(rng.normal(size=(2, 2, 6, 6)).astype(np.float32))
    ce = losses.get_loss("ce")(logits, target).item()
    dice = losses.get_loss("dice")(logits, target).item()
    assert ce == pytest.approx(_numpy_ce(logits.numpy(), target).mean(), rel=1e-5)
    assert losses.get_loss("ce_dice")(logits, target).item() == pytest.approx(ce + dice, rel=1e-5)
    assert losses.bce_dice(logits, target).item() == pytest.approx(ce + dice, rel=1e-5)
    with pytest.raises(ValueError, match="unknown loss 'focal'; choose one of: ce, weighted_ce"):
        losses.get_loss("focal")
