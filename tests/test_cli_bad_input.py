"""`python -m seg predict / evaluate` on bad input: files that are not images, images with
another channel count, a checkpoint of another architecture or cut short, an output folder that
cannot be written. Each is one sentence; skipped inputs are listed and set the exit code."""
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from minidl import nn
from seg import cli, data, models
from seg.checkpoints import save_checkpoint

OPTIONS = {"depth": 2, "features_root": 2, "padding": "same", "batch_norm": True, "dropout": 0.0,
           "dropout_mode": "bottleneck"}


def checkpoint(path, in_channels=1, built=None, model=None):
    """A seg checkpoint (untrained weights) of a small U-Net; the weights are those of a U-Net
    with the `built` options, or of `model`, when given (a checkpoint that does not fit its config)."""
    cfg = {"model": "unet", "num_classes": 2, "in_channels": in_channels, "model_options": OPTIONS,
           "size": [16, 16]}
    if model is None:
        model = models.build("unet", num_classes=2, in_channels=in_channels, **(built or OPTIONS))
    save_checkpoint(path, model, meta={"epoch": 1, "config": cfg})
    return str(path)


def gray(path, shape=(20, 24)):
    tifffile.imwrite(path, (np.arange(np.prod(shape)) % 251).astype(np.uint8).reshape(shape))


def predict(ckpt, input_dir, output):
    return cli.main(["predict", "--checkpoint", ckpt, "--input", str(input_dir), "--output", str(output),
                     "--no-progress"])


def test_bad_files_are_listed_and_skipped(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "c.npz")
    inp = tmp_path / "in"
    inp.mkdir()
    gray(inp / "a.tif")
    Image.fromarray(np.zeros((20, 24, 4), np.uint8)).save(inp / "rgba.png")   # made gray, as in training
    (inp / "README.txt").write_text("scans of 3 May")
    (inp / "junk.png").write_bytes(os.urandom(64))
    tif = (inp / "a.tif").read_bytes()
    (inp / "cut.tif").write_bytes(tif[: len(tif) // 2])
    Image.fromarray(np.zeros((20, 24, 2), np.uint8), mode="LA").save(inp / "la.png")
    (inp / ".DS_Store").write_bytes(b"\0")                                    # hidden: passed over
    code = predict(ckpt, inp, tmp_path / "out")
    captured = capsys.readouterr()
    assert code == 1
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "rgba.png"]
    assert "wrote 2 mask(s)" in captured.out
    lines = captured.err.strip().splitlines()
    assert lines[0] == "skipped 4 files:"
    reasons = {"README.txt": "is not an image (.txt)", "junk.png": "damaged or not a PNG",
               "cut.tif": "truncated", "la.png": "has 2 channel(s) but the model in"}
    for name, reason in reasons.items():
        assert sum(str(inp / name) in line and reason in line for line in lines[1:]) == 1, (name, lines)


def test_gray_images_for_an_rgb_checkpoint(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "rgb.npz", in_channels=3)
    inp = tmp_path / "in"
    inp.mkdir()
    gray(inp / "a.tif")
    assert predict(ckpt, inp, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"Image {inp / 'a.tif'} has 1 channel(s) but the model in {ckpt} takes 3-channel images" in err


@pytest.mark.parametrize("case, message", [
    ("other_layers", "does not fit this model: it holds the weights of another architecture"),
    ("other_shapes", "does not fit this model: it holds the weights of another architecture"),
    ("truncated", "is damaged or was not written by seg.train"),
    ("not_seg", "is damaged or was not written by seg.train"),
])
def test_unusable_checkpoint_is_one_sentence(tmp_path, capsys, case, message):
    path = tmp_path / "c.npz"
    if case == "other_layers":
        checkpoint(path, model=nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
    elif case == "other_shapes":
        checkpoint(path, built=dict(OPTIONS, features_root=4))
    elif case == "truncated":
        good = (tmp_path / "good.npz").__fspath__()
        checkpoint(good)
        path.write_bytes(open(good, "rb").read()[:3000])
    else:
        np.savez(path, weights=np.zeros(3))
    inp = tmp_path / "in"
    inp.mkdir()
    gray(inp / "a.tif")
    assert predict(str(path), inp, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(path) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_output_folder_that_cannot_be_written(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "c.npz")
    inp = tmp_path / "in"
    inp.mkdir()
    gray(inp / "a.tif")
    (tmp_path / "file").write_text("")
    # A file as --output is refused by name (seg.outputs.mask_outputs); a folder that cannot be
    # created is found by the write test (seg.prediction_inputs.prepare_output_folder).
    for output, message in ((tmp_path / "file", f"--output {tmp_path / 'file'} is a file"),
                            (tmp_path / "file" / "masks", f"--output folder {tmp_path / 'file' / 'masks'} "
                                                          "cannot be written")):
        assert predict(ckpt, inp, output) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def test_nothing_to_predict(tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "notes.txt").write_text("x")
    assert predict(str(tmp_path / "c.npz"), inp, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "holds no .tif/.tiff/.png images" in err and "notes.txt is not an image" in err


def test_evaluate_lists_every_problem(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "c.npz")
    root = data.write_synthetic_dataset(tmp_path / "k", n_subjects=2, images_per_subject=2, size=(20, 24),
                                        n_test=0)
    (root / "train" / "1_1.tif").write_bytes(b"")
    os.remove(root / "train" / "2_2_mask.tif")
    assert cli.main(["evaluate", "--checkpoint", ckpt, "--data", str(root), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and "1_1.tif" in err and "2_2.tif has no mask" in err


def test_resume_from_a_checkpoint_of_another_model_is_one_sentence(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "c.npz", built=dict(OPTIONS, features_root=4))
    root = data.write_synthetic_dataset(tmp_path / "k", n_subjects=2, images_per_subject=2, size=(20, 24),
                                        n_test=0)
    code = cli.main(["train", "--data", str(root), "--epochs", "1", "--size", "16x16", "--depth", "2",
                     "--features-root", "2", "--no-progress", "--out", str(tmp_path / "run"),
                     "--resume", ckpt, "--val-fraction", "0.5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"Checkpoint {ckpt} does not fit this model" in err


def test_train_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "run").write_text("")
    assert cli.main(["train", "--out", str(tmp_path / "run")]) == 2
    assert f"--out {tmp_path / 'run'} is a file" in capsys.readouterr().err


def test_disk_errors_while_training_are_one_line(tmp_path, capsys, monkeypatch):
    import seg.train

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "run" / "last.npz"))

    monkeypatch.setattr(seg.train, "save_checkpoint", full_disk)
    root = data.write_synthetic_dataset(tmp_path / "k", n_subjects=2, images_per_subject=2, size=(20, 24),
                                        n_test=0)
    code = cli.main(["train", "--data", str(root), "--epochs", "1", "--size", "16x16", "--depth", "2",
                     "--features-root", "2", "--no-progress", "--out", str(tmp_path / "run"),
                     "--val-fraction", "0.5"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "No space left on device" in err
    assert "last.npz" in err
