"""The command-line side of issue 16: --amp (autocast + GradScaler, its state in checkpoints),
--cuda-graph (GPU only; elsewhere one line and eager training), --matmul-precision."""
import numpy as np
import pytest

import minidl
from minidl import amp, optim
from seg import acceleration, cli, losses
from seg.checkpoints import read_checkpoint_meta
from seg.models.unet import UNet
from seg.train import Trainer
from test_train import loaders


def _trainer(out_dir, device="cpu", log=None, **options):
    minidl.manual_seed(0)
    model = UNet(2, 1, depth=2, features_root=4, padding="same", batch_norm=True)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    train_loader, val_loader = loaders(augment=False)
    return Trainer(model, train_loader, val_loader, losses.get_loss("ce_dice"), opt,
                   out_dir=out_dir, device=device, progress=False, plot=False, log=log, **options)


def test_amp_flags_become_autocast_and_a_scaler_for_fp16_only():
    bf16 = acceleration.trainer_options(cli.parse_train_args(["--amp", "bf16"]))
    fp16 = acceleration.trainer_options(cli.parse_train_args(["--amp", "fp16"]))
    plain = acceleration.trainer_options(cli.parse_train_args([]))
    assert bf16["scaler"] is None                       # bfloat16 has float32's range
    assert isinstance(fp16["scaler"], amp.GradScaler) and fp16["scaler"].is_enabled()
    assert plain == {"cuda_graph": False}
    with fp16["step_context"]():
        assert amp.is_autocast_enabled()
    assert not amp.is_autocast_enabled()


@pytest.mark.parametrize("flag,dtype", [("bf16", np.float32), ("fp16", np.float16)])
def test_training_forward_runs_in_the_low_precision(device, flag, dtype, tmp_path):
    seen = []
    loss_fn = losses.get_loss("ce_dice")

    def recording_loss(logits, target):
        seen.append((logits.dtype, amp.is_autocast_enabled()))
        return loss_fn(logits, target)

    args = cli.parse_train_args(["--amp", flag, "--device", "cpu"])
    args.device = device
    trainer = _trainer(tmp_path, device, **acceleration.trainer_options(args))
    trainer.loss_fn = recording_loss
    result = trainer.fit(1)
    training = [d for d, autocast in seen if autocast]
    validation = [d for d, autocast in seen if not autocast]
    # float16 logits are float16 arrays; bfloat16 ones are float32 arrays of bfloat16 values.
    assert training and all(d == dtype for d in training)
    assert validation and all(d == np.float32 for d in validation)
    assert np.isfinite(result.last["train_loss"]) and result.last["val_dice"] > 0
    for p in trainer.model.parameters():               # master weights stay float32
        assert p.dtype == np.float32


def test_grad_scaler_state_is_saved_and_restored_on_resume(tmp_path):
    trainer = _trainer(tmp_path, scaler=amp.GradScaler(init_scale=2.0 ** 10, growth_interval=2))
    trainer.fit(1)
    saved = read_checkpoint_meta(tmp_path / "last.npz")["scaler"]
    assert saved == trainer.scaler.state_dict()
    # 2 clean steps of 2 batches grow the scale once; a fresh scaler starts elsewhere.
    assert saved["scale"] == 2.0 ** 11 and saved["growth_interval"] == 2
    resumed = _trainer(tmp_path, scaler=amp.GradScaler(init_scale=4.0))
    resumed.resume(tmp_path / "last.npz")
    assert resumed.scaler.state_dict() == saved


def test_seg_train_with_amp_fp16_writes_the_scaler_into_the_checkpoint(tmp_path, capsys):
    from seg import data
    root = data.write_synthetic_dataset(tmp_path / "kaggle", n_subjects=3, images_per_subject=3,
                                        size=(40, 56), n_test=1)
    out = tmp_path / "run"
    run = ["train", "--data", str(root), "--batch-size", "4", "--size", "32x32", "--depth", "2",
           "--features-root", "2", "--out", str(out), "--no-progress", "--val-fraction", "0.34",
           "--amp", "fp16"]
    assert cli.main(run + ["--epochs", "1"]) == 0
    scale = read_checkpoint_meta(out / "last.npz")["scaler"]["scale"]
    assert 0 < scale <= 2.0 ** 16 and np.log2(scale) == int(np.log2(scale))   # halved on inf only
    assert cli.main(run + ["--epochs", "2", "--resume", str(out / "last.npz")]) == 0
    assert "Resumed from" in capsys.readouterr().out
    assert read_checkpoint_meta(out / "last.npz")["epoch"] == 2


def test_cuda_graph_falls_back_with_one_line_and_trains_as_eager(device, tmp_path):
    eager = _trainer(tmp_path / "eager", device).fit(2)
    lines = []
    trainer = _trainer(tmp_path / "graph", device, log=lines.append, cuda_graph=True)
    graphed = trainer.fit(2)
    for key in ("train_loss", "val_loss", "val_dice"):
        np.testing.assert_allclose([r[key] for r in graphed.history],
                                   [r[key] for r in eager.history], rtol=1e-5, err_msg=key)
    notes = [line for line in lines if line.startswith("--cuda-graph")]
    if trainer.graph.reason is not None:       # on the CPU, or a CuPy that cannot capture
        assert len(notes) == 1 and notes[0].endswith("; training eagerly.")
        if device == "cpu":
            assert "need --device gpu" in notes[0]


def test_cuda_graph_refuses_the_fp16_scaler_with_its_reason(tmp_path):
    lines = []
    steps = acceleration.GraphedSteps(None, None, None, "gpu", scaler=amp.GradScaler(),
                                      log=lines.append)
    assert "GradScaler" in steps.reason and "--amp bf16" in lines[0]


def test_matmul_precision_flag_sets_minidls_setting():
    before = minidl.get_float32_matmul_precision()
    try:
        acceleration.apply_matmul_precision(cli.parse_train_args(["--matmul-precision", "high"]))
        assert minidl.get_float32_matmul_precision() == "high"
        acceleration.apply_matmul_precision(cli.parse_train_args(["--matmul-precision", "highest"]))
        assert minidl.get_float32_matmul_precision() == "highest"
        minidl.set_float32_matmul_precision("high")
        acceleration.apply_matmul_precision(cli.parse_train_args([]))    # no flag: unchanged
        assert minidl.get_float32_matmul_precision() == "high"
    finally:
        minidl.set_float32_matmul_precision(before)
    with pytest.raises(SystemExit):
        cli.parse_train_args(["--matmul-precision", "medium"])


# ----------------------------------------------------------------------------- capturable Adam
def _adam_run(cls, device, steps=4, **options):
    from minidl import backend, nn
    minidl.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)).to(device)
    opt = cls(model.parameters(), lr=1e-2, weight_decay=0.1, **options)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = backend.to_device(rng.standard_normal(p.shape).astype(np.float32), device)
        opt.step()
    return model, opt


@pytest.mark.parametrize("cls", [optim.Adam, optim.AdamW])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_capturable_adam_takes_adams_steps_with_its_step_count_on_the_device(device, cls, amsgrad):
    from minidl import backend
    plain, _ = _adam_run(cls, device, amsgrad=amsgrad)
    model, opt = _adam_run(cls, device, amsgrad=amsgrad, capturable=True)
    for p, q in zip(plain.parameters(), model.parameters()):
        # (the compiled kernel and the array expressions may round the last bit differently)
        np.testing.assert_allclose(backend.to_numpy(q.data), backend.to_numpy(p.data), rtol=1e-6,
                                   atol=1e-7)
    step = next(iter(opt.state.values()))["step"]
    assert step.shape == () and backend.device_of(step) == device and float(step) == 4


def test_capturable_adam_keeps_no_changing_python_number_and_resumes_plain_adam(device):
    from minidl import cuda
    for capturable, expected in ((False, 1), (True, 0)):
        model, opt = _adam_run(optim.Adam, device, steps=1, capturable=capturable)
        grads = [p.grad for p in model.parameters()]

        def step():
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            opt.step()
        _, reasons = cuda.host_state_changes(step, (), opt)
        assert len(reasons) == expected, reasons     # plain Adam: its Python step count
    # A state saved by plain Adam continues under capturable Adam, and back.
    plain, plain_opt = _adam_run(optim.Adam, device, steps=2)
    model, opt = _adam_run(optim.Adam, device, steps=2, capturable=True)
    opt.load_state_dict(plain_opt.state_dict())
    plain_opt.load_state_dict(opt.state_dict())
    for p in list(model.parameters()) + list(plain.parameters()):
        p.grad = p.data * 0 + 1
    opt.step()
    plain_opt.step()
    for o in (opt, plain_opt):
        assert float(next(iter(o.state.values()))["step"]) == 3
