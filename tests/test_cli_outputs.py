"""No command replaces data by accident (issue 20, item 1): predict never writes over its input
images and gives every input its own mask; train never replaces another run (seg.outputs)."""
import csv
import importlib.util
import os
import re

import numpy as np
import pytest
from PIL import Image

import minidl
from minidl import optim
from seg import cli, data, inference, losses, models
from seg.errors import UsageError
from seg.outputs import choose_run_folder, mask_outputs
from seg.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--epochs", "1", "--batch-size", "4", "--size", "24x32", "--depth", "2", "--features-root", "2",
        "--no-progress", "--val-fraction", "0.34", "--no-augment", "--plot-every", "9"]


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    return data.write_synthetic_dataset(tmp_path_factory.mktemp("kaggle"), n_subjects=3,
                                        images_per_subject=3, size=(40, 56), n_test=2)


@pytest.fixture(scope="module")
def checkpoint(kaggle, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert cli.main(["train", "--data", str(kaggle), "--out", str(out)] + TINY) == 0
    return out / "best.npz"


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ----------------------------------------------------------------------------- predict

def test_predict_refuses_to_write_into_the_input_folder(checkpoint, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.arange(24 * 32, dtype=np.uint16).reshape(24, 32).astype(np.uint8)).save(folder / "a.png")
    before = (folder / "a.png").read_bytes()
    for output in (folder, f"{folder}/", f"{folder}/."):
        code = cli.main(["predict", "--checkpoint", str(checkpoint), "--input", str(folder),
                         "--output", str(output), "--no-progress"])
        assert code == 2
        assert re.search(r"is the folder of the input images.*choose another folder, e\.g\. --output "
                         r".*images-masks\.$", one_error_line(capsys))
    assert os.listdir(folder) == ["a.png"] and (folder / "a.png").read_bytes() == before


def test_predict_gives_inputs_sharing_a_stem_their_own_masks(checkpoint, tmp_path, capsys):
    folder, output = tmp_path / "images", tmp_path / "masks"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = {name: rng.integers(0, 256, (30, 40), dtype=np.uint8) for name in ("a.png", "a.tif", "b.png")}
    for name, pixels in images.items():
        Image.fromarray(pixels).save(folder / name)
    code = cli.main(["predict", "--checkpoint", str(checkpoint), "--input", str(folder),
                     "--output", str(output), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "wrote 3 mask(s)" in out and "a.png -> a.png.png" in out and "a.tif -> a.tif.png" in out
    assert sorted(os.listdir(output)) == ["a.png.png", "a.tif.png", "b.png"]
    model, config = inference.load_for_inference(checkpoint)
    for name, mask_name in (("a.png", "a.png.png"), ("a.tif", "a.tif.png"), ("b.png", "b.png")):
        expected = inference.predict_image(model, data.load_image(folder / name), config["size"]).argmax(0)
        np.testing.assert_array_equal(data.load_mask(output / mask_name, binary=True), expected)


def test_mask_names_never_collide(tmp_path):
    names = ["A.png", "a.tif", "a.tif.tif", "b.png", "c.tif"]
    pairs, note = mask_outputs([tmp_path / "in" / n for n in names], str(tmp_path / "out"), ".png")
    outputs = [os.path.basename(p) for _, p in pairs]
    assert outputs == ["A.png.png", "a.tif.png", "a.tif-2.png", "b.png", "c.png"]
    assert len({o.casefold() for o in outputs}) == len(outputs)
    assert note.startswith("3 input(s) share a file stem")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match=r"--output .*file is a file; give a folder"):
        mask_outputs([tmp_path / "in" / "a.png"], str(tmp_path / "file"), ".png")


# ----------------------------------------------------------------------------- train

def test_train_refuses_an_out_folder_holding_another_run(kaggle, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(kaggle), "--out", str(out)] + TINY) == 0
    best, rows = (out / "best.npz").read_bytes(), read_rows(out / "metrics.csv")
    capsys.readouterr()
    assert cli.main(["train", "--data", str(kaggle), "--out", str(out), "--seed", "1"] + TINY) == 2
    assert re.search(r"--out .*run already holds a training run .*--resume .*last\.npz, or pass "
                     r"--overwrite to replace it\.$", one_error_line(capsys))
    assert (out / "best.npz").read_bytes() == best and read_rows(out / "metrics.csv") == rows
    # --overwrite: a fresh run whose metrics.csv holds its own epochs only.
    (out / "samples_epoch007.png").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    assert cli.main(["train", "--data", str(kaggle), "--out", str(out), "--seed", "1", "--overwrite"] + TINY) == 0
    assert "--overwrite: removed the previous run's" in capsys.readouterr().out
    assert len(read_rows(out / "metrics.csv")) == 1 and (out / "best.npz").read_bytes() != best
    assert not (out / "samples_epoch007.png").exists() and (out / "notes.txt").read_text() == "mine"


def test_resume_continues_in_the_run_it_comes_from(kaggle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--data", str(kaggle), "--out", "other"] + TINY) == 0
    assert cli.main(["train", "--data", str(kaggle), "--out", "mine"] + TINY) == 0
    capsys.readouterr()
    args = TINY[:]
    args[1] = "2"                                       # --epochs 2
    # Without --out: on in other/, not in the default runs/unet.
    assert cli.main(["train", "--data", str(kaggle), "--resume", "other/last.npz"] + args) == 0
    assert "Continuing the run in other (the folder of --resume)." in capsys.readouterr().out
    assert not os.path.exists("runs") and [r["epoch"] for r in read_rows("other/metrics.csv")] == ["1", "2"]
    # The same run named explicitly continues too; another run's folder is refused.
    args[1] = "3"
    assert cli.main(["train", "--data", str(kaggle), "--resume", "other/last.npz", "--out", "other"] + args) == 0
    assert len(read_rows("other/metrics.csv")) == 3
    assert cli.main(["train", "--data", str(kaggle), "--resume", "other/last.npz", "--out", "mine"] + args) == 2
    assert "--out mine already holds a training run" in one_error_line(capsys)
    assert len(read_rows("mine/metrics.csv")) == 1


def _train_unet_example():
    spec = importlib.util.spec_from_file_location("train_unet", os.path.join(REPO, "examples", "train_unet.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_demo_twice_keeps_the_first_run(kaggle, tmp_path, monkeypatch, capsys):
    """`make demo` twice: the second run goes to runs/unet-2 and says so; the first is kept."""
    monkeypatch.chdir(tmp_path)
    example = _train_unet_example()
    assert example.main(["--data", str(kaggle)] + TINY) == 0
    first = (tmp_path / "runs" / "unet" / "best.npz").read_bytes()
    capsys.readouterr()
    assert example.main(["--data", str(kaggle), "--seed", "1"] + TINY) == 0
    out = capsys.readouterr().out
    assert "runs/unet holds an earlier run, so this one goes to runs/unet-2 (--out to choose)." in out
    assert "outputs in runs/unet-2" in out
    assert (tmp_path / "runs" / "unet" / "best.npz").read_bytes() == first
    assert len(read_rows(tmp_path / "runs" / "unet" / "metrics.csv")) == 1
    assert len(read_rows(tmp_path / "runs" / "unet-2" / "metrics.csv")) == 1


def test_choose_run_folder_rules(tmp_path):
    run = tmp_path / "run"
    assert choose_run_folder(str(run), given=True) == (str(run), None)      # nothing there yet
    run.mkdir()
    (run / "notes.txt").write_text("x")
    assert choose_run_folder(str(run), given=True) == (str(run), None)      # no run in it
    (run / "interrupted.npz").write_bytes(b"")
    with pytest.raises(UsageError, match="already holds a training run"):
        choose_run_folder(str(run), given=True)
    assert choose_run_folder(str(run), given=True, resume=str(run / "interrupted.npz")) == (str(run), None)
    (tmp_path / "run-2").mkdir()
    (tmp_path / "run-2" / "metrics.csv").write_text("")
    assert choose_run_folder(str(run) + "/", given=False)[0] == str(tmp_path / "run-3")


def test_a_new_trainer_run_starts_its_own_metrics_table(tmp_path):
    """seg.train used directly: a run from epoch 0 in a folder with an old metrics.csv writes a
    fresh table instead of appending to the old one (a resume rewrites it from its history)."""
    (tmp_path / "metrics.csv").write_text("epoch,train_loss\n1,9.0\n2,8.0\n")
    rng = np.random.default_rng(0)
    images = rng.random((4, 16, 16)).astype(np.float32)
    masks = (images > 0.5).astype(np.uint8)
    dataset = data.Dataset(list(range(4)), lambda i: (images[i], masks[i]))
    minidl.manual_seed(0)
    model = models.build("unet", num_classes=2, in_channels=1, depth=2, features_root=2)
    result = train(model, data.DataLoader(dataset, batch_size=2), data.DataLoader(dataset, batch_size=2),
                   losses.get_loss("ce"), optim.Adam(model.parameters(), lr=1e-3), epochs=1,
                   out_dir=tmp_path, plot=False, progress=False, log=None)
    rows = read_rows(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1"] and float(rows[0]["train_loss"]) == pytest.approx(
        result.history[0]["train_loss"])
