"""Dense CRF in the pipeline: `python -m seg evaluate/predict --crf` and examples/crf_refine.py."""
import importlib.util
import os
import re

import numpy as np
import pytest
from scipy import ndimage

from seg import cli, data, inference
from test_train import make   # the tiny U-Net trainer of the training tests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What load_for_inference needs to rebuild test_train.make's model.
TINY_CONFIG = {"model": "unet", "num_classes": 2, "in_channels": 1, "size": [24, 32], "val_fraction": 0.5,
               "model_options": {"depth": 2, "features_root": 4, "padding": "same", "batch_norm": True,
                                 "dropout": 0.2}}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A one-epoch checkpoint and a 2-patient, 4-frame Kaggle-layout data set of 40x56 frames."""
    tmp = tmp_path_factory.mktemp("crf_pipeline")
    make(tmp / "run", config=TINY_CONFIG).fit(1)
    root = data.write_synthetic_dataset(tmp / "kaggle", n_subjects=2, images_per_subject=2,
                                        size=(40, 56), n_test=2)
    return tmp / "run" / "best.npz", root


def test_evaluate_crf_prints_dice_without_and_with_crf(tiny_run, capsys):
    checkpoint, root = tiny_run
    assert cli.main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(root), "--crf",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    plain = re.search(r"^4 images \(all\): Dice \(Kaggle\) (\S+)", out, re.M)
    refined = re.search(r"^4 images \(all\) \+ dense CRF: Dice \(Kaggle\) (\S+)", out, re.M)
    assert plain and refined, out
    # The printed numbers are the two evaluations, network alone and network + CRF.
    model, config = inference.load_for_inference(checkpoint)
    reader = data.KaggleUltrasound(root)
    for match, crf in ((plain, False), (refined, True)):
        scores = inference.evaluate_samples(model, reader, reader.samples, config["size"], 2, crf=crf,
                                      progress=False)
        assert match.group(1) == f"{scores['dice']:.4f}"
    # Without --crf only the plain line.
    assert cli.main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(root), "--no-progress"]) == 0
    assert "dense CRF" not in capsys.readouterr().out


def test_predict_crf_writes_the_refined_masks(tiny_run, tmp_path):
    checkpoint, root = tiny_run
    assert cli.main(["predict", "--checkpoint", str(checkpoint), "--input", str(root / "test"),
                     "--output", str(tmp_path), "--crf", "--format", "tiff", "--no-progress"]) == 0
    model, config = inference.load_for_inference(checkpoint)
    for name in ("1", "2"):
        image = data.load_image(root / "test" / f"{name}.tif")
        expected = inference.predict_image(model, image, config["size"], crf=True).argmax(0)
        written = data.load_mask(tmp_path / f"{name}.tif", binary=True)
        np.testing.assert_array_equal(written, expected)


def _load_example():
    path = os.path.join(REPO, "examples", "crf_refine.py")
    spec = importlib.util.spec_from_file_location("crf_refine", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _blurred_case(seed, empty=False):
    """A noisy frame with a brighter ellipse (the mask; an edge of 77 grey levels, noise of 13),
    and a network-like prediction: the mask shifted by a few pixels and blurred, plus two
    small false detections."""
    rng = np.random.default_rng(seed)
    h, w = 96, 128
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(35, 60), rng.uniform(40, 88)
    mask = (((yy - cy) / 16) ** 2 + ((xx - cx) / 22) ** 2 < 1).astype(np.uint8) * (not empty)
    image = np.clip(0.35 + 0.3 * mask + rng.normal(0, 0.05, (h, w)), 0, 1).astype(np.float32)
    p = ndimage.gaussian_filter(np.roll(mask.astype(np.float32), (2, -3), axis=(0, 1)), 3)
    for sy, sx in rng.integers(5, 85, size=(2, 2)):
        p[sy:sy + 4, sx:sx + 4] = 0.7     # specks far from the nerve, like the U-Net's
    p = np.clip(p, 0.02, 0.98)
    return np.stack([1 - p, p]).astype(np.float32), image, mask


@pytest.mark.parametrize("seed, empty", [(0, False), (1, False), (2, True)])
def test_example_core_function_does_not_lower_dice(seed, empty):
    example = _load_example()
    probs, image, mask = _blurred_case(seed, empty)
    before, after, refined = example.refine_and_score(probs, image, mask)
    assert refined.shape == probs.shape
    np.testing.assert_allclose(refined.sum(axis=0), 1.0, atol=1e-4)
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    assert after >= before - 0.02, (before, after)
    if empty:   # the specks alone make the Kaggle Dice 0; the CRF removes them
        assert before == 0.0 and after == 1.0
