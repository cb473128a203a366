"""Errors while loading a sample (a file damaged or changed after the data check, a disk error)
reach the training loop as one sentence naming the file; last.npz stays intact and resumable."""
import errno
import threading

import pytest

import minidl
from minidl import optim
from seg import cli, data, losses
from seg.checkpoints import read_checkpoint_meta
from seg.data import SampleLoadError
from seg.errors import TrainingDataError
from seg.models.unet import UNet
from seg.train import Trainer


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return data.write_synthetic_dataset(tmp_path_factory.mktemp("kaggle"), n_subjects=2,
                                        images_per_subject=4, size=(24, 32), n_test=0)


def failing(broken):
    """load_sample, except for samples whose image number is in `broken`: a disk error."""
    def load(sample):
        if sample.n in broken:
            raise OSError(errno.EIO, "Input/output error")
        return data.load_sample(sample)
    return load


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "seg-data-prefetch"]


@pytest.mark.parametrize("prefetch", [True, False])
def test_worker_error_names_the_sample_in_the_main_thread(root, prefetch):
    samples = data.find_kaggle_samples(root)
    loader = data.DataLoader(data.Dataset(samples, failing({3})), batch_size=2, prefetch=prefetch)
    with pytest.raises(SampleLoadError, match=r"sample .*1_3\.tif could not be loaded \(OSError: "
                                              r"\[Errno 5\] Input/output error\)") as info:
        list(loader)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.name == samples[2].image_path
    assert not prefetch_threads()


def make_trainer(samples, load, out_dir):
    minidl.manual_seed(0)
    model = UNet(2, 1, depth=2, features_root=2, padding="same", batch_norm=True)
    resize = data.Resize((16, 16))
    train = data.DataLoader(data.Dataset(samples[:6], load, preprocess=resize), batch_size=2, shuffle=True)
    val = data.DataLoader(data.Dataset(samples[6:], load, preprocess=resize), batch_size=2)
    return Trainer(model, train, val, losses.get_loss("ce_dice"), optim.Adam(model.parameters()),
                   out_dir=out_dir, plot=False, progress=False, log=None)


def test_failure_mid_run_keeps_last_checkpoint_and_resumes(root, tmp_path):
    samples = data.find_kaggle_samples(root)
    broken = set()
    trainer = make_trainer(samples, failing(broken), tmp_path)
    trainer.fit(1)
    broken.add(2)                      # the disk fails in epoch 2 (no cache: files are read again)
    with pytest.raises(TrainingDataError) as info:
        trainer.fit(3)
    message = str(info.value)
    assert message.startswith("Training stopped in epoch 2: sample ") and "1_2.tif" in message
    assert f"checkpoint {tmp_path / 'last.npz'} of epoch 1 is intact" in message
    assert f"--resume {tmp_path / 'last.npz'}" in message and "\n" not in message
    assert read_checkpoint_meta(tmp_path / "last.npz")["epoch"] == 1
    assert not prefetch_threads()
    broken.clear()                     # the file is fixed: resume finishes the run
    result = make_trainer(samples, failing(broken), tmp_path).fit(3, resume=tmp_path / "last.npz")
    assert result.epochs_done == 3 and [r["epoch"] for r in result.history] == [1, 2, 3]


def test_cli_prints_one_sentence_without_traceback(root, tmp_path, capsys, monkeypatch):
    real = data.samples.load_image

    def changed_after_the_check(path, *args):     # (path, channels)
        if str(path).endswith("2_1.tif"):
            raise ValueError(f"Could not read TIFF file {path} (unexpected end of file); the file "
                             "is damaged or not a TIFF.")
        return real(path, *args)

    monkeypatch.setattr(data.samples, "load_image", changed_after_the_check)
    out = tmp_path / "run"
    code = cli.main(["train", "--data", str(root), "--epochs", "1", "--size", "16x16", "--depth", "2",
                     "--features-root", "2", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "2_1.tif" in err and "no checkpoint was written yet" in err
    assert not (out / "last.npz").exists()
