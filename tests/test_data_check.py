"""The data check (seg.data.check, seg.data.headers): every problem of a data set at once,
before training; `python -m seg check-data`; `--skip-bad`."""
import csv
import os
import re

import numpy as np
import pytest
import tifffile
from PIL import Image

from seg import cli, data, setup
from seg.data import DataCheckError, check_dataset, read_header
from seg.data.check import SHOWN_PROBLEMS

SIZE = (24, 32)


def esc(path):
    return re.escape(str(path))


def kaggle(tmp_path, subjects=3, per_subject=3):
    return data.write_synthetic_dataset(tmp_path / "kaggle", n_subjects=subjects,
                                        images_per_subject=per_subject, size=SIZE, n_test=0)


def damage(train):
    """Five kinds of problem, one file each -> {path: words its sentence must hold}."""
    b = (train / "1_2.tif").read_bytes()
    (train / "1_2.tif").write_bytes(b[: len(b) // 2])                     # cut short
    tifffile.imwrite(train / "2_1_mask.tif", np.zeros((SIZE[0] - 4, SIZE[1]), np.uint8))
    os.remove(train / "2_2_mask.tif")
    tifffile.imwrite(train / "3_1_mask.tif", np.full(SIZE, 7, np.uint8))  # not 0/255
    (train / "3_3.tif").write_bytes(b"")                                  # empty file
    return {train / "1_2.tif": "truncated", train / "2_1_mask.tif": "same size",
            train / "2_2.tif": "has no mask", train / "3_1_mask.tif": "holds values {7}",
            train / "3_3.tif": "not a TIFF"}


def open_checked(root, **kw):
    problems = []
    reader = data.KaggleUltrasound(root, problems=problems)
    return check_dataset(reader, problems, **kw)


def test_clean_data_set_summary(tmp_path):
    root = kaggle(tmp_path)
    report = open_checked(root)
    assert report.ok and len(report.samples) == 9
    masks = [data.load_mask(s.mask_path, binary=True) for s in report.samples]
    empty = sum(not m.any() for m in masks)
    s = report.summary
    assert (s["pairs"], s["subjects"], s["empty_masks"], s["masks_read"]) == (9, 3, empty, 9)
    assert s["sizes"] == {f"{SIZE[0]}x{SIZE[1]}": 9} and s["types"] == {"uint8 gray": 9}
    text = str(report)
    assert "No problems" in text and f"empty masks: {empty} of 9" in text
    # Headers only: the masks' pixels are not read, so the empty share is unknown.
    quick = open_checked(root, read_masks=False)
    assert quick.ok and quick.summary["masks_read"] == 0 and "not read" in quick.format_summary()


def test_every_problem_is_reported_at_once(tmp_path):
    root = kaggle(tmp_path)
    expected = damage(root / "train")
    (root / "train" / "notes.tif").write_bytes(b"x")                     # breaks the naming
    expected[root / "train" / "notes.tif"] = "naming"
    report = open_checked(root)
    assert not report.ok
    assert {p.path for p in report.problems} == {str(p) for p in expected}
    for problem in report.problems:
        assert problem.path in problem.message                         # names its file
        assert expected[type(root)(problem.path)] in problem.message
    bad = {str(p) for p in expected}
    assert report.samples and all(s.image_path not in bad and s.mask_path not in bad for s in report.samples)
    assert len(report.samples) == 9 - 5      # 1_2, 2_1, 2_2, 3_1, 3_3 left out


def test_report_shows_the_first_problems_and_counts_the_rest(tmp_path):
    root = kaggle(tmp_path, subjects=5, per_subject=5)
    for s in data.find_kaggle_samples(root):
        (root / "train" / os.path.basename(s.image_path)).write_bytes(b"garbage")
    report = open_checked(root)
    text = report.format_problems()
    assert len(report.problems) == 25
    assert text.count("\n  - ") == SHOWN_PROBLEMS
    assert f"and {25 - SHOWN_PROBLEMS} more" in text and text.startswith("25 problems")


def test_folder_layout_problems(tmp_path):
    root = tmp_path / "own"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in "abcd":
        Image.fromarray(np.zeros((8, 10), np.uint8)).save(root / "images" / f"{stem}.png")
    Image.fromarray(np.zeros((8, 10), np.uint8)).save(root / "masks" / "a.png")
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(root / "images" / "a.tif")  # second "a"
    Image.fromarray(np.full((8, 10), 5, np.uint8)).save(root / "masks" / "b.png")     # id 5 >= 3
    Image.fromarray(np.zeros((8, 10), np.uint8)).save(root / "masks" / "c.png")
    (root / "masks" / "z.png").write_bytes(b"\x89PNG\r\n\x1a\n")                         # no image
    problems = []
    reader = data.ImageMaskFolder(root, num_classes=3, problems=problems)
    report = check_dataset(reader, problems)
    messages = {os.path.basename(p.path): p.message for p in report.problems}
    assert set(messages) == {"a.tif", "z.png", "d.png", "b.png"}
    assert "share the stem 'a'" in messages["a.tif"] and "has no image" in messages["z.png"]
    assert "has no mask" in messages["d.png"] and "class id 5" in messages["b.png"]
    assert [os.path.basename(s.image_path) for s in report.samples] == ["a.png", "c.png"]
    # Without a problems list the readers still stop at the first problem.
    with pytest.raises(ValueError, match="share the stem"):
        data.ImageMaskFolder(root, num_classes=3)


def test_read_header_shapes_and_errors(tmp_path):
    tifffile.imwrite(tmp_path / "g.tif", np.zeros((5, 7), np.uint16))
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(tmp_path / "c.png")
    Image.fromarray(np.zeros((5, 7, 2), np.uint8), mode="LA").save(tmp_path / "la.png")
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((3, 5, 7), np.uint8), photometric="minisblack")
    assert read_header(tmp_path / "g.tif") == ((5, 7), 1, np.dtype(np.uint16))
    assert read_header(tmp_path / "c.png") == ((5, 7), 3, np.dtype(np.uint8))
    assert read_header(tmp_path / "la.png").channels == 2
    with pytest.raises(ValueError, match=esc(tmp_path / "stack.tif") + ".*not a stack of pages"):
        read_header(tmp_path / "stack.tif")
    png = (tmp_path / "c.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[:-20])
    with pytest.raises(ValueError, match=esc(tmp_path / "cut.png") + ".*damaged"):
        read_header(tmp_path / "cut.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_header(tmp_path / "missing.tif")
    with pytest.raises(ValueError, match="unsupported type"):
        read_header(tmp_path / "notes.txt")


def test_check_data_command(tmp_path, capsys):
    root = kaggle(tmp_path)
    assert cli.main(["check-data", str(root)]) == 0
    out = capsys.readouterr().out
    assert "No problems found" in out and "9 image/mask pairs" in out and "3 subjects" in out
    damage(root / "train")
    assert cli.main(["check-data", str(root)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("5 problems in") and "empty masks:" in out
    assert cli.main(["check-data", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


TRAIN = ["train", "--epochs", "1", "--batch-size", "2", "--size", "16x16", "--depth", "2",
         "--features-root", "2", "--no-progress", "--val-fraction", "0.34", "--no-augment"]


def test_training_stops_before_writing_anything(tmp_path, capsys):
    root = kaggle(tmp_path)
    damage(root / "train")
    out = tmp_path / "run"
    assert cli.main(TRAIN + ["--data", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n  - ") == 5 and "--skip-bad" in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(DataCheckError, match="5 problems"):
        setup.set_up_training(cli.parse_train_args(TRAIN[1:] + ["--data", str(root), "--out", str(out)]),
                              log=lambda *a: None)


def test_skip_bad_trains_on_the_rest_and_lists_what_it_skipped(tmp_path, capsys):
    root = kaggle(tmp_path, subjects=3, per_subject=4)
    expected = damage(root / "train")
    out = tmp_path / "run"
    # --crf scores the validation images again after training: without the skipped files too.
    assert cli.main(TRAIN + ["--data", str(root), "--out", str(out), "--skip-bad", "--crf"]) == 0
    text = capsys.readouterr().out
    assert "--skip-bad: training on the 7 pairs" in text and "final validation Dice" in text
    assert "+ dense CRF" in text
    with open(out / setup.SKIPPED_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["file"] for r in rows} == {str(p) for p in expected}
    assert all(r["file"] in r["problem"] for r in rows)
    assert (out / "last.npz").exists()


def test_skip_bad_with_nothing_left(tmp_path, capsys):
    root = kaggle(tmp_path, subjects=2, per_subject=1)
    for name in ("1_1.tif", "2_1.tif"):
        (root / "train" / name).write_bytes(b"")
    assert cli.main(TRAIN + ["--data", str(root), "--out", str(tmp_path / "run"), "--skip-bad"]) == 2
    assert "no image/mask pair is left" in capsys.readouterr().err


def test_damaged_tiff_gives_one_sentence_and_no_tifffile_log(tmp_path, caplog):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((6, 8), np.uint8), description="a frame")
    raw = (tmp_path / "a.tif").read_bytes()
    (tmp_path / "a.tif").write_bytes(raw[:200])        # tag values cut off: tifffile logs them
    for reader in (data.read_array, read_header):
        with caplog.at_level("DEBUG", logger="tifffile"):
            with pytest.raises(ValueError, match=esc(tmp_path / "a.tif")):
                reader(tmp_path / "a.tif")
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]


def test_check_data_on_a_folder_of_class_id_masks(tmp_path, capsys):
    root = tmp_path / "own"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in "ab":
        Image.fromarray(np.zeros((8, 10), np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(np.arange(80, dtype=np.uint8).reshape(8, 10) % 3).save(root / "masks" / f"{stem}.png")
    # The classes are inferred from the mask values (seg.data.describe), and said.
    assert cli.main(["check-data", str(root)]) == 0
    out = capsys.readouterr().out
    assert "No problems found" in out and "class ids, 3 classes" in out and "--num-classes" in out
    assert cli.main(["check-data", str(root), "--num-classes", "3"]) == 0
    assert "No problems found" in capsys.readouterr().out
    assert cli.main(["check-data", str(root), "--num-classes", "2"]) == 1
    assert "holds class id 2, but num_classes is 2" in capsys.readouterr().out
