"""examples/train_any.py and examples/train_unet.py (issue 20, items 6 and 7): --preset and
--lr-schedule are honoured, a too-small --size becomes the nearest one the model takes, and bad
input ends in the one sentence `python -m seg train` prints (no traceback, no Python advice)."""
import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import minidl
from seg import cli, models
from seg.models.input_size import fitting_input_size
from image_folders import random_folder

ROOT = Path(__file__).resolve().parents[1]


def _example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lrs(out):
    with open(out / "metrics.csv") as f:
        return [float(row["lr"]) for row in csv.DictReader(f)]


QUICK = ["--size", "16x16", "--batch-size", "3", "--no-progress", "--no-augment", "--plot-every", "9"]


def test_train_any_follows_lr_schedule_and_preset(tmp_path):
    train_any = _example("train_any")
    data = str(random_folder(tmp_path / "data"))
    assert train_any.main(["--data", data, "--epochs", "2", "--out", str(tmp_path / "poly")] + QUICK) == 0
    # The lr each epoch trained with: poly decay, stepped after each epoch.
    assert _lrs(tmp_path / "poly") == [pytest.approx(1e-3), pytest.approx(1e-3 * (1 - 1 / 2) ** 0.9)]
    # The preset's lr 1e-4 and constant schedule; explicit options still win.
    assert train_any.main(["--data", data, "--preset", "seed-unet", "--epochs", "2",
                           "--out", str(tmp_path / "preset")] + QUICK) == 0
    assert _lrs(tmp_path / "preset") == [pytest.approx(1e-4)] * 2


def test_too_small_size_becomes_the_nearest_the_model_takes():
    minidl.manual_seed(0)
    model = models.build("deconvnet", 2, in_channels=1, width=1 / 16).eval()
    h, w = fitting_input_size(model, (64, 64))
    assert h == w and 64 < h
    with minidl.no_grad():
        assert model(minidl.tensor(np.zeros((1, 1, h, w), np.float32))).shape[2:] == (h, w)
        with pytest.raises(ValueError):
            model(minidl.tensor(np.zeros((1, 1, h - 16, w - 16), np.float32)))
    assert fitting_input_size(model, (h, w + 5)) == (h, w + 5)        # a size that fits stays


@pytest.mark.parametrize("entry", ["cli", "train_any", "train_unet"])
def test_bad_input_is_one_sentence_everywhere(entry, tmp_path, capsys):
    if entry == "cli":
        main = lambda argv: cli.main(["train"] + argv)  # noqa: E731
    else:
        main = _example(entry).main
    # 3-class masks with --num-classes 2: the data check (seg.data.check) lists every mask that
    # breaks it, then one closing sentence; no traceback.
    three = str(random_folder(tmp_path / "three", classes=3))
    assert main(["--data", three, "--model", "unet", "--num-classes", "2", "--epochs", "1",
                 "--out", str(tmp_path / "a")] + QUICK) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "Mask file" in err and "holds class id 2, but num_classes is 2" in err
    assert err.splitlines()[-1].startswith("The data check stopped the run")
    # A checkpoint of another model: the options it was trained with, not "strict=False".
    two = str(random_folder(tmp_path / "two"))
    assert cli.main(["train", "--data", two, "--model", "unet", "--depth", "2", "--epochs", "1",
                     "--out", str(tmp_path / "b")] + QUICK) == 0
    capsys.readouterr()
    assert main(["--data", two, "--model", "unet", "--depth", "3", "--epochs", "2",
                 "--resume", str(tmp_path / "b" / "last.npz"), "--out", str(tmp_path / "c")] + QUICK) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--depth 2" in err and "strict" not in err
