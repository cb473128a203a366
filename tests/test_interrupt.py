"""Ctrl-C during training (issue 20, item 5): taken between batches, never inside a kernel;
interrupted.npz is always written; only checkpoints that exist are suggested; a run without a
validation score yet says so instead of "best validation Dice -inf"."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import minidl
from minidl import optim
from seg import data, losses
from seg.interrupt import DeferredInterrupt, is_interrupt
from seg.models.unet import UNet
from seg.train import Trainer
from image_folders import random_folder

ROOT = Path(__file__).resolve().parents[1]


def _tiny_loaders(n=8, size=16):
    rng = np.random.default_rng(0)
    images = [rng.random((size, size), dtype=np.float32) for _ in range(n)]
    masks = [(im > 0.5).astype(np.uint8) for im in images]
    load = lambda i: (images[i], masks[i])  # noqa: E731
    return (data.DataLoader(data.Dataset(list(range(n - 2)), load), batch_size=2),
            data.DataLoader(data.Dataset([n - 2, n - 1], load), batch_size=2))


class _CtrlCAt:
    """A loader that presses Ctrl-C (SIGINT to this process) when batch `at` is handed out."""

    def __init__(self, loader, at):
        self.loader, self.at = loader, at

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader, 1):
            if i == self.at:
                os.kill(os.getpid(), signal.SIGINT)
            yield batch


def _trainer(out_dir, train_loader, val_loader, log):
    minidl.manual_seed(0)
    model = UNet(2, 1, depth=2, features_root=2, padding="same")
    return Trainer(model, train_loader, val_loader, losses.get_loss("ce"),
                   optim.Adam(model.parameters(), lr=1e-3), out_dir=out_dir, plot=False,
                   progress=False, log=log)


def test_ctrl_c_in_epoch_one_saves_and_suggests_only_what_exists(tmp_path):
    train_loader, val_loader = _tiny_loaders()
    lines = []
    trainer = _trainer(tmp_path, _CtrlCAt(train_loader, 2), val_loader, lines.append)
    result = trainer.fit(3)
    assert result.interrupted and result.epochs_done == 0
    assert (tmp_path / "interrupted.npz").exists() and not (tmp_path / "last.npz").exists()
    text = "\n".join(lines)
    assert "Interrupted in epoch 1" in text and "last.npz" not in text
    # Resuming it: no score exists yet, and the message says so (not "-inf").
    lines.clear()
    again = _trainer(tmp_path / "again", train_loader, val_loader, lines.append)
    again.fit(1, resume=tmp_path / "interrupted.npz")
    assert "no validation score yet" in lines[0] and "inf" not in lines[0]


def test_ctrl_c_in_a_later_epoch_suggests_last_npz(tmp_path):
    train_loader, val_loader = _tiny_loaders()
    lines = []
    trainer = _trainer(tmp_path, train_loader, val_loader, lines.append)
    trainer.fit(1)
    trainer.train_loader = _CtrlCAt(train_loader, 1)
    assert trainer.fit(3).interrupted
    assert f"--resume {tmp_path / 'last.npz'}" in lines[-1] and "after epoch 1" in lines[-1]


def test_ctrl_c_during_a_numba_kernel_waits_for_the_check():
    x = np.random.default_rng(0).random((1, 2, 6, 6), dtype=np.float32)
    with DeferredInterrupt() as interrupt:
        os.kill(os.getpid(), signal.SIGINT)
        y = minidl.functional.max_pool2d(minidl.tensor(x), 2)      # a kernel call, unharmed
        assert y.shape == (1, 2, 3, 3) and interrupt.requested
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_systemerror_caused_by_ctrl_c_counts_as_an_interrupt():
    wrapped = SystemError("<built-in function kernel> returned a result with an exception set")
    wrapped.__cause__ = KeyboardInterrupt()
    assert is_interrupt(wrapped) and is_interrupt(KeyboardInterrupt())
    assert not is_interrupt(SystemError("something else")) and not is_interrupt(ValueError())


def test_sigint_to_a_training_process_exits_130_with_a_checkpoint(tmp_path):
    random_folder(tmp_path / "data", size=24)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "seg", "train", "--data", str(tmp_path / "data"), "--size", "16x16",
           "--depth", "2", "--epochs", "1000", "--batch-size", "2", "--no-progress",
           "--no-augment", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MPLBACKEND": "Agg"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.npz").exists():          # training is under way
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start in 2 minutes"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "SystemError" not in stderr
    assert (out / "interrupted.npz").exists()
    assert f"Resume with --resume {out / 'interrupted.npz'}" in stdout
