"""Where the data check (issue 18) meets inferred classes/channels and output naming (issue 20):
inference passes over damaged files so that the check lists them all; predict takes one file or
a folder, checks headers and channels, and names masks without replacing anything."""
import os

import numpy as np
import pytest
from PIL import Image

from seg import cli, data, models, setup
from seg.checkpoints import save_checkpoint
from seg.data import describe


def own_folder(root, mask_values=(0, 1, 2)):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, stem in enumerate("abcd"):
        Image.fromarray(np.full((8, 10, 3), 40 * i, np.uint8)).save(root / "images" / f"{stem}.png")
        mask = np.resize(np.array(mask_values, np.uint8), 80).reshape(8, 10)
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    return root


def test_check_lists_damaged_files_after_inferring_classes_and_channels(tmp_path):
    root = own_folder(tmp_path / "own")
    (root / "images" / "b.png").write_bytes(b"not a png")
    (root / "masks" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    reader, kind, num_classes, report = setup.open_checked_dataset(root)
    assert (kind, num_classes, reader.in_channels) == ("folder", 3, 3)
    assert sorted(os.path.basename(p.path) for p in report.problems) == ["b.png", "c.png"]
    assert [os.path.basename(s.image_path) for s in report.samples] == ["a.png", "d.png"]
    # Outside the check, inference still stops at the first damaged file.
    with pytest.raises(ValueError, match="c.png"):
        describe.infer_mask_classes(reader.samples)


def test_masks_fitting_no_convention_are_a_problem_of_the_check(tmp_path):
    root = own_folder(tmp_path / "own", mask_values=(0, 128))
    report = setup.open_checked_dataset(root)[3]
    assert not report.ok
    assert "neither binary masks" in report.problems[0].message
    assert len(report.problems) == 5          # the folder, then each mask that is not binary
    with pytest.raises(ValueError, match="neither binary masks"):
        data.ImageMaskFolder(root, binary=None)


def test_predict_one_file_and_a_folder_with_damaged_and_colliding_files(tmp_path, capsys):
    ckpt = tmp_path / "c.npz"
    options = {"depth": 2, "features_root": 2}
    model = models.build("unet", num_classes=2, in_channels=1, **options)
    save_checkpoint(ckpt, model, meta={"epoch": 1, "config": {
        "model": "unet", "num_classes": 2, "in_channels": 1, "model_options": options, "size": [16, 16]}})
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("a.png", "a.tif"):                       # one stem: masks named after the file name
        Image.fromarray(np.zeros((20, 24), np.uint8)).save(inp / name)
    (inp / "b.png").write_bytes(b"not a png")
    common = ["--checkpoint", str(ckpt), "--no-progress"]
    assert cli.main(["predict", "--input", str(inp / "a.png"), "--output", str(tmp_path / "one")] + common) == 0
    assert os.listdir(tmp_path / "one") == ["a.png"]
    assert cli.main(["predict", "--input", str(inp), "--output", str(tmp_path / "all")] + common) == 1
    assert sorted(os.listdir(tmp_path / "all")) == ["a.png.png", "a.tif.png"]
    captured = capsys.readouterr()
    assert "share a file stem" in captured.out and "skipped 1 file:" in captured.err
    assert "b.png" in captured.err
    assert cli.main(["predict", "--input", str(inp), "--output", str(inp)] + common) == 2
    assert "is the folder of the input images" in capsys.readouterr().err
