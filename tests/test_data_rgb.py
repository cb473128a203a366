"""Colour images (issue 20, item 2): the channel count comes from the data (--in-channels to
force it), travels in the checkpoint, and predict/evaluate read images with it."""
import importlib.util
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from seg import cli, data, inference, models
from seg.checkpoints import read_checkpoint_meta, save_checkpoint
from seg.data.readers import image_channels, to_float_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--epochs", "1", "--batch-size", "4", "--size", "24x32", "--depth", "2", "--features-root", "2",
        "--no-progress", "--val-fraction", "0.34", "--no-augment", "--plot-every", "9"]


def test_to_float_image_keeps_or_makes_rgb():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    np.testing.assert_allclose(to_float_image(rgb, channels=3), rgb / 255.0, atol=1e-7)
    rgba = np.concatenate([rgb, np.zeros((5, 6, 1), np.uint8)], axis=-1)
    np.testing.assert_allclose(to_float_image(rgba, channels=3), rgb / 255.0, atol=1e-7)
    gray = rgb[..., 0]
    np.testing.assert_allclose(to_float_image(gray, channels=3), np.repeat(gray[..., None] / 255.0, 3, -1),
                               atol=1e-7)
    # channels=1 (the default) is the BT.601 luminance, as before.
    expected = (rgb @ np.array([0.299, 0.587, 0.114])) / 255.0
    np.testing.assert_allclose(to_float_image(rgb), expected, atol=1e-6)
    with pytest.raises(ValueError, match="channels must be 1 \\(gray\\) or 3 \\(RGB\\), got 2"):
        to_float_image(rgb, channels=2)


def test_image_channels_reads_the_header(tmp_path):
    pixels = np.zeros((4, 5, 4), np.uint8)
    cases = {"gray.png": Image.fromarray(pixels[..., 0]), "rgb.png": Image.fromarray(pixels[..., :3]),
             "rgba.png": Image.fromarray(pixels), "palette.png": Image.fromarray(pixels[..., 0]).convert("P")}
    for name, im in cases.items():
        im.save(tmp_path / name)
    tifffile.imwrite(tmp_path / "gray.tif", pixels[..., 0])
    tifffile.imwrite(tmp_path / "rgb.tif", pixels[..., :3], photometric="rgb")
    found = {name: image_channels(tmp_path / name) for name in sorted(os.listdir(tmp_path))}
    assert found == {"gray.png": 1, "gray.tif": 1, "palette.png": 1, "rgb.png": 3, "rgb.tif": 3,
                     "rgba.png": 3}
    (tmp_path / "bad.png").write_bytes(b"\x89PNG no")
    with pytest.raises(ValueError, match="Could not read image file .*bad.png"):
        image_channels(tmp_path / "bad.png")


def colour_folder(root, n=9, size=(30, 40), rgb=True):
    """images/ + masks/ where the object differs from the background in hue, not in gray level:
    a red disc (gray 0.299 * 200 = 59.8) on a green ground (gray 0.587 * 102 = 59.9)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:size[0], :size[1]]
    for i in range(n):
        cy, cx = rng.uniform(8, size[0] - 8), rng.uniform(8, size[1] - 8)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < 36).astype(np.uint8)
        image = np.zeros(size + (3,), np.uint8)
        image[..., 1] = 102
        image[mask == 1] = (200, 0, 0)
        Image.fromarray(image if rgb else image[..., 1]).save(root / "images" / f"{i}.png")
        Image.fromarray(mask * 255).save(root / "masks" / f"{i}.png")
    return root


def test_folder_infers_the_channels(tmp_path):
    root = colour_folder(tmp_path / "colour", n=3)
    assert data.ImageMaskFolder(root, in_channels=None).in_channels == 3
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(root / "images" / "1.png")   # one gray image
    mixed = data.ImageMaskFolder(root, in_channels=None, binary=True)
    assert mixed.in_channels == 3 and mixed.load(mixed.samples[1])[0].shape == (30, 40, 3)
    gray = colour_folder(tmp_path / "gray", n=2, rgb=False)
    assert data.ImageMaskFolder(gray, in_channels=None).in_channels == 1
    # The library default stays gray (H, W).
    assert data.ImageMaskFolder(root, binary=True).load(mixed.samples[0])[0].shape == (30, 40)


def test_kaggle_frames_as_rgb(tmp_path):
    root = data.write_synthetic_dataset(tmp_path, n_subjects=2, images_per_subject=1, size=(20, 24))
    gray = data.KaggleUltrasound(root)
    rgb = data.KaggleUltrasound(root, in_channels=3)
    image, _ = gray.load(gray.samples[0])
    image3, _ = rgb.load(rgb.samples[0])
    assert image3.shape == (20, 24, 3)
    np.testing.assert_array_equal(image3, np.repeat(image[..., None], 3, axis=-1))


def test_cli_trains_on_colour_and_predicts_with_it(tmp_path, capsys, device):
    root = colour_folder(tmp_path / "data")
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(root), "--out", str(out), "--device", device] + TINY) == 0
    assert "binary foreground masks, 2 classes; images read as RGB (3 channel(s))" in capsys.readouterr().out
    config = read_checkpoint_meta(out / "best.npz")["config"]
    assert config["in_channels"] == 3
    model, _ = inference.load_for_inference(out / "best.npz")
    assert model.in_channels == 3
    masks = tmp_path / "masks"
    assert cli.main(["predict", "--checkpoint", str(out / "best.npz"), "--input", str(root / "images"),
                     "--output", str(masks), "--no-progress", "--device", device]) == 0
    for name in ("0.png", "5.png"):
        rgb = data.load_image(root / "images" / name, channels=3)
        expected = inference.predict_image(model, rgb, config["size"]).argmax(0)
        np.testing.assert_array_equal(data.load_mask(masks / name, binary=True), expected)
    assert cli.main(["evaluate", "--checkpoint", str(out / "best.npz"), "--data", str(root),
                     "--no-progress", "--device", device]) == 0
    assert "9 images (all): Dice (Kaggle)" in capsys.readouterr().out
    # --in-channels 1 forces gray.
    assert cli.main(["train", "--data", str(root), "--out", str(tmp_path / "gray"), "--in-channels", "1"]
                    + TINY) == 0
    assert read_checkpoint_meta(tmp_path / "gray" / "best.npz")["config"]["in_channels"] == 1


def test_rgb_models_train_on_colour_data_from_the_examples(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_any", os.path.join(REPO, "examples", "train_any.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    root = colour_folder(tmp_path / "data", size=(32, 32))
    out = tmp_path / "segnet"
    args = ["--model", "segnet", "--data", str(root), "--out", str(out), "--size", "32x32"] + TINY[:4] + TINY[6:]
    assert example.main(args) == 0
    config = read_checkpoint_meta(out / "last.npz")["config"]
    assert config["in_channels"] == 3 and config["model"] == "segnet"
    model, _ = inference.load_for_inference(out / "last.npz")
    assert model.in_channels == 3


def test_old_checkpoints_without_in_channels_read_gray(tmp_path, capsys):
    model = models.build("unet", num_classes=2, in_channels=1, depth=2, features_root=2)
    config = {"model": "unet", "num_classes": 2, "size": [24, 32],
              "model_options": {"depth": 2, "features_root": 2}}        # no "in_channels"
    save_checkpoint(tmp_path / "old.npz", model, meta={"config": config})
    root = colour_folder(tmp_path / "data", n=1)
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "old.npz"), "--input", str(root / "images"),
                     "--output", str(tmp_path / "masks"), "--no-progress"]) == 0
    loaded, _ = inference.load_for_inference(tmp_path / "old.npz")
    expected = inference.predict_image(loaded, data.load_image(root / "images" / "0.png"), [24, 32]).argmax(0)
    np.testing.assert_array_equal(data.load_mask(tmp_path / "masks" / "0.png", binary=True), expected)
