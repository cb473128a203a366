"""seg.train: learning, exact resume, safe checkpoints, NaN stop, Ctrl-C; the command line."""
import os

import numpy as np
import pytest

import minidl
from kernels import cuda
from minidl import backend, optim
from seg import cli, data, inference, losses, tiling
from seg.checkpoints import load_checkpoint, read_checkpoint_meta, save_checkpoint
from seg.errors import GPUOutOfMemoryError, NonFiniteLossError
from seg.models.unet import UNet
from seg.train import Trainer


def tiny_images(n=12, size=16, seed=0):
    """Noisy images with a bright disc (the mask) in most of them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, masks = [], []
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        if i % 4:
            cy, cx = rng.uniform(4, size - 4, 2)
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(6, 12)).astype(np.uint8)
        images.append((0.3 + 0.4 * mask + rng.normal(0, 0.1, (size, size))).astype(np.float32))
        masks.append(mask)
    return images, masks


def loaders(batch_size=4, augment=True):
    images, masks = tiny_images()
    load = lambda i: (images[i], masks[i])  # noqa: E731
    aug = data.Augment(rotate=10, elastic_sigma=1.0) if augment else None
    train_set = data.Dataset(list(range(8)), load, transform=aug)
    val_set = data.Dataset(list(range(8, 12)), load)
    return (data.DataLoader(train_set, batch_size=batch_size, shuffle=True, seed=3),
            data.DataLoader(val_set, batch_size=batch_size))


def make(out_dir, seed=0, dropout=0.2, lr=1e-2, scheduler=True, **kw):
    minidl.manual_seed(seed)
    model = UNet(2, 1, depth=2, features_root=4, padding="same", batch_norm=True, dropout=dropout)
    opt = optim.Adam(model.parameters(), lr=lr)
    sched = optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7) if scheduler else None
    train_loader, val_loader = loaders()
    kw.setdefault("plot", False)
    return Trainer(model, train_loader, val_loader, losses.get_loss("ce_dice"), opt, sched,
                   out_dir=out_dir, progress=False, log=None, **kw)


def test_training_lowers_the_loss_and_writes_files(tmp_path):
    trainer = make(tmp_path, dropout=0.0, plot=True, plot_every=3)
    result = trainer.fit(3)
    losses_ = [row["train_loss"] for row in result.history]
    assert losses_[-1] < 0.8 * losses_[0]
    assert result.epochs_done == 3 and not result.interrupted
    for name in ("last.npz", "best.npz", "metrics.csv", "curves.png", "samples_epoch003.png",
                 "samples_last.png"):
        assert (tmp_path / name).exists(), name
    rows = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch,train_loss,val_loss,val_dice") and len(rows) == 4
    assert 0 <= result.last["val_dice"] <= 1
    assert result.best_score == max(r["val_dice"] for r in result.history)
    assert read_checkpoint_meta(tmp_path / "best.npz")["epoch"] == result.best_epoch


def test_no_graph_survives_an_epoch(tmp_path):
    """Memory must not grow with steps: after training no autograd node is left alive."""
    import gc
    from minidl.function import Function

    def nodes():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, Function))

    trainer = make(tmp_path)
    before = nodes()
    trainer.fit(2)
    assert nodes() == before
    assert all(isinstance(row["train_loss"], float) for row in trainer.history)


def test_resume_continues_exactly(tmp_path):
    full = make(tmp_path / "full").fit(3)
    make(tmp_path / "part").fit(1)
    # A new model with other initial weights: everything must come from the checkpoint.
    resumed = make(tmp_path / "part", seed=99).fit(3, resume=tmp_path / "part" / "last.npz")
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for key in ("train_loss", "val_loss", "val_dice", "lr"):
        np.testing.assert_allclose([r[key] for r in resumed.history], [r[key] for r in full.history],
                                   rtol=1e-6, err_msg=key)
    assert len((tmp_path / "part" / "metrics.csv").read_text().strip().splitlines()) == 4


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    trainer = make(tmp_path)
    trainer.fit(1)
    path = tmp_path / "last.npz"
    before = {k: v.copy() for k, v in trainer.model.state_dict().items()}

    written = []

    def broken_member(archive, name, array):   # a few arrays written, then the "disk" fails
        if len(written) == 3:
            raise OSError("No space left on device")
        written.append(name)
        real_member(archive, name, array)

    real_member = minidl.serialization._write_member
    monkeypatch.setattr(minidl.serialization, "_write_member", broken_member)
    for p in trainer.model.parameters():
        p.data = p.data + 1
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, trainer.model, trainer.optimizer)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["best.npz", "last.npz", "metrics.csv"]   # no temp left
    model = UNet(2, 1, depth=2, features_root=4, padding="same", batch_norm=True, dropout=0.2)
    assert load_checkpoint(path, model)["epoch"] == 1
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(backend.to_numpy(v), backend.to_numpy(before[k]), err_msg=k)


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path):
    trainer = make(tmp_path)
    real, calls = trainer.loss_fn, {"n": 0}

    def loss_fn(logits, target):
        loss = real(logits, target)
        if minidl.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 3:            # epoch 2, step 1 (two batches per epoch)
                return loss * float("nan")
        return loss

    trainer.loss_fn = loss_fn
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2, step 1 .*"
                                                 r"last good checkpoint .*last\.npz \(epoch 1\) is kept"):
        trainer.fit(3)
    saved = UNet(2, 1, depth=2, features_root=4, padding="same", batch_norm=True, dropout=0.2)
    assert load_checkpoint(tmp_path / "last.npz", saved)["epoch"] == 1
    for (name, p), q in zip(trainer.model.named_parameters(), saved.parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=name)   # bad step not applied


def _cupy_out_of_memory():
    """An exception that looks like CuPy's (module cupy.cuda.memory), without CuPy."""
    kind = type("OutOfMemoryError", (MemoryError,), {"__module__": "cupy.cuda.memory"})
    return kind("Out of memory allocating 1,073,741,824 bytes (allocated so far: 0 bytes).")


def test_gpu_out_of_memory_names_the_batch_and_what_to_lower(tmp_path):
    trainer = make(tmp_path)
    real = trainer.loss_fn

    def loss_fn(logits, target):
        if minidl.is_grad_enabled():
            raise _cupy_out_of_memory()
        return real(logits, target)

    trainer.loss_fn = loss_fn
    with pytest.raises(GPUOutOfMemoryError, match=r"out of memory on a training batch of 4 "
                       r"image\(s\) of 16x16 pixels \(Out of memory allocating .*\); try a "
                       r"smaller batch \(--batch-size 2\), smaller images \(--size\)"):
        trainer.fit(1)
    # Any other error passes through unchanged.
    trainer.loss_fn = lambda logits, target: (_ for _ in ()).throw(KeyError("x"))
    with pytest.raises(KeyError):
        trainer.fit(1)


def test_gpu_out_of_memory_in_prediction_names_the_tiles_and_what_to_lower(monkeypatch):
    model = UNet(2, 1, depth=2, features_root=4, padding="same")

    def forward(x):
        raise _cupy_out_of_memory()
    monkeypatch.setattr(model, "forward", forward)
    image = np.zeros((20, 24), np.float32)
    with pytest.raises(GPUOutOfMemoryError, match=r"tile prediction batch of 1 image\(s\) of "
                       r"\d+x\d+ pixels .*; try predicting on the CPU \(--device cpu\)\."):
        inference.predict_image(model, image, size=(16, 16))
    # Called directly, predict_tiled names the batch of tiles and what to lower.
    with pytest.raises(GPUOutOfMemoryError, match=r"tile prediction batch of 2 image\(s\) of "
                       r"40x40 pixels .*; try a smaller batch_size \(it is 2\) or tile_size, or "
                       r"the CPU"):
        tiling.predict_tiled(model, np.zeros((60, 60), np.float32), tile_size=40, batch_size=2)


def test_is_out_of_memory_recognises_only_gpu_allocation_failures():
    assert backend.is_out_of_memory(_cupy_out_of_memory())
    cublas = type("CUBLASError", (RuntimeError,), {"__module__": "cupy_backends.cuda.libs.cublas"})
    assert backend.is_out_of_memory(cublas("CUBLAS_STATUS_ALLOC_FAILED"))
    assert not backend.is_out_of_memory(MemoryError("host memory"))
    assert not backend.is_out_of_memory(cublas("CUBLAS_STATUS_INVALID_VALUE"))


def test_ctrl_c_saves_and_returns(tmp_path):
    trainer = make(tmp_path)
    real_loader = trainer.train_loader

    class Interrupting:
        def __len__(self):
            return len(real_loader)

        def set_epoch(self, epoch):
            self.epoch = epoch
            real_loader.set_epoch(epoch)

        def __iter__(self):
            for i, batch in enumerate(real_loader):
                if self.epoch == 1 and i == 1:
                    raise KeyboardInterrupt
                yield batch

    trainer.train_loader = Interrupting()
    result = trainer.fit(3)
    assert result.interrupted and result.epochs_done == 1
    meta = read_checkpoint_meta(tmp_path / "interrupted.npz")
    assert meta["epoch"] == 1 and meta["interrupted_in_epoch"] == 2


# ----------------------------------------------------------------------------- command line

@pytest.mark.parametrize("argv, message", [
    (["train", "--epochs", "0"], "--epochs: '0' must be at least 1"),
    (["train", "--size", "12xab"], "size '12xab' is not HEIGHTxWIDTH"),
    (["train", "--padding", "full"], "invalid choice: 'full'"),
    (["train", "--loss", "focal"], "invalid choice: 'focal'"),
    (["predict", "--checkpoint", "x.npz"], "the following arguments are required: --input, --output"),
    (["fly"], "invalid choice: 'fly'"),
])
def test_cli_argument_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_checked_errors_exit_2(tmp_path, capsys, monkeypatch):
    assert cli.main(["train", "--data", str(tmp_path / "nope")]) == 2
    assert "--data folder" in capsys.readouterr().err
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "c.npz"), "--input", str(tmp_path),
                     "--output", str(tmp_path / "o")]) == 2
    assert "holds no" in capsys.readouterr().err
    # No CuPy: one sentence telling how to install the gpu extra.
    monkeypatch.setattr(cuda, "_cupy", None)
    monkeypatch.setattr(cuda, "_cupy_error", ImportError("No module named 'cupy'"))
    assert cli.main(["train", "--device", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install" in err and ".[gpu]" in err and len(err.splitlines()) == 1


def test_cli_train_predict_evaluate_models(tmp_path, capsys):
    root = data.write_synthetic_dataset(tmp_path / "kaggle", n_subjects=3, images_per_subject=3,
                                        size=(40, 56), n_test=2)
    out = tmp_path / "run"
    code = cli.main(["train", "--data", str(root), "--epochs", "1", "--batch-size", "4",
                     "--size", "24x32", "--depth", "2", "--features-root", "2", "--padding", "valid",
                     "--out", str(out), "--no-progress", "--val-fraction", "0.34"])
    assert code == 0
    assert "final validation Dice" in capsys.readouterr().out
    code = cli.main(["predict", "--checkpoint", str(out / "best.npz"), "--input", str(root / "test"),
                     "--output", str(tmp_path / "masks"), "--format", "tiff", "--no-progress"])
    assert code == 0
    written = sorted(os.listdir(tmp_path / "masks"))
    assert written == ["1.tif", "2.tif"]
    mask = data.load_mask(tmp_path / "masks" / "1.tif", binary=True)
    assert mask.shape == (40, 56)
    assert cli.main(["evaluate", "--checkpoint", str(out / "best.npz"), "--data", str(root),
                     "--split", "val", "--no-progress"]) == 0
    assert "3 images (val): Dice (Kaggle)" in capsys.readouterr().out
    assert cli.main(["models"]) == 0
    assert "unet" in capsys.readouterr().out.split()
