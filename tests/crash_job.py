"""The training run that tests/test_crash_safety.py kills with SIGKILL, and the same run in
one piece for the reference.

    python tests/crash_job.py OUT_DIR DEVICE [--slow-save]

Trains a tiny U-Net for EPOCHS epochs into OUT_DIR, resuming from OUT_DIR/last.npz when it
exists. It prints "training" once set up, so the test can time its kills from there.
--slow-save makes every checkpoint write slow (a pause per stored array), so that kills at
random moments often land while a checkpoint is being written. With JOB_FAKE_CUPY=1 in the
environment "gpu" runs on tests/fake_cupy.py's host emulation of CuPy.
"""
import os
import sys
import time

import numpy as np

import minidl
from minidl import optim, serialization
from seg import data, losses
from seg.models.unet import UNet
from seg.train import Trainer

EPOCHS = 4
SIZE = 16


def tiny_loaders():
    """8 training and 4 validation images (SIZE x SIZE) with a bright square as the mask."""
    rng = np.random.default_rng(0)
    images, masks = [], []
    for i in range(12):
        mask = np.zeros((SIZE, SIZE), np.uint8)
        y, x = rng.integers(2, SIZE - 8, 2)
        mask[y:y + 6, x:x + 6] = i % 3 != 0
        images.append((0.3 + 0.4 * mask + rng.normal(0, 0.1, mask.shape)).astype(np.float32))
        masks.append(mask)
    load = lambda i: (images[i], masks[i])  # noqa: E731
    train_set = data.Dataset(list(range(8)), load, transform=data.Augment(rotate=10, elastic_sigma=1.0))
    val_set = data.Dataset(list(range(8, 12)), load)
    return (data.DataLoader(train_set, batch_size=4, shuffle=True, seed=3),
            data.DataLoader(val_set, batch_size=4))


def make_trainer(out_dir, device="cpu"):
    """The run: dropout (minidl's random stream), augmentation, Adam and a schedule, so that an
    exact resume needs every random state and the loader's order back."""
    minidl.manual_seed(0)
    np.random.seed(0)
    model = UNet(2, 1, depth=2, features_root=4, padding="same", batch_norm=True, dropout=0.2)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    sched = optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    train_loader, val_loader = tiny_loaders()
    return Trainer(model, train_loader, val_loader, losses.get_loss("ce_dice"), opt, sched,
                   out_dir=out_dir, device=device, plot=False, progress=False, log=None)


def slow_down_checkpoint_writes(pause=0.001):
    write_member = serialization._write_member

    def slow(archive, name, array):
        time.sleep(pause)
        write_member(archive, name, array)
    serialization._write_member = slow


def main():
    out_dir, device, *flags = sys.argv[1:]
    if os.environ.get("JOB_FAKE_CUPY"):
        import fake_cupy
        fake_cupy.install()
    if "--slow-save" in flags:
        slow_down_checkpoint_writes()
    trainer = make_trainer(out_dir, device)
    last = os.path.join(out_dir, "last.npz")
    print("training", flush=True)
    trainer.fit(EPOCHS, resume=last if os.path.exists(last) else None)
    print("done", flush=True)


if __name__ == "__main__":
    main()
