"""Tests for seg.metrics: confusion matrix, IoU, Dice (Kaggle rule), pixel accuracy."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from seg.metrics import (
    accuracy_from_confusion,
    confusion_matrix,
    dice_score,
    iou_from_confusion,
    iou_per_class,
    mean_dice,
    mean_iou,
    pixel_accuracy,
)

# A 2x3 example small enough to count by hand.
TARGET = np.array([[0, 0, 1],
                   [1, 2, 2]])
PRED = np.array([[0, 1, 1],
                 [1, 2, 0]])


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(PRED, TARGET, num_classes=3)
    # rows = truth, columns = prediction
    #   truth 0: pixels (0,0)->0, (0,1)->1
    #   truth 1: (0,2)->1, (1,0)->1
    #   truth 2: (1,1)->2, (1,2)->0
    expected = np.array([[1, 1, 0],
                         [0, 2, 0],
                         [1, 0, 1]])
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int64
    assert cm.sum() == TARGET.size


def test_confusion_matrix_batch_equals_sum_of_images():
    rng = np.random.default_rng(0)
    p = rng.integers(0, 4, (3, 5, 6))
    t = rng.integers(0, 4, (3, 5, 6))
    total = sum(confusion_matrix(p[i], t[i], 4) for i in range(3))
    np.testing.assert_array_equal(confusion_matrix(p, t, 4), total)


def test_confusion_matrix_ignore_index():
    target = TARGET.copy()
    target[0, 0] = 255  # ignored pixel, whatever the prediction says
    cm = confusion_matrix(PRED, target, 3, ignore_index=255)
    assert cm.sum() == TARGET.size - 1
    assert cm[0, 0] == 0  # the only correct class-0 pixel was the ignored one


def test_iou_by_hand():
    iou = iou_per_class(PRED, TARGET, 3)
    # class 0: TP 1, pred 2, true 2 -> 1 / (2 + 2 - 1) = 1/3
    # class 1: TP 2, pred 3, true 2 -> 2 / 3
    # class 2: TP 1, pred 1, true 2 -> 1 / 2
    np.testing.assert_allclose(iou, [1 / 3, 2 / 3, 1 / 2])
    assert mean_iou(PRED, TARGET, 3) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_absent_class_excluded_from_mean_iou():
    pred = np.array([[0, 1], [1, 1]])
    target = np.array([[0, 1], [1, 0]])
    iou = iou_per_class(pred, target, num_classes=4)  # classes 2 and 3 appear nowhere
    assert np.isnan(iou[2]) and np.isnan(iou[3])
    assert mean_iou(pred, target, 4) == pytest.approx((1 / 2 + 2 / 3) / 2)
    # a class predicted but absent from the target counts as IoU 0, not NaN
    pred2 = pred.copy()
    pred2[0, 0] = 3
    assert iou_per_class(pred2, target, 4)[3] == 0.0


def test_mean_iou_all_ignored_is_nan_without_warning(recwarn):
    target = np.full((2, 2), 9)
    assert math.isnan(mean_iou(np.zeros((2, 2), int), target, 2, ignore_index=9))
    assert math.isnan(pixel_accuracy(np.zeros((2, 2), int), target, ignore_index=9))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_pixel_accuracy_by_hand():
    assert pixel_accuracy(PRED, TARGET) == pytest.approx(4 / 6)
    assert accuracy_from_confusion(confusion_matrix(PRED, TARGET, 3)) == pytest.approx(4 / 6)


def test_dice_edge_cases():
    empty = np.zeros((4, 4), dtype=np.uint8)
    blob = empty.copy()
    blob[1:3, 1:3] = 1
    assert dice_score(empty, empty) == 1.0  # Kaggle rule: nothing to find, nothing found
    assert dice_score(blob, empty) == 0.0
    assert dice_score(empty, blob) == 0.0
    assert dice_score(blob, blob) == 1.0
    half = empty.copy()
    half[1:3, 1] = 1  # 2 of the 4 pixels
    assert dice_score(half, blob) == pytest.approx(2 * 2 / (2 + 4))
    # any non-zero label counts as foreground (0/255 masks work as they are)
    assert dice_score(blob * 255, blob) == 1.0


def test_dice_per_image_and_mean():
    empty = np.zeros((3, 3), int)
    full = np.ones((3, 3), int)
    pred = np.stack([empty, full, full])
    target = np.stack([empty, empty, full])
    np.testing.assert_allclose(dice_score(pred, target), [1.0, 0.0, 1.0])
    assert mean_dice(pred, target) == pytest.approx(2 / 3)
    assert isinstance(mean_dice(pred, target), float)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"pred shape \(2, 3\) does not match target shape \(3, 2\)"):
        dice_score(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="does not match"):
        confusion_matrix(np.zeros((1, 2, 3), int), np.zeros((2, 3), int), 2)
    with pytest.raises(ValueError, match=r"\(H, W\) or \(N, H, W\)"):
        mean_iou(np.zeros((1, 1, 2, 3), int), np.zeros((1, 1, 2, 3), int), 2)


def test_float_scores_rejected():
    with pytest.raises(TypeError, match="argmax"):
        pixel_accuracy(np.zeros((2, 2), np.float32), np.zeros((2, 2), int))


def test_out_of_range_class_is_a_clear_error():
    with pytest.raises(ValueError, match=r"target holds class id 5, outside \[0, 3\)"):
        confusion_matrix(np.zeros((2, 2), int), np.full((2, 2), 5), 3)
    with pytest.raises(ValueError, match="pred holds class id -1"):
        confusion_matrix(np.full((2, 2), -1), np.zeros((2, 2), int), 3)


def test_iou_from_confusion_requires_square():
    with pytest.raises(ValueError, match="square"):
        iou_from_confusion(np.zeros((2, 3)))


# ----------------------------------------------------------------------------- properties

binary_maps = st.integers(1, 3).flatmap(
    lambda n: st.tuples(
        arrays(np.uint8, (n, 5, 6), elements=st.integers(0, 1)),
        arrays(np.uint8, (n, 5, 6), elements=st.integers(0, 1)),
    )
)


@settings(max_examples=40, deadline=None)
@given(binary_maps)
def test_dice_symmetric_and_bounded(pair):
    p, t = pair
    d = dice_score(p, t)
    np.testing.assert_allclose(d, dice_score(t, p))
    assert np.all((d >= 0) & (d <= 1))
    np.testing.assert_array_equal(dice_score(t, t), np.ones(len(t)))  # perfect prediction
    # Dice and the foreground IoU are tied: D = 2 J / (1 + J) for every image with foreground.
    for i in range(len(p)):
        if p[i].any() or t[i].any():
            j = iou_per_class(p[i], t[i], 2)[1]
            assert d[i] == pytest.approx(2 * j / (1 + j))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 5).flatmap(
    lambda k: st.tuples(st.just(k),
                        arrays(np.int64, (2, 4, 5), elements=st.integers(0, k - 1)),
                        arrays(np.int64, (2, 4, 5), elements=st.integers(0, k - 1)))))
def test_confusion_and_iou_properties(args):
    k, p, t = args
    cm = confusion_matrix(p, t, k)
    assert cm.sum() == p.size
    np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(t.ravel(), minlength=k))  # rows: truth
    np.testing.assert_array_equal(cm.sum(axis=0), np.bincount(p.ravel(), minlength=k))  # columns: pred
    iou = iou_per_class(p, t, k)
    present = np.isin(np.arange(k), np.concatenate([p.ravel(), t.ravel()]))
    np.testing.assert_array_equal(~np.isnan(iou), present)
    assert np.all((iou[present] >= 0) & (iou[present] <= 1))
    assert mean_iou(t, t, k) == 1.0
    assert pixel_accuracy(t, t) == 1.0
    assert pixel_accuracy(p, t) == pytest.approx(np.trace(cm) / cm.sum())
