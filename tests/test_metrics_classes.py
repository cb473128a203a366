"""More than two classes (issue 20, item 3): classes read off the mask values, per-class Dice and
IoU, and a score that tells the classes apart (swapping two of them must not score 1)."""
import csv

import numpy as np
import pytest
from PIL import Image

from seg import cli, metrics
from seg.checkpoints import read_checkpoint_meta
from seg.data import ImageMaskFolder, infer_mask_classes

TINY = ["--epochs", "2", "--batch-size", "4", "--size", "24x32", "--depth", "2", "--features-root", "2",
        "--no-progress", "--val-fraction", "0.34", "--no-augment", "--plot-every", "9"]


def mask_folder(root, masks):
    """images/ + masks/ with one gray image per mask array."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i, mask in enumerate(masks):
        image = (60 + 60 * mask.astype(np.float32) / max(int(mask.max()), 1) + rng.normal(0, 5, mask.shape))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{i}.png")
    return root


def blobs(values, n=9, size=(30, 40)):
    """n masks of class squares, cycling through `values` (background 0)."""
    masks = []
    for i in range(n):
        m = np.zeros(size, np.uint8)
        m[4:14, 4 + i:16 + i] = values[i % len(values)]
        m[16:26, 20:32] = values[(i + 1) % len(values)]
        masks.append(m)
    return masks


@pytest.mark.parametrize("values, expected", [
    ((255,), (2, True, "mask values {0, 255}: binary foreground masks, 2 classes")),
    ((1,), (2, True, "mask values {0, 1}: binary foreground masks, 2 classes")),
    ((1, 2), (3, False, "mask values {0, 1, 2}: class ids, 3 classes")),
])
def test_classes_are_read_off_the_mask_values(tmp_path, values, expected):
    folder = ImageMaskFolder(mask_folder(tmp_path, blobs(values, n=3)), binary=None)
    assert (folder.num_classes, folder.binary, folder.classes.describe()) == expected
    _, mask = folder.load(folder.samples[0])
    assert set(np.unique(mask).tolist()) <= set(range(expected[0]))


@pytest.mark.parametrize("values, message", [
    ((1, 2, 255), r"hold the values \{0, 1, 2, 255\}, which are neither binary masks \(only 0/255 or only "
                  r"0/1\) nor class ids 0..K-1 with every class present \(255 is often a 'void' border "
                  r"label: map it to a class first\); save them .* \(--num-classes\) if some classes are absent\."),
    ((128,), r"hold the values \{0, 128\}, which are neither binary masks"),
    ((2, 5), r"hold the values \{0, 2, 5\}, which are neither"),
])
def test_masks_that_fit_no_convention_are_refused(tmp_path, values, message):
    root = mask_folder(tmp_path, blobs(values, n=3))
    with pytest.raises(ValueError, match=message):
        ImageMaskFolder(root, binary=None)


def test_given_number_of_classes_is_checked(tmp_path):
    samples = ImageMaskFolder(mask_folder(tmp_path, blobs((255,), n=2))).samples
    assert infer_mask_classes(samples, 2)[:2] == (2, True)
    with pytest.raises(ValueError, match=r"Mask .*0\.png holds the value 255, but the number of classes is 3, so "
                                         r"class ids must be below 3 \(0/255 masks are binary foreground masks: "
                                         r"use 2 classes\)\."):
        infer_mask_classes(samples, 3)
    ids = ImageMaskFolder(mask_folder(tmp_path / "ids", blobs((2,), n=2))).samples
    assert infer_mask_classes(ids, 4) == (4, False, (0, 2))     # absent classes allowed when given


def reference_dice(pred, target, k):
    p, t = pred == k, target == k
    total = p.sum() + t.sum()
    return np.nan if total == 0 else 2.0 * (p & t).sum() / total


def test_dice_from_confusion_matches_a_per_class_reference():
    rng = np.random.default_rng(3)
    for _ in range(5):
        pred, target = rng.integers(0, 4, (2, 3, 7, 9))
        target[target == 3] = 0                 # class 3 only in the prediction
        pred[pred == 2] = 1
        target[target == 2] = 1                 # class 2 in neither: NaN
        got = metrics.dice_from_confusion(metrics.confusion_matrix(pred, target, 5))
        expected = [reference_dice(pred, target, k) for k in range(5)]
        np.testing.assert_allclose(got, expected, equal_nan=True)
        assert np.isnan(got[2]) and np.isnan(got[4]) and got[3] == 0


def test_swapping_two_classes_does_not_score_one():
    target = np.zeros((2, 8, 8), np.int64)
    target[:, :4, :4], target[:, 4:, 4:] = 1, 2
    swapped = np.where(target == 1, 2, np.where(target == 2, 1, 0))
    scores = metrics.RunningScores(3)
    scores.add(swapped, target)
    summary = scores.summary()
    assert metrics.mean_dice(swapped, target) == 1.0          # the binary (Kaggle) Dice cannot tell
    assert summary["dice"] == 0.0 and summary["dice_per_class"] == [1.0, 0.0, 0.0]
    assert summary["iou_per_class"] == [1.0, 0.0, 0.0]
    right = metrics.RunningScores(3)
    right.add(target, target)
    assert right.summary()["dice"] == 1.0
    # Two classes: the Kaggle per-image mean, as before, and no per-class columns.
    binary = metrics.RunningScores(2)
    pred = np.zeros((2, 8, 8), np.int64)
    pred[0, :4, :4] = 1
    binary.add(pred, (target > 0).astype(np.int64))
    assert binary.summary()["dice"] == metrics.mean_dice(pred, target > 0)
    assert metrics.class_columns(binary.summary()) == {}
    assert metrics.format_class_table(binary.summary()) == ""


def test_cli_trains_three_classes_and_reports_each(tmp_path, capsys, device):
    root = mask_folder(tmp_path / "data", blobs((1, 2)))
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(root), "--out", str(out), "--device", device] + TINY) == 0
    log = capsys.readouterr().out
    assert "mask values {0, 1, 2}: class ids, 3 classes" in log and "Dice per class" in log
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        per_class = [float(row[f"val_dice_c{k}"]) for k in (1, 2)]
        assert float(row["val_dice"]) == pytest.approx(np.nanmean(per_class))
        assert {f"val_iou_c{k}" for k in range(3)} <= set(row)
    meta = read_checkpoint_meta(out / "best.npz")
    assert meta["config"]["num_classes"] == 3
    scores = [float(r["val_dice"]) for r in rows]
    assert meta["best_score"] == pytest.approx(max(scores))
    assert meta["best_epoch"] == 1 + int(np.argmax(scores))
    assert cli.main(["evaluate", "--checkpoint", str(out / "best.npz"), "--data", str(root),
                     "--no-progress", "--device", device]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("9 images (all): mean Dice (classes 1-2) ")
    assert lines[1].split() == ["class", "Dice", "IoU"] and [line.split()[0] for line in lines[2:5]] == ["0", "1", "2"]
