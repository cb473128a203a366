"""`python -m seg train --distributed` (seg/distributed_training.py): 2-rank runs under mpiexec
on tiny synthetic data, compared with one process.

The jobs run tests/seg_job.py (`python -m seg` with an optional fault on one rank) on 2 ranks,
one thread each; they are skipped, with the reason, only where MPI is not installed.
"""
import csv
import os
import sys

import numpy as np
import pytest

import minidl
from seg import cli, data, distributed_training, setup
from seg.checkpoints import load_checkpoint, read_checkpoint_meta
from seg.train import Trainer

from test_distributed import needs_mpi, run_on_two_ranks

HERE = os.path.dirname(os.path.abspath(__file__))
JOB = os.path.join(HERE, "seg_job.py")


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    """3 subjects of 3 frames: 6 training and 3 validation images."""
    root = tmp_path_factory.mktemp("dist_data") / "kaggle"
    return data.write_synthetic_dataset(root, n_subjects=3, images_per_subject=3, size=(40, 56),
                                        n_test=1)


def train_argv(root, out, epochs, *extra, device="cpu"):
    """A tiny valid-padding U-Net (the mirror padding goes through the DDP wrapper too)."""
    return ["train", "--data", str(root), "--epochs", str(epochs), "--batch-size", "2",
            "--size", "24x32", "--depth", "2", "--features-root", "2", "--padding", "valid",
            "--val-fraction", "0.34", "--out", str(out), "--no-progress", "--plot-every", "1",
            "--device", device, *extra]


def two_ranks(argv, timeout=180):
    done, seconds = run_on_two_ranks([JOB, *argv], timeout=timeout)
    return done, seconds


def metrics_rows(out):
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def two_epochs_on_cpu(kaggle, tmp_path_factory):
    """A 2-rank, 2-epoch run with --sync-bn on the CPU: (its folder, the completed process)."""
    out = tmp_path_factory.mktemp("dist_run") / "run"
    done, _ = two_ranks(train_argv(kaggle, out, 2, "--distributed", "--sync-bn"))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def one_process_validation(root, checkpoint, device="cpu"):
    """The validation figures of `checkpoint` scored by one process on the whole split."""
    scratch = os.path.join(os.path.dirname(checkpoint), "one-process")   # not the run's own folder
    args = cli.parse_train_args(train_argv(root, scratch, 1, device=device)[1:])
    run = setup.set_up_training(args, log=lambda *a: None)
    load_checkpoint(checkpoint, run.model)
    trainer = Trainer(run.model, None, run.data.val_loader, run.loss_fn, run.optimizer,
                      out_dir=scratch,
                      device=device, plot=False, progress=False, log=None)
    scores, _ = trainer.evaluate(run.data.val_loader)
    return scores, run


@needs_mpi
def test_two_ranks_write_once_and_validate_like_one_process(kaggle, two_epochs_on_cpu, tmp_path,
                                                            device):
    if device == "cpu":
        out, done = two_epochs_on_cpu
    else:   # the same run on the GPU (both ranks share it: the "mpi" backend)
        out = tmp_path / "run"
        done, _ = two_ranks(train_argv(kaggle, out, 2, "--distributed", "--sync-bn",
                                       device=device))
        assert done.returncode == 0, done.stderr[-3000:]
    # Rank 0 alone prints and writes: one summary line, one metrics.csv, no stray files.
    assert done.stdout.count("final validation Dice") == 1
    assert done.stdout.count("epoch 2/2") == 1
    names = sorted(os.listdir(out))
    assert [n for n in names if n.endswith(".npz")] == ["best.npz", "last.npz"]
    assert not [n for n in names if "tmp" in n]
    rows = metrics_rows(out)
    assert [row["epoch"] for row in rows] == [1, 2]
    meta = read_checkpoint_meta(out / "last.npz")
    assert meta["world_size"] == 2 and meta["epoch"] == 2
    # The checkpoint has the model's own keys (DDP's .module) and loads into the plain model;
    # its validation figures, scored by one process on the whole split, are those the two
    # ranks summed up: the same pixels and images, not an average of the ranks' averages.
    scores, run = one_process_validation(kaggle, str(out / "last.npz"), device)
    assert sorted(minidl.load(str(out / "last.npz"))["model"]) == sorted(run.model.state_dict())
    for key in ("val_dice", "val_iou", "val_accuracy"):
        assert rows[-1][key] == pytest.approx(scores[key], rel=1e-12, abs=1e-12), key
    # The loss is a mean over each batch, and the ranks batch the images differently.
    assert rows[-1]["val_loss"] == pytest.approx(scores["val_loss"], rel=1e-5)


@needs_mpi
def test_resume_on_two_ranks_continues_exactly(kaggle, two_epochs_on_cpu, tmp_path):
    whole, _ = two_epochs_on_cpu
    out = tmp_path / "run"
    done, _ = two_ranks(train_argv(kaggle, out, 1, "--distributed", "--sync-bn"))
    assert done.returncode == 0, done.stderr[-3000:]
    done, _ = two_ranks(train_argv(kaggle, out, 2, "--distributed", "--sync-bn",
                                   "--resume", str(out / "last.npz")))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resumed from" in done.stdout
    resumed, uninterrupted = metrics_rows(out), metrics_rows(whole)
    for key in ("train_loss", "val_loss", "val_dice", "val_iou", "val_accuracy", "lr"):
        assert [row[key] for row in resumed] == [row[key] for row in uninterrupted], key
    a, b = minidl.load(str(out / "last.npz"))["model"], minidl.load(str(whole / "last.npz"))["model"]
    for key in b:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@needs_mpi
def test_an_error_on_one_rank_ends_the_distributed_run(kaggle, tmp_path):
    out = tmp_path / "run"
    # Rank 0 left waiting for rank 1 would hang: the timeout fails the test then.
    done, _ = two_ranks(["--fail-on-rank", "1",
                         *train_argv(kaggle, out, 2, "--distributed")], timeout=120)
    assert done.returncode != 0
    assert "rank 1 fails on purpose" in done.stderr
    assert "final validation Dice" not in done.stdout     # rank 0 never finished
    assert not os.path.exists(out / "metrics.csv")        # it was waiting in the first epoch


@needs_mpi
def test_resuming_with_another_number_of_ranks_says_how_many(kaggle, two_epochs_on_cpu, tmp_path,
                                                           capsys):
    whole, _ = two_epochs_on_cpu
    # This pytest process is a world of one rank (MPI singleton).
    code = cli.main(train_argv(kaggle, tmp_path / "run", 3, "--distributed",
                               "--resume", str(whole / "last.npz")))
    assert code == 2
    err = capsys.readouterr().err
    assert "written by a run of 2 rank(s) and this run has 1" in err
    assert "mpiexec -n 2" in err


def test_sync_bn_without_distributed_is_refused(kaggle, tmp_path, capsys):
    assert cli.main(train_argv(kaggle, tmp_path / "run", 1, "--sync-bn")) == 2
    assert "--sync-bn synchronises batch norm across the ranks" in capsys.readouterr().err


@needs_mpi
def test_one_rank_trains_exactly_like_one_process(kaggle, tmp_path):
    # Rank 0 keeps the one-process streams: same order, augmentation and weights, so a world of
    # one rank (this pytest process) writes the figures of a run without --distributed.
    assert cli.main(train_argv(kaggle, tmp_path / "plain", 1)) == 0
    assert cli.main(train_argv(kaggle, tmp_path / "dist", 1, "--distributed")) == 0
    plain, one_rank = metrics_rows(tmp_path / "plain"), metrics_rows(tmp_path / "dist")
    for key in ("train_loss", "val_loss", "val_dice", "val_iou", "val_accuracy", "lr"):
        assert [row[key] for row in one_rank] == [row[key] for row in plain], key


def test_other_ranks_draw_their_own_random_streams():
    seeds = [distributed_training.rank_seed(5, rank) for rank in range(4)]
    assert seeds[0] == 5                      # rank 0: the one-process streams
    assert len(set(seeds)) == 4
    assert distributed_training.rank_seed(6, 1) != seeds[1]


def test_distributed_without_mpi_names_the_dist_extra(kaggle, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)   # makes `from mpi4py import MPI` fail
    assert cli.main(train_argv(kaggle, tmp_path / "run", 1, "--distributed")) == 2
    err = capsys.readouterr().err
    assert '.[dist]' in err and len(err.strip().splitlines()) == 1
